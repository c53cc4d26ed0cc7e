"""The connector's optional text-token attention bias: padding masks for batches of unequal prompts and
log-weights for prompt weighting act on the text tokens' attention logits only; None is the reference."""

from __future__ import annotations

import math

import pytest
import torch

from ella_core import ELLA, ELLAConfig

CONFIG = ELLAConfig(input_dim=40, width=48, layers=2, heads=4, num_latents=8, time_channel=32, time_embed_dim=64)


def _model(seed: int = 0) -> ELLA:
    torch.manual_seed(seed)
    model = ELLA(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():  # AdaLN starts at zero: random everywhere so t and the bias both matter
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("seed", range(6))
@torch.no_grad()
def test_minus_inf_on_padding_equals_each_prompt_alone(seed):
    """A padded batch with -inf on the padding gives each prompt's unpadded context (any lengths, any t)."""
    g = torch.Generator().manual_seed(seed)
    model = _model(seed)
    lengths = torch.randint(1, 12, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
    L = max(lengths)
    prompts = [torch.randn(1, n, CONFIG.input_dim, generator=g) for n in lengths]
    t = torch.rand(len(lengths), generator=g) * 999
    padded = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, L - p.shape[1]), value=float(seed)) for p in prompts])
    bias = torch.zeros(len(lengths), L)
    for i, n in enumerate(lengths):
        bias[i, n:] = -math.inf
    batched = model(padded, t, text_bias=bias)
    many = model.forward_many(model.project_text(padded), t, text_bias=bias)
    for i, p in enumerate(prompts):
        alone = model(p, t[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(many[i:i + 1], alone, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_bias_changes_only_what_it_weights():
    """A zero bias is the reference (to rounding); a log-weight on one token changes the context."""
    model = _model(1)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 7, CONFIG.input_dim, generator=g), torch.tensor([10.0, 700.0])
    reference = model(x, t)
    torch.testing.assert_close(model(x, t, text_bias=torch.zeros(2, 7)), reference, atol=1e-6, rtol=1e-5)
    bias = torch.zeros(2, 7)
    bias[:, 3] = math.log(2.0)
    assert (model(x, t, text_bias=bias) - reference).abs().max() > 1e-4


def test_wrong_bias_shape_names_the_shapes():
    model = _model()
    x = torch.randn(2, 5, CONFIG.input_dim)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 4\)"):
        model(x, 0.0, text_bias=torch.zeros(2, 4))
