"""The connector's numerics against the reference implementation's golden outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from ella_core import ELLA, ELLAConfig
from ella_core.connector import broadcast_timesteps, timestep_sinusoid

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def golden(golden_dir):
    with safe_open(str(golden_dir / "ella_tiny_golden.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = ELLAConfig.from_dict(json.loads(f.metadata()["config"]))
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model = ELLA(config).eval()
    model.load_state_dict(weights, strict=True)
    return model, tensors


def test_reference_config_fields_parse(golden):
    model, _ = golden
    assert model.config == ELLAConfig(input_dim=40, width=48, layers=2, heads=4, num_latents=8, time_channel=32, time_embed_dim=64)


@torch.no_grad()
def test_output_matches_reference(golden):
    model, g = golden
    out = model(g["input.text"], g["input.timesteps"])
    assert out.shape == (2, 8, 48)
    torch.testing.assert_close(out, g["output.expected"], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_intermediates_match_reference(golden):
    model, g = golden
    t = g["input.timesteps"]
    torch.testing.assert_close(timestep_sinusoid(t, 32), g["intermediate.time_sinusoid"], atol=ATOL, rtol=RTOL)
    temb = model.time_embed(t, 2)
    torch.testing.assert_close(temb, g["intermediate.time_embedding"], atol=ATOL, rtol=RTOL)
    text = model.project_text(g["input.text"])
    torch.testing.assert_close(text, g["intermediate.proj_in_out"], atol=ATOL, rtol=RTOL)
    resampler = model.connector
    latents = resampler.latents.unsqueeze(0) + resampler.time_aware_linear(torch.nn.functional.silu(temb))
    normed = torch.nn.functional.layer_norm(text, (48,), eps=1e-6)
    for i, block in enumerate(resampler.perceiver_blocks):
        latents = block(latents, text, normed, temb)
        torch.testing.assert_close(latents, g[f"intermediate.block{i}_out"], atol=ATOL, rtol=RTOL)


@torch.no_grad()
@pytest.mark.parametrize("form", ["tensor[1]", "0-d", "python float", "python int"])
def test_single_timestep_broadcasts_over_batch(golden, form):
    model, g = golden
    t = g["extra.scalar_timesteps"]
    value = {"tensor[1]": t, "0-d": t.reshape(()), "python float": float(t), "python int": int(t)}[form]
    torch.testing.assert_close(model(g["input.text"], value), g["extra.scalar_expected"], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_fractional_timesteps_stay_fractional(golden):
    model, g = golden
    x = g["input.text"][:1]
    out = {t: model(x, t) for t in (250.0, 250.5, 251.0)}
    assert not torch.allclose(out[250.5], out[250.0]) and not torch.allclose(out[250.5], out[251.0])
    # the sinusoid is evaluated at 250.5 itself
    expected = torch.tensor([[math.cos(250.5 * math.exp(-math.log(1e4) * k / 16)) for k in range(16)]])
    torch.testing.assert_close(timestep_sinusoid(torch.tensor([250.5]), 32)[:, :16], expected, atol=1e-5, rtol=1e-5)
    # integer-typed tensors are accepted and equal their float values
    torch.testing.assert_close(model(x, torch.tensor([250])), out[250.0])


@torch.no_grad()
def test_projected_prompt_reuse_equals_full_forward(golden):
    model, g = golden
    projected = model.project_text(g["input.text"])
    for t in (999.0, 500.0, 0.0):
        torch.testing.assert_close(model.forward_projected(projected, t), model(g["input.text"], t), atol=0, rtol=0)


@torch.no_grad()
def test_projection_runs_once_when_reused(golden):
    model, g = golden
    calls = []
    handle = model.connector.proj_in.register_forward_hook(lambda *a: calls.append(1))
    try:
        projected = model.project_text(g["input.text"])
        for t in range(0, 1000, 100):
            model.forward_projected(projected, t)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_batch_rows_are_independent(golden):
    model, g = golden
    with torch.no_grad():
        both = model(g["input.text"], g["input.timesteps"])
        second = model(g["input.text"][1:], g["input.timesteps"][1:])
    torch.testing.assert_close(both[1:], second, atol=ATOL, rtol=RTOL)


def test_wrong_llm_width_names_both_numbers(golden):
    model, _ = golden
    with pytest.raises(ValueError, match=r"\(batch, tokens, 40\).*\(1, 5, 576\)"):
        model(torch.zeros(1, 5, 576), 10)


def test_wrong_timestep_count_names_numbers(golden):
    model, g = golden
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        model(g["input.text"], torch.tensor([1.0, 2.0, 3.0]))
    assert broadcast_timesteps(5, 3, torch.device("cpu")).tolist() == [5.0, 5.0, 5.0]


@torch.no_grad()
def test_module_dtype_governs_compute(golden):
    model, g = golden
    bf16 = ELLA(model.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    out = bf16(g["input.text"], g["input.timesteps"])  # float32 features are cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), g["output.expected"], atol=0.1, rtol=0.05)


def test_reference_initialisation():
    model = ELLA(ELLAConfig(input_dim=16, width=32, layers=2, heads=4, num_latents=4, time_channel=8, time_embed_dim=16))
    for block in model.connector.perceiver_blocks:
        for norm in (block.ln_1, block.ln_2, block.ln_ff):
            assert not norm.linear.weight.any() and not norm.linear.bias.any()
        assert not block.attn.in_proj_bias.any() and not block.attn.out_proj.bias.any()
    assert 0.5 < model.connector.latents.std().item() * math.sqrt(32) < 1.5


def test_gradients_reach_every_parameter():
    """The connector is what trains: every parameter must receive gradient (the known broken trainer's bug)."""
    config = ELLAConfig(input_dim=16, width=32, layers=2, heads=4, num_latents=4, time_channel=8, time_embed_dim=16, pooled_dim=12)
    model = ELLA(config)
    for p in model.parameters():  # leave the zero-initialised state, where some gradients vanish by design
        torch.nn.init.normal_(p, std=0.1)
    context = model(torch.randn(2, 5, 16), torch.tensor([10.0, 900.0]))
    (context.square().mean() + model.pooled(context).square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_sdxl_layout_has_pooled_head():
    model = ELLA(ELLAConfig.for_base("sdxl", input_dim=64, layers=1, num_latents=4, time_channel=32, time_embed_dim=64))
    assert model.config.width == 2048 and model.config.pooled_dim == 1280
    with torch.no_grad():
        context = model(torch.randn(2, 3, 64), 500)
        pooled = model.pooled(context)
    assert context.shape == (2, 4, 2048) and pooled.shape == (2, 1280)
    assert not pooled.any()  # zero-initialised: starts as "no pooled text"
    sd15 = ELLA(ELLAConfig(input_dim=8, width=16, layers=1, heads=2, num_latents=2, time_channel=8, time_embed_dim=8))
    with pytest.raises(ValueError, match="no pooled head"):
        sd15.pooled(torch.zeros(1, 2, 16))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"width": 30, "heads": 8}, "width 30 is not divisible by heads 8"),
        ({"layers": 0}, "layers must be a positive integer"),
        ({"time_channel": 33}, "time_channel must be even"),
    ],
)
def test_invalid_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ELLAConfig(**fields)


def test_reference_constructor_fields():
    assert ELLAConfig.from_dict({"act_fn": "silu", "out_dim": None, "width": 64}).width == 64
    with pytest.raises(ValueError, match="out_dim"):
        ELLAConfig.from_dict({"out_dim": 1024})
    with pytest.raises(ValueError, match="unknown config fields"):
        ELLAConfig.from_dict({"widht": 64})
