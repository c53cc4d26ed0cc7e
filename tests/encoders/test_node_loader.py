"""The real `Load ELLA Text Encoder` node inside an in-process ComfyUI (CPU): a single fp16 T5 file with no
tokenizer beside it, ComfyUI's --*-text-enc precision flags, and partial (lowvram) loads.

Runs on both transformers versions scripts/test.sh tests (the newest and the 4.50.3 floor)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from ella_core.dtypes import NAMES
from ella_core.text_encoder import load_text_encoder

from encoder_builders import build_t5_folder, write_t5_single_file

SINGLE = "flan-t5-tiny-fp16.safetensors"
PREFIXED = "t5xxl-style/tiny_t5_comfy.safetensors"
FLAGS = {"fp8_e4m3fn_text_enc": "--fp8_e4m3fn-text-enc", "fp8_e5m2_text_enc": "--fp8_e5m2-text-enc",
         "fp16_text_enc": "--fp16-text-enc", "bf16_text_enc": "--bf16-text-enc", "fp32_text_enc": "--fp32-text-enc"}


@pytest.fixture(scope="module")
def comfy_env(tmp_path_factory):
    """ComfyUI imported on CPU, our pack loaded by path, models/text_encoders holding two tokenizer-less T5 files."""
    from tests.nodes.inprocess import PACK_MODULE, load_pack
    from devtools import tiny_models as tm

    tm.import_comfy()
    import folder_paths

    base = tmp_path_factory.mktemp("node-loader")
    (base / "src").mkdir()
    folder = build_t5_folder(base / "src", seed=3)
    encoders = base / "models" / "text_encoders"
    (encoders / "t5xxl-style").mkdir(parents=True)
    write_t5_single_file(folder, encoders / SINGLE)
    write_t5_single_file(folder, encoders / PREFIXED, prefix="text_encoders.t5xxl.transformer.")
    folder_paths.add_model_folder_path("text_encoders", str(encoders), is_default=True)
    load_pack()
    nodes = sys.modules[f"{PACK_MODULE}.nodes.ella_nodes"]
    return {"nodes": nodes, "folders": sys.modules[f"{PACK_MODULE}.nodes.folders"], "src": folder,
            "encoders": encoders, "managed": sys.modules[f"{PACK_MODULE}.nodes.managed"]}


@pytest.fixture
def no_flags(monkeypatch):
    from comfy.cli_args import args

    for flag in FLAGS:
        monkeypatch.setattr(args, flag, False)
    return args


def _load(env, name, dtype="fp16", mode="fixed", max_length=16):
    return env["nodes"].EllaTSCTextEncoderLoader.execute(name, dtype, "cpu", mode, max_length).result[0]


@pytest.mark.parametrize("name", [SINGLE, PREFIXED])
def test_single_t5_file_without_tokenizer_loads_through_the_node(comfy_env, no_flags, name):
    assert not any(p.suffix != ".safetensors" for p in comfy_env["encoders"].rglob("*") if p.is_file())
    assert name in comfy_env["folders"].list_text_encoders()  # offered in the node's list
    managed = _load(comfy_env, name)
    assert "T5" in type(managed.encoder.tokenizer.tokenizer).__name__  # ComfyUI's T5 tokenizer
    reference = load_text_encoder(str(comfy_env["src"]), dtype="fp16")  # the folder it came from
    for prompt in ["a photo of a cat wearing a red hat", "", "an astronaut riding a horse on the moon"]:
        direct = reference.encode([prompt], mode="fixed", max_length=16).prompt_features(0)
        assert torch.equal(managed.encode(prompt), direct)
    wo = managed.encoder.model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32  # the recipe's fp32 `wo` survives the single-file load


@pytest.mark.parametrize("flag", FLAGS)
def test_comfy_precision_flags_take_effect(comfy_env, no_flags, flag, caplog):
    from comfy.cli_args import parser

    parsed = parser.parse_args([FLAGS[flag]])  # ComfyUI's own parser sets exactly the attribute the node reads
    assert [f for f in FLAGS if getattr(parsed, f)] == [flag]
    setattr(no_flags, flag, True)
    expected = flag[: -len("_text_enc")]
    managed = _load(comfy_env, SINGLE, dtype="default")
    assert managed.encoder.precision.name == expected
    storage = NAMES[expected]
    q = managed.encoder.model.encoder.block[0].layer[0].SelfAttention.q.weight
    assert q.dtype == storage
    assert managed.encoder.dtype == (torch.float16 if storage.itemsize == 1 else storage)
    features = managed.encode("a red hat")
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    # an explicit widget value wins, and the log names the flag it overrides
    other = "fp32" if expected != "fp32" else "bf16"
    with caplog.at_level(logging.WARNING):
        managed = _load(comfy_env, SINGLE, dtype=other)
    assert managed.encoder.precision.name == other
    assert any(FLAGS[flag] in r.getMessage() and other in r.getMessage() for r in caplog.records)


def test_default_without_flags_is_fp32_on_cpu(comfy_env, no_flags):
    assert _load(comfy_env, SINGLE, dtype="default").encoder.precision.name == "fp32"


def test_partial_load_keeps_features_exact(comfy_env, no_flags, monkeypatch):
    """ComfyUI's lowvram path leaves layers on the offload device; the encoder still runs, bit-identically,
    and the node no longer forces a full load."""
    import comfy.model_management as mm

    managed = _load(comfy_env, SINGLE, dtype="fp32")
    full = managed.encoder.encode(["a dog in a garden"], max_length=16).features
    calls = []
    real = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **k: calls.append(k) or real(models, *a, **k))
    managed.encode("a cat")
    assert calls and not calls[0].get("force_full_load", False)
    patcher = managed.patcher
    size = patcher.model_size()
    patcher.unpatch_model()
    patcher.load(torch.device("cpu"), lowvram_model_memory=size // 3, full_load=False)
    try:
        assert patcher.model.model_lowvram  # ComfyUI really did a partial load
        offloaded = [m for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False)]
        assert offloaded, "no module was left to cast-on-use"
        partial = managed.encoder.encode(["a dog in a garden"], max_length=16).features
        assert torch.equal(partial, full)
    finally:
        patcher.unpatch_model()
