"""Prompt weights through ELLA Prompt Encode and the sampler hook, in-process: weight 1.0 (explicit or none) is
the unweighted reference bit for bit; a weighted prompt's context at every UNet call is the connector with
that prompt's text_bias; unweighted prompts sampled beside weighted ones stay bit-identical; strip ignores
weights. (The server test of the same: test_server_prompt_weights.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from ella_core.conditioning import ContextCache, EllaPrompt
from ella_core.prompt_weights import PromptWeightError
from tests.nodes.graphs import chunks
from tests.nodes.inprocess import make_env, sample

ACT = "connector attention"


@pytest.fixture(scope="module")
def env(tiny_base):
    return make_env(tiny_base)


def encode(env, text: str, weighting=None):
    kwargs = {} if weighting is None else {"weighting": weighting}
    return env.nodes.EllaTSCEncode.execute(env.text_encoder, env.connector, text, **kwargs).result[0]


def prompt_of(conditioning) -> EllaPrompt:
    return conditioning[0][1]["model_conds"]["ella"].cond


def contexts(env, positive, negative, **kwargs) -> list[torch.Tensor]:
    model, rec = env.patched()
    sample(model, positive, negative, **kwargs)
    return [(call["t"], call["context"], call["cond_or_uncond"]) for call in rec.calls]


UNIT = [("(cat:1.0) on a mat", "cat on a mat"), ("a (red fox:1) in (snow:1.0)", "a red fox in snow"),
        ("((a lighthouse:1.0)) at dusk", "a lighthouse at dusk"), ("a red cube, two cats .", "a red cube, two cats ."),
        ("", "")]


@pytest.mark.parametrize("weighted, plain", UNIT)
def test_unit_weights_are_the_unweighted_reference_bit_for_bit(env, weighted, plain):
    """Through the node (features, no bias) and the hook (every context of a sampling run)."""
    ours, reference = encode(env, weighted, ACT), encode(env, plain)
    assert prompt_of(ours).text_bias is None
    assert torch.equal(prompt_of(ours).features, prompt_of(reference).features)
    negative = encode(env, "")
    got = contexts(env, ours, negative, sampler="heun", steps=3)
    expected = contexts(env, reference, negative, sampler="heun", steps=3)
    assert len(got) == len(expected) > 0
    for (t, ctx, which), (t_ref, ctx_ref, which_ref) in zip(got, expected):
        assert torch.equal(t, t_ref) and which == which_ref and torch.equal(ctx, ctx_ref)


def test_old_workflows_without_the_widget_strip(env):
    """A saved graph has no weighting input: strip, today's behaviour, bit for bit."""
    for text in ["a (red:1.5) fox", "a cat (sleeping) on a mat"]:
        assert torch.equal(prompt_of(encode(env, text)).features, prompt_of(encode(env, text, "strip")).features)
        assert prompt_of(encode(env, text)).text_bias is None


def test_weighted_context_at_every_call_is_the_biased_connector(env):
    """heun (midpoints off the planned schedule), batch 2: the weighted cond's chunks equal
    connector(features, t, text_bias) exactly; the unweighted uncond's chunks equal connector(features, t)."""
    pos, neg = encode(env, "a (red:1.6) fox in (deep snow:0.4)", ACT), encode(env, "blurry")
    p, n = prompt_of(pos), prompt_of(neg)
    bias = p.text_bias
    assert bias is not None and n.text_bias is None
    assert sorted({round(math.exp(v), 6) for v in bias[0].tolist()}) == [0.4, 1.0, 1.6]
    module = env.connector.module
    checked = 0
    for t, ctx, which in contexts(env, pos, neg, sampler="heun", scheduler="karras", steps=3, batch=2):
        for kind, t_chunk, chunk in chunks({"t": t, "context": ctx, "cond_or_uncond": which}):
            prompt = p if kind == 0 else n
            with torch.no_grad():
                rows = [module.forward_projected(module.project_text(prompt.features), float(v),
                                                 text_bias=prompt.text_bias) for v in t_chunk]
            assert torch.equal(chunk, torch.cat(rows)), (kind, t_chunk)
            checked += 1
    assert checked >= 8


def test_weights_change_the_context_and_strip_does_not(env):
    text = "a (red:1.8) fox in the (snow:0.3)"
    weighted, stripped, plain = encode(env, text, ACT), encode(env, text, "strip"), encode(env, "a red fox in the snow")
    assert torch.equal(prompt_of(weighted).features, prompt_of(plain).features)
    assert torch.equal(prompt_of(stripped).features, prompt_of(plain).features)
    negative = encode(env, "")
    got, ref, strip = (contexts(env, c, negative, steps=2) for c in (weighted, plain, stripped))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(strip, ref))
    assert all(not torch.equal(a[1], b[1]) for a, b in zip(got, ref))


def test_biased_and_unbiased_rows_never_share_a_forward():
    """ContextCache batches rows with a text bias apart from rows without; each row equals its prompt alone."""
    from ella_core import ELLA, ELLAConfig

    torch.manual_seed(0)
    module = ELLA(ELLAConfig(input_dim=8, width=32, layers=2, heads=4, num_latents=16, time_channel=8,
                             time_embed_dim=16)).eval()
    with torch.no_grad():
        for q in module.parameters():
            q.normal_(0, 0.3)
    features = [torch.randn(1, 5, 8) for _ in range(3)]
    bias = torch.tensor([[0.0, math.log(2.0), 0.0, -math.inf, 0.0]])
    prompts = [EllaPrompt(features[0], lambda: module), EllaPrompt(features[1], lambda: module, text_bias=bias),
               EllaPrompt(features[2], lambda: module, text_bias=bias * 0.5)]
    cache = ContextCache(connector=lambda: module)
    rows = [(p, 0, t) for p in prompts for t in (3.0, 700.5)]
    got = cache.fetch(rows)
    assert cache.stats.forwards == 2
    for (prompt, _, t), value in zip(rows, got):
        with torch.no_grad():
            alone = module.forward_projected(module.project_text(prompt.features), t, text_bias=prompt.text_bias)[0]
        assert torch.equal(value, alone)
    with pytest.raises(ValueError, match=r"text_bias has shape \(1, 4\)"):
        EllaPrompt(features[0], lambda: module, text_bias=torch.zeros(1, 4))


def test_bad_weights_are_named(env):
    with pytest.raises(ValueError, match=r"weight -0.5 on 'red'") as raised:  # the pack's own PromptWeightError
        encode(env, "a (red:-0.5) fox", ACT)
    assert type(raised.value).__name__ == PromptWeightError.__name__
    problem = env.nodes.EllaTSCEncode.validate_inputs(text="a (red:nan) fox", weighting=ACT)
    assert isinstance(problem, str) and "weight nan on 'red'" in problem
    assert env.nodes.EllaTSCEncode.validate_inputs(text="a (red:nan) fox", weighting="strip") is True
    assert "not one of" in env.nodes.EllaTSCEncode.validate_inputs(text="a", weighting="loud")
