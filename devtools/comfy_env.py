"""ComfyUI imported into this process and this repository loaded as a custom-node package the way ComfyUI
loads it (by path, so the pack's relative imports work), for in-process tests and the benches."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    """The ComfyUI tree in use (`$COMFYUI_PATH`, as printed by scripts/setup_env.sh)."""
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "main.py").is_file():
        raise RuntimeError("COMFYUI_PATH is not set to a ComfyUI tree; run: eval \"$(bash scripts/setup_env.sh)\"")
    return Path(path)


def import_comfy(cpu: bool = True) -> None:
    """Make `comfy` importable; `cpu` forces its model management onto the CPU (set before
    comfy.model_management is first imported)."""
    root = str(comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu


def load_pack(module_name: str) -> ModuleType:
    """Import the repository as the custom-node package `module_name` (once per process)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = pack
    spec.loader.exec_module(pack)
    return pack


def pack_module(module_name: str, name: str) -> ModuleType:
    """A module of the loaded pack, e.g. pack_module(PACK, "nodes.hook")."""
    return importlib.import_module(f"{module_name}.{name}")
