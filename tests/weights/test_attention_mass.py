"""A prompt weight moves the connector's attention mass (softmax probability summed over heads and queries)
on exactly the weighted tokens: w > 1 raises it, w < 1 lowers it, measured by hooking every block's attention."""

from __future__ import annotations

import math
import random

import pytest
import torch

from devtools import tiny_models as tm
from devtools.attention_probe import record_attention, text_attention_mass
from ella_core import ELLA, ELLAConfig
from ella_core.prompt_weights import text_bias, token_log_weights, weigh_prompt
from ella_core.tokenization import load_tokenizer

WORDS = "a red fox sleeps in the deep white snow under tall pine trees at dusk".split()
LENGTH = 32


def _connector(seed: int, **fields) -> ELLA:
    config = dict(input_dim=64, width=64, layers=3, heads=4, num_latents=16, time_channel=32, time_embed_dim=64)
    config.update(fields)
    torch.manual_seed(seed)
    module = ELLA(ELLAConfig(**config)).eval().requires_grad_(False)
    with torch.no_grad():  # random AdaLN too, so every block sees t
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.02))
    return module


@pytest.fixture(scope="module")
def t5_tokenizer():
    return load_tokenizer(str(tm.t5_tokenizer_dir()))


def _case(rng: random.Random) -> tuple[str, float]:
    """A prompt with one or two weighted spans of one weight."""
    w = rng.choice([0.0, 0.25, 0.5, 0.8, 0.95, 1.05, 1.2, 1.5, 2.0, 4.0])
    words = list(WORDS)
    for _ in range(rng.choice([1, 2])):
        i = rng.randrange(len(words))
        if not words[i].startswith("("):
            span = min(rng.choice([1, 2]), len(words) - i)
            if not any(x.startswith("(") for x in words[i:i + span]):
                words[i:i + span] = [f"({' '.join(words[i:i + span])}:{w})"]
    return " ".join(words), w


@pytest.mark.parametrize("seed", range(40))
def test_weight_moves_attention_mass_on_exactly_the_weighted_tokens(seed, t5_tokenizer):
    rng = random.Random(seed)
    text, w = _case(rng)
    module = _connector(seed % 4)
    bias = text_bias(token_log_weights(t5_tokenizer, weigh_prompt(text), mode="fixed", max_length=LENGTH), LENGTH)
    weighted = bias[0] != 0
    assert weighted.any() and torch.allclose(bias[0, weighted], torch.tensor(math.log(w) if w else -math.inf))
    projected = module.project_text(torch.randn(1, LENGTH, 64, generator=torch.Generator().manual_seed(seed)))
    t = rng.uniform(0, 999)
    before = text_attention_mass(module, projected, t)
    after = text_attention_mass(module, projected, t, bias)
    change = after - before  # (blocks, L)
    up = w > 1
    # The first block reads the same queries and keys either way: each weighted token gains (w > 1) or loses
    # mass, and every other token moves the other way (the softmax renormalises).
    assert ((change[0, weighted] > 0) == up).all(), (text, change[0])
    assert ((change[0, ~weighted] < 0) == up).all(), (text, change[0])
    # In every block the weighted tokens' total mass moves in the weight's direction.
    assert ((change[:, weighted].sum(dim=1) > 0) == up).all(), (text, change[:, weighted].sum(dim=1))
    if w == 0:
        assert after[:, weighted].abs().max() == 0  # left out entirely


def test_unit_weight_leaves_attention_unchanged(t5_tokenizer):
    prompt = weigh_prompt("a (red:1.0) fox in (the snow:1)")
    assert not prompt.weighted
    assert text_bias(token_log_weights(t5_tokenizer, prompt, mode="fixed", max_length=LENGTH), LENGTH) is None


def test_probe_reads_the_attention_the_connector_computes():
    """The recomputed probabilities reproduce each block's attention output (so the masses are its own)."""
    module = _connector(1)
    projected = module.project_text(torch.randn(2, 9, 64))
    bias = torch.zeros(2, 9)
    bias[:, 3] = math.log(3.0)
    bias[1, 7] = -math.inf
    outputs = []
    handles = [b.attn.register_forward_hook(lambda m, a, o: outputs.append((m, a, o)))
               for b in module.connector.perceiver_blocks]
    try:
        with torch.no_grad(), record_attention(module) as seen:
            module.forward_projected(projected, torch.tensor([10.0, 800.0]), text_bias=bias)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(outputs) == module.config.layers
    for (attn, args, out), (_, probs) in zip(outputs, seen):
        W = args[0].shape[-1]
        w_v, b_v = (x.split([W, W, W])[2] for x in (attn.in_proj_weight, attn.in_proj_bias))
        v = torch.nn.functional.linear(args[1], w_v, b_v)
        v = v.unflatten(-1, (attn.heads, W // attn.heads)).transpose(1, 2).double()
        mixed = (probs @ v).transpose(1, 2).reshape(out.shape).float()
        torch.testing.assert_close(attn.out_proj(mixed), out, atol=1e-5, rtol=1e-4)
        assert probs[1, :, :, module.config.num_latents + 7].abs().max() == 0
