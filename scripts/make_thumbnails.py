#!/usr/bin/env python3
"""Write the template browser's thumbnails: example_workflows/<name>.jpg beside each <name>.json.

Each thumbnail is a screenshot of the example's graph in the real frontend (the ComfyUI that scripts/setup_env.sh
provides, this pack linked in, headless Debian chromium driven by scripts/thumbnails.mjs), fitted to the graph
and scaled to a square JPEG. The models folders hold empty placeholder files under the names the examples select
(so the loaders show them) and ComfyUI's T5 tokenizer beside the T5 name (so the token count shows a count).

    eval "$(bash scripts/setup_env.sh)" && "$ELLA_PYTHON" scripts/make_thumbnails.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_example_workflows as examples  # noqa: E402
from run_example import free_port, link_pack, start_server, stop_server, wait_ready  # noqa: E402

SIZE = 512  # pixels, square: the template browser shows thumbnails in square tiles
VIEWPORT = 1100  # the browser's square window; the graph is fitted into it, then scaled to SIZE


def placeholder_models(models: Path, comfy: Path) -> None:
    """Empty files under the examples' model names, and a T5 tokenizer beside the T5 file."""
    for name, (folder, _url) in examples.MODEL_URLS.items():
        (models / folder).mkdir(parents=True, exist_ok=True)
        (models / folder / name).write_bytes(b"")
    (models / "loras").mkdir(parents=True, exist_ok=True)
    (models / "loras" / examples.LORA).write_bytes(b"")
    stem = Path(examples.T5_FILE).stem
    (models / "text_encoders" / f"{stem}_tokenizer").symlink_to(comfy / "comfy" / "text_encoders" / "t5_tokenizer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "example_workflows"))
    args = ap.parse_args(argv)
    comfy = Path(os.environ.get("COMFYUI_PATH", ""))
    modules = os.environ.get("ELLA_NODE_MODULES", "")
    if not (comfy / "main.py").is_file() or not (Path(modules) / "playwright-core").is_dir():
        raise SystemExit("run after: eval \"$(bash scripts/setup_env.sh)\" (needs COMFYUI_PATH, ELLA_NODE_MODULES)")
    workflows = sorted(Path(args.out).glob("*.json"))
    with tempfile.TemporaryDirectory(prefix="ella-thumbnails-") as tmp:
        base = Path(tmp) / "base"
        placeholder_models(base / "models", comfy)
        (base / "input").mkdir(parents=True)
        settings = base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True,
                                        "Comfy.Workflow.ShowMissingModelsWarning": False}))
        link_pack(base / "custom_nodes")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(comfy, port, base, base / "comfyui.log")
        try:
            wait_ready(url, proc, base / "comfyui.log")
            config = {"server": url, "viewport": VIEWPORT, "user_data_dir": str(Path(tmp) / "chromium"),
                      "shots": {str(p): str(Path(tmp) / (p.stem + ".png")) for p in workflows}}
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            subprocess.run(["node", str(ROOT / "scripts" / "thumbnails.mjs"), str(Path(tmp) / "config.json")],
                           check=True, timeout=600)
        finally:
            stop_server(proc)
        from PIL import Image

        for wf, png in config["shots"].items():
            with Image.open(png) as img:
                jpg = Path(wf).with_suffix(".jpg")
                img.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS).save(jpg, "JPEG", quality=85, optimize=True)
                print(f"wrote {jpg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
