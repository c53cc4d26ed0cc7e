"""One dtype policy (ella_core.dtypes), fp8 weight storage, an fp16 overflow recompute that leaves the encoder
exactly as loaded, flexible mode's truncation limit, and single T5 files without a tokenizer beside them."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import torch

from ella_core import dtypes
from ella_core.llm_loading import TextEncoderError, hf_dtype_kwargs
from ella_core.text_encoder import load_text_encoder

from encoder_builders import write_t5_single_file

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


# ---------------------------------------------------------------- the table and its parser


def test_every_spelling_parses_to_the_table():
    spellings = {name: [name, name.upper(), f" {name} "] for name in dtypes.NAMES}
    for alias, name in dtypes.ALIASES.items():
        spellings[name] += [alias, alias.title()]
    for name, dtype in dtypes.NAMES.items():
        spellings[name].append(dtype)
    for family, (name, variants) in itertools.product(("t5", "decoder"), spellings.items()):
        for value in variants:
            p = dtypes.parse_precision(value, family)
            assert p.name == name and p.storage == dtypes.NAMES[name]
            half = dtypes.NAMES[dtypes.FAMILY_DEFAULT[family]]
            assert p.compute == (half if p.storage in FP8 else p.storage) and p.is_fp8 == (p.storage in FP8)
    for value in (None, "auto", "AUTO", "default"):
        assert dtypes.parse_precision(value, "t5").compute == torch.float16
        assert dtypes.parse_precision(value, "decoder").compute == torch.bfloat16


@pytest.mark.parametrize("bad", ["fp8", "int8", "float64", "", "fp 16", "q4_0", torch.float64, torch.int8, 16])
def test_unknown_dtypes_are_refused_with_the_choices(bad):
    with pytest.raises(dtypes.PrecisionError) as info:
        dtypes.parse_precision(bad, "t5")
    assert "fp16" in str(info.value) and "fp8_e4m3fn" in str(info.value)


def test_loader_refuses_a_bad_dtype_before_reading_weights(tiny_t5_dir):
    with pytest.raises(TextEncoderError, match="unknown text encoder dtype 'int4'.*auto, fp16, bf16, fp32"):
        load_text_encoder(str(tiny_t5_dir), dtype="int4")


# ---------------------------------------------------------------- fp8 storage


@pytest.mark.parametrize("name", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_storage_is_fp8_weights_computed_in_fp16(tiny_t5_dir, name):
    """Features equal transformers' fp16 model whose Linear weights were rounded through fp8, bit for bit."""
    from transformers import T5EncoderModel

    enc = load_text_encoder(str(tiny_t5_dir), dtype=name)
    storage = dtypes.NAMES[name]
    linears = {n: m for n, m in enc.model.named_modules() if isinstance(m, torch.nn.Linear)}
    for n, m in linears.items():  # transformers keeps T5's `wo` in fp32; everything else is fp8
        assert m.weight.dtype == (torch.float32 if n.endswith(".wo") else storage), n
    assert enc.dtype == torch.float16 and enc.model.shared.weight.dtype == torch.float16
    ref = T5EncoderModel.from_pretrained(tiny_t5_dir, **hf_dtype_kwargs(torch.float16)).eval()
    with torch.no_grad():
        for n, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float16:
                m.weight.copy_(m.weight.to(storage).to(torch.float16))
    prompts = ["a photo of a cat wearing a red hat", "", "an astronaut riding a horse"]
    ids, mask = enc.tokenizer.pad([enc.tokenizer.tokenize(p)[0] for p in prompts], 128)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    got = enc.encode(prompts)
    assert torch.equal(got.features, expected)
    assert sum(m.weight.dtype == storage for m in linears.values()) == len(linears) - 2  # all but 2 `wo`


# ---------------------------------------------------------------- issue 8.8: the fallback leaves the encoder as loaded


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hot_token_model(enc, word: str, others: list[str]) -> list[int]:
    """Make the embedding of `word`'s own tokens huge: a prompt containing it saturates fp16 in block 0; prompts
    made of `others` stay in range."""
    common = {i for w in others for i in enc.tokenizer.tokenize(w)[0]}
    ids = sorted(set(enc.tokenizer.tokenize(word)[0]) - common)
    assert ids, word
    with torch.no_grad():
        enc.model.shared.weight[ids] = 65000.0
    return ids


@pytest.mark.parametrize("dtype", ["fp16", "fp8_e4m3fn"])
def test_overflow_recompute_leaves_the_encoder_exactly_as_loaded(tiny_t5_dir, dtype):
    enc = load_text_encoder(str(tiny_t5_dir), dtype=dtype)
    words = "a photo of cat dog red hat garden sunny tree house blue sky night city".split()
    _hot_token_model(enc, "zebra", words + ["in a field number 0 1 2"])
    loaded_dtypes = {n: p.dtype for n, p in enc.model.named_parameters()}
    assert loaded_dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32  # kept by transformers
    params = {n: p for n, p in enc.model.named_parameters()}
    before = _snapshot(enc.model)
    rng = random.Random(0)
    prompts_a = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(6)]
    features_a = [enc.encode(p) for p in prompts_a]
    assert not any(f.overflow_recomputed for f in features_a), "prompt A must not overflow, or this proves nothing"
    for i in range(3):  # prompt B overflows and is recomputed in fp32, several times
        out_b = enc.encode(f"a zebra number {i} in a field")
        assert out_b.overflow_recomputed and torch.isfinite(out_b.features).all()
    for prompt, first in zip(prompts_a, features_a):
        again = enc.encode(prompt)
        assert torch.equal(again.features, first.features) and not again.overflow_recomputed
    assert {n: p.dtype for n, p in enc.model.named_parameters()} == loaded_dtypes
    assert all(p is params[n] for n, p in enc.model.named_parameters())  # the very same tensors
    after = _snapshot(enc.model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------- point 10: flexible mode honours max_length


def test_flexible_mode_truncates_at_max_length(tiny_t5_fp32):
    rng = random.Random(1)
    words = "a photo of cat dog red hat garden sunny tree house blue sky night city with many boats".split()
    tok = tiny_t5_fp32.tokenizer
    for _ in range(40):
        prompt = " ".join(rng.choices(words, k=rng.randint(0, 60)))
        max_length = rng.randint(1, 40)
        flex_ids, flex = tok.tokenize(prompt, mode="flexible", max_length=max_length)
        fixed_ids, fixed = tok.tokenize(prompt, mode="fixed", max_length=max_length)
        assert flex_ids == fixed_ids and flex == fixed  # same truncation (and report); only padding differs
        assert len(flex_ids) == min(flex.total, max_length) and flex.kept + flex.dropped == flex.total
        assert tok.count_tokens(prompt, max_length=max_length, mode="flexible") == flex
    long = " ".join(words * 20)
    calls = []
    real_forward = tiny_t5_fp32._forward
    tiny_t5_fp32._forward = lambda ids, mask: calls.append(ids.shape) or real_forward(ids, mask)
    try:
        out = tiny_t5_fp32.encode([long, "a cat"], mode="flexible", max_length=24)
    finally:
        del tiny_t5_fp32._forward
    assert max(shape[1] for shape in calls) == 24  # the LLM never saw more than max_length tokens
    assert out.token_counts[0] == 24 and out.dropped[0] > 0 and out.token_counts[1] < 24
    assert any("truncated" in w for w in out.warnings)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        tiny_t5_fp32.encode("a cat", mode="flexible", max_length=0)


# ---------------------------------------------------------------- point 7: single T5 files with no tokenizer


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
def test_single_fp16_t5_file_without_tokenizer(tmp_path, tiny_t5_dir, t5_tokenizer_dir, prefix):
    path = write_t5_single_file(tiny_t5_dir, tmp_path / "flan-t5-tiny-fp16.safetensors", prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with pytest.raises(TextEncoderError, match="carries no tokenizer.*t5_tokenizer"):
        load_text_encoder(str(path), dtype="fp16")
    enc = load_text_encoder(str(path), dtype="fp16", fallback_t5_tokenizer=str(t5_tokenizer_dir))
    folder = load_text_encoder(str(tiny_t5_dir), dtype="fp16")
    # same tensors, same dtypes (the file's fp32 `wo` stays fp32, not rounded through fp16)
    got, ref = enc.model.state_dict(), folder.model.state_dict()
    assert got.keys() == ref.keys()
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)
    prompts = ["a photo of a cat wearing a red hat", ""]
    assert torch.equal(enc.encode(prompts).features, folder.encode(prompts).features)


def test_fallback_tokenizer_is_only_for_t5_files(tmp_path, tiny_llama_dir, t5_tokenizer_dir):
    """A decoder's single file never silently gets T5's vocabulary."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    path = tmp_path / "llama.safetensors"
    save_file(state, str(path))
    with pytest.raises(TextEncoderError, match="carries no tokenizer"):
        load_text_encoder(str(path), fallback_t5_tokenizer=str(t5_tokenizer_dir))


def test_token_route_tokenizer_for_a_tokenizer_less_t5_file(tmp_path, tiny_t5_dir, t5_tokenizer_dir, monkeypatch):
    """load_tokenizer (the web UI's token count) finds the same fallback the node pack registers."""
    from ella_core import llm_loading
    from ella_core.tokenization import load_tokenizer

    path = write_t5_single_file(tiny_t5_dir, tmp_path / "t5.safetensors")
    monkeypatch.setattr(llm_loading, "_fallback_t5_tokenizer", None)
    with pytest.raises(TextEncoderError, match="carries no tokenizer"):
        load_tokenizer(str(path))
    llm_loading.set_fallback_t5_tokenizer(str(t5_tokenizer_dir))
    enc = load_text_encoder(str(path), dtype="fp16")
    tok = load_tokenizer(str(path))
    assert tok.family == "t5"
    for prompt, max_length in [("a cat", 8), ("a very long prompt " * 20, 16), ("", 4)]:
        assert tok.count_tokens(prompt, max_length) == enc.count_tokens(prompt, max_length)


@pytest.mark.parametrize("version", ["4.49.0", "4.50.2", "3.5.1"])
def test_transformers_below_the_floor_is_refused_by_name(tiny_t5_dir, monkeypatch, version):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(TextEncoderError, match=rf"need transformers>=4\.50\.3, but {re.escape(version)} is installed"):
        load_text_encoder(str(tiny_t5_dir))


@pytest.mark.parametrize("version, keyword", [("4.50.3", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                              ("4.56.0", "dtype"), ("5.24.0", "dtype"), ("5.0.0rc1", "dtype")])
def test_from_pretrained_dtype_keyword_by_version(monkeypatch, version, keyword):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert hf_dtype_kwargs(torch.float16) == {keyword: torch.float16}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8_e5m2"])
def test_cast_aware_layers_change_nothing_when_weights_are_in_place(tiny_llama_dir, dtype):
    """Wrapping every module (what the node does for partial loads) is bit-identical and leaves the weights be."""
    from ella_core.cast_weights import make_cast_aware

    plain = load_text_encoder(str(tiny_llama_dir), dtype=dtype)
    wrapped = load_text_encoder(str(tiny_llama_dir), dtype=dtype)
    modules = make_cast_aware(wrapped.model)
    assert make_cast_aware(wrapped.model) == modules  # idempotent
    held = {n: t for n, t in wrapped.model.state_dict(keep_vars=True).items()}
    rotary = [m for m in modules if not any(True for _ in m.parameters(recurse=False))]
    assert rotary, "buffer-only modules (rotary embedding) must be wrapped too"
    prompts = ["a cat on the mat", "", "a big red car on the road at night"]
    for mode in ("fixed", "flexible"):
        assert torch.equal(wrapped.encode(prompts, mode=mode, max_length=8).features,
                           plain.encode(prompts, mode=mode, max_length=8).features)
    assert all(t is held[n] for n, t in wrapped.model.state_dict(keep_vars=True).items())
