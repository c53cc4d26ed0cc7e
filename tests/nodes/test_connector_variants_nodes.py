"""Connector ablations inside ComfyUI: a `time_aware=false` or `input_pool=mean` file loads through the
connector loader node with its setting, and the sampler hook gives every UNet call exactly
connector(features, t) of that call (the same exactness check as tests/nodes/test_exactness.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ella_core import ELLA, ELLAConfig, save_ella
from devtools import tiny_models as tm
from tests.nodes.graphs import assert_contexts_exact
from tests.nodes.inprocess import make_env, sample

VARIANTS = {"constant_t.safetensors": {"time_aware": False}, "mean_pool.safetensors": {"input_pool": "mean"}}


@pytest.fixture(scope="module")
def env(tiny_base):
    models = tiny_base / "models"
    for name, variant in VARIANTS.items():
        config = ELLAConfig(input_dim=tm.T5_HIDDEN, width=768, layers=1, heads=8, num_latents=8, time_channel=32,
                            time_embed_dim=64, **variant)
        torch.manual_seed(12)
        module = ELLA(config)
        with torch.no_grad():  # random everywhere (the reference zeroes AdaLN), so t would matter if it reached
            for p in module.parameters():  # scaled as devtools.tiny_models.write_tiny_ella's
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.02))
        save_ella(module, models / "ella" / name, {"base_model": "sd15", "llm": "tiny-t5", "llm_dtype": "float32",
                                                    "token_length": 16, "token_mode": "fixed"})
    return make_env(tiny_base)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_loads_and_every_call_gets_its_context(env, name):
    connector = env.nodes.EllaTSCConnectorLoader.execute(name).result[0]
    module = connector.module
    assert {k: getattr(module.config, k) for k in VARIANTS[name]} == VARIANTS[name]
    env = dataclasses.replace(env, connector=connector)
    texts = {0: "a red circle left of a blue square", 1: "low quality"}
    feats = {k: env.features(v) for k, v in texts.items()}

    def expected(which, t):
        with torch.no_grad():
            return module(feats[which].expand(t.shape[0], -1, -1), t.float())

    model, rec = env.patched()
    sample(model, env.encode(texts[0]), env.encode(texts[1]), sampler="heun", scheduler="karras", steps=3, batch=2)
    assert assert_contexts_exact(rec.calls, expected) == 2 * len(rec.calls)
    contexts = {float(c["t"][0]): c["context"] for c in rec.calls}
    assert len(contexts) >= 3
    first, *rest = contexts.values()
    changes = max((c - first).abs().max().item() for c in rest)
    if VARIANTS[name].get("time_aware") is False:
        assert changes == 0.0  # one context for the whole schedule
    else:
        assert changes > 1e-4  # the pooled connector is still time-aware
