"""Registry readiness: pyproject metadata, licence, icon, and what `comfy node pack` puts into the archive.

comfy-cli runs from its own venv (scripts/setup_env.sh: $ELLA_COMFY_CLI); `comfy node validate` and
`comfy node pack` work offline. The pack is run on a copy of the checkout's files in a fresh git repository, so
the test never writes into the checkout and sees exactly what a clone would pack.
"""
from __future__ import annotations

import os
import re
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.workflows.examples import copy_checkout

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REFERENCE_PACK = "comfyui-ella"  # TencentQQGYLab/ComfyUI-ELLA's package name


def test_project_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower() and project["name"] != REFERENCE_PACK, project["name"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*", project["name"]), project["name"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", project["urls"]["Repository"])
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")


def test_license_file_matches_declaration():
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and len(text) > 10_000


def test_icon_is_a_committed_square_image():
    """Icon is the raw URL of a file in this repository (on its default branch)."""
    icon, repo = PYPROJECT["tool"]["comfy"]["Icon"], PYPROJECT["project"]["urls"]["Repository"]
    owner_name = repo.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_name}/main/"
    assert icon.startswith(prefix), (icon, prefix)
    path = ROOT / icon.removeprefix(prefix)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] == img.size[1] >= 128, (img.format, img.size)


def _comfy_cli() -> str:
    cli = os.environ.get("ELLA_COMFY_CLI", "")
    if not Path(cli).is_file():
        pytest.fail("ELLA_COMFY_CLI does not point at comfy-cli: run eval \"$(bash scripts/setup_env.sh)\"")
    return cli


def _comfy(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([_comfy_cli(), "--skip-prompt", "--no-enable-telemetry", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"comfy {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The checkout's files (tracked and new, minus ignored) in a fresh git repository, plus a stray cache."""
    dest = copy_checkout(tmp_path_factory.mktemp("clone") / "ella-tsc")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    (dest / "nodes" / "__pycache__").mkdir(exist_ok=True)
    (dest / "nodes" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")  # untracked: never packed
    return dest


def test_comfy_node_validate(clone):
    proc = _comfy(["node", "validate"], clone)
    out = proc.stdout + proc.stderr  # comfy-cli prints its verdict on stderr when not on a terminal
    assert "All validation checks passed" in out and "Error" not in out and "warning" not in out.lower(), out


def test_comfy_node_pack_carries_what_users_need(clone):
    _comfy(["node", "pack"], clone)
    with zipfile.ZipFile(clone / "node.zip") as z:
        names = set(z.namelist())
    tracked = set(filter(None, subprocess.run(["git", "ls-files", "-z"], cwd=clone, capture_output=True, text=True,
                                              check=True).stdout.split("\0")))
    needed = {"__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE",
              "web/js/ella_token_count.js", PYPROJECT["tool"]["comfy"]["Icon"].split("/main/", 1)[1]}
    for folder in ("nodes", "ella_core", "training", "example_workflows", "docs"):
        files = {n for n in tracked if n.startswith(folder + "/")}
        assert files, folder
        needed |= files
    assert needed <= names, f"missing from the archive: {sorted(needed - names)}"
    examples = {n for n in names if n.startswith("example_workflows/")}
    assert {Path(n).stem for n in examples if n.endswith(".json")} == \
        {Path(n).stem for n in examples if n.endswith(".jpg")}, "every example needs its thumbnail"
    unwanted = [n for n in names if n.split("/")[0] in ("tests", "devtools", "bench", "scripts", ".ci") or "__pycache__" in n
                or n.endswith(".pyc") or n == "requirements-dev.txt"]
    assert not unwanted, unwanted
