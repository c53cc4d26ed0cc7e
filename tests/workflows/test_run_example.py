"""scripts/run_example.sh, the README's main command, run as a user would: it must print a real PNG's path."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from PIL import Image

from devtools.tiny_models import write_tiny_ella, write_tiny_sd15_checkpoint, write_tiny_t5
from tests.workflows.examples import copy_checkout

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


def _main_job(checkout: Path, base: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/run_example.sh", "--base-directory", str(base), "--size", "64",
                           "--steps", "1"], cwd=checkout, env=_env(), capture_output=True, text=True, timeout=500)


def _png_of(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    image = Path(proc.stdout.strip().splitlines()[-1])
    with Image.open(image) as img:
        assert img.format == "PNG" and img.size == (64, 64)
    return image


def test_two_clones_one_after_the_other(tmp_path):
    """Clone A, then clone B, then (B deleted) clone A again, all on one base directory: each run takes over
    custom_nodes/ella-tsc, a stale link is replaced, and the reference pack's folder is never touched."""
    base = tmp_path / "base"
    models = base / "models"
    write_tiny_sd15_checkpoint(models, name="v1-5-pruned-emaonly-fp16.safetensors")
    write_tiny_ella(models, name="ella-sd1.5-tsc-t5xl.safetensors")
    write_tiny_t5(models, name="flan-t5-xl")
    reference = base / "custom_nodes" / "comfyui-ella"  # a user's copy of the reference pack, never ours
    reference.mkdir(parents=True)
    (reference / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    clone_a, clone_b = copy_checkout(tmp_path / "a" / "ella-tsc"), copy_checkout(tmp_path / "b" / "ella-tsc")
    link = base / "custom_nodes" / "ella-tsc"

    first = _png_of(_main_job(clone_a, base))
    assert link.is_symlink() and link.resolve() == clone_a.resolve()
    second_proc = _main_job(clone_b, base)
    second = _png_of(second_proc)
    assert link.resolve() == clone_b.resolve() and "replaced" in second_proc.stdout, second_proc.stdout[-2000:]
    assert second != first  # a new image, not the first run's file reported again
    shutil.rmtree(tmp_path / "b")
    assert link.is_symlink() and not link.exists()  # dangling: its clone is gone
    third_proc = _main_job(clone_a, base)
    _png_of(third_proc)
    assert link.resolve() == clone_a.resolve() and "deleted clone" in third_proc.stdout, third_proc.stdout[-2000:]
    assert sorted(p.name for p in (base / "custom_nodes").iterdir()) == ["comfyui-ella", "ella-tsc"]
    assert (reference / "__init__.py").read_text() == "NODE_CLASS_MAPPINGS = {}\n" and not reference.is_symlink()


@pytest.mark.parametrize("occupant", ["folder", "foreign link"])
def test_link_name_held_by_something_else_is_refused(tmp_path, occupant):
    """custom_nodes/ella-tsc that is not a link to a copy of this pack is the user's: named, left as it is."""
    base = tmp_path / "base"
    models = base / "models"
    write_tiny_sd15_checkpoint(models, name="v1-5-pruned-emaonly-fp16.safetensors")
    write_tiny_ella(models, name="ella-sd1.5-tsc-t5xl.safetensors")
    write_tiny_t5(models, name="flan-t5-xl")
    link = base / "custom_nodes" / "ella-tsc"
    link.parent.mkdir(parents=True)
    other = tmp_path / "other-project"
    (other / "pyproject.toml").parent.mkdir()
    (other / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    if occupant == "folder":
        link.mkdir()
    else:
        link.symlink_to(other, target_is_directory=True)
    proc = _main_job(ROOT, base)
    assert proc.returncode != 0 and str(link) in proc.stderr, proc.stderr[-2000:]
    assert link.is_symlink() == (occupant == "foreign link") and link.exists()


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
