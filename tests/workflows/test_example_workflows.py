"""Every example workflow, queued through a real ComfyUI server's HTTP API with tiny models, saves a real PNG.

Also checks that the committed example files are exactly what scripts/build_example_workflows.py generates from
the server's current /object_info (so widget order and defaults match the installed nodes), and that the
UI -> API converter rejects what it cannot convert with a message naming the node.
"""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
from PIL import Image

# (examples puts scripts/ on sys.path)
from tests.workflows.examples import TEST_SIZE, WORKFLOW_DIR, example_files, substitute_tiny

import build_example_workflows as builder  # noqa: E402  (scripts/)
from workflow_to_prompt import WorkflowError, widget_values_by_name, workflow_to_prompt  # noqa: E402

EXPECTED = {  # file -> node types it must contain (the feature each example shows)
    "ELLA text to image (SD1.5).json": {"KSampler", "EmptyLatentImage"},
    "ELLA and CLIP with a LoRA (SD1.5).json": {"LoraLoader"},
    "ELLA with ControlNet canny (SD1.5).json": {"ControlNetLoader", "ControlNetApplyAdvanced", "LoadImage", "Canny"},
    "ELLA image to image (SD1.5).json": {"VAEEncode", "LoadImage"},
    "ELLA regional prompts (SD1.5).json": {"ConditioningSetArea", "ConditioningCombine"},
    "ELLA with SamplerCustom and Align Your Steps (SD1.5).json": {"SamplerCustom", "AlignYourStepsScheduler"},
}
OURS = {"EllaTSCConnectorLoader", "EllaTSCTextEncoderLoader", "EllaTSCEncode", "EllaTSCTimestepConditioning"}
# Loader -> (file input, model folder) of every file the examples select; each must be downloadable.
LOADERS = {"CheckpointLoaderSimple": ("ckpt_name", "checkpoints"), "EllaTSCConnectorLoader": ("ella_name", "ella"),
           "EllaTSCTextEncoderLoader": ("model_name", "text_encoders"),
           "ControlNetLoader": ("control_net_name", "controlnet")}


def test_example_set_is_complete():
    names = {p.name for p in example_files()}
    assert names == set(EXPECTED), f"example_workflows/ holds {sorted(names)}"
    for path in example_files():
        wf = json.loads(path.read_text())
        types = {n["type"] for n in wf["nodes"]}
        assert OURS <= types, f"{path.name} lacks {OURS - types}"
        assert EXPECTED[path.name] <= types, f"{path.name} lacks {EXPECTED[path.name] - types}"
        values = [v for n in wf["nodes"] for v in n.get("widgets_values", [])]
        assert "ella-sd1.5-tsc-t5xl.safetensors" in values, path.name
        assert "flan-t5-xl-encoder-fp16.safetensors" in values, path.name


def _selected_files(wf: dict, object_info: dict) -> list[tuple[str, str]]:
    """(folder, file) chosen by every model loader of a UI workflow, read by input name, not by position."""
    out = []
    for node in wf["nodes"]:
        if node["type"] in LOADERS:
            name, folder = LOADERS[node["type"]]
            out.append((folder, widget_values_by_name(node, object_info[node["type"]])[name]))
    return out


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.stem)
def test_models_list_offers_every_selected_file(object_info, path):
    """The top-level `models` list (read by the frontend's Missing Models dialog) has one downloadable entry per
    file a loader selects: name = the selected value, its loader's folder, a Hugging Face URL; single files only."""
    wf = json.loads(path.read_text())
    selected = _selected_files(wf, object_info)
    assert {"checkpoints", "ella", "text_encoders"} <= {folder for folder, _ in selected}, selected
    listed = {(m["directory"], m["name"]): m["url"] for m in wf["models"]}
    assert len(listed) == len(wf["models"]), "duplicate entries in models"
    assert set(listed) == set(selected), f"{path.name}: models {sorted(listed)} vs loaders {sorted(selected)}"
    for (folder, name), url in listed.items():
        assert name.endswith((".safetensors", ".sft")), f"{name}: the frontend offers only single weight files"
        assert url.startswith("https://huggingface.co/") and "/resolve/" in url and url.endswith(".safetensors")
    for node in wf["nodes"]:  # node-level copies (kept when a node is copied to another graph) agree
        for entry in node["properties"].get("models", []):
            assert listed[(entry["directory"], entry["name"])] == entry["url"]


def test_pack_nodes_carry_registry_id_and_version():
    """Our nodes' properties say cnr_id = the pyproject name and ver = its version (as the frontend writes them
    for registry packs); core nodes carry neither."""
    import tomllib

    project = tomllib.loads((WORKFLOW_DIR.parent / "pyproject.toml").read_text())["project"]
    for path in example_files():
        for node in json.loads(path.read_text())["nodes"]:
            props = node["properties"]
            if node["type"] in OURS:
                assert (props.get("cnr_id"), props.get("ver")) == (project["name"], project["version"]), node
                assert list(props)[:3] == ["cnr_id", "ver", "Node name for S&R"], props
            else:
                assert "cnr_id" not in props and "ver" not in props, node


def test_committed_files_match_generator(object_info):
    generated = builder.build_all(object_info)
    for name, wf in generated.items():
        committed = (WORKFLOW_DIR / name).read_text(encoding="utf-8")
        assert committed == builder.dumps(wf), (
            f"example_workflows/{name} is out of date with the nodes' /object_info: run "
            f"python scripts/build_example_workflows.py --server <url>")


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.stem)
def test_example_runs_and_saves_png(example_server, object_info, path):
    server, names = example_server
    workflow = json.loads(path.read_text())
    prompt = substitute_tiny(workflow_to_prompt(workflow, object_info), names)
    save_nodes = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert save_nodes, f"{path.name} has no SaveImage"
    result = server.run(prompt, timeout=240)
    for node_id in save_nodes:
        images = result.outputs(node_id).get("images", [])
        assert len(images) == 1, f"{path.name}: SaveImage {node_id} produced {images}"
        img = images[0]
        file = server.base_dir / "output" / img["subfolder"] / img["filename"]
        assert file.is_file(), f"{file} reported in /history but missing"
        data = file.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{file} is not a PNG"
        Image.open(io.BytesIO(data)).verify()
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert pixels.shape == (TEST_SIZE, TEST_SIZE, 3), pixels.shape
        assert pixels.std() > 0, f"{path.name}: the image is a single flat colour (NaN or dead model?)"
        assert server.view(img) == data  # the server serves the same file it wrote


def test_converter_skips_frontend_control_values(object_info):
    wf = json.loads((WORKFLOW_DIR / "ELLA with SamplerCustom and Align Your Steps (SD1.5).json").read_text())
    node = next(n for n in wf["nodes"] if n["type"] == "SamplerCustom")
    named = widget_values_by_name(node, object_info["SamplerCustom"])
    assert named == {"add_noise": True, "noise_seed": 1234, "cfg": 7.5}, named  # "fixed" dropped
    loader = {"id": 9, "type": "LoadImage", "widgets_values": ["example.png", "image"], "inputs": []}
    assert widget_values_by_name(loader, object_info["LoadImage"]) == {"image": "example.png"}


def test_converter_errors_name_the_node(object_info):
    wf = json.loads((WORKFLOW_DIR / "ELLA text to image (SD1.5).json").read_text())
    broken = copy.deepcopy(wf)
    broken["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowError, match=r"node 1 has type 'NoSuchNode'"):
        workflow_to_prompt(broken, object_info)
    nested = copy.deepcopy(wf)
    nested["definitions"] = {"subgraphs": [{"id": "6c1d0a52-0000-4000-8000-000000000001", "nodes": []}]}
    nested["nodes"][0]["type"] = "6c1d0a52-0000-4000-8000-000000000001"
    with pytest.raises(WorkflowError, match=r"node 1 is a subgraph"):
        workflow_to_prompt(nested, object_info)
    dangling = copy.deepcopy(wf)
    dangling["links"] = dangling["links"][1:]
    with pytest.raises(WorkflowError, match=r"link \d+ is referenced"):
        workflow_to_prompt(dangling, object_info)


def test_converter_bypass_and_mute(object_info):
    """A bypassed LoraLoader passes model and clip through; a muted SaveImage is dropped."""
    wf = json.loads((WORKFLOW_DIR / "ELLA and CLIP with a LoRA (SD1.5).json").read_text())
    lora = next(n for n in wf["nodes"] if n["type"] == "LoraLoader")
    ckpt = next(n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple")
    lora["mode"] = 4
    prompt = workflow_to_prompt(wf, object_info)
    assert str(lora["id"]) not in prompt
    hook = next(v for v in prompt.values() if v["class_type"] == "EllaTSCTimestepConditioning")
    assert hook["inputs"]["model"] == [str(ckpt["id"]), 0]
    enc = next(v for v in prompt.values() if v["class_type"] == "EllaTSCEncode")
    assert enc["inputs"]["clip"] == [str(ckpt["id"]), 1]
    next(n for n in wf["nodes"] if n["type"] == "SaveImage")["mode"] = 2
    assert not any(v["class_type"] == "SaveImage" for v in workflow_to_prompt(wf, object_info).values())
