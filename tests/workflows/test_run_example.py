"""scripts/run_example.sh, the README's main command, run as a user would: it must print a real PNG's path."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from PIL import Image

from tests.support.tiny_models import write_tiny_ella, write_tiny_sd15_checkpoint, write_tiny_t5

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env.update(extra)
    return env


def test_offline_demo_end_to_end(tmp_path):
    """No real weights in a fresh base directory: stand-ins are built, the banner says so, an image is saved."""
    base = tmp_path / "base"
    proc = subprocess.run(["bash", "scripts/run_example.sh", "--base-directory", str(base), "--size", "64",
                           "--steps", "2"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "OFFLINE DEMO" in proc.stdout and "RANDOM connector (input_dim=576)" in proc.stdout
    image = Path(proc.stdout.strip().splitlines()[-1])
    assert image.is_file() and base in image.parents, proc.stdout[-2000:]
    with Image.open(image) as img:
        assert img.format == "PNG" and img.size == (64, 64)
    assert (base / "custom_nodes" / "ella-tsc").resolve() == ROOT


def test_weights_under_the_real_names_are_used(tmp_path):
    """Files under the names docs/workflows.md gives (tiny ones here) are found: no stand-ins, no banner."""
    base = tmp_path / "base"
    models = base / "models"
    write_tiny_sd15_checkpoint(models, name="v1-5-pruned-emaonly-fp16.safetensors")
    write_tiny_ella(models, name="ella-sd1.5-tsc-t5xl.safetensors")
    write_tiny_t5(models, name="flan-t5-xl")
    proc = subprocess.run(["bash", "scripts/run_example.sh", "--base-directory", str(base), "--size", "64",
                           "--steps", "2"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "OFFLINE" not in proc.stdout and "real weights:" in proc.stdout, proc.stdout[-2000:]
    assert not (models / "ella" / "ella-offline-random-smollm2.safetensors").exists()
    with Image.open(Path(proc.stdout.strip().splitlines()[-1])) as img:
        assert img.format == "PNG" and img.size == (64, 64)


def test_users_comfyui_without_weights_is_refused_cleanly(tmp_path):
    """With the user's own ComfyUI, missing weights are named and nothing is written into their tree."""
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("raise SystemExit('must not be started')\n")
    proc = subprocess.run(["bash", "scripts/run_example.sh"], cwd=ROOT, env=_env(COMFYUI_PATH=str(comfy)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "real weights missing" in proc.stderr and "ella" in proc.stderr and "docs/workflows.md" in proc.stderr
    assert list((comfy / "custom_nodes").iterdir()) == []
    assert not (comfy / "models").exists()
