// Screenshots of each example workflow's graph in the real frontend (headless Debian chromium, never a downloaded
// browser), for scripts/make_thumbnails.py.   node thumbnails.mjs CONFIG.json
// CONFIG: {server, viewport, user_data_dir, shots: {workflow.json: out.png}}
import fs from "node:fs";
import path from "node:path";

import { launchChromium } from "./chromium.mjs";

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const size = config.viewport;
const browser = await launchChromium(config.user_data_dir, { width: size, height: size });
try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  await page.goto(config.server, { waitUntil: "load", timeout: 120000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.EllaTSCEncode,
                             null, { timeout: 120000 });
  await page.evaluate(async () => {
    const settings = window.app.extensionManager.setting;
    await settings.set("Comfy.Graph.CanvasInfo", false);  // no FPS / node counters in the picture
    await settings.set("Comfy.Graph.CanvasMenu", false);  // no zoom buttons
    await settings.set("LiteGraph.Canvas.MinFontSizeForLOD", 0);  // draw text at any zoom
    window.app.extensionManager.command.execute("Workspace.ToggleFocusMode");  // no side bars, tabs or menus
  });
  for (const [file, out] of Object.entries(config.shots)) {
    const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
    await page.evaluate(async ([wf, name]) => {
      await window.app.loadGraphData(wf, true, false, name);
      const canvas = window.app.canvas;
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const n of window.app.graph.nodes) {
        const [x, y, w, h] = n.boundingRect;
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
      }
      canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.96 });
      canvas.setDirty(true, true);
    }, [workflow, path.basename(file, ".json")]);
    // Let the token counts arrive and the DOM widgets settle before the picture.
    await page.waitForFunction(() => [...document.querySelectorAll(".ella-token-count")]
      .every((el) => el.dataset.state !== "pending"), null, { timeout: 60000 }).catch(() => {});
    await page.waitForTimeout(1200);
    await page.screenshot({ path: out, type: "png" });
  }
} finally {
  await browser.close();
}
