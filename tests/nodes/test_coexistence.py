"""Coexistence with the reference ELLA pack (TencentQQGYLab/ComfyUI-ELLA): one real ComfyUI with both packs.

Two packs registering one node id or type replace each other silently (seen before our rename: the
reference's graphs failed with "'ManagedConnector' object is not a mapping"). The reference's surface is
data (tests/data/reference_pack_surface.json). The server test installs, as `custom_nodes/comfyui-ella`,
our stand-in that registers that surface (tests/support/reference_pack_standin), or the real reference pack
when ELLA_REFERENCE_PACK points at an export of it, and checks that each pack still serves all of its own
surface and runs a graph to an image over HTTP. The migrating user's files are shared: the reference
graph's connector in models/ella and T5 in models/ella_encoder are the ones our graph loads too.
On the same server: reference-format UI workflows run, then run again after scripts/migrate_reference_workflow.py,
and both load intact in the real frontend.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tests.nodes.inprocess import REPO_ROOT, load_pack
from tests.support import reference_surface as rs
from devtools import tiny_models as tm
from tests.support.comfy_server import ComfyServer

MANIFEST = rs.load_manifest()
STANDIN = Path(__file__).resolve().parents[1] / "support" / "reference_pack_standin"
OUR_MODULE = f"custom_nodes.{REPO_ROOT.name}"
T5_DIR = "t5-from-the-reference-pack"  # a T5 folder in models/ella_encoder, where reference users keep it


def _norm(name: str) -> str:
    """How the frontend compares types (case-insensitively); also used for ids and display names."""
    return name.strip().casefold()


def _our_schemas() -> list:
    tm.import_comfy()
    load_pack()
    return [node.define_schema() for node in sys.modules["ella_pack_under_test.nodes.ella_nodes"].NODES]


def test_our_names_are_disjoint_from_the_reference_surface():
    """Node ids, display names and every socket type of our schemas vs the reference's, case-insensitively."""
    schemas = _our_schemas()
    ref_ids = {_norm(n) for n in MANIFEST["nodes"]}
    ref_names = {_norm(spec["display_name"]) for spec in MANIFEST["nodes"].values()}
    ref_types = {_norm(t) for t in MANIFEST["types"]}
    assert len(schemas) == 4 and len(ref_ids) == 11 and len(ref_types) == 3
    our_types = set()
    for schema in schemas:
        assert _norm(schema.node_id) not in ref_ids, schema.node_id
        assert _norm(schema.display_name) not in ref_names, schema.display_name
        our_types |= {str(s.get_io_type()) for s in [*schema.inputs, *schema.outputs]}
    assert {"ELLA_TSC_CONNECTOR", "ELLA_TSC_TEXT_ENCODER"} <= our_types
    clashes = sorted(t for t in our_types if _norm(t) in ref_types)
    assert not clashes, f"types the reference pack also registers: {clashes}"
    pack_name = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert _norm(pack_name) != _norm(MANIFEST["package_dir"])


def _released_shape_connector(models: Path, name: str) -> None:
    """A random connector with the released SD1.5 shapes (the real reference pack loads only those), fp16."""
    from ella_core import ELLA, ELLAConfig, save_ella

    torch.manual_seed(11)
    save_ella(ELLA(ELLAConfig()).half(), models / "ella" / name, {"base_model": "sd15", "llm": "tiny-t5-2048"})


def _t5_in_ella_encoder(models: Path, d_model: int) -> None:
    scratch = models.parent / "scratch"
    built = tm.write_tiny_t5(scratch, T5_DIR, d_model=d_model, num_layers=1)
    (models / "ella_encoder").mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(models / "ella_encoder" / T5_DIR))
    shutil.rmtree(scratch)


@pytest.fixture(scope="module", params=["standin", "reference"])
def both(request, tmp_path_factory):
    """(server, connector file name): ComfyUI with our pack and the reference surface as custom_nodes/comfyui-ella."""
    if request.param == "reference":
        source = os.environ.get("ELLA_REFERENCE_PACK")
        if not source:
            pytest.skip("ELLA_REFERENCE_PACK is not set: point it at an export of TencentQQGYLab/ComfyUI-ELLA "
                        "(e.g. `git archive HEAD | tar -x -C /tmp/ref-ella`) to run this test against the real pack")
        source = Path(source)
        if not (source / "__init__.py").is_file():
            pytest.fail(f"ELLA_REFERENCE_PACK={source} has no __init__.py: not a ComfyUI pack")
    else:
        source = STANDIN
    base = tmp_path_factory.mktemp(f"coexist-{request.param}")
    models = base / "models"
    tm.write_tiny_sd15_checkpoint(models)
    if request.param == "reference":  # the real pack builds the released connector and casts T5 to it
        ella_name = "ella-sd15-released-shape.safetensors"
        _released_shape_connector(models, ella_name)
        _t5_in_ella_encoder(models, d_model=2048)
    else:
        ella_name = tm.ELLA_NAME
        tm.write_tiny_ella(models)
        _t5_in_ella_encoder(models, d_model=tm.T5_HIDDEN)
    packs = base / "packs"
    packs.mkdir()
    (packs / MANIFEST["package_dir"]).symlink_to(source.resolve(), target_is_directory=True)
    server = ComfyServer(base, extra_packs=[packs / MANIFEST["package_dir"]])
    server.start()
    try:
        yield server, ella_name
    finally:
        server.stop()


def reference_graph(ella_name: str, positive: str) -> dict:
    """The reference's per-step graph (its node ids and input names): the positive through ELLA Text Encode,
    the negative through T5 Text Encode #ELLA + ELLA Encode; timesteps from Set ELLA Timesteps."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tm.CHECKPOINT_NAME}},
        "ella": {"class_type": "ELLALoader", "inputs": {"name": ella_name}},
        "t5": {"class_type": "T5TextEncoderLoader #ELLA", "inputs": {"name": T5_DIR, "max_length": 0, "dtype": "FP32"}},
        "steps": {"class_type": "SetEllaTimesteps", "inputs": {"model": ["ckpt", 0], "ella": ["ella", 0],
                                                               "scheduler": "normal", "steps": 2, "denoise": 1.0}},
        "pos": {"class_type": "EllaTextEncode", "inputs": {"ella": ["steps", 0], "text_encoder": ["t5", 0], "text": positive}},
        "neg_embeds": {"class_type": "T5TextEncode #ELLA", "inputs": {"text": "", "text_encoder": ["t5", 0]}},
        "neg": {"class_type": "EllaEncode", "inputs": {"ella": ["steps", 0], "embeds": ["neg_embeds", 0]}},
        **_sampling(["ckpt", 0], "reference_pack"),
    }


def our_graph(ella_name: str, positive: str) -> dict:
    """Ours on the same files: the connector from models/ella, the T5 from the reference's models/ella_encoder."""
    encode = {"text_encoder": ["llm", 0], "ella": ["ella", 0]}
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tm.CHECKPOINT_NAME}},
        "ella": {"class_type": "EllaTSCConnectorLoader", "inputs": {"ella_name": ella_name}},
        "llm": {"class_type": "EllaTSCTextEncoderLoader", "inputs": {"model_name": T5_DIR, "dtype": "fp32", "device": "cpu",
                                                                    "token_mode": "flexible", "max_length": 128}},
        "hook": {"class_type": "EllaTSCTimestepConditioning", "inputs": {"model": ["ckpt", 0], "ella": ["ella", 0]}},
        "pos": {"class_type": "EllaTSCEncode", "inputs": {**encode, "text": positive}},
        "neg": {"class_type": "EllaTSCEncode", "inputs": {**encode, "text": ""}},
        **_sampling(["hook", 0], "ella_tsc"),
    }


def _sampling(model: list, prefix: str) -> dict:
    return {
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def test_reference_surface_served_unchanged(both):
    """Every reference node id, display name, category, socket and widget is served by the reference pack."""
    server, ella_name = both
    info = server.object_info()
    files = {"files:ella": server.get_json("/models/ella"), "config_dirs:ella_encoder": [T5_DIR],
             "comfy.samplers.SCHEDULER_NAMES": info["KSampler"]["input"]["required"]["scheduler"][0]}
    assert ella_name in files["files:ella"]
    missing = [node_id for node_id in MANIFEST["nodes"] if node_id not in info]
    assert not missing, f"reference nodes missing: {missing}\n{server.log_tail()}"
    for node_id in MANIFEST["nodes"]:
        assert rs.served(info[node_id]) == rs.expected(MANIFEST, node_id, files.__getitem__), node_id
    assert set(MANIFEST["model_folders"]) <= set(server.get_json("/models"))


def test_our_surface_present_and_nothing_collides(both):
    server, _ = both
    info = server.object_info()
    ours = {k: v for k, v in info.items() if v["python_module"] == OUR_MODULE}
    assert sorted(ours) == sorted(["EllaTSCConnectorLoader", "EllaTSCTextEncoderLoader", "EllaTSCEncode",
                                   "EllaTSCTimestepConditioning"]), server.log_tail()
    others = {k: v for k, v in info.items() if k not in ours}
    assert len(others) > 100  # ComfyUI's own nodes and the reference's
    other_names = {_norm(v["display_name"] or k): k for k, v in others.items()}  # the frontend shows the id then
    other_ids = {_norm(k) for k in others}
    other_types = {_norm(t) for v in others.values() for t in rs.io_types(v)}
    assert _norm("T5_TEXT_ENCODER") in other_types and _norm("ELLA") in other_types  # the reference's, served
    for node_id, entry in ours.items():
        assert _norm(node_id) not in other_ids, node_id
        assert _norm(entry["display_name"]) not in other_names, (entry["display_name"], other_names.get(_norm(entry["display_name"])))
    own_types = {t for v in ours.values() for t in rs.io_types(v)} - {t for v in others.values() for t in rs.io_types(v)}
    assert own_types == {"ELLA_TSC_CONNECTOR", "ELLA_TSC_TEXT_ENCODER"}
    assert not {_norm(t) for t in own_types} & other_types
    # A migrating user's T5 in models/ella_encoder is offered by our loader too.
    assert T5_DIR in info["EllaTSCTextEncoderLoader"]["input"]["required"]["model_name"][1]["options"]


def test_one_graph_of_each_pack_runs(both):
    server, ella_name = both
    ours = server.run(our_graph(ella_name, "a red fox in the snow"))
    theirs = server.run(reference_graph(ella_name, "a red fox in the snow"))
    assert len(ours.images) == 1 and len(theirs.images) == 1
    assert ours.images[0]["filename"].startswith("ella_tsc") and theirs.images[0]["filename"].startswith("reference_pack")
    for image in (*ours.images, *theirs.images):
        assert server.view(image)[:8] == b"\x89PNG\r\n\x1a\n"
    again = server.run(our_graph(ella_name, "a blue bird"))  # ours still works after the reference's graph ran
    assert len(again.images) == 1


# ---- scripts/migrate_reference_workflow.py: a reference-format UI workflow, migrated, runs on ours --------------
SCRIPTS = REPO_ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import build_example_workflows as builder  # noqa: E402  (scripts/)
import migrate_reference_workflow as migration  # noqa: E402
from workflow_to_prompt import widget_inputs, workflow_to_prompt  # noqa: E402

POSITIVE = "a castle on a hill at sunset"


def reference_ui_workflow(kind: str, info: dict, ella_name: str) -> dict:
    """A workflow as the frontend saves it with the reference pack. per_step: Set ELLA Timesteps, ELLA Text
    Encode with CLIP, T5 Text Encode + ELLA Encode; linked_text: the same with the positive text from a String
    node. apply: T5 Text Encode, Combine CLIP & ELLA Embeds, Apply ELLA with BasicScheduler sigmas."""
    g = builder.Graph(f"reference_{kind}", info)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=tm.CHECKPOINT_NAME)
    ella = g.add("ELLALoader", name=ella_name)
    sampling = dict(seed=5, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    if kind in ("per_step", "linked_text"):
        t5 = g.add("T5TextEncoderLoader #ELLA", name=T5_DIR, max_length=0, dtype="FP32")
        steps = g.add("SetEllaTimesteps", model=ckpt[0], ella=ella[0], scheduler="normal", steps=2, denoise=1.0)
        text = g.add("PrimitiveStringMultiline", value=POSITIVE)[0] if kind == "linked_text" else POSITIVE
        pos = g.add("EllaTextEncode", ella=steps[0], text_encoder=t5[0], text=text, clip=ckpt[1], text_clip=POSITIVE)
        neg = g.add("EllaEncode", ella=steps[0], embeds=g.add("T5TextEncode #ELLA", text="", text_encoder=t5[0])[0])
        model, pos_out, neg_out = ckpt[0], pos[0], neg[0]
    else:
        t5 = g.add("T5TextEncoderLoader #ELLA", name=T5_DIR, max_length=16, dtype="FP32")
        embeds = g.add("T5TextEncode #ELLA", text=POSITIVE, text_encoder=t5[0])
        clip = g.add("CLIPTextEncode", clip=ckpt[1], text=POSITIVE)
        pos = g.add("CombineClipEllaEmbeds", cond=clip[0], embeds=embeds[0])
        neg = g.add("T5TextEncode #ELLA", text="", text_encoder=t5[0])
        sigmas = g.add("BasicScheduler", model=ckpt[0], scheduler="normal", steps=2, denoise=1.0)
        applied = g.add("EllaApply", model=ckpt[0], ella=ella[0], positive=pos[0], negative=neg[0], sigmas=sigmas[0])
        model, pos_out, neg_out = applied[0], applied[1], applied[2]
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampler = g.add("KSampler", model=model, positive=pos_out, negative=neg_out, latent_image=latent[0], **sampling)
    image = g.add("VAEDecode", samples=sampler[0], vae=ckpt[2])
    g.add("SaveImage", images=image[0], filename_prefix=f"ref_{kind}")
    return g.to_ui()


def _input_source(prompt: dict, node_id: str, name: str) -> dict:
    return prompt[prompt[node_id]["inputs"][name][0]]


def test_migration_creates_nodes_as_the_server_defines_them(both):
    server, _ = both
    info = server.object_info()
    for ntype, (sockets, widgets, outputs) in migration.CREATED.items():
        entry = info[ntype]
        widget_names = [w[0] for w in widget_inputs(entry)]
        served_sockets = [(name, entry["input"][group][name][0], group == "optional")
                          for group in ("required", "optional") for name in entry["input_order"].get(group, [])
                          if name not in widget_names]
        assert (served_sockets, widget_names) == (sockets, widgets), ntype
        assert list(zip(entry["output_name"], entry["output"])) == outputs, ntype


@pytest.mark.parametrize("kind", ["per_step", "linked_text", "apply"])
def test_reference_workflow_runs_then_migrated_runs_on_ours(both, kind, tmp_path, capsys):
    """The reference-format workflow runs on the reference pack; migrated (by the command line), it runs on
    ours, wired as README says."""
    server, ella_name = both
    info = server.object_info()
    original = reference_ui_workflow(kind, info, ella_name)
    assert len(server.run(workflow_to_prompt(original, info)).images) == 1

    (tmp_path / "old.json").write_text(json.dumps(original))
    assert migration.main([str(tmp_path / "old.json"), "-o", str(tmp_path / "new.json")]) == 0
    migrated = json.loads((tmp_path / "new.json").read_text())
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert migrated == migration.migrate(original)[0]
    types = {n["type"] for n in migrated["nodes"]}
    assert not types & set(MANIFEST["nodes"]), types
    prompt = workflow_to_prompt(migrated, info)
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    assert _input_source(prompt, sampler, "model")["class_type"] == "EllaTSCTimestepConditioning"
    positive = _input_source(prompt, sampler, "positive")
    assert positive["class_type"] == "EllaTSCEncode"
    text = positive["inputs"]["text"]
    if kind == "linked_text":
        assert (prompt[text[0]]["class_type"], prompt[text[0]]["inputs"]["value"]) == ("PrimitiveStringMultiline", POSITIVE)
    else:
        assert text == POSITIVE
    assert positive["inputs"]["clip"][0] == next(k for k, v in prompt.items() if v["class_type"] == "CheckpointLoaderSimple")
    loader = next(v for v in prompt.values() if v["class_type"] == "EllaTSCTextEncoderLoader")
    assert (loader["inputs"]["token_mode"], loader["inputs"]["max_length"]) == (
        ("fixed", 16) if kind == "apply" else ("flexible", migration.FLEXIBLE_MAX_LENGTH))
    assert any("SetEllaTimesteps" in n or "sigmas" in n for n in notes), notes
    result = server.run(prompt)
    assert len(result.images) == 1


@pytest.mark.parametrize("max_length", [0, 16, 64, 128])
@pytest.mark.parametrize("dtype", ["auto", "FP16", "FP32"])
def test_migration_maps_every_t5_loader_setting(max_length, dtype):
    """The whole widget domain of the reference's T5 loader (0..128 in steps of 16, three dtypes)."""
    ui = {"nodes": [{"id": 1, "type": "T5TextEncoderLoader #ELLA", "pos": [0, 0], "inputs": [],
                     "outputs": [{"name": "T5_TEXT_ENCODER", "type": "T5_TEXT_ENCODER", "links": None}],
                     "widgets_values": ["flan-t5-xl", max_length, dtype]}], "links": [], "last_node_id": 1}
    migrated, _ = migration.migrate(ui)
    (node,) = migrated["nodes"]
    assert node["type"] == "EllaTSCTextEncoderLoader"
    mode, length = ("flexible", migration.FLEXIBLE_MAX_LENGTH) if max_length == 0 else ("fixed", max_length)
    assert node["widgets_values"] == ["flan-t5-xl", {"auto": "default", "FP16": "fp16", "FP32": "fp32"}[dtype],
                                      "auto", mode, length]


def test_migration_widget_orders_match_the_manifest():
    """The script reads `widgets_values` positionally: its orders must be the reference's."""
    widget_kinds = {"INT", "FLOAT", "STRING", "COMBO", "BOOLEAN"}
    for node_id, spec in MANIFEST["nodes"].items():
        widgets = [n for group in ("required", "optional") for n, kind, _ in spec["inputs"].get(group, [])
                   if kind in widget_kinds]
        assert widgets == migration.REFERENCE_WIDGETS.get(node_id, []), node_id


def test_migration_names_the_node_it_cannot_rewrite():
    ui = {"nodes": [{"id": 7, "type": "EllaEncode", "pos": [0, 0], "inputs": [{"name": "ella", "type": "ELLA", "link": None},
                                                                              {"name": "embeds", "type": "ELLA_EMBEDS", "link": None}],
                     "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": None}]}], "links": []}
    with pytest.raises(migration.MigrationError, match="node 7 .*'ella' is not connected"):
        migration.migrate(ui)


def test_reference_and_migrated_workflows_load_in_the_real_frontend(both, tmp_path):
    """What a person sees: in headless Chromium on the two-pack server, each reference workflow and its migration
    load with every node type registered and every link intact, and the frontend's own UI -> API conversion of
    the migrated one equals scripts/workflow_to_prompt.py's (which the tests above ran)."""
    from tests.frontend.test_frontend import HERE as FRONTEND, SHORT_PROMPT, LONG_PROMPT, _need_browser

    server, ella_name = both
    modules = _need_browser()
    info = server.object_info()
    files = {}
    for kind in ("per_step", "linked_text", "apply"):
        original = reference_ui_workflow(kind, info, ella_name)
        for label, wf in ((f"reference_{kind}", original), (f"migrated_{kind}", migration.migrate(original)[0])):
            files[label] = tmp_path / f"{label}.json"
            files[label].write_text(json.dumps(wf))
    config = {"server": server.url, "workflows": {k: str(v) for k, v in files.items()},
              "token_workflow": "migrated_per_step", "user_data_dir": str(tmp_path / "chromium-profile"),
              "screenshot": str(tmp_path / "migrated.png"), "text_encoder_name": T5_DIR,
              "short_prompt": SHORT_PROMPT, "long_prompt": LONG_PROMPT, "out": str(tmp_path / "report.json")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(["node", str(FRONTEND / "check_workflows.mjs"), str(tmp_path / "config.json")],
                          env=dict(os.environ, ELLA_NODE_MODULES=modules), capture_output=True, text=True, timeout=300)
    assert Path(config["out"]).is_file(), f"node script wrote no report:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(Path(config["out"]).read_text())
    assert "fatal" not in report, report.get("fatal")
    assert not report["page_errors"], report["page_errors"]
    for label, path in files.items():
        wf, seen = json.loads(path.read_text()), report["workflows"][label]
        assert seen["problems"] == [], f"{label}: {seen['problems']}"
        assert (seen["node_count"], seen["link_count"]) == (len(wf["nodes"]), len(wf["links"])), label
        if label.startswith("migrated"):
            ours, theirs = workflow_to_prompt(wf, info), seen["api_prompt"]
            assert {k: (v["class_type"], v["inputs"]) for k, v in ours.items()} == \
                {k: (v["class_type"], v["inputs"]) for k, v in theirs.items()}, label
    # The migrated graph's ELLA Prompt Encode counts tokens with the T5 from models/ella_encoder.
    assert report["tokens"]["short"]["info"]["total"] > 0, report["tokens"]["short"]
