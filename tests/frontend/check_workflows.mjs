// Drives the real ComfyUI frontend in headless Debian chromium (never a downloaded browser) and reports, as JSON,
// what it sees for each example workflow and for the token-count extension. Assertions live in the pytest side
// (test_frontend.py); this script only observes.
//
// node check_workflows.mjs CONFIG.json   (CONFIG: {server, workflows: {name: path}, user_data_dir, screenshot,
//                                          text_encoder_name, connector_name, long_prompt, short_prompt, out})
import fs from "node:fs";

import { launchChromium } from "../../scripts/chromium.mjs";

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));

const report = { console_errors: [], page_errors: [], http_errors: [], workflows: {}, tokens: {} };
const browser = await launchChromium(config.user_data_dir, { width: 1600, height: 1000 });

async function waitFor(page, fn, arg, timeout = 30000) {
  await page.waitForFunction(fn, arg, { timeout, polling: 100 });
}

try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  page.on("console", (m) => { if (m.type() === "error") report.console_errors.push(m.text()); });
  page.on("pageerror", (e) => report.page_errors.push(String(e)));
  page.on("response", (r) => { if (r.status() >= 400) report.http_errors.push(`${r.status()} ${r.url()}`); });
  await page.goto(config.server, { waitUntil: "load", timeout: 120000 });
  await waitFor(page, () => window.app?.graph && window.LiteGraph && window.app.canvas, null, 120000);
  // Extensions (ours included) are registered once the node definitions have arrived.
  await waitFor(page, () => !!window.LiteGraph.registered_node_types["EllaTSCEncode"], null, 60000);
  report.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));

  for (const [name, file] of Object.entries(config.workflows)) {
    const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
    const seen = await page.evaluate(async ([wf, name]) => {
      const app = window.app;
      await app.loadGraphData(structuredClone(wf), true, true, name);
      const graph = app.graph;
      const registered = window.LiteGraph.registered_node_types;
      const nodes = graph.nodes ?? graph._nodes;
      const linkList = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {});
      const problems = [];
      for (const n of nodes) {
        if (!registered[n.type]) problems.push(`node ${n.id}: type ${n.type} not registered`);
        if (n.has_errors) problems.push(`node ${n.id}: ${n.type} has errors`);
      }
      for (const l of linkList) {
        if (!l) continue;
        const o = graph.getNodeById(l.origin_id), t = graph.getNodeById(l.target_id);
        if (!o) problems.push(`link ${l.id}: origin node ${l.origin_id} missing`);
        else if (!o.outputs?.[l.origin_slot]) problems.push(`link ${l.id}: origin slot ${l.origin_slot} missing`);
        else if (!(o.outputs[l.origin_slot].links ?? []).includes(l.id))
          problems.push(`link ${l.id}: origin output does not list it`);
        if (!t) problems.push(`link ${l.id}: target node ${l.target_id} missing`);
        else if (t.inputs?.[l.target_slot]?.link !== l.id) problems.push(`link ${l.id}: target input not linked`);
      }
      const serialized = graph.serialize();
      const prompt = await app.graphToPrompt();
      return {
        node_count: nodes.length,
        link_count: linkList.filter(Boolean).length,
        problems,
        nodes: serialized.nodes,
        extra: serialized.extra,
        links: serialized.links,
        api_prompt: prompt.output,
      };
    }, [workflow, name]);
    report.workflows[name] = seen;
  }

  // Token count on ELLA Prompt Encode: the loader selects the test's text encoder (set in the file before
  // loading, as a user's saved workflow would). The server's answers are held back 1.5 s, as a first tokenizer
  // load can take, and every state each counter shows meanwhile is recorded (a 20 ms poll of the DOM).
  const tokenWorkflow = JSON.parse(fs.readFileSync(config.workflows[config.token_workflow], "utf8"));
  for (const n of tokenWorkflow.nodes) {
    if (n.type === "EllaTSCTextEncoderLoader") n.widgets_values[0] = config.text_encoder_name;
    if (n.type === "EllaTSCConnectorLoader") n.widgets_values[0] = config.connector_name;
  }
  await page.evaluate(() => {
    const realFetch = window.fetch;
    window.fetch = async (...args) => {
      const url = String(args[0]?.url ?? args[0]);
      if (url.includes("/ella/tokenize")) window.__ellaBodies.push(JSON.parse(args[1]?.body ?? "{}"));
      if (url.includes("/ella/tokenize") && window.__ellaDelayMs) {
        await new Promise((r) => setTimeout(r, window.__ellaDelayMs));
      }
      return realFetch(...args);
    };
    window.__ellaDelayMs = 1500;
    window.__ellaBodies = [];
    window.__ellaStates = [];
    const last = new Map();
    window.__ellaRecord = () => {
      document.querySelectorAll(".ella-token-count").forEach((el, i) => {
        const seen = `${el.dataset.state}|${el.textContent}`;
        if (last.get(el) !== seen) {
          last.set(el, seen);
          window.__ellaStates.push({ el: i, state: el.dataset.state, text: el.textContent });
        }
      });
    };
    window.__ellaPoll = setInterval(window.__ellaRecord, 20);
  });
  await page.evaluate(async (wf) => {
    await window.app.loadGraphData(structuredClone(wf), true, true, "tokens");
  }, tokenWorkflow);
  await waitFor(page, () => {
    const els = [...document.querySelectorAll(".ella-token-count")];
    return els.length > 0 && els.every((el) => el.dataset.state === "ok");
  }, null, 60000);
  report.tokens.first_load = await page.evaluate(() => {
    clearInterval(window.__ellaPoll);
    window.__ellaRecord();  // the final states: on a loaded machine the 20 ms timer can lag behind waitFor's check
    window.__ellaDelayMs = 0;
    return window.__ellaStates;
  });
  report.tokens.request_bodies = await page.evaluate(() => window.__ellaBodies);

  const readTokens = (prompt) => page.evaluate(async (prompt) => {
    const node = window.app.graph.nodes.find((n) => n.comfyClass === "EllaTSCEncode");
    const text = node.widgets.find((w) => w.name === "text");
    text.value = prompt;
    if (text.element) {
      text.element.value = prompt;
      text.element.dispatchEvent(new Event("input"));
    }
    node.ellaTokenInfo = null;
    return node.id;
  }, prompt);
  const waitTokens = async (prompt) => {
    const id = await readTokens(prompt);
    await waitFor(page, ([id, prompt]) => {
      const node = window.app.graph.getNodeById(id);
      return node.ellaTokenInfo && node.ellaTokenInfo.text === prompt &&
        (node.ellaTokenInfo.total !== undefined || node.ellaTokenInfo.error);
    }, [id, prompt], 60000);
    return page.evaluate((id) => {
      const node = window.app.graph.getNodeById(id);
      const widget = node.widgets.find((w) => w.name === "ella_token_count");
      const el = widget?.element;
      return { info: node.ellaTokenInfo, dom_text: el?.textContent ?? null, over: el?.dataset?.over ?? null,
               state: el?.dataset?.state ?? null,
               visible: !!el && el.isConnected && el.offsetParent !== null,
               // Clipping: the text's own height vs the box it is given, and the widget's bottom vs the node's.
               scroll_height: el?.scrollHeight, client_height: el?.clientHeight,
               widget_bottom: (widget?.y ?? 0) + (widget?.computedHeight ?? 0), node_height: node.size[1] };
    }, id);
  };
  report.tokens.short = await waitTokens(config.short_prompt);
  report.tokens.long = await waitTokens(config.long_prompt);
  await page.waitForTimeout(500); // the node grows on the next frame
  report.tokens.long = { ...report.tokens.long, ...(await page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.comfyClass === "EllaTSCEncode");
    const widget = node.widgets.find((w) => w.name === "ella_token_count");
    const el = widget.element;
    return { scroll_height: el.scrollHeight, client_height: el.clientHeight,
             widget_bottom: widget.y + widget.computedHeight, node_height: node.size[1] };
  })) };
  // The widgets still serialise exactly as before (the display widget is never saved or queued).
  report.tokens.serialized = await page.evaluate(() => {
    const n = window.app.graph.serialize().nodes.find((n) => n.type === "EllaTSCEncode");
    return n.widgets_values;
  });
  await page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.comfyClass === "EllaTSCEncode");
    const canvas = window.app.canvas;
    canvas.ds.scale = 1.0;
    canvas.ds.offset = [-node.pos[0] + 450, -node.pos[1] + 250];
    canvas.setDirty(true, true);
  });
  await page.waitForTimeout(800);
  await page.screenshot({ path: config.screenshot });
} catch (e) {
  report.fatal = String(e.stack ?? e);
} finally {
  await browser.close();
  fs.writeFileSync(config.out, JSON.stringify(report, null, 1));
}
