#!/usr/bin/env python3
"""Write the example workflows (example_workflows/*.json, the frontend's UI format) from compact graph specs.

Widget order, defaults, socket names and types come from a live server's `/object_info`, so the files always match
the installed nodes; tests/workflows regenerates them and fails when the committed files differ.

    python scripts/build_example_workflows.py --server http://127.0.0.1:8188       # rewrite example_workflows/
    python scripts/build_example_workflows.py --object-info info.json --check      # exit 1 if out of date
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
import uuid
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workflow_to_prompt import read_object_info, widget_inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "example_workflows")
FRONTEND_VERSION = "1.32.9"

# Realistic default file names; docs/workflows.md says where each comes from.
CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
ELLA_FILE = "ella-sd1.5-tsc-t5xl.safetensors"
T5_FILE = "flan-t5-xl-encoder-fp16.safetensors"  # one file: ComfyUI's bundled T5 tokenizer reads its prompts
LORA = "add_detail.safetensors"  # the user's own LoRA: no download offered
CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
# file -> (model folder, download URL): the frontend's Missing Models dialog offers these (Hugging Face URLs,
# names ending in .safetensors, registered folders). The T5 file is the fp16 T5EncoderModel QQGYLab publishes
# beside the connector, saved under a name that says what it is.
MODEL_URLS = {
    CKPT: ("checkpoints", "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                          "v1-5-pruned-emaonly-fp16.safetensors"),
    ELLA_FILE: ("ella", "https://huggingface.co/QQGYLab/ELLA/resolve/main/ella-sd1.5-tsc-t5xl.safetensors"),
    T5_FILE: ("text_encoders", "https://huggingface.co/QQGYLab/ELLA/resolve/main/"
                               "models--google--flan-t5-xl--text_encoder/model.safetensors"),
    CONTROLNET: ("controlnet", "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/"
                               "main/control_v11p_sd15_canny_fp16.safetensors"),
}
PACK_NODES = ("EllaTSC",)  # node-type prefix of this pack: those nodes carry the registry id and version


def pack_identity() -> tuple[str, str]:
    """(registry id, version) from pyproject.toml, as the frontend stores them in a node's cnr_id / ver."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return project["name"], project["version"]
NEGATIVE = ""  # the reference ELLA negative prompt is the empty string
SHAPE_OPTIONAL = 7  # LiteGraph's hollow-circle slot shape, used by the frontend for optional inputs


def js_number(value: Any) -> Any:
    """Integral floats as the frontend (JavaScript) writes them: 1.0 -> 1."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass(frozen=True)
class Out:
    """Reference to output `slot` of node `node`."""
    node: "Node"
    slot: int


@dataclass
class Node:
    id: int
    type: str
    values: dict[str, Any]
    title: str | None = None
    links_in: dict[str, Out] = field(default_factory=dict)

    def __getitem__(self, slot: int) -> Out:
        return Out(self, slot)


class Graph:
    """A tiny builder: `g.add(type, input=value_or_Out, ...)`; `g.to_ui()` gives the UI-format workflow.

    `name` is the file's stem, which is also the title ComfyUI's template browser shows (frontend 1.32 reads
    title and description of a custom node's template from its file name only), so it is written for people.
    """

    def __init__(self, name: str, info: dict):
        self.name, self.info, self.nodes, self.notes = name, info, [], []

    def add(self, ntype: str, title: str | None = None, **inputs: Any) -> Node:
        if ntype not in self.info:
            raise KeyError(f"{self.name}: node type {ntype} is not in /object_info (is the pack loaded?)")
        node = Node(len(self.nodes) + 1, ntype, {k: v for k, v in inputs.items() if not isinstance(v, Out)},
                    title, {k: v for k, v in inputs.items() if isinstance(v, Out)})
        known = set()
        for section in ("required", "optional"):
            known |= set(self.info[ntype]["input"].get(section, {}))
        unknown = set(inputs) - known
        if unknown:
            raise KeyError(f"{self.name}: {ntype} has no inputs {sorted(unknown)} (has {sorted(known)})")
        self.nodes.append(node)
        return node

    def note(self, text: str) -> None:
        self.notes.append(text)

    # ---- serialisation -------------------------------------------------------------------------------------
    def _depths(self) -> dict[int, int]:
        depth: dict[int, int] = {}

        def d(n: Node) -> int:
            if n.id not in depth:
                depth[n.id] = 1 + max((d(o.node) for o in n.links_in.values()), default=-1)
            return depth[n.id]
        for n in self.nodes:
            d(n)
        return depth

    def to_ui(self) -> dict:
        depth = self._depths()
        order = sorted(self.nodes, key=lambda n: (depth[n.id], n.id))
        links, ui_nodes = [], {}
        column_y: dict[int, float] = {}
        for rank, n in enumerate(order):
            info = self.info[n.type]
            widgets = widget_inputs(info)
            widget_names = {w[0] for w in widgets}
            values = []
            for name, kind, opts in widgets:
                if name in n.values:
                    v = n.values[name]
                elif "default" in opts:
                    v = opts["default"]
                else:
                    spec = info["input"].get("required", {}).get(name) or info["input"]["optional"][name]
                    choices = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
                    v = choices[0] if choices else ""
                values.append(v)
                if opts.get("control_after_generate"):
                    values.append("fixed")  # reproducible examples
                if any(k.endswith("_upload") and flag for k, flag in opts.items()):
                    values.append("image")
            # Inputs as frontend 1.32 saves them: sockets first, then one input per widget; optional ones hollow.
            inputs, widget_slots = [], []
            for section in ("required", "optional"):
                for name in info["input_order"].get(section, []):
                    spec = info["input"][section][name]
                    slot = {"localized_name": name, "name": name}
                    if section == "optional":
                        slot["shape"] = SHAPE_OPTIONAL
                    slot["type"] = spec[0] if isinstance(spec[0], str) else "COMBO"
                    if name in widget_names:
                        slot["widget"] = {"name": name}
                        slot["link"] = None
                        widget_slots.append(slot)
                        opts = spec[1] if len(spec) > 1 else {}
                        if any(k.endswith("_upload") and flag for k, flag in opts.items()):
                            widget_slots.append({"localized_name": "choose file to upload", "name": "upload",
                                                 "type": "IMAGEUPLOAD", "widget": {"name": "upload"},
                                                 "link": None})
                        continue
                    slot["link"] = None
                    inputs.append(slot)
                    if section == "required" and name not in n.links_in:
                        raise ValueError(f"{self.name}: {n.type} (node {n.id}) needs input '{name}'")
            sockets = len(inputs)
            inputs += widget_slots
            height = 46 + 22 * max(sockets, len(info["output"])) + 26 * len(widgets)
            height += 120 * sum(1 for _, k, o in widgets if k == "STRING" and o.get("multiline"))
            x = 40 + 380 * depth[n.id]
            y = column_y.get(depth[n.id], 40)
            column_y[depth[n.id]] = y + height + 60
            node = {
                "id": n.id, "type": n.type, "pos": [x, y], "size": [340, height], "flags": {}, "order": rank,
                "mode": 0, "inputs": inputs,
                "outputs": [{"localized_name": oname, "name": oname, "type": otype, "links": []}
                            for oname, otype in zip(info["output_name"], info["output"])],
                "properties": self._properties(n.type),
                "widgets_values": [js_number(v) for v in values],
            }
            files = [v for v in values if isinstance(v, str) and v in MODEL_URLS]
            if files:
                node["properties"]["models"] = [model_entry(v) for v in files]
            if n.title:
                node["title"] = n.title
            ui_nodes[n.id] = node
        link_id = 0
        for n in self.nodes:  # links in node-then-input order: stable ids
            for inp in ui_nodes[n.id]["inputs"]:
                src = n.links_in.get(inp["name"])
                if src is None:
                    continue
                link_id += 1
                otype = ui_nodes[src.node.id]["outputs"][src.slot]["type"]
                inp["link"] = link_id
                ui_nodes[src.node.id]["outputs"][src.slot]["links"].append(link_id)
                links.append([link_id, src.node.id, src.slot, n.id, ui_nodes[n.id]["inputs"].index(inp), otype])
        for node in ui_nodes.values():
            for out in node["outputs"]:
                out["links"] = out["links"] or None
        nodes = [ui_nodes[n.id] for n in self.nodes]
        next_id = len(self.nodes)
        for text in self.notes:
            next_id += 1
            nodes.append({"id": next_id, "type": "MarkdownNote", "pos": [40, -340], "size": [720, 300],
                          "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                          "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        models = []
        for node in nodes:  # every downloadable file a loader selects, once, in graph order
            for entry in node["properties"].get("models", []):
                if entry not in models:
                    models.append(entry)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "ella-tsc/" + self.name)),
            "revision": 0, "last_node_id": next_id, "last_link_id": link_id,
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [60, 400]}, "frontendVersion": FRONTEND_VERSION,
                      "workflowRendererVersion": "LG"},
            "models": models,
            "version": 0.4,
        }

    @staticmethod
    def _properties(ntype: str) -> dict:
        """Node properties in the frontend's order; this pack's nodes carry its registry id and version."""
        if ntype.startswith(PACK_NODES):
            cnr_id, ver = pack_identity()
            return {"cnr_id": cnr_id, "ver": ver, "Node name for S&R": ntype}
        return {"Node name for S&R": ntype}


def model_entry(name: str) -> dict:
    directory, url = MODEL_URLS[name]
    return {"name": name, "url": url, "directory": directory}


# ---- the examples ------------------------------------------------------------------------------------------
MODELS_NOTE = (
    "Models (see docs/workflows.md for download commands):\n"
    f"- `models/ella/{ELLA_FILE}` (ELLA SD1.5 connector)\n"
    f"- `models/text_encoders/{T5_FILE}` (flan-t5-xl encoder, fp16, one file)\n"
    f"- `models/checkpoints/{CKPT}` (any SD1.5 checkpoint)\n")


def _base(g: Graph, ckpt: Node | None = None):
    """Loaders shared by every example: checkpoint, ELLA connector, T5 encoder, the per-step hook."""
    ckpt = ckpt or g.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    ella = g.add("EllaTSCConnectorLoader", ella_name=ELLA_FILE)
    te = g.add("EllaTSCTextEncoderLoader", model_name=T5_FILE)
    return ckpt, ella, te


def _finish(g: Graph, model: Out, pos: Out, neg: Out, latent: Out, vae: Out, prefix: str,
            denoise: float = 1.0, steps: int = 25) -> None:
    sampler = g.add("KSampler", model=model, positive=pos, negative=neg, latent_image=latent, seed=1234,
                    steps=steps, cfg=7.5, sampler_name="dpmpp_2m", scheduler="karras", denoise=denoise)
    image = g.add("VAEDecode", samples=sampler[0], vae=vae)
    g.add("SaveImage", images=image[0], filename_prefix=prefix)


def txt2img(info: dict) -> Graph:
    g = Graph("ELLA text to image (SD1.5)", info)
    g.note("# ELLA text to image (SD1.5)\nThe prompt goes through flan-t5-xl and the ELLA connector; "
           "**ELLA Timestep Conditioning** recomputes the connector's output at every sampling step with the "
           "sampler's own timestep, for any sampler and scheduler.\n\n" + MODELS_NOTE)
    ckpt, ella, te = _base(g)
    model = g.add("EllaTSCTimestepConditioning", model=ckpt[0], ella=ella[0])
    pos = g.add("EllaTSCEncode", title="ELLA Prompt Encode (positive)", text_encoder=te[0], ella=ella[0],
                text="a red fox sitting in a snowy birch forest at dawn, soft golden light, detailed fur, "
                     "photograph")
    neg = g.add("EllaTSCEncode", title="ELLA Prompt Encode (negative)", text_encoder=te[0], ella=ella[0], text=NEGATIVE)
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _finish(g, model[0], pos[0], neg[0], latent[0], ckpt[2], "ELLA/txt2img")
    return g


def clip_lora(info: dict) -> Graph:
    g = Graph("ELLA and CLIP with a LoRA (SD1.5)", info)
    g.note("# ELLA + CLIP with a LoRA\nLoRA trigger words and styles live in CLIP's embedding space. Connecting "
           "the (LoRA-patched) CLIP to **ELLA Prompt Encode** appends CLIP's tokens to the ELLA tokens, weighted by "
           f"`clip_weight`. Put a LoRA into `models/loras/` (here `{LORA}`).\n\n" + MODELS_NOTE)
    ckpt, ella, te = _base(g)
    lora = g.add("LoraLoader", model=ckpt[0], clip=ckpt[1], lora_name=LORA, strength_model=0.8,
                 strength_clip=0.8)
    model = g.add("EllaTSCTimestepConditioning", model=lora[0], ella=ella[0])
    pos = g.add("EllaTSCEncode", title="ELLA Prompt Encode (positive, + CLIP)", text_encoder=te[0], ella=ella[0],
                clip=lora[1], text="an old lighthouse keeper reading a letter by an oil lamp, highly detailed, "
                                   "intricate textures, cinematic lighting")
    neg = g.add("EllaTSCEncode", title="ELLA Prompt Encode (negative, + CLIP)", text_encoder=te[0], ella=ella[0],
                clip=lora[1], text=NEGATIVE)
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _finish(g, model[0], pos[0], neg[0], latent[0], ckpt[2], "ELLA/clip_lora")
    return g


def controlnet(info: dict) -> Graph:
    g = Graph("ELLA with ControlNet canny (SD1.5)", info)
    g.note("# ELLA + ControlNet (canny)\nThe photo is turned into an edge map by **Canny**, which steers an SD1.5 "
           f"canny ControlNet in `models/controlnet/` (`{CONTROLNET}`). The ControlNet sees the ELLA conditioning "
           "of each step.\n\n" + MODELS_NOTE)
    ckpt, ella, te = _base(g)
    model = g.add("EllaTSCTimestepConditioning", model=ckpt[0], ella=ella[0])
    pos = g.add("EllaTSCEncode", title="ELLA Prompt Encode (positive)", text_encoder=te[0], ella=ella[0],
                text="a futuristic glass building at night, neon reflections on wet streets, wide angle")
    neg = g.add("EllaTSCEncode", title="ELLA Prompt Encode (negative)", text_encoder=te[0], ella=ella[0], text=NEGATIVE)
    cn = g.add("ControlNetLoader", control_net_name=CONTROLNET)
    photo = g.add("LoadImage", image="example.png")
    edges = g.add("Canny", image=photo[0], low_threshold=0.4, high_threshold=0.8)
    applied = g.add("ControlNetApplyAdvanced", positive=pos[0], negative=neg[0], control_net=cn[0],
                    image=edges[0], vae=ckpt[2], strength=0.8, start_percent=0.0, end_percent=1.0)
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _finish(g, model[0], applied[0], applied[1], latent[0], ckpt[2], "ELLA/controlnet")
    return g


def img2img(info: dict) -> Graph:
    g = Graph("ELLA image to image (SD1.5)", info)
    g.note("# ELLA image to image\nThe input image is encoded by the VAE and partly re-noised (`denoise` 0.6); "
           "ELLA conditions the remaining steps, each with its own timestep.\n\n" + MODELS_NOTE)
    ckpt, ella, te = _base(g)
    model = g.add("EllaTSCTimestepConditioning", model=ckpt[0], ella=ella[0])
    pos = g.add("EllaTSCEncode", title="ELLA Prompt Encode (positive)", text_encoder=te[0], ella=ella[0],
                text="an oil painting in the style of the impressionists, thick brush strokes, warm palette")
    neg = g.add("EllaTSCEncode", title="ELLA Prompt Encode (negative)", text_encoder=te[0], ella=ella[0], text=NEGATIVE)
    image = g.add("LoadImage", image="example.png")
    latent = g.add("VAEEncode", pixels=image[0], vae=ckpt[2])
    _finish(g, model[0], pos[0], neg[0], latent[0], ckpt[2], "ELLA/img2img", denoise=0.6)
    return g


def regional(info: dict) -> Graph:
    g = Graph("ELLA regional prompts (SD1.5)", info)
    g.note("# ELLA regional prompts\nEach region gets its own ELLA Prompt Encode, placed with **Conditioning (Set "
           "Area)** and merged with **Conditioning (Combine)**; a whole-image prompt sets the scene.\n\n"
           + MODELS_NOTE)
    ckpt, ella, te = _base(g)
    model = g.add("EllaTSCTimestepConditioning", model=ckpt[0], ella=ella[0])
    scene = g.add("EllaTSCEncode", title="ELLA Prompt Encode (scene)", text_encoder=te[0], ella=ella[0],
                  text="a sunny meadow with a wooden fence, blue sky, children's book illustration")
    left = g.add("EllaTSCEncode", title="ELLA Prompt Encode (left)", text_encoder=te[0], ella=ella[0],
                 text="a brown horse standing")
    right = g.add("EllaTSCEncode", title="ELLA Prompt Encode (right)", text_encoder=te[0], ella=ella[0],
                  text="a white goat eating grass")
    left_area = g.add("ConditioningSetArea", conditioning=left[0], width=256, height=512, x=0, y=0, strength=1.0)
    right_area = g.add("ConditioningSetArea", conditioning=right[0], width=256, height=512, x=256, y=0,
                       strength=1.0)
    both = g.add("ConditioningCombine", conditioning_1=left_area[0], conditioning_2=right_area[0])
    pos = g.add("ConditioningCombine", conditioning_1=scene[0], conditioning_2=both[0])
    neg = g.add("EllaTSCEncode", title="ELLA Prompt Encode (negative)", text_encoder=te[0], ella=ella[0], text=NEGATIVE)
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _finish(g, model[0], pos[0], neg[0], latent[0], ckpt[2], "ELLA/regional")
    return g


def sampler_custom(info: dict) -> Graph:
    g = Graph("ELLA with SamplerCustom and Align Your Steps (SD1.5)", info)
    g.note("# ELLA with SamplerCustom and Align Your Steps\nAYS spaces the steps unevenly in time. ELLA "
           "Timestep Conditioning reads the timestep of every model call, so the connector sees the true "
           "timestep at each of these steps (no manual 'set timesteps' node).\n\n" + MODELS_NOTE)
    ckpt, ella, te = _base(g)
    model = g.add("EllaTSCTimestepConditioning", model=ckpt[0], ella=ella[0])
    pos = g.add("EllaTSCEncode", title="ELLA Prompt Encode (positive)", text_encoder=te[0], ella=ella[0],
                text="a ceramic teapot shaped like a snail on a wooden table, studio lighting, product photo")
    neg = g.add("EllaTSCEncode", title="ELLA Prompt Encode (negative)", text_encoder=te[0], ella=ella[0], text=NEGATIVE)
    sampler = g.add("KSamplerSelect", sampler_name="dpmpp_2m")
    sigmas = g.add("AlignYourStepsScheduler", model_type="SD1", steps=10, denoise=1.0)
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    custom = g.add("SamplerCustom", model=model[0], add_noise=True, noise_seed=1234, cfg=7.5, positive=pos[0],
                   negative=neg[0], sampler=sampler[0], sigmas=sigmas[0], latent_image=latent[0])
    image = g.add("VAEDecode", samples=custom[0], vae=ckpt[2])
    g.add("SaveImage", images=image[0], filename_prefix="ELLA/sampler_custom_ays")
    return g


EXAMPLES = [txt2img, clip_lora, controlnet, img2img, regional, sampler_custom]


def build_all(info: dict) -> dict[str, dict]:
    """file name -> UI workflow for every example."""
    out = {}
    for make in EXAMPLES:
        g = make(info)
        out[g.name + ".json"] = g.to_ui()
    return out


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--object-info", help="JSON file with /object_info instead of asking the server")
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    args = ap.parse_args(argv)
    info = read_object_info(args.object_info, args.server)
    stale = []
    for name, wf in build_all(info).items():
        path = os.path.join(args.out, name)
        text = dumps(wf)
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old != text:
            stale.append(name)
            if not args.check:
                os.makedirs(args.out, exist_ok=True)
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, path)
    if args.check and stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    print(("would rewrite " if args.check else "wrote ") + (", ".join(stale) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
