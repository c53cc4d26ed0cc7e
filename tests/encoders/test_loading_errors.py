"""Every loading error names the file and the numbers (issue point 8), and pickles are refused (point 7)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from ella_core.llm_loading import TextEncoderError, infer_t5_config
from ella_core.text_encoder import WidthMismatchError, check_width, load_text_encoder
from ella_core.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def t5_state(tiny_t5_dir):
    return load_file(str(tiny_t5_dir / "model.safetensors"))


def test_partial_key_set(tmp_path, t5_state, t5_tokenizer_dir):
    state = {k: v for k, v in t5_state.items() if "block.1.layer.1" not in k}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    (tmp_path / "config.json").write_text(json.dumps(infer_t5_config({k: tuple(v.shape) for k, v in t5_state.items()}, "x").to_dict()))
    with pytest.raises(TextEncoderError) as info:
        load_text_encoder(str(path), tokenizer=str(t5_tokenizer_dir))
    message = str(info.value)
    assert str(path) in message and "4 of the model's" in message and "encoder.block.1.layer.1" in message


def test_partial_blocks_without_config(tmp_path, t5_state, t5_tokenizer_dir):
    state = {k: v for k, v in t5_state.items() if not k.startswith("encoder.block.0.")}
    path = tmp_path / "noblock0.safetensors"
    save_file(state, str(path))
    with pytest.raises(TextEncoderError, match=re.escape(str(path)) + r".*(block 0|blocks \[0\]|architecture)"):
        load_text_encoder(str(path), tokenizer=str(t5_tokenizer_dir))


def test_unknown_keys(tmp_path, t5_state, t5_tokenizer_dir):
    state = dict(t5_state)
    state["encoder.block.0.layer.0.SelfAttention.scale_weight"] = torch.ones(1)
    state["encoder.extra.weight"] = torch.ones(2)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    with pytest.raises(TextEncoderError, match=re.escape(str(path)) + r".*2 keys are not part of this model.*scale_weight"):
        load_text_encoder(str(path), tokenizer=str(t5_tokenizer_dir))


def test_shape_mismatch_against_config(tmp_path, tiny_t5_dir, t5_state, t5_tokenizer_dir):
    config = json.loads((tiny_t5_dir / "config.json").read_text())
    config["d_ff"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    path = tmp_path / "t5.safetensors"
    save_file(t5_state, str(path))
    with pytest.raises(TextEncoderError) as info:
        load_text_encoder(str(path), tokenizer=str(t5_tokenizer_dir))
    message = str(info.value)
    assert str(path) in message and "shape mismatches" in message and "file [48, 32], config [40, 32]" in message


def test_unknown_architecture_without_config(tmp_path, t5_tokenizer_dir):
    path = tmp_path / "mystery.safetensors"
    save_file({"layers.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(TextEncoderError, match=re.escape(str(path)) + ".*no config.json.*cannot be inferred"):
        load_text_encoder(str(path), tokenizer=str(t5_tokenizer_dir))


def test_missing_tokenizer(tmp_path, t5_state, tiny_t5_dir):
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file(t5_state, str(path))
    with pytest.raises(TextEncoderError, match=re.escape(str(path)) + ".*carries no tokenizer.*pass tokenizer="):
        load_text_encoder(str(path))
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    with pytest.raises(TextEncoderError, match="no tokenizer found in " + re.escape(str(empty))):
        load_text_encoder(str(path), tokenizer=str(empty))
    folder = tmp_path / "no_tok_folder"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_t5_dir / name).read_bytes())
    with pytest.raises(TextEncoderError, match="no tokenizer found in " + re.escape(str(folder))):
        load_text_encoder(str(folder))
    with pytest.raises(TextEncoderError, match="tokenizer folder .*does not exist"):
        load_text_encoder(str(path), tokenizer=str(tmp_path / "nowhere"))


def test_folder_errors(tmp_path):
    with pytest.raises(TextEncoderError, match=re.escape(str(tmp_path)) + ": the folder has no config.json"):
        load_text_encoder(str(tmp_path))
    with pytest.raises(TextEncoderError, match="not found: not an existing file or folder, nor a hub id"):
        load_text_encoder(str(tmp_path / "missing.safetensors"))
    with pytest.raises(TextEncoderError, match="'models/t5xxl_fp16.safetensors' not found"):  # not taken for a hub id
        load_text_encoder("models/t5xxl_fp16.safetensors")


def test_unknown_architecture_folder(tmp_path, t5_tokenizer_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_llm", "hidden_size": 8}))
    for item in t5_tokenizer_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    with pytest.raises(TextEncoderError, match=re.escape(str(tmp_path)) + ": transformers cannot use its config.json.*no_such_llm"):
        load_text_encoder(str(tmp_path))


def test_remote_code_needs_opt_in(tmp_path, t5_tokenizer_dir):
    """trust_remote_code stays off unless asked: a folder's custom code is never executed by default."""
    marker = tmp_path / "executed"
    (tmp_path / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "custom_llm", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    for item in t5_tokenizer_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    with pytest.raises(TextEncoderError, match="(?s)" + re.escape(str(tmp_path)) + ".*trust_remote_code"):
        load_text_encoder(str(tmp_path))
    assert not marker.exists()


def test_hub_id_offline_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here; offline mode fails at once instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TextEncoderError, match="google/flan-t5-xl: not a local file or folder, and downloading it"):
        load_text_encoder("google/flan-t5-xl")


class NotATensor:
    pass


def test_pickles_are_refused(tmp_path, t5_state, t5_tokenizer_dir, tiny_t5_dir, tiny_t5_fp32):
    evil = tmp_path / "evil.bin"
    torch.save({"shared.weight": t5_state["shared.weight"], "payload": NotATensor()}, str(evil))
    with pytest.raises(TextEncoderError, match=re.escape(str(evil)) + ": refusing to load.*weights_only=True"):
        load_text_encoder(str(evil), tokenizer=str(t5_tokenizer_dir))
    # a plain tensor dict in a .bin loads (weights_only=True accepts it)
    plain = tmp_path / "plain" / "t5.bin"
    plain.parent.mkdir()
    torch.save(dict(t5_state), str(plain))
    enc = load_text_encoder(str(plain), tokenizer=str(t5_tokenizer_dir), dtype="fp32")
    assert torch.equal(enc.encode("a cat").features, tiny_t5_fp32.encode("a cat").features)


def test_pickle_folder_refused(tmp_path, tiny_t5_dir, t5_tokenizer_dir):
    folder = tmp_path / "binfolder"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_t5_dir / "config.json").read_text())
    torch.save({"x": NotATensor()}, str(folder / "pytorch_model.bin"))
    for item in t5_tokenizer_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    with pytest.raises(TextEncoderError, match=re.escape(str(folder)) + ": refusing to load.*weights_only=True"):
        load_text_encoder(str(folder))


def test_partial_folder(tmp_path, tiny_t5_dir, t5_state):
    """transformers only warns and random-initialises missing weights; we refuse."""
    folder = tmp_path / "partial_folder"
    folder.mkdir()
    for item in tiny_t5_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    save_file({k: v for k, v in t5_state.items() if "block.1.layer.1" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(TextEncoderError, match=re.escape(str(folder)) + ": 4 weights the model needs are missing"):
        load_text_encoder(str(folder))


def test_bad_settings(tiny_t5_dir, tiny_t5_fp32):
    with pytest.raises(TextEncoderError, match="unknown text encoder dtype 'fp8'"):
        load_text_encoder(str(tiny_t5_dir), dtype="fp8")
    with pytest.raises(TextEncoderError, match="family='decoder' was asked for, but the config says model_type 't5'"):
        load_text_encoder(str(tiny_t5_dir), family="decoder")
    with pytest.raises(ValueError, match="token mode must be one of"):
        tiny_t5_fp32.encode("a cat", mode="loose")
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        tiny_t5_fp32.encode("a cat", max_length=0)


def test_check_width():
    check_width(576, 576, "SmolLM2", "ella-smol")
    with pytest.raises(WidthMismatchError, match="LLM SmolLM2 outputs width 576 but connector ella-sd15 expects input_dim 2048"):
        check_width(576, 2048, "SmolLM2", "ella-sd15")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TextEncoderError, match="no tokenizer found"):
        load_tokenizer(str(tmp_path))
