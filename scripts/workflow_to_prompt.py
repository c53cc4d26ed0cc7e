#!/usr/bin/env python3
"""Convert a ComfyUI workflow saved by the frontend (UI format) into the API prompt that `POST /prompt` takes.

The UI format stores widget values as a positional list (`widgets_values`); the API format wants them by input
name. The order is the node's input order from `/object_info`, with the extra values the frontend saves after some
widgets (the "control after generate" choice after a seed, the upload button after an image combo) skipped.

Used by scripts/run_example.sh and by the tests; standard library only, no ComfyUI import.

    python scripts/workflow_to_prompt.py WORKFLOW.json --server http://127.0.0.1:8188 > prompt.json
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from typing import Any

# Frontend-only nodes that never reach the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
# Values of the control widget the frontend adds after a widget with `control_after_generate`.
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Values of the upload button widget the frontend adds after an `*_upload` combo (LoadImage: "image").
UPLOAD_VALUES = {"image", "video", "audio", "animated_image", "3d"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """A workflow that cannot be converted; the message names the node."""


def _links(workflow: dict) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id, origin slot, type); accepts the list and the object link forms."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type", "*"))
        else:
            out[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else "*")
    return out


def widget_inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of each input of an /object_info entry that the frontend shows as a widget, in order."""
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    result = []
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {})
        for name in order.get(section, []):
            spec = specs.get(name)
            if spec is None:
                continue
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_combo = isinstance(kind, list)
            if options.get("forceInput") or (not is_combo and kind not in WIDGET_TYPES):
                continue
            result.append((name, "COMBO" if is_combo else kind, options))
    return result


def widget_values_by_name(node: dict, info: dict) -> dict[str, Any]:
    """Map a UI node's positional `widgets_values` to input names, skipping frontend-only control values."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some nodes save widgets by name already
        return dict(values)
    named: dict[str, Any] = {}
    i = 0
    for name, _kind, options in widget_inputs(info):
        if i >= len(values):
            break
        named[name] = values[i]
        i += 1
        if options.get("control_after_generate") and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
        if any(k.endswith("_upload") and v for k, v in options.items()) and i < len(values) \
                and values[i] in UPLOAD_VALUES:
            i += 1
    return named


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Return the API prompt {node_id: {"class_type", "inputs"}} for a UI-format workflow.

    Muted nodes are dropped; bypassed nodes and reroutes pass their matching input through.
    Raises WorkflowError naming the node when a type is not installed or a link points nowhere.
    """
    if "nodes" not in workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes' list); API-format prompts need no conversion")
    subgraphs = {g.get("id") for g in workflow.get("definitions", {}).get("subgraphs", [])}
    for node in workflow["nodes"]:
        if node.get("type") in subgraphs:
            raise WorkflowError(f"node {node['id']} is a subgraph; this converter handles flat graphs only "
                                f"(unpack it in the frontend: right-click > Unpack Subgraph)")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)

    def source(link_id: int, seen: frozenset = frozenset()) -> tuple[int, int] | None:
        """Follow a link back through reroutes and bypassed nodes to a real output."""
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is referenced by a node but missing from the workflow's links")
        origin, slot, ltype = links[link_id]
        node = nodes.get(origin)
        if node is None:
            raise WorkflowError(f"link {link_id} starts at node {origin}, which is not in the workflow")
        if origin in seen:
            raise WorkflowError(f"link cycle through node {origin}")
        if node.get("mode") == MODE_MUTED:
            return None
        if node["type"] == "Reroute" or node.get("mode") == MODE_BYPASSED:
            out_type = node.get("outputs", [{}])[slot].get("type", ltype) if node.get("outputs") else ltype
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp.get("type") in (out_type, "*")):
                    return source(inp["link"], seen | {origin})
            return None
        return origin, slot

    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        ntype = node.get("type")
        if ntype in VIRTUAL_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info.get(ntype)
        if info is None:
            raise WorkflowError(f"node {node['id']} has type '{ntype}', which this ComfyUI server does not know "
                                f"(is the custom node pack that provides it installed and loaded?)")
        inputs: dict[str, Any] = widget_values_by_name(node, info)
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            if src is None:
                inputs.pop(inp["name"], None)
            else:
                inputs[inp["name"]] = [str(src[0]), src[1]]
        entry: dict[str, Any] = {"class_type": ntype, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


# Loader node -> (its file-name input, the role a caller names the file by), for set_model_files.
MODEL_INPUTS = {
    "CheckpointLoaderSimple": ("ckpt_name", "ckpt"),
    "EllaTSCConnectorLoader": ("ella_name", "ella"),
    "EllaTSCTextEncoderLoader": ("model_name", "text_encoder"),
    "LoraLoader": ("lora_name", "lora"),
    "ControlNetLoader": ("control_net_name", "controlnet"),
}


def set_model_files(prompt: dict[str, dict], names: dict[str, str]) -> dict[str, dict]:
    """Point every loader of an API prompt at the file named for its role (roles absent from `names` stay)."""
    for node in prompt.values():
        input_name, role = MODEL_INPUTS.get(node["class_type"], (None, None))
        if role in names:
            node["inputs"][input_name] = names[role]
    return prompt


def fetch_object_info(server: str, timeout: float = 60.0) -> dict:
    """GET /object_info from a running ComfyUI server."""
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=timeout) as r:
        return json.load(r)


def read_object_info(path: str | None, server: str) -> dict:
    """The node definitions from a saved /object_info JSON file when given, else from the server."""
    if path:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return fetch_object_info(server)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="UI-format workflow JSON")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI server to read /object_info from")
    ap.add_argument("--object-info", help="read object_info from this JSON file instead of the server")
    args = ap.parse_args(argv)
    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    info = read_object_info(args.object_info, args.server)
    try:
        json.dump(workflow_to_prompt(workflow, info), sys.stdout, indent=1)
    except WorkflowError as e:
        print(f"{args.workflow}: {e}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
