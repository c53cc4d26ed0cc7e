"""Test-only stand-in for the reference ELLA pack (TencentQQGYLab/ComfyUI-ELLA), which CI cannot fetch.

It registers exactly the reference's public surface, read as data from tests/data/reference_pack_surface.json:
node ids, display names, categories, input/output names and types, the custom types `ELLA`,
`ELLA_EMBEDS` and `T5_TEXT_ENCODER`, the model folders `ella` and `ella_encoder`, and the legacy
`NODE_CLASS_MAPPINGS` registration. Tests install it as `custom_nodes/comfyui-ella` (the reference's package
directory). What the nodes do is our own minimal code (behaviour.py), enough to run a graph to an image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import comfy.samplers
import folder_paths

from . import behaviour

MANIFEST = json.loads((Path(__file__).resolve().parents[2] / "data" / "reference_pack_surface.json").read_text())


def _register_folders() -> None:
    """Like the reference: keep any paths already set (extra_model_paths.yaml), set the extension filter."""
    for name in MANIFEST["model_folders"]:
        paths = (folder_paths.folder_names_and_paths[name][0] if name in folder_paths.folder_names_and_paths
                 else [os.path.join(folder_paths.models_dir, name)])
        folder_paths.folder_names_and_paths[name] = (paths, folder_paths.supported_pt_extensions)


def _options(source: str) -> list[str]:
    kind, _, folder = source.partition(":")
    if kind == "files":
        return folder_paths.get_filename_list(folder)
    if kind == "config_dirs":
        return behaviour.config_dirs(folder)
    if source == "comfy.samplers.SCHEDULER_NAMES":
        return list(comfy.samplers.SCHEDULER_NAMES)
    raise ValueError(f"reference_pack_surface.json: unknown options_from {source!r}")


def _input_spec(kind: str, config: dict) -> tuple:
    if kind == "COMBO":
        return (list(config["options"]) if "options" in config else _options(config["options_from"]),)
    return (kind, dict(config)) if config else (kind,)


def _node_class(node_id: str, spec: dict) -> type:
    run = behaviour.NODES[node_id]

    def input_types(cls) -> dict:  # evaluated per /object_info request, like the reference's file lists
        return {group: {name: _input_spec(kind, config) for name, kind, config in items}
                for group, items in spec["inputs"].items()}

    return type(f"Standin_{run.__name__}", (), {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(kind for kind, _ in spec["outputs"]),
        "RETURN_NAMES": tuple(name for _, name in spec["outputs"]),
        "FUNCTION": "run",
        "CATEGORY": spec["category"],
        "run": lambda self, **inputs: run(**inputs),
    })


_register_folders()
NODE_CLASS_MAPPINGS = {node_id: _node_class(node_id, spec) for node_id, spec in MANIFEST["nodes"].items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: spec["display_name"] for node_id, spec in MANIFEST["nodes"].items()}
