#!/usr/bin/env python3
"""Rewrite a workflow saved with the reference ELLA pack (TencentQQGYLab/ComfyUI-ELLA) to this pack's nodes.

Works on the frontend's UI format, in place: other nodes keep their ids, positions and widgets. The mapping
is README's "Coming from ComfyUI-ELLA": Load ELLA Model -> Load ELLA Connector; Load T5 TextEncoder #ELLA ->
Load ELLA Text Encoder (max_length 0 -> flexible); Set ELLA Timesteps -> ELLA Timestep Conditioning on the
model it read (every consumer of that model output now gets the patched model); Apply ELLA -> ELLA Timestep
Conditioning + one ELLA Prompt Encode per prompt; ELLA Encode / ELLA Text Encode / T5 Text Encode and the
embeds helpers -> ELLA Prompt Encode, with a CLIP connected when CLIP embeds were combined in. What cannot
be carried over exactly is reported as a note (stderr), never dropped silently.

    python scripts/migrate_reference_workflow.py OLD.json -o NEW.json

Standard library only; needs no server.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any, Optional

# Widget order of the reference pack's nodes in `widgets_values` (tests/data/reference_pack_surface.json).
REFERENCE_WIDGETS = {
    "ELLALoader": ["name"],
    "T5TextEncoderLoader #ELLA": ["name", "max_length", "dtype"],
    "SetEllaTimesteps": ["scheduler", "steps", "denoise"],
    "EllaTextEncode": ["text", "text_clip"],
    "T5TextEncode #ELLA": ["text"],
}
REFERENCE_NODES = set(REFERENCE_WIDGETS) | {"EllaApply", "EllaEncode", "EllaCombineEmbeds", "ConditionToEllaEmbeds",
                                            "ConcatConditionEllaEmbeds", "CombineClipEllaEmbeds"}

# Nodes this script creates, as the frontend saves them: (sockets (name, type, optional), widgets, outputs).
# tests/nodes/test_coexistence.py checks this table against the server's /object_info.
CREATED = {
    "EllaTSCConnectorLoader": ([], ["ella_name"], [("ELLA", "ELLA_TSC_CONNECTOR")]),
    "EllaTSCTextEncoderLoader": ([], ["model_name", "dtype", "device", "token_mode", "max_length"],
                                 [("TEXT_ENCODER", "ELLA_TSC_TEXT_ENCODER")]),
    "EllaTSCEncode": ([("text_encoder", "ELLA_TSC_TEXT_ENCODER", False), ("ella", "ELLA_TSC_CONNECTOR", False),
                       ("clip", "CLIP", True)], ["text", "clip_weight", "weighting"],
                      [("CONDITIONING", "CONDITIONING")]),
    "EllaTSCTimestepConditioning": ([("model", "MODEL", False), ("ella", "ELLA_TSC_CONNECTOR", False)], [],
                                    [("MODEL", "MODEL")]),
    "CLIPTextEncode": ([("clip", "CLIP", False)], ["text"], [("CONDITIONING", "CONDITIONING")]),
}
DTYPES = {"auto": "default", "FP16": "fp16", "FP32": "fp32"}
FLEXIBLE_MAX_LENGTH = 512  # the reference's max_length 0 never truncated; ours truncates flexible prompts here
SHAPE_OPTIONAL = 7

Source = tuple[int, int]  # (node id, output slot)


class MigrationError(ValueError):
    """A reference graph this script cannot rewrite; the message names the node."""


class Workflow:
    """A UI-format workflow with just the edits the migration needs (links kept consistent both ways)."""

    def __init__(self, workflow: dict) -> None:
        if "nodes" not in workflow:
            raise MigrationError("not a UI-format workflow (no 'nodes' list)")
        self.data = copy.deepcopy(workflow)
        self.nodes = {n["id"]: n for n in self.data["nodes"]}
        self.links: dict[int, list] = {}
        for link in self.data.get("links", []):
            if isinstance(link, dict):
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type", "*")]
            self.links[link[0]] = list(link)
        self.next_node = max([self.data.get("last_node_id", 0), *self.nodes]) + 1
        self.next_link = max([self.data.get("last_link_id", 0), *self.links, 0]) + 1

    def of_type(self, ntype: str) -> list[dict]:
        return [n for n in self.data["nodes"] if n["type"] == ntype]

    def source(self, node: dict, name: str) -> Optional[Source]:
        for inp in node.get("inputs", []):
            if inp["name"] == name and inp.get("link") is not None:
                link = self.links[inp["link"]]
                return link[1], link[2]
        return None

    def widget(self, node: dict, name: str) -> Any:
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            return values.get(name)
        i = REFERENCE_WIDGETS[node["type"]].index(name)
        return values[i] if i < len(values) else None

    def consumers(self, src: Source) -> list[int]:
        return [lid for lid, link in self.links.items() if (link[1], link[2]) == tuple(src)]

    def add(self, ntype: str, pos: list, widgets: list, title: Optional[str] = None) -> dict:
        sockets, _, outputs = CREATED[ntype]
        node = {"id": self.next_node, "type": ntype, "pos": [pos[0], pos[1]], "size": [340, 120], "flags": {},
                "order": len(self.data["nodes"]), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None, **({"shape": SHAPE_OPTIONAL} if opt else {})}
                           for n, t, opt in sockets],
                "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
                "properties": {"Node name for S&R": ntype}, "widgets_values": widgets}
        if title:
            node["title"] = title
        self.next_node += 1
        self.data["nodes"].append(node)
        self.nodes[node["id"]] = node
        return node

    def connect(self, src: Source, node: dict, name: str, widget: bool = False) -> None:
        slots = [i for i, inp in enumerate(node["inputs"]) if inp["name"] == name]
        if not slots:  # a widget fed by a link becomes an input of its own
            node["inputs"].append({"name": name, "type": "STRING", "widget": {"name": name}, "link": None})
            slots = [len(node["inputs"]) - 1]
        origin = self.nodes[src[0]]
        out_type = origin["outputs"][src[1]]["type"]
        lid = self.next_link
        self.next_link += 1
        self.links[lid] = [lid, src[0], src[1], node["id"], slots[0], out_type]
        node["inputs"][slots[0]]["link"] = lid
        origin["outputs"][src[1]].setdefault("links", [])
        origin["outputs"][src[1]]["links"] = (origin["outputs"][src[1]]["links"] or []) + [lid]

    def redirect(self, lid: int, src: Source) -> None:
        """Let link `lid` start at `src` instead (its target is unchanged)."""
        link = self.links[lid]
        old = self.nodes[link[1]]["outputs"][link[2]]
        old["links"] = [x for x in old.get("links") or [] if x != lid]
        new = self.nodes[src[0]]["outputs"][src[1]]
        new["links"] = (new.get("links") or []) + [lid]
        link[1], link[2], link[5] = src[0], src[1], new["type"]

    def remove(self, node_id: int) -> list[int]:
        """Drop a node and every link touching it; returns the ids of nodes that lost an input."""
        orphaned = []
        for lid in [lid for lid, link in self.links.items() if node_id in (link[1], link[3])]:
            _, origin, oslot, target, tslot, _ = self.links.pop(lid)
            if target != node_id:
                self.nodes[target]["inputs"][tslot]["link"] = None
                orphaned.append(target)
            if origin != node_id:
                out = self.nodes[origin]["outputs"][oslot]
                out["links"] = [x for x in out.get("links") or [] if x != lid]
        del self.nodes[node_id]
        self.data["nodes"] = [n for n in self.data["nodes"] if n["id"] != node_id]
        return orphaned

    def to_dict(self) -> dict:
        for node in self.data["nodes"]:
            for out in node.get("outputs", []):
                out["links"] = out.get("links") or None
        self.data["links"] = sorted(self.links.values())
        self.data["last_node_id"], self.data["last_link_id"] = self.next_node - 1, self.next_link - 1
        return self.data


def migrate(workflow: dict) -> tuple[dict, list[str]]:
    """(rewritten workflow, notes) for a UI workflow that uses the reference pack's nodes."""
    w, notes = Workflow(workflow), []
    if not any(n["type"] in REFERENCE_NODES for n in w.data["nodes"]):
        notes.append("no nodes of the reference ELLA pack found; nothing changed")

    def name(node: dict) -> str:
        return f"node {node['id']} ({node.get('title') or node['type']})"

    connectors = {n["id"]: w.add("EllaTSCConnectorLoader", n["pos"], [w.widget(n, "name")], n.get("title"))
                  for n in w.of_type("ELLALoader")}
    encoders = {}
    for n in w.of_type("T5TextEncoderLoader #ELLA"):
        length = int(w.widget(n, "max_length") or 0)
        mode, length = ("flexible", FLEXIBLE_MAX_LENGTH) if length == 0 else ("fixed", length)
        dtype = DTYPES.get(w.widget(n, "dtype"), "default")
        encoders[n["id"]] = w.add("EllaTSCTextEncoderLoader", n["pos"],
                                  [w.widget(n, "name"), dtype, "auto", mode, length], n.get("title"))
        if mode == "flexible":
            notes.append(f"{name(n)}: max_length 0 (no padding) -> token_mode flexible, truncating at "
                         f"{FLEXIBLE_MAX_LENGTH} tokens")

    def upstream(node: dict, input_name: str) -> dict:
        src = w.source(node, input_name)
        if src is None:
            raise MigrationError(f"{name(node)}: input '{input_name}' is not connected")
        return w.nodes[src[0]]

    def connector_of(node: dict) -> tuple[dict, list[dict]]:
        """Our connector loader for a node's `ella` input, and the Set ELLA Timesteps nodes passed on the way."""
        src, passed = upstream(node, "ella"), []
        while src["type"] == "SetEllaTimesteps":
            passed.append(src)
            src = upstream(src, "ella")
        if src["id"] not in connectors:
            raise MigrationError(f"{name(node)}: its ella input comes from {src['type']}, not Load ELLA Model")
        return connectors[src["id"]], passed

    hooks: dict[tuple, dict] = {}

    def hook_for(model: Source, connector: dict, pos: list) -> dict:
        key = (tuple(model), connector["id"])
        if key not in hooks:
            hooks[key] = hook = w.add("EllaTSCTimestepConditioning", pos, [])
            w.connect(model, hook, "model")
            w.connect((connector["id"], 0), hook, "ella")
        return hooks[key]

    def embeds_of(node: dict) -> dict:
        """What an ELLA_EMBEDS output carries: T5 text (value or link), its encoder, CLIP conditioning."""
        t = node["type"]
        if t == "T5TextEncode #ELLA":
            below = embeds_of(upstream(node, "embeds")) if w.source(node, "embeds") else {}
            return {**below, "text": w.widget(node, "text"), "text_src": w.source(node, "text"),
                    "encoder": upstream(node, "text_encoder"), "at": node}
        if t == "EllaCombineEmbeds":
            return {**embeds_of(upstream(node, "embeds")), **embeds_of(upstream(node, "embeds_add"))}
        if t in ("CombineClipEllaEmbeds", "ConcatConditionEllaEmbeds"):
            return {"clip_cond": w.source(node, "cond"), **embeds_of(upstream(node, "embeds"))}
        if t == "ConditionToEllaEmbeds":
            return {"clip_cond": w.source(node, "cond")}
        raise MigrationError(f"{name(node)}: ELLA embeds from an unknown node type {t}")

    def clip_model(cond: Optional[Source], text: Any, where: dict) -> Optional[Source]:
        """The CLIP behind a CLIP conditioning: ours appends the CLIP tokens of the same text."""
        if cond is None:
            return None
        origin = w.nodes[cond[0]]
        clip = w.source(origin, "clip") if origin["type"] == "CLIPTextEncode" else None
        if clip is None:
            notes.append(f"{name(where)}: CLIP conditioning from {origin['type']} dropped; connect a CLIP to "
                         "ELLA Prompt Encode's clip input to append CLIP tokens")
            return None
        clip_text = (origin.get("widgets_values") or [None])[0]
        if clip_text != text:
            notes.append(f"{name(where)}: the CLIP text {clip_text!r} differs from the T5 text {text!r}; ELLA "
                         "Prompt Encode encodes the same text with both")
        return clip

    def prompt_encode(embeds: dict, connector: dict, where: dict, pos: list, title: Optional[str]) -> dict:
        if "encoder" not in embeds:
            raise MigrationError(f"{name(where)}: its embeds have no T5 Text Encode #ELLA")
        if embeds["encoder"]["id"] not in encoders:
            raise MigrationError(f"{name(where)}: its text encoder is {embeds['encoder']['type']}, "
                                 "not Load T5 TextEncoder #ELLA")
        node = w.add("EllaTSCEncode", pos, [embeds["text"] or "", 1.0, "strip"], title)  # strip: as the reference
        w.connect((encoders[embeds["encoder"]["id"]]["id"], 0), node, "text_encoder")
        w.connect((connector["id"], 0), node, "ella")
        if embeds.get("text_src"):
            w.connect(embeds["text_src"], node, "text")
        clip = clip_model(embeds.get("clip_cond"), embeds["text"], where)
        if clip is not None:
            w.connect(clip, node, "clip")
        return node

    def move_consumers(src: Source, node: dict, slot: int = 0) -> None:
        for lid in w.consumers(src):
            w.redirect(lid, (node["id"], slot))

    for s in w.of_type("SetEllaTimesteps"):
        connector, _ = connector_of(s)
        model = w.source(s, "model")
        if model is None:
            raise MigrationError(f"{name(s)}: input 'model' is not connected")
        hook = hook_for(model, connector, s["pos"])
        for lid in w.consumers(model):
            target = w.nodes[w.links[lid][3]]
            if target["id"] != hook["id"] and target["type"] not in REFERENCE_NODES:
                w.redirect(lid, (hook["id"], 0))
        notes.append(f"{name(s)}: replaced by ELLA Timestep Conditioning on its model; its scheduler, steps and "
                     "denoise now come from the sampler")

    for a in w.of_type("EllaApply"):
        connector, _ = connector_of(a)
        model = w.source(a, "model")
        if model is None:
            raise MigrationError(f"{name(a)}: input 'model' is not connected")
        move_consumers((a["id"], 0), hook_for(model, connector, a["pos"]))
        for slot, which, dy in ((1, "positive", 0), (2, "negative", 260)):
            node = prompt_encode(embeds_of(upstream(a, which)), connector, a, [a["pos"][0], a["pos"][1] + dy],
                                 f"ELLA Prompt Encode ({which})")
            move_consumers((a["id"], slot), node)
        if w.source(a, "sigmas"):
            notes.append(f"{name(a)}: its sigmas input is not needed and was dropped")

    for e in w.of_type("EllaEncode"):
        connector, passed = connector_of(e)
        node = prompt_encode(embeds_of(upstream(e, "embeds")), connector, e, e["pos"], e.get("title"))
        move_consumers((e["id"], 0), node)
        if not passed:
            notes.append(f"{name(e)}: no Set ELLA Timesteps before it; add ELLA Timestep Conditioning on the "
                         "sampler's model")

    for x in w.of_type("EllaTextEncode"):
        connector, passed = connector_of(x)
        embeds = {"text": w.widget(x, "text"), "text_src": w.source(x, "text"), "encoder": upstream(x, "text_encoder")}
        clip = w.source(x, "clip")
        text_clip = w.widget(x, "text_clip") or ""
        node = prompt_encode(embeds, connector, x, x["pos"], x.get("title"))
        if clip is not None:
            w.connect(clip, node, "clip")
            if text_clip != embeds["text"]:
                notes.append(f"{name(x)}: text_clip {text_clip!r} differs from text; ELLA Prompt Encode encodes "
                             "the same text with CLIP")
        move_consumers((x["id"], 0), node)
        if w.consumers((x["id"], 1)):
            if clip is None:
                notes.append(f"{name(x)}: its CLIP CONDITIONING output had no CLIP and was dropped")
            else:
                plain = w.add("CLIPTextEncode", [x["pos"][0], x["pos"][1] + 260], [text_clip])
                w.connect(clip, plain, "clip")
                move_consumers((x["id"], 1), plain)
        if not passed:
            notes.append(f"{name(x)}: no Set ELLA Timesteps before it; add ELLA Timestep Conditioning on the "
                         "sampler's model")

    for node in [n for n in w.data["nodes"] if n["type"] in REFERENCE_NODES]:
        for target in w.remove(node["id"]):
            if target in w.nodes and w.nodes[target]["type"] not in REFERENCE_NODES:
                notes.append(f"{name(w.nodes[target])}: lost an input that came from the removed {node['type']}")
    return w.to_dict(), notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="UI-format workflow saved with the reference ELLA pack")
    ap.add_argument("-o", "--output", help="where to write the result (default: stdout)")
    args = ap.parse_args(argv)
    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    try:
        result, notes = migrate(workflow)
    except MigrationError as e:
        print(f"{args.workflow}: {e}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
