// What a user sees of this pack in the real frontend (headless Debian chromium, never a downloaded browser) on a
// server whose model folders are empty: the template browser's section for the pack (cards, titles, thumbnails),
// the Missing Models dialog each example raises, and the node search box. Reports JSON; test_frontend.py asserts.
//
// node check_templates.mjs CONFIG.json  (CONFIG: {server, pack, workflows: {name: path}, first, searches,
//                                         user_data_dir, templates_png, missing_png, out})
import fs from "node:fs";
import path from "node:path";

import { launchChromium } from "../../scripts/chromium.mjs";

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));

const report = { page_errors: [], thumbnails: {}, cards: [], missing: {}, search: {} };
const browser = await launchChromium(config.user_data_dir, { width: 1400, height: 900 });

/** Text of each row of the open Missing Models dialog: {label, error, download_enabled}. */
async function readMissingDialog(page) {
  const dialog = page.locator(".p-dialog", { hasText: "Missing Models" });
  await dialog.waitFor({ timeout: 30000 });
  await page.waitForTimeout(500);
  return dialog.evaluate((d) => {
    const rows = [];
    for (const btn of d.querySelectorAll("button")) {
      if (!/copy url/i.test(btn.innerText)) continue;
      const row = btn.closest("div")?.parentElement;
      const label = row?.querySelector("span[title]")?.textContent?.trim() ?? row?.innerText.split("\n")[0];
      const download = [...row.querySelectorAll("button")].find((b) => /download/i.test(b.innerText));
      rows.push({ label, error: row.querySelector(".p-message")?.innerText ?? null,
                  download_enabled: !!download && !download.disabled });
    }
    return rows;
  });
}

async function closeDialogs(page) {
  for (let i = 0; i < 3 && (await page.locator(".p-dialog").count()); i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  page.on("pageerror", (e) => report.page_errors.push(String(e)));
  page.on("response", (r) => {
    const url = decodeURIComponent(r.url());
    if (url.includes(`/workflow_templates/${config.pack}/`) && url.endsWith(".jpg")) {
      report.thumbnails[path.basename(url, ".jpg")] = { status: r.status(), type: r.headers()["content-type"] };
    }
  });
  await page.goto(config.server, { waitUntil: "load", timeout: 120000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.EllaTSCEncode,
                             null, { timeout: 120000 });

  // Template browser -> Extensions -> this pack.
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  await page.getByRole("button", { name: config.pack, exact: true }).click();
  const names = Object.keys(config.workflows);
  await page.waitForFunction((n) => {
    const imgs = [...document.querySelectorAll('[data-testid^="template-workflow-"] img')];
    return imgs.length >= n && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, names.length, { timeout: 60000, polling: 200 }).catch(() => {});
  report.cards = await page.$$eval('[data-testid^="template-workflow-"]', (els) => els.map((e) => ({
    id: e.dataset.testid.replace("template-workflow-", ""),
    lines: e.innerText.split("\n").map((l) => l.trim()).filter(Boolean),
    images: [...e.querySelectorAll("img")].map((i) => ({ src: decodeURIComponent(i.src), width: i.naturalWidth })),
  })));
  await page.screenshot({ path: config.templates_png });

  // Open the first example from its card, as a user would: the Missing Models dialog must offer every file.
  await page.locator(`[data-testid="template-workflow-${config.first}"]`).click();
  report.missing[config.first] = await readMissingDialog(page);
  await page.screenshot({ path: config.missing_png });
  await closeDialogs(page);
  for (const [name, file] of Object.entries(config.workflows)) {
    if (name === config.first) continue;
    const wf = JSON.parse(fs.readFileSync(file, "utf8"));
    await page.evaluate(async ([wf, name]) => window.app.loadGraphData(wf, true, true, name), [wf, name]);
    report.missing[name] = await readMissingDialog(page);
    await closeDialogs(page);
  }

  // Node search box (double-click on an empty canvas): typing a query lists our text-encoder loader; picking
  // it adds the node.
  await page.evaluate(() => window.app.graph.clear());
  for (const query of config.searches) {
    await closeDialogs(page);
    await page.mouse.dblclick(700, 450);
    const input = page.locator(".comfy-vue-node-search-container input").first();
    await input.waitFor({ timeout: 10000 });
    await input.fill(query);
    await page.waitForTimeout(800);
    const options = await page.$$eval("[role=option]", (els) => els.map((e) => e.innerText.replace(/\s+/g, " ")));
    const ours = page.locator("[role=option]", { hasText: "Load ELLA Text Encoder" }).first();
    let added = null;
    if (await ours.count()) {
      await ours.click();
      await page.waitForTimeout(500);
      added = await page.evaluate(() => window.app.graph.nodes.map((n) => n.type));
      await page.evaluate(() => window.app.graph.clear());
    }
    report.search[query] = { options: options.slice(0, 10), added };
  }
} catch (e) {
  report.fatal = String(e.stack ?? e);
} finally {
  await browser.close();
  fs.writeFileSync(config.out, JSON.stringify(report, null, 1));
}
