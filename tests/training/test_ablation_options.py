"""The trainer's ablation options: connector.time_aware and connector.input_pool reach the connector (new or
init_from) and its saved file, checked before any model loads; train.min_snr_gamma's weights follow the
formula. One tiny run with both options trains, writes an ella.safetensors with them, and calls the
evaluation hooks (validation.hooks) at the steps they are due, with the EMA weights."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ella_core import ELLA, ELLAConfig, load_ella, read_ella_metadata, save_ella
from training.config import ConfigError, ConnectorConfig, load_config
from training.loop import snr_weights
from training.models import build_connector
from tests.training.train_helpers import read_metrics, run_trainer

PROBE = Path(__file__).with_name("eval_hook_probe.py")
REQUIRED = ["model.pretrained=some/model", "llm.source=some/llm"]
SMALL = dict(layers=1, heads=2, num_latents=4, time_channel=8, time_embed_dim=8)


# ---------------------------------------------------------------- config and build_connector
@pytest.mark.parametrize("override, message", [
    ("connector.input_pool=max", r"connector\.input_pool='max' is not one of \['null', 'mean'\]"),
    ("connector.input_pool=true", r"connector\.input_pool"),
    ("connector.time_aware=maybe", r"connector\.time_aware='maybe': must be true or false"),
    ("connector.time_aware=1", r"connector\.time_aware=1: must be true or false"),
])
def test_bad_values_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, f"data.path={tmp_path}", override])


def test_the_keys_parse(tmp_path):
    c = load_config(None, [*REQUIRED, f"data.path={tmp_path}", "connector.time_aware=false",
                           "connector.input_pool=mean"]).connector
    assert (c.time_aware, c.input_pool) == (False, "mean")
    c = load_config(None, [*REQUIRED, f"data.path={tmp_path}", "connector.input_pool=null"]).connector
    assert (c.time_aware, c.input_pool) == (True, None)


BASE = SimpleNamespace(context_dim=16, pooled_dim=None)


@pytest.mark.parametrize("variant", [{}, {"time_aware": False}, {"input_pool": "mean"},
                                     {"time_aware": False, "input_pool": "mean"}])
def test_new_connectors_get_the_options(variant):
    ella = build_connector(ConnectorConfig(**SMALL, **variant), 8, BASE)
    want = {"time_aware": True, "input_pool": None, **variant}
    assert {k: getattr(ella.config, k) for k in want} == want
    assert ella.training and all(p.requires_grad for p in ella.parameters())


@pytest.mark.parametrize("saved, run", [({"time_aware": False}, {}), ({}, {"time_aware": False}),
                                        ({"input_pool": "mean"}, {}), ({}, {"input_pool": "mean"})])
def test_init_from_takes_the_runs_setting_with_the_same_weights(tmp_path, caplog, saved, run):
    torch.manual_seed(1)
    source = ELLA(ELLAConfig(input_dim=8, width=16, **SMALL, **saved))
    path = tmp_path / "init.safetensors"
    save_ella(source, path)
    caplog.set_level(logging.WARNING, logger="training")
    ella = build_connector(ConnectorConfig(init_from=str(path), **run), 8, BASE)
    want = {"time_aware": True, "input_pool": None, **run}
    assert {k: getattr(ella.config, k) for k in want} == want
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in ella.state_dict().items())
    assert ella.training and all(p.requires_grad for p in ella.parameters())
    changed = next(iter(saved or run))
    assert f"connector.{changed}=" in caplog.text and "(the file: " in caplog.text


# ---------------------------------------------------------------- min-SNR weights
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 5.0, 20.0])
def test_min_snr_weights_follow_the_formula(prediction_type, gamma):
    """Hang et al. 2023: w = min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v; SNR from
    alphas_cumprod in float64, at every one of the 1000 timesteps."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    base = SimpleNamespace(scheduler=scheduler, prediction_type=prediction_type)
    t = torch.arange(1000)
    a = scheduler.alphas_cumprod.double()[t]
    snr = a / (1 - a)
    want = snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    got = snr_weights(base, t, gamma)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got.shape == (1000,)
    if prediction_type == "epsilon":  # low-noise steps (SNR > gamma) are down-weighted, the rest weigh 1
        assert got[0] < 1 and torch.all(got[snr < gamma] == 1)


# ---------------------------------------------------------------- tiny runs
def _run(tiny_sd15, tiny_t5, data, out, *extra):
    run_trainer(f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={data}", f"output_dir={out}",
                "validation.steps=2", *extra)
    return read_metrics(out)


def _seen(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "hook_probe" / "seen.jsonl").read_text().splitlines()]


@torch.no_grad()
def test_a_run_with_both_options_ema_and_two_hooks(tiny_sd15, tiny_t5, datasets, tmp_path):
    """One run for both options (each is checked on its own): constant t, the mean-pooled input in flexible mode
    (-inf padding in the batches), EMA, validation every 2 of 4 steps, a hook by file and one by module."""
    out = tmp_path / "ablations"
    metrics = _run(tiny_sd15, tiny_t5, datasets["folder"], out, "connector.time_aware=false",
                   "connector.input_pool=mean", "llm.token_mode=flexible", "train.ema_decay=0.9", "validation.every=2",
                   f"validation.hooks=[{PROBE}:probe, tests.training.eval_hook_probe:summary]")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    connector = load_ella(out / "ella.safetensors")
    assert (connector.config.time_aware, connector.config.input_pool) == (False, "mean")
    assert read_ella_metadata(out / "ella.safetensors").config == connector.config
    f = torch.randn(3, 16, connector.config.input_dim)
    assert all(torch.equal(connector(f, t), connector(f, 0.0)) for t in (1.0, 500.0, 999.0))  # t-independent

    # every validation, and the last step (a validation step here: once); hooks in the order given
    hooked = [(m["step"], m["hook"]) for m in metrics if "hook" in m]
    assert hooked == [(2, "probe"), (2, "summary"), (4, "probe"), (4, "summary")]
    for m in (m for m in metrics if m.get("hook") == "probe"):
        assert m["t_spread"] == 0.0 and 0.0 <= m["image_mean"] <= 1.0 and math.isnan(m["undefined"])
    assert [m["at_step"] for m in metrics if m.get("hook") == "summary"] == [2.0, 4.0]
    assert all(m["time_aware"] == 0.0 and m["pooled"] == 1.0 for m in metrics if m.get("hook") == "summary")
    seen = _seen(out)
    assert [(s["step"], s["final"]) for s in seen] == [(2, False), (4, True)]
    assert all(not s["training"] and not s["grad_enabled"] and s["image_shape"] == [1, 3, 32, 32] for s in seen)
    # the hook got the EMA weights; the training weights (ella.safetensors, saved after it ran) are not those
    given = load_ella(out / "hook_probe" / "step-4.safetensors").state_dict()
    ema, trained = load_ella(out / "ella_ema.safetensors").state_dict(), connector.state_dict()
    assert all(torch.equal(given[k], ema[k]) for k in given)
    assert any(not torch.equal(given[k], trained[k]) for k in given)
