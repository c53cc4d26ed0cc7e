"""The reference ELLA pack's public surface (tests/data/reference_pack_surface.json) and the same surface
read back from a server's /object_info, in one normal form so a test can compare them with `==`.

Normal form of a node: {"display_name", "category", "python_module", "inputs": {group: [[name, type, config]]},
"outputs": [[type, name]]}, where a COMBO's config is {"options": [...]}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

MANIFEST_PATH = Path(__file__).resolve().parents[1] / "data" / "reference_pack_surface.json"


def load_manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text())


def served(entry: dict) -> dict:
    """Normal form of one /object_info entry."""
    inputs = {}
    for group, names in entry.get("input_order", {}).items():
        items = []
        for name in names:
            spec = entry["input"][group][name]
            kind, config = spec[0], dict(spec[1]) if len(spec) > 1 else {}
            if isinstance(kind, list):  # legacy combo: the options list is the type
                kind, config = "COMBO", {"options": kind, **config}
            items.append([name, kind, config])
        inputs[group] = items
    return {"display_name": entry["display_name"], "category": entry["category"],
            "python_module": entry["python_module"], "inputs": inputs,
            "outputs": [list(pair) for pair in zip(entry["output"], entry["output_name"])]}


def expected(manifest: dict, node_id: str, options_from: Callable[[str], list]) -> dict:
    """Normal form the manifest promises for `node_id`; `options_from(source)` lists a dynamic COMBO."""
    spec = manifest["nodes"][node_id]
    inputs = {}
    for group, items in spec["inputs"].items():
        inputs[group] = [[name, kind, {"options": options_from(config["options_from"])} if "options_from" in config
                          else dict(config)] for name, kind, config in items]
    return {"display_name": spec["display_name"], "category": spec["category"],
            "python_module": f"custom_nodes.{manifest['package_dir']}", "inputs": inputs,
            "outputs": [list(pair) for pair in spec["outputs"]]}


def io_types(entry: dict) -> set[str]:
    """Every socket type an /object_info entry names (inputs and outputs; combos and widgets excluded)."""
    kinds = {k for k in entry.get("output", []) if isinstance(k, str)}
    for group in entry.get("input", {}).values():
        kinds |= {spec[0] for spec in group.values() if isinstance(spec[0], str)}
    return kinds - {"COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"}
