"""T5-family encoders against transformers' own numerics: tokenisation modes, truncation, empty prompt,
weight syntax, single-file loading (ComfyUI style state dicts), UMT5/MT5."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from ella_core.text_encoder import load_text_encoder
from ella_core.tokenization import load_tokenizer

from encoder_builders import build_t5_folder

LONG = ", ".join(f"a small red house number {i} by the sea" for i in range(30))


def hf_features(model, tokenizer, prompts, **tok_kwargs):
    batch = tokenizer(prompts, return_tensors="pt", **tok_kwargs)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return out.float(), batch


def test_fixed_mode_matches_transformers(tiny_t5_fp32, tiny_t5_hf, hf_t5_tokenizer):
    prompts = ["a photo of a cat wearing a red hat", "an astronaut riding a horse on the moon"]
    enc = tiny_t5_fp32.encode(prompts)
    ref, batch = hf_features(tiny_t5_hf, hf_t5_tokenizer, prompts, padding="max_length", max_length=128, truncation=True)
    assert enc.features.shape == (2, 128, 32) and enc.features.dtype == torch.float32
    assert torch.equal(enc.attention_mask, batch.attention_mask)
    assert enc.token_counts == batch.attention_mask.sum(1).tolist()
    torch.testing.assert_close(enc.features, ref, rtol=1e-5, atol=1e-5)  # all 128 positions, padding included
    assert batch.input_ids[0, enc.token_counts[0] - 1] == hf_t5_tokenizer.eos_token_id  # EOS appended, no BOS
    assert batch.input_ids[0, 0] != hf_t5_tokenizer.eos_token_id and enc.dropped == [0, 0]


def test_flexible_mode_batch_equals_separate(tiny_t5_fp32, tiny_t5_hf, hf_t5_tokenizer):
    prompts = ["a cat", "a dog sitting in a sunny garden next to a big tree", ""]
    batched = tiny_t5_fp32.encode(prompts, mode="flexible")
    longest = max(batched.token_counts)
    assert batched.features.shape == (3, longest, 32)
    for i, prompt in enumerate(prompts):
        alone = tiny_t5_fp32.encode(prompt, mode="flexible")
        n = batched.token_counts[i]
        assert alone.features.shape == (1, n, 32)
        assert torch.equal(batched.prompt_features(i), alone.features)  # batching changes nothing, bit for bit
        assert batched.attention_mask[i].sum() == n
        assert torch.all(batched.features[i, n:] == 0)
        ref, _ = hf_features(tiny_t5_hf, hf_t5_tokenizer, [prompt])
        torch.testing.assert_close(alone.features, ref, rtol=1e-5, atol=1e-5)


def test_truncation_is_reported(tiny_t5_fp32, hf_t5_tokenizer):
    full = hf_t5_tokenizer(LONG).input_ids
    enc = tiny_t5_fp32.encode(LONG, max_length=16)
    assert enc.features.shape == (1, 16, 32)
    assert enc.token_counts == [16] and enc.dropped == [len(full) - 16]
    kept = hf_t5_tokenizer(LONG, truncation=True, max_length=16).input_ids
    assert kept[-1] == hf_t5_tokenizer.eos_token_id  # truncation keeps the EOS
    # The reported text is exactly the prompt's tail starting where the kept tokens end.
    dropped = enc.dropped_text[0]
    assert LONG.endswith(dropped) and len(dropped) > len(LONG) // 2
    kept_text = hf_t5_tokenizer.decode(kept, skip_special_tokens=True).replace(" ", "")
    assert (kept_text + dropped.replace(" ", "")) == LONG.replace(" ", "")
    assert any("truncated" in w for w in enc.warnings)
    count = tiny_t5_fp32.count_tokens(LONG, max_length=16)
    assert (count.total, count.kept, count.dropped, count.dropped_text) == (len(full), 16, len(full) - 16, dropped)


def test_empty_prompt_like_reference(tiny_t5_fp32, tiny_t5_hf, hf_t5_tokenizer):
    enc = tiny_t5_fp32.encode("")
    ref, batch = hf_features(tiny_t5_hf, hf_t5_tokenizer, [""], padding="max_length", max_length=128)
    assert batch.input_ids[0, 0] == hf_t5_tokenizer.eos_token_id and batch.input_ids[0, 1:].eq(0).all()
    assert enc.token_counts == [1]
    torch.testing.assert_close(enc.features, ref, rtol=1e-5, atol=1e-5)


def test_weight_syntax_is_stripped(tiny_t5_fp32):
    weighted = tiny_t5_fp32.encode("a (red hat:1.3) on a ((cat:1.2))")
    plain = tiny_t5_fp32.encode("a red hat on a (cat)")
    assert torch.equal(weighted.features, plain.features)
    assert not torch.equal(weighted.features, tiny_t5_fp32.encode("a red hat on a cat").features)


def test_hidden_layer_t5(tiny_t5_dir, tiny_t5_hf, hf_t5_tokenizer):
    enc = load_text_encoder(str(tiny_t5_dir), dtype="fp32", hidden_layer=1)
    batch = hf_t5_tokenizer(["a cat"], return_tensors="pt", padding="max_length", max_length=128)
    with torch.no_grad():
        states = tiny_t5_hf(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(enc.encode("a cat").features, states[1], rtol=1e-5, atol=1e-5)


def test_count_tokens_with_tokenizer_only(tiny_t5_dir, tiny_t5_fp32, hf_t5_tokenizer):
    tok = load_tokenizer(str(tiny_t5_dir))
    assert tok.family == "t5"
    assert tok.count_tokens(LONG, max_length=64) == tiny_t5_fp32.count_tokens(LONG, max_length=64)
    plain = len(hf_t5_tokenizer("a cat").input_ids)
    assert tok.count_tokens("a (cat:1.4)").total == plain  # weight syntax is not counted


@pytest.mark.parametrize("prefix, extra, embedding", [
    ("", False, "shared.weight"), ("text_encoders.t5xxl.transformer.", True, "encoder.embed_tokens.weight")])
def test_single_safetensors_infers_t5_config(tmp_path, tiny_t5_fp32, tiny_t5_hf, t5_tokenizer_dir, prefix, extra, embedding):
    """A ComfyUI-style t5xxl file: no config, maybe a wrapper prefix and decoder keys; config from shapes."""
    drop = {"shared.weight", "encoder.embed_tokens.weight"} - {embedding}
    state = {prefix + k: v.to(torch.float16) for k, v in tiny_t5_hf.state_dict().items() if k not in drop}
    if extra:
        state[prefix + "decoder.final_layer_norm.weight"] = torch.ones(32, dtype=torch.float16)
    path = tmp_path / "t5_tiny_fp16.safetensors"
    save_file(state, str(path))
    enc = load_text_encoder(str(path), tokenizer=str(t5_tokenizer_dir), dtype="fp32")
    cfg = enc.config
    assert (cfg.model_type, cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.d_kv) == ("t5", 32, 48, 2, 4, 8)
    assert cfg.feed_forward_proj == "gated-gelu"
    ref = tiny_t5_fp32.encode("a red hat").features
    # weights went through fp16 in the file, so compare with that rounding's tolerance
    torch.testing.assert_close(enc.encode("a red hat").features, ref, rtol=0, atol=5e-3)
    assert enc.model.encoder.embed_tokens.weight.data_ptr() == enc.model.shared.weight.data_ptr()


def test_single_file_with_config_beside(tmp_path, tiny_t5_dir, tiny_t5_fp32, t5_tokenizer_dir):
    (tmp_path / "config.json").write_text((tiny_t5_dir / "config.json").read_text())
    from safetensors.torch import load_file

    save_file(load_file(str(tiny_t5_dir / "model.safetensors")), str(tmp_path / "weights.safetensors"))
    enc = load_text_encoder(str(tmp_path / "weights.safetensors"), tokenizer=str(t5_tokenizer_dir), dtype="fp32")
    assert torch.equal(enc.encode("a cat").features, tiny_t5_fp32.encode("a cat").features)


@pytest.mark.parametrize("layout", ["{stem}_tokenizer", "{stem}", "tokenizer", "."])
def test_single_file_finds_its_tokenizer_beside_it(tmp_path, tiny_t5_dir, tiny_t5_fp32, t5_tokenizer_dir, layout):
    """How users keep single files: the tokenizer in `<name>_tokenizer/`, `<name>/`, `tokenizer/` or alongside."""
    import shutil

    from safetensors.torch import load_file

    save_file(load_file(str(tiny_t5_dir / "model.safetensors")), str(tmp_path / "t5.safetensors"))
    shutil.copytree(t5_tokenizer_dir, tmp_path / layout.format(stem="t5"), dirs_exist_ok=True)
    source = str(tmp_path / "t5.safetensors")
    enc = load_text_encoder(source, dtype="fp32")  # no tokenizer argument: found beside the file
    assert torch.equal(enc.encode("a cat").features, tiny_t5_fp32.encode("a cat").features)
    assert load_tokenizer(source).count_tokens("a cat").total == tiny_t5_fp32.count_tokens("a cat").total


@pytest.mark.parametrize("kind", ["umt5", "mt5"])
def test_umt5_mt5_encoders(tmp_path, kind, t5_tokenizer_dir, hf_t5_tokenizer):
    import transformers

    folder = build_t5_folder(tmp_path / kind, kind=kind, seed=3)
    enc = load_text_encoder(str(folder), dtype="fp32")
    cls = {"umt5": transformers.UMT5EncoderModel, "mt5": transformers.MT5EncoderModel}[kind]
    assert type(enc.model) is cls and enc.family == "t5"
    ref, _ = hf_features(cls.from_pretrained(folder).eval(), hf_t5_tokenizer, ["a blue car"], padding="max_length", max_length=128)
    torch.testing.assert_close(enc.encode("a blue car").features, ref, rtol=1e-5, atol=1e-5)
    if kind == "umt5":  # per-block position bias -> a single file is recognised as UMT5
        from safetensors.torch import load_file

        single = tmp_path / "umt5.safetensors"
        save_file(load_file(str(folder / "model.safetensors")), str(single))
        enc2 = load_text_encoder(str(single), tokenizer=str(t5_tokenizer_dir), dtype="fp32")
        assert enc2.config.model_type == "umt5"
        assert torch.equal(enc2.encode("a blue car").features, enc.encode("a blue car").features)
