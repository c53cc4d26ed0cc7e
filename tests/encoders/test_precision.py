"""dtype defaults, the missing-half-kernel fallback and fp16 overflow handling."""

from __future__ import annotations

import logging

import pytest
import torch

from ella_core.llm_loading import hf_dtype_kwargs
from ella_core.text_encoder import load_text_encoder

from encoder_builders import build_t5_folder

PROMPTS = ["a photo of a cat wearing a red hat", ""]


@pytest.mark.parametrize("dtype, torch_dtype, tol", [(None, torch.float16, 1e-2), ("bf16", torch.bfloat16, 6e-2), ("fp32", torch.float32, 0)])
def test_t5_dtypes(tiny_t5_dir, tiny_t5_fp32, dtype, torch_dtype, tol):
    from transformers import T5EncoderModel

    enc = load_text_encoder(str(tiny_t5_dir), dtype=dtype)
    assert enc.dtype == torch_dtype and next(enc.model.parameters()).dtype == torch_dtype  # fp16 is T5's default
    out = enc.encode(PROMPTS)
    assert out.features.dtype == torch.float32 and out.dtype == torch_dtype and not out.overflow_recomputed
    # same numbers as transformers' own model in that dtype...
    hf = T5EncoderModel.from_pretrained(tiny_t5_dir, **hf_dtype_kwargs(torch_dtype)).eval()
    ids, mask = enc.tokenizer.pad([enc.tokenizer.tokenize(p)[0] for p in PROMPTS], 128)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    torch.testing.assert_close(out.features, ref, rtol=0, atol=1e-6)
    # ...and close to fp32 within the dtype's rounding
    torch.testing.assert_close(out.features, tiny_t5_fp32.encode(PROMPTS).features, rtol=tol, atol=tol + 1e-6)


def test_missing_half_kernel_falls_back_to_fp32(tiny_t5_dir, tiny_t5_fp32, monkeypatch, caplog):
    """Simulate a CPU build without half kernels: every half-precision linear raises like torch does."""
    real_linear = torch.nn.functional.linear

    def linear_without_half(x, weight, bias=None):
        if x.dtype in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"\"addmm_impl_cpu_\" not implemented for '{'Half' if x.dtype == torch.float16 else 'BFloat16'}'")
        return real_linear(x, weight, bias)

    enc = load_text_encoder(str(tiny_t5_dir))  # fp16 default
    monkeypatch.setattr(torch.nn.functional, "linear", linear_without_half)
    with caplog.at_level(logging.WARNING):
        out = enc.encode(PROMPTS)
    assert enc.fell_back_to_fp32 and enc.dtype == torch.float32 and out.dtype == torch.float32
    assert any("switched the text encoder to float32" in r.message for r in caplog.records)
    assert any("not implemented for 'Half'" in w for w in out.warnings)
    # the fp16 file's weights upcast losslessly -> fp32 numbers of the fp16-rounded weights
    torch.testing.assert_close(out.features, tiny_t5_fp32.encode(PROMPTS).features, rtol=1e-2, atol=1e-2)
    assert torch.isfinite(out.features).all()


def test_other_runtime_errors_are_not_swallowed(tiny_t5_dir, monkeypatch):
    enc = load_text_encoder(str(tiny_t5_dir))

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(torch.nn.functional, "linear", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        enc.encode("a cat")
    assert enc.dtype == torch.float16 and not enc.fell_back_to_fp32


@pytest.fixture(scope="module", params=["saturated", "nan"])
def hot_t5_dir(request, tmp_path_factory):
    """Weights scaled up so fp16 overflows, as flan-t5 does in places. "saturated": the feed-forward overflows
    and transformers clamps it (finite but wrong output); "nan": attention scores overflow to inf -> NaN."""
    folder = tmp_path_factory.mktemp("hot_t5")
    if request.param == "saturated":
        return build_t5_folder(folder, seed=1, scale=40.0)
    return build_t5_folder(folder, seed=2, qk_scale=30000.0)


def test_fp16_overflow_is_detected_and_recomputed(hot_t5_dir, caplog):
    from transformers import T5EncoderModel

    hf16 = T5EncoderModel.from_pretrained(hot_t5_dir, **hf_dtype_kwargs(torch.float16)).eval()
    enc = load_text_encoder(str(hot_t5_dir))
    ids, mask = enc.tokenizer.pad([enc.tokenizer.tokenize(PROMPTS[0])[0]], 128)
    with torch.no_grad():
        raw = hf16(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    blown = not torch.isfinite(raw.last_hidden_state).all() or any(
        h.abs().amax() >= torch.finfo(torch.float16).max - 1000 for h in raw.hidden_states
    )
    assert blown, "the scaled model must overflow fp16 in plain transformers, or this test proves nothing"
    with caplog.at_level(logging.WARNING):
        out = enc.encode(PROMPTS[0])
    assert out.overflow_recomputed and out.dtype == torch.float32 and torch.isfinite(out.features).all()
    assert any("overflowed" in r.message for r in caplog.records)
    assert enc.dtype == torch.float16  # the module goes back to fp16 afterwards
    with torch.no_grad():  # reference: transformers in fp32 on the same fp16-rounded weights
        ref = hf16.float()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out.features, ref, rtol=1e-5, atol=1e-5)


def test_non_finite_in_fp32_is_an_error(tiny_t5_dir):
    from ella_core.llm_loading import TextEncoderError

    enc = load_text_encoder(str(tiny_t5_dir), dtype="fp32")
    with torch.no_grad():
        enc.model.encoder.final_layer_norm.weight[0] = float("nan")
    with pytest.raises(TextEncoderError, match="inf/NaN features even in torch.float32"):
        enc.encode("a cat")
