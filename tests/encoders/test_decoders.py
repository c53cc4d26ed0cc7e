"""Decoder-only LLMs (tiny Llama built from a config) against transformers' numerics."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ella_core.llm_loading import TextEncoderError, hf_dtype_kwargs
from ella_core.text_encoder import load_text_encoder


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_text_encoder(str(tiny_llama_dir), dtype="fp32")


@pytest.fixture(scope="module")
def llama_hf(tiny_llama_dir):
    from transformers import LlamaModel

    return LlamaModel.from_pretrained(tiny_llama_dir, **hf_dtype_kwargs(torch.float32)).eval()


def reference(model, ids, hidden_layer=None):
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]


def test_tokenizer_rules(llama):
    tok = llama.tokenizer
    assert llama.family == "decoder" and llama.dtype == torch.float32
    assert tok.pad_id == tok.tokenizer.eos_token_id == 2  # no pad token -> EOS pads
    ids, count = tok.tokenize("a cat on the mat")
    assert ids[0] == 1 and len(ids) == 6 and count.total == 6  # BOS added, as the tokenizer does
    empty, count = tok.tokenize("")
    assert empty == [1] and count.total == 1  # at least one token


def test_fixed_mode_right_padding_matches_unpadded(llama, llama_hf):
    prompts = ["a cat on the mat", "a big red car on the road at night in the city"]
    enc = llama.encode(prompts, max_length=16)
    assert enc.features.shape == (2, 16, 32)
    assert enc.attention_mask[0].tolist() == [1] * 6 + [0] * 10  # right padding
    for i, prompt in enumerate(prompts):
        ids, _ = llama.tokenizer.tokenize(prompt)
        ref = reference(llama_hf, ids)
        # causal attention: real tokens do not see the padding after them
        torch.testing.assert_close(enc.features[i : i + 1, : len(ids)], ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(enc.features).all()  # padding positions included


def test_flexible_mode_and_default_dtype(tiny_llama_dir, llama, llama_hf):
    prompts = ["a dog", "a small green house with a tree in the garden", ""]
    enc = llama.encode(prompts, mode="flexible")
    for i, prompt in enumerate(prompts):
        alone = llama.encode(prompt, mode="flexible")
        assert torch.equal(enc.prompt_features(i), alone.features)
        ids, _ = llama.tokenizer.tokenize(prompt)
        torch.testing.assert_close(alone.features, reference(llama_hf, ids), rtol=1e-5, atol=1e-5)
    default = load_text_encoder(str(tiny_llama_dir))
    assert default.dtype == torch.bfloat16  # documented default for decoders
    out = default.encode("a dog", mode="flexible")
    assert out.features.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.features, enc.prompt_features(0), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("layer", [0, 1, -2, 3, -1])
def test_hidden_layer_choice(tiny_llama_dir, llama_hf, layer):
    enc = load_text_encoder(str(tiny_llama_dir), dtype="fp32", hidden_layer=layer)
    ids, _ = enc.tokenizer.tokenize("a red hat")
    got = enc.encode("a red hat", mode="flexible").features
    torch.testing.assert_close(got, reference(llama_hf, ids, layer), rtol=1e-5, atol=1e-5)
    if layer not in (-1, 3):
        assert not torch.allclose(got, reference(llama_hf, ids))


def test_hidden_layer_out_of_range(tiny_llama_dir):
    with pytest.raises(TextEncoderError, match=r"hidden_layer 4 is out of range; this model has 3 layers"):
        load_text_encoder(str(tiny_llama_dir), dtype="fp32", hidden_layer=4)
    with pytest.raises(TextEncoderError, match="-5 is out of range"):
        load_text_encoder(str(tiny_llama_dir), dtype="fp32", hidden_layer=-5)


def test_causal_lm_single_file_with_config_beside(tmp_path, tiny_llama_dir, llama):
    """A *ForCausalLM state dict (model.* keys + lm_head) as one file, config.json beside, tokenizer apart."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert any(k.startswith("model.") for k in state) and "lm_head.weight" in state
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    save_file(state, str(tmp_path / "llm.safetensors"))
    enc = load_text_encoder(str(tmp_path / "llm.safetensors"), tokenizer=str(tiny_llama_dir), dtype="fp32")
    assert torch.equal(enc.encode("a cat").features, llama.encode("a cat").features)


def test_encode_follows_module_device(llama):
    """The device is read from the parameters at call time (ComfyUI moves the module)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    expected = llama.encode("a cat").features
    for device in devices:
        llama.model.to(device)
        out = llama.encode("a cat")
        assert out.features.device.type == device and out.attention_mask.device.type == device
        torch.testing.assert_close(out.features.cpu(), expected, rtol=1e-4, atol=1e-4)
    llama.model.to("cpu")
