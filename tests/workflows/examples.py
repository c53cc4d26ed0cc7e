"""Helpers to run the example workflows on a real ComfyUI server with tiny models (tests/workflows, tests/frontend)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from devtools.tiny_models import write_all, write_tiny_controlnet  # noqa: E402
from tests.workflows.extra_models import write_tiny_lora  # noqa: E402
from workflow_to_prompt import set_model_files  # noqa: E402

WORKFLOW_DIR = ROOT / "example_workflows"
TEST_SIZE = 128  # pixels; the examples use 512, the tiny UNet needs no more to show the graph runs


def write_input_image(path: Path, size: int = TEST_SIZE) -> None:
    """A small colourful PNG standing in for ComfyUI's example.png (LoadImage inputs: img2img, ControlNet)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, ((x // 16 + y // 16) % 2) * 255], -1).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def example_files() -> list[Path]:
    files = sorted(WORKFLOW_DIR.glob("*.json"))
    if not files:
        raise RuntimeError(f"no example workflows in {WORKFLOW_DIR}")
    return files


def substitute_tiny(prompt: dict, names: dict, size: int = TEST_SIZE, steps: int = 2) -> dict:
    """The API prompt with the tiny models' file names, a small image and few steps (the graph is unchanged)."""
    scale = size / 512
    set_model_files(prompt, names)
    for node in prompt.values():
        inputs, ctype = node["inputs"], node["class_type"]
        if ctype == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
        elif ctype == "ConditioningSetArea":
            for key in ("width", "height", "x", "y"):
                inputs[key] = int(inputs[key] * scale) // 8 * 8
            inputs["width"], inputs["height"] = max(inputs["width"], 64), max(inputs["height"], 64)
        elif "steps" in inputs and not isinstance(inputs["steps"], list):
            inputs["steps"] = steps
    return prompt


def tiny_models_base(base: Path) -> dict:
    """Fill `base` (a ComfyUI base directory) with tiny models for every loader the examples use; returns
    role -> file name as the loaders list them."""
    models = base / "models"
    tiny = write_all(models)
    names = {
        "ckpt": tiny.checkpoint, "ella": tiny.ella, "text_encoder": tiny.text_encoder,
        "controlnet": write_tiny_controlnet(models).name,
        "lora": write_tiny_lora(models, models / "checkpoints" / tiny.checkpoint).name,
    }
    write_input_image(base / "input" / "example.png")
    return names


def copy_checkout(dest: Path) -> Path:
    """A copy of this checkout's files as a fresh clone of the current tree would have them (tracked and new
    files, not ignored ones such as caches), without its .git."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest
