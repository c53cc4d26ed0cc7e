// The one way this repository starts a browser: Debian's chromium (never a downloaded one), headless, driven by
// playwright-core from $ELLA_NODE_MODULES, with the flags this offline machine needs (no background networking).
// Used by scripts/thumbnails.mjs and the frontend tests' scripts.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.ELLA_NODE_MODULES, "noop.js"));
const { chromium } = require("playwright-core");

/** A persistent headless chromium context in `userDataDir` with the given viewport {width, height}. */
export function launchChromium(userDataDir, viewport) {
  return chromium.launchPersistentContext(userDataDir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run",
    ],
  });
}
