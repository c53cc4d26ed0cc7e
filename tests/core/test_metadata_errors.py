"""Connector metadata and GGUF files that are wrong: each error names the key or file and the value, and
comes before anything large is built or read."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ella_core import ELLA, ELLACheckpointError, ELLAConfig, load_ella, read_ella_metadata, save_ella
from ella_core import checkpoint as ckpt
from ella_core.gguf_check import GGUFFileError, check_gguf_file

CONFIG = ELLAConfig(input_dim=32, width=64, layers=2, heads=4, num_latents=4, time_channel=16, time_embed_dim=32)
BAD_METADATA = [
    ({"ella_config": "[1,2]"}, "'ella_config' must be a JSON object"),
    ({"ella_config": "{bad"}, "'ella_config' is not valid JSON"),
    ({"ella_config": json.dumps({**CONFIG.to_dict(), "width": "64"})}, "'ella_config': ELLAConfig.width must be a positive integer, got '64'"),
    ({"ella_config": json.dumps({**CONFIG.to_dict(), "depth": 3})}, "'ella_config': ELLAConfig: unknown config fields \\['depth'\\]"),
    ({"ella_token_length": "abc"}, "'ella_token_length' must be an integer, got 'abc'"),
    ({"ella_token_length": "0"}, "'ella_token_length' must be a positive integer, got 0"),
    ({"ella_llm_hidden_layer": "-2.5"}, "'ella_llm_hidden_layer' must be an integer, got '-2.5'"),
    ({"ella_token_mode": "wobbly"}, "'ella_token_mode' must be one of \\['fixed', 'flexible'\\], got 'wobbly'"),
    ({"ella_base_model": "sd3"}, "'ella_base_model' must be one of \\['sd15', 'sdxl'\\], got 'sd3'"),
    ({"ella_config": json.dumps({**CONFIG.to_dict(), "layers": 3000, "width": 65536})},
     "does not match its tensors: width=65536 \\(tensors say 64\\), layers=3000 \\(tensors say 2\\)"),
]


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta") / "good.safetensors"
    torch.manual_seed(0)
    save_ella(ELLA(CONFIG), path, {"token_length": 8, "token_mode": "fixed"})
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("change, message", BAD_METADATA)
def test_bad_metadata_names_the_key(good_file, tmp_path, monkeypatch, change, message):
    tensors, meta = good_file
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), {**meta, **change})
    built = []
    monkeypatch.setattr(ckpt, "_meta_module", lambda config: built.append(config) or pytest.fail("module built"))
    for read in (load_ella, read_ella_metadata):
        with pytest.raises(ELLACheckpointError, match=message) as failure:
            read(path)
        assert str(path) in str(failure.value)
    assert not built  # refused from the header and shapes alone, before any module exists


def test_good_metadata_still_loads(good_file, tmp_path):
    tensors, meta = good_file
    save_file(tensors, str(tmp_path / "ok.safetensors"), meta)
    module = load_ella(tmp_path / "ok.safetensors")
    assert module.config == CONFIG and read_ella_metadata(tmp_path / "ok.safetensors").token_length == 8


@pytest.fixture(scope="module")
def gguf_path():
    path = os.environ.get("ELLA_SMOLLM2_GGUF")
    if not path or not os.path.isfile(path):
        pytest.fail("ELLA_SMOLLM2_GGUF is not set: run eval \"$(bash scripts/setup_env.sh)\"")
    return path


def test_complete_gguf_passes(gguf_path):
    check_gguf_file(gguf_path)


@pytest.mark.parametrize("fraction", [0.0, 0.00001, 0.001, 0.01, 0.05, 0.3, 0.6, 0.99, 0.9999999])
def test_truncated_gguf_is_named_fast(gguf_path, tmp_path, fraction):
    """Cut anywhere (magic, header, vocabulary, tensor table, tensor data): refused, naming the file."""
    size = os.path.getsize(gguf_path)
    cut = tmp_path / "SmolLM2-cut.gguf"
    with open(gguf_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(int(size * fraction)))
    start = time.perf_counter()
    with pytest.raises(GGUFFileError, match="SmolLM2-cut.gguf"):
        check_gguf_file(cut)
    print(f"cut at {fraction:.7f}: refused in {time.perf_counter() - start:.3f}s")


def test_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(GGUFFileError, match="model.gguf does not start with the GGUF magic"):
        check_gguf_file(fake)


def test_truncated_gguf_through_load_tokenizer(gguf_path, tmp_path):
    from ella_core.tokenization import load_tokenizer

    cut = tmp_path / "half.gguf"
    with open(gguf_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(os.path.getsize(gguf_path) // 2))
    with pytest.raises(GGUFFileError, match="half.gguf is truncated: its header describes 272 tensors"):
        load_tokenizer(str(cut))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_gguf_through_load_text_encoder(gguf_path, tmp_path, fraction):
    """The trainer's and scripts' path (ella_core.load_text_encoder) names the file before any parsing."""
    from ella_core import TextEncoderError, load_text_encoder

    cut = tmp_path / "cut-encoder.gguf"
    with open(gguf_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(int(os.path.getsize(gguf_path) * fraction)))
    with pytest.raises(TextEncoderError, match="cut-encoder.gguf"):
        load_text_encoder(str(cut))
