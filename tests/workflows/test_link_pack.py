"""scripts/run_example.py's link_pack on every kind of occupant of custom_nodes/ella-tsc (no server needed).

The rule: a symlink named ella-tsc that points at this checkout is kept, one that dangles or points at another
copy of this pack is replaced, anything else is the user's and the job stops naming it; other entries (the
reference pack at custom_nodes/comfyui-ella above all) are never touched.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.workflows import examples  # noqa: F401  (puts scripts/ on sys.path)

import run_example  # noqa: E402  (scripts/)

ROOT = run_example.ROOT


def _project(path: Path, name: str) -> Path:
    path.mkdir(parents=True)
    (path / "pyproject.toml").write_text(f'[project]\nname = "{name}"\nversion = "0.0.1"\n')
    return path


def _state(custom: Path) -> dict[str, str]:
    """name -> what it is (link target or 'dir'), for every entry of custom_nodes."""
    return {e.name: (os.readlink(e) if e.is_symlink() else "dir") for e in sorted(custom.iterdir())}


OCCUPANTS = ["none", "this checkout", "dangling", "other clone", "other clone, relative link", "foreign project",
             "real folder", "file", "this checkout under another name"]


@pytest.mark.parametrize("occupant", OCCUPANTS)
@pytest.mark.parametrize("with_reference_pack", [False, True])
def test_link_pack(tmp_path, occupant, with_reference_pack):
    custom = tmp_path / "ComfyUI" / "custom_nodes"
    custom.mkdir(parents=True)
    link = custom / "ella-tsc"
    if with_reference_pack:
        _project(custom / "comfyui-ella", "comfyui-ella")
    clone = _project(tmp_path / "clone-b" / "ella-tsc", "ella-tsc")
    if occupant == "this checkout":
        link.symlink_to(ROOT)
    elif occupant == "dangling":
        link.symlink_to(tmp_path / "deleted-clone")
    elif occupant == "other clone":
        link.symlink_to(clone)
    elif occupant == "other clone, relative link":
        link.symlink_to(os.path.relpath(clone, custom))
    elif occupant == "foreign project":
        link.symlink_to(_project(tmp_path / "other", "something-else"))
    elif occupant == "real folder":
        link.mkdir()
    elif occupant == "file":
        link.write_text("x")
    elif occupant == "this checkout under another name":
        (custom / "my-ella").symlink_to(ROOT)
    before = _state(custom)

    if occupant in ("foreign project", "real folder", "file"):
        with pytest.raises(SystemExit, match=str(link)):
            run_example.link_pack(custom)
        assert _state(custom) == before  # nothing touched
        return
    entry = run_example.link_pack(custom)
    after = _state(custom)
    assert entry.resolve() == ROOT
    if occupant == "this checkout under another name":
        assert entry.name == "my-ella" and after == before  # not loaded twice
    else:
        assert entry == link and link.is_symlink() and link.resolve() == ROOT
        assert set(after) == set(before) | {"ella-tsc"}
    if with_reference_pack:
        assert after["comfyui-ella"] == "dir" and (custom / "comfyui-ella" / "pyproject.toml").is_file()
    assert clone.is_dir()  # replacing a link never deletes what it pointed at
    assert run_example.link_pack(custom) == entry and _state(custom) == after  # idempotent


@pytest.mark.parametrize("text, expected", [
    ('[project]\nname = "ella-tsc"\n', True),
    ('[project]\nname="ella-tsc"\nversion = "1"\n', True),
    ('[project]\nname = "comfyui-ella"\n', False),
    ('[tool.other]\nname = "ella-tsc"\n', False),
    ("not toml [[[", False),
])
def test_is_ella_tsc_checkout(tmp_path, text, expected):
    (tmp_path / "pyproject.toml").write_text(text)
    assert run_example.is_ella_tsc_checkout(tmp_path) is expected
    assert run_example.is_ella_tsc_checkout(tmp_path / "missing") is False
