"""ella_core.conditioning on its own (no ComfyUI): context assembly, caching, width checks."""

from __future__ import annotations

import pytest
import torch

from ella_core import ELLA, ELLAConfig
from ella_core.conditioning import ContextCache, ELLAShapeError, EllaPrompt, check_context_width


@pytest.fixture(scope="module")
def connector():
    torch.manual_seed(0)
    module = ELLA(ELLAConfig(input_dim=16, width=32, layers=1, heads=4, num_latents=4, time_channel=8,
                             time_embed_dim=16, pooled_dim=12)).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def test_context_with_weighted_clip_tokens(connector):
    feats, clip = torch.randn(1, 5, 16), torch.randn(1, 7, 32)
    prompt = EllaPrompt(features=feats, connector=lambda: connector, clip_tokens=clip, clip_weight=0.3)
    cache = ContextCache()
    t = torch.tensor([421.5])
    ctx = cache.context(prompt, t, torch.device("cpu"))
    with torch.no_grad():
        expected = torch.cat([connector(feats, t), clip * 0.3], dim=1)
    torch.testing.assert_close(ctx, expected, atol=1e-6, rtol=0)
    assert ctx.shape == (1, 4 + 7, 32)
    pooled = cache.pooled(prompt, t, torch.device("cpu"))
    torch.testing.assert_close(pooled, connector.pooled(connector(feats, t)).detach(), atol=1e-6, rtol=0)
    assert cache.stats.projections == 1 and cache.stats.connector_calls == 1  # pooled reused the output


def test_cache_keys_on_prompt_and_timestep(connector):
    a = EllaPrompt(features=torch.randn(1, 5, 16), connector=lambda: connector)
    b = EllaPrompt(features=a.features.clone(), connector=lambda: connector)  # equal values, other prompt
    cache = ContextCache()
    for prompt in (a, b, a):
        for t in (999.0, 500.0, 999.0, 0.25):
            cache.context(prompt, torch.tensor([t]), torch.device("cpu"))
    assert cache.stats.projections == 2
    assert cache.stats.connector_calls == 2 * 3  # three distinct timesteps per prompt
    per_sample = cache.context(a, torch.tensor([999.0, 3.0]), torch.device("cpu"))
    assert per_sample.shape[0] == 2
    torch.testing.assert_close(per_sample[1:], cache.context(a, torch.tensor([3.0]), torch.device("cpu")))


def test_context_width_check_names_both_numbers(connector):
    with pytest.raises(ELLAShapeError, match=r"width 32.*width 768"):
        check_context_width(connector, 768)
    check_context_width(connector, 32)


def test_context_lru_is_bounded(connector):
    prompt = EllaPrompt(features=torch.randn(1, 3, 16), connector=lambda: connector)
    cache = ContextCache(max_contexts=3)
    for t in range(10):
        cache.context(prompt, torch.tensor([float(t)]), torch.device("cpu"))
    assert len(cache.contexts) == 3 and cache.stats.connector_calls == 10
    cache.context(prompt, torch.tensor([9.0]), torch.device("cpu"))  # still cached
    assert cache.stats.connector_calls == 10
