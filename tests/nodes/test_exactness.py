"""Exactness of the per-step hook, in-process: at every UNet call every ELLA cond's context equals
connector(its own LLM features, t) at the timestep t the UNet itself receives (model_sampling at call time).

Covers samplers with intermediate evaluations, schedulers incl. AYS and custom fractional sigmas, denoise<1
(img2img), two passes, batch>1, several ELLA prompts (combine, areas, timestep ranges) mixed with plain CLIP
conds, a patched model_sampling, per-sample sigmas, call counts of the per-run cache, and cheap clones.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.nodes.graphs import assert_contexts_exact
from tests.nodes.inprocess import make_env, sample


@pytest.fixture(scope="module")
def env(tiny_base):
    return make_env(tiny_base)


@pytest.fixture(scope="module")
def conds(env):
    texts = {"a": "a lighthouse at dusk", "b": "two cats on a sofa", "neg": "low quality"}
    return {k: env.encode(v) for k, v in texts.items()}, {k: env.reference(v) for k, v in texts.items()}


def _pos_neg_expected(refs):
    return lambda which, t: (refs["a"] if which == 0 else refs["neg"])(t)


@pytest.mark.parametrize("sampler, scheduler", [("heun", "karras"), ("dpm_2", "exponential"),
                                                ("euler_ancestral", "normal"), ("dpmpp_2m", "sgm_uniform")])
def test_samplers_and_schedulers(env, conds, sampler, scheduler):
    (c, refs) = conds
    model, rec = env.patched()
    sample(model, c["a"], c["neg"], sampler=sampler, scheduler=scheduler, steps=4, batch=2)
    assert assert_contexts_exact(rec.calls, _pos_neg_expected(refs)) == 2 * len(rec.calls)
    assert len({tuple(x["t"].tolist()) for x in rec.calls}) >= 3


def test_custom_fractional_sigmas_and_ays(env, conds):
    """Explicit sigmas between the discrete ones (SamplerCustom), and Align Your Steps' SD1 schedule."""
    from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler

    (c, refs) = conds
    ays = AlignYourStepsScheduler.execute("SD1", 4, 1.0).result[0]
    for sigmas in (torch.tensor([13.3, 6.1, 2.37, 0.81, 0.2, 0.0]), ays):
        model, rec = env.patched()
        sample(model, c["a"], c["neg"], sampler="heun", sigmas=sigmas, batch=1)
        assert assert_contexts_exact(rec.calls, _pos_neg_expected(refs)) == 2 * len(rec.calls)


def test_img2img_denoise_and_two_passes(env, conds):
    (c, refs) = conds
    model, rec = env.patched()
    first = sample(model, c["a"], c["neg"], sampler="euler", steps=4, batch=3)
    n_first = len(rec.calls)
    sample(model, c["b"], c["neg"], sampler="dpm_2", scheduler="karras", steps=4, denoise=0.45, latent=first)
    assert n_first and len(rec.calls) > n_first
    assert assert_contexts_exact(rec.calls[:n_first], _pos_neg_expected(refs)) == 2 * n_first
    second = lambda which, t: (refs["b"] if which == 0 else refs["neg"])(t)  # noqa: E731
    assert assert_contexts_exact(rec.calls[n_first:], second) == 2 * (len(rec.calls) - n_first)
    assert max(float(x["t"].max()) for x in rec.calls[n_first:]) < 700  # denoise 0.45 starts part-way


def test_several_prompts_areas_ranges_and_clip_mixed(env, conds):
    """Positive: ELLA a (left half) + ELLA b (right half) combined; negative: plain CLIP plus ELLA neg on
    the first half of the schedule only. Every chunk equals one of the contexts allowed for it."""
    import node_helpers

    (c, refs) = conds
    ms = env.model.get_model_object("model_sampling")
    left = node_helpers.conditioning_set_values(c["a"], {"area": (64 // 8, 32 // 8, 0, 0), "strength": 1.0,
                                                         "set_area_to_bounds": False})
    right = node_helpers.conditioning_set_values(c["b"], {"area": (64 // 8, 32 // 8, 0, 32 // 8), "strength": 1.0,
                                                          "set_area_to_bounds": False})
    tokens = env.clip.tokenize("")
    clip_cond, pooled = env.clip.encode_from_tokens(tokens, return_pooled=True)
    clip_neg = [[clip_cond, {"pooled_output": pooled}]]
    ranged = node_helpers.conditioning_set_values(c["neg"], {"start_percent": 0.0, "end_percent": 0.5})
    model, rec = env.patched()
    sample(model, left + right, clip_neg + ranged, sampler="heun", scheduler="normal", steps=4, batch=2)

    seen = set()
    for call in rec.calls:
        n = len(call["cond_or_uncond"])
        b = call["context"].shape[0] // n
        for i, which in enumerate(call["cond_or_uncond"]):
            ctx, t = call["context"][i * b:(i + 1) * b], call["t"][i * b:(i + 1) * b]
            if which == 0:
                options = {"a": refs["a"](t), "b": refs["b"](t)}
            else:
                options = {"clip": clip_cond.expand(b, -1, -1).float(), "neg": refs["neg"](t)}
            match = [k for k, v in options.items() if v.shape == ctx.shape and (v - ctx).abs().max() < 1e-5]
            assert match, f"chunk {which} at t {t.tolist()} matches no allowed context"
            seen.add((match[0], float(t[0])))
    names = {k for k, _ in seen}
    assert names == {"a", "b", "clip", "neg"}, names
    start_sigma = ms.percent_to_sigma(0.5)  # the ranged ELLA negative only runs while sigma >= this
    assert all(float(ms.sigma(torch.tensor(t))) >= start_sigma - 1e-4 for k, t in seen if k == "neg")
    assert any(k == "clip" and t < 400 for k, t in seen)


def test_patched_model_sampling_read_at_call_time(env, conds):
    """v-prediction + zero-terminal-SNR changes sigma -> t; the contexts follow the UNet's t, not a table."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    (c, refs) = conds
    patched_sampling = ModelSamplingDiscrete().patch(env.model, "v_prediction", True)[0]
    model, rec = env.patched(patched_sampling)
    sample(model, c["a"], c["neg"], sampler="euler", steps=4)
    assert assert_contexts_exact(rec.calls, _pos_neg_expected(refs)) == 2 * len(rec.calls)
    plain = env.model.get_model_object("model_sampling")
    differs = [float(plain.timestep(x["sigma"][:1])) != float(x["t"][0]) for x in rec.calls]
    assert any(differs), "zsnr should change the sigma -> t mapping for some call"


def test_per_sample_sigmas(env, conds):
    """A call whose batch has different sigmas gets one context per sample, each at its own t."""
    (c, refs) = conds
    from comfy.sampler_helpers import convert_cond

    cond = convert_cond(c["a"])
    import comfy.samplers

    model = env.model.model
    encoded = comfy.samplers.encode_model_conds(model.extra_conds, cond, torch.zeros(2, 4, 8, 8), "cpu", "positive")
    sigma = torch.tensor([14.0, 0.7])
    out = env.hook.ella_conds_for_step(model, [encoded], torch.zeros(2, 4, 8, 8), sigma, env.hook.ContextCache())
    ctx = out[0][0]["model_conds"]["c_crossattn"].cond
    t = model.model_sampling.timestep(sigma).float()
    assert t[0] != t[1]
    torch.testing.assert_close(ctx, refs["a"](t), atol=1e-5, rtol=0)
    assert "ella" not in out[0][0]["model_conds"] and "ella" in encoded[0]["model_conds"]  # originals untouched


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_connector_called_once_per_prompt_and_timestep(env, conds, monkeypatch, sampler):
    """Projection once per prompt; each (prompt, t) context computed once; all scheduled contexts in one
    forward before the first UNet call, and one forward per off-schedule evaluation (dpm_2's midpoints)."""
    (c, _) = conds
    module = env.connector.module
    counts = {"project_text": 0, "forward_many": 0, "rows": 0}
    depth = [0]  # forward_many runs the rows of a connector with few latents one by one, through itself
    for name in ("project_text", "forward_many"):
        original = getattr(module, name)

        def counted(*args, _name=name, _orig=original, **kwargs):
            if depth[0] == 0:
                counts[_name] += 1
                if _name == "forward_many":
                    counts["rows"] += args[0].shape[0]
            depth[0] += 1
            try:
                return _orig(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(module, name, counted)
    model, rec = env.patched()
    for run in range(2):  # each sampling run has its own cache
        for k in counts:
            counts[k] = 0
        start = len(rec.calls)
        sample(model, c["a"], c["neg"], sampler=sampler, scheduler="karras", steps=4, batch=2)
        distinct_t = {float(x["t"][0]) for x in rec.calls[start:]}
        sigmas = model.get_model_object("model_sampling")
        planned = _ksampler_sigmas(model, sampler, 4)
        scheduled = {float(t) for t in sigmas.timestep(planned[planned > 0])}
        off_schedule = distinct_t - scheduled
        assert counts["project_text"] == 2, counts  # positive and negative, once each
        assert counts["rows"] == 2 * len(distinct_t | scheduled), (counts, distinct_t)
        assert counts["forward_many"] == 1 + len(off_schedule), (counts, off_schedule)
        stats = env.hook.installed_hook(model).last_stats
        assert (stats.forwards, stats.connector_calls, stats.precomputed) == (
            counts["forward_many"], counts["rows"], 2 * len(scheduled))
        if sampler == "heun":  # its corrector revisits the next step's t: served from the cache
            assert len(rec.calls) - start > len(distinct_t)
    assert (sampler == "dpm_2") == bool(off_schedule)


def _ksampler_sigmas(model, sampler, steps):
    """The sigmas KSampler plans (dpm_2 and others discard the penultimate one)."""
    import comfy.samplers

    return comfy.samplers.KSampler(model, steps, "cpu", sampler, "karras").sigmas


def test_clone_is_cheap_and_hook_installed_once(env, conds):
    (c, _) = conds
    once = env.nodes.EllaTSCTimestepConditioning.execute(env.model, env.connector).result[0]
    twice = env.nodes.EllaTSCTimestepConditioning.execute(once, env.connector).result[0]
    for wrapper_type in ("calc_cond_batch", "outer_sample"):
        assert len(twice.wrappers[wrapper_type]["ella"]) == 1
    clone = twice.clone()
    assert clone.get_additional_models_with_key("ella_connector")[0].model.inner is env.connector.module
    copied = copy.deepcopy(c["a"])  # conditioning copies share the prompt's tensors
    assert copied[0][1]["model_conds"]["ella"].cond is c["a"][0][1]["model_conds"]["ella"].cond
    tensors_in_options = [v for v in _walk(clone.model_options) if isinstance(v, torch.Tensor)]
    assert not tensors_in_options


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def test_encoding_cache(env):
    enc = env.text_encoder
    calls = []
    original = enc.encoder.encode
    enc.encoder.encode = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        first = enc.encode("a brand new prompt")
        again = enc.encode("a brand new prompt")
        enc.encode("another prompt")
    finally:
        del enc.encoder.encode
    assert len(calls) == 2 and again is first


def test_width_mismatch_messages(env, tiny_base):
    from tests.nodes.conftest import NARROW_LLM_ELLA, WIDE_ELLA

    wide = env.nodes.EllaTSCConnectorLoader.execute(WIDE_ELLA).result[0]
    with pytest.raises(ValueError, match=r"512.*768"):
        env.nodes.EllaTSCTimestepConditioning.execute(env.model, wide)
    narrow = env.nodes.EllaTSCConnectorLoader.execute(NARROW_LLM_ELLA).result[0]
    with pytest.raises(ValueError, match=r"64.*32"):
        env.nodes.EllaTSCEncode.execute(env.text_encoder, narrow, "a prompt")


def test_controlnet_gets_the_same_context_as_the_unet(env, conds, tiny_base):
    """ControlNet computes its residuals from the cond's context before the UNet: it must see ELLA's
    per-step context too (the hook runs before batching and before ControlNet)."""
    import comfy.controlnet
    import nodes as comfy_nodes  # ComfyUI's nodes.py
    from devtools import tiny_models as tm

    (c, refs) = conds
    control = comfy.controlnet.load_controlnet(str(tm.write_tiny_controlnet(tiny_base / "models")))
    seen = []
    inner = control.control_model
    original_forward = inner.forward

    def recording_forward(x, hint, timesteps, context, **kwargs):
        seen.append((timesteps.detach().float().clone(), context.detach().float().clone()))
        return original_forward(x, hint, timesteps, context, **kwargs)

    inner.forward = recording_forward
    try:
        pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            c["a"], c["neg"], control, torch.rand(1, 64, 64, 3), 1.0, 0.0, 1.0)
        model, rec = env.patched()
        sample(model, pos, neg, sampler="heun", scheduler="karras", steps=3, batch=2)
    finally:
        del inner.forward
    assert len(seen) == len(rec.calls) > 0
    for (t_cn, ctx_cn), call in zip(seen, rec.calls):
        torch.testing.assert_close(t_cn, call["t"])
        torch.testing.assert_close(ctx_cn, call["context"], atol=1e-6, rtol=0)
    assert assert_contexts_exact(rec.calls, _pos_neg_expected(refs)) == 2 * len(rec.calls)


def test_dual_cfg_guider_and_mask(env, conds):
    """SamplerCustomAdvanced-style guider with three cond groups (DualCFG), one of them masked."""
    import comfy.samplers
    import node_helpers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    (c, refs) = conds
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    masked_b = node_helpers.conditioning_set_values(c["b"], {"mask": mask, "set_area_to_bounds": False,
                                                             "mask_strength": 1.0})
    model, rec = env.patched()
    guider = Guider_DualCFG(model)
    guider.set_conds(c["a"], masked_b, c["neg"])
    guider.set_cfg(5.0, 2.0)
    latent = torch.zeros(1, 4, 8, 8)
    sigmas = model.get_model_object("model_sampling").sigma(torch.tensor([999.0, 600.5, 250.25])).tolist() + [0.0]
    import comfy.sample
    guider.sample(comfy.sample.prepare_noise(latent, 0), latent, comfy.samplers.sampler_object("dpm_2"),
                  torch.tensor(sigmas), seed=0, disable_pbar=True)
    by_index = {0: refs["neg"], 1: refs["b"], 2: refs["a"]}  # DualCFG batches [negative, middle, positive]
    assert assert_contexts_exact(rec.calls, lambda which, t: by_index[which](t)) == 3 * len(rec.calls)


def test_sdxl_context_and_pooled_vector_every_call(env, tiny_base):
    """SDXL layout: a width-2048 connector with a pooled head; at every call the context is exact and the
    pooled slot of `y` (its first 1280 values) is pooled_proj(mean of that step's context)."""
    from devtools import tiny_models as tm
    from tests.nodes.inprocess import tiny_sdxl_model

    tm.write_tiny_ella(tiny_base / "models", "tiny_ella_sdxl.safetensors", width=2048, pooled_dim=1280,
                       base_model="sdxl")
    connector = env.nodes.EllaTSCConnectorLoader.execute("tiny_ella_sdxl.safetensors").result[0]
    sdxl = tiny_sdxl_model()
    pos = env.nodes.EllaTSCEncode.execute(env.text_encoder, connector, "a glass teapot").result[0]
    neg = env.nodes.EllaTSCEncode.execute(env.text_encoder, connector, "").result[0]
    with pytest.raises(ValueError, match=r"2048.*768"):  # and an SDXL connector on SD1.5 is refused
        env.nodes.EllaTSCTimestepConditioning.execute(env.model, connector)
    model = env.nodes.EllaTSCTimestepConditioning.execute(sdxl, connector).result[0]
    from tests.nodes.inprocess import Recorder

    rec = Recorder()
    model.add_wrapper_with_key("diffusion_model", "test_recorder", rec)
    sample(model, pos, neg, sampler="heun", scheduler="karras", steps=3, batch=2)
    module = connector.module
    feats = {0: env.features("a glass teapot"), 1: env.features("")}
    checked = 0
    for call in rec.calls:
        n = len(call["cond_or_uncond"])
        b = call["context"].shape[0] // n
        for i, which in enumerate(call["cond_or_uncond"]):
            t = call["t"][i * b:(i + 1) * b]
            with torch.no_grad():
                ref = module(feats[which].expand(b, -1, -1), t)
                pooled = module.pooled(ref)
            torch.testing.assert_close(call["context"][i * b:(i + 1) * b], ref, atol=1e-5, rtol=0)
            y = call["y"][i * b:(i + 1) * b]
            torch.testing.assert_close(y[:, :1280], pooled, atol=1e-5, rtol=0)
            checked += 1
    assert checked == 2 * len(rec.calls) > 0
    assert len({float(c["y"][0, 0]) for c in rec.calls}) > 1  # the pooled vector changes with t


def test_clip_only_graph_unchanged_by_the_hook(env):
    """With no ELLA cond the patched model samples bit-for-bit like the original."""
    tokens = env.clip.tokenize("a plain clip prompt")
    cond, pooled = env.clip.encode_from_tokens(tokens, return_pooled=True)
    pos, neg = [[cond, {"pooled_output": pooled}]], [[torch.zeros_like(cond), {"pooled_output": pooled}]]
    model, _ = env.patched()
    a = sample(env.model, pos, neg, sampler="heun", steps=2, seed=3)
    b = sample(model, pos, neg, sampler="heun", steps=2, seed=3)
    assert torch.equal(a, b)


def test_models_are_managed(env, conds):
    """The connector is loaded with the UNet for sampling; the LLM was loaded through model management."""
    import comfy.model_management as mm

    (c, _) = conds
    model, _ = env.patched()
    loaded_during = []
    original = mm.load_models_gpu

    def spy(models, *args, **kwargs):
        loaded_during.append(list(models))
        return original(models, *args, **kwargs)

    mm.load_models_gpu = spy
    try:
        sample(model, c["a"], c["neg"], steps=1)
        env.text_encoder._cache.clear()
        env.encode("a prompt that was never encoded before")
    finally:
        mm.load_models_gpu = original
    sampling_load, encode_load = loaded_during[0], loaded_during[-1]
    assert any(getattr(m, "model", None) is not None and getattr(m.model, "inner", None) is env.connector.module
               for m in sampling_load), "the connector was not loaded with the UNet"
    assert model in sampling_load or any(m.is_clone(model) for m in sampling_load)
    assert encode_load == [env.text_encoder.patcher]
    assert env.text_encoder.patcher.model.inner is env.text_encoder.encoder.model


def test_flexible_token_mode_prompts_of_different_lengths(env):
    """Flexible mode: prompts keep their own token counts (no padding, no repetition of features); positive
    and negative of different lengths still batch (the contexts have a fixed token count) and stay exact."""
    flexible = env.nodes.EllaTSCTextEncoderLoader.execute("tiny-t5", "fp32", "cpu", "flexible", 64).result[0]
    # A connector trained in flexible mode: one that records "fixed" would (rightly) switch the encoding back.
    connector = dataclasses.replace(env.connector, metadata=dataclasses.replace(env.connector.metadata,
                                                                                token_mode="flexible"))
    long_text, short_text = "a very long prompt about a harbour with many boats at sunrise", "dark"
    pos = env.nodes.EllaTSCEncode.execute(flexible, connector, long_text).result[0]
    neg = env.nodes.EllaTSCEncode.execute(flexible, connector, short_text).result[0]
    feats = {0: pos[0][1]["model_conds"]["ella"].cond.features, 1: neg[0][1]["model_conds"]["ella"].cond.features}
    direct = {0: flexible.encoder.encode([long_text], mode="flexible", max_length=64).features,
              1: flexible.encoder.encode([short_text], mode="flexible", max_length=64).features}
    assert feats[0].shape[1] > feats[1].shape[1]
    for i in (0, 1):
        assert torch.equal(feats[i], direct[i])  # exactly the encoder's tokens: nothing padded or repeated
    model, rec = env.patched()
    sample(model, pos, neg, sampler="heun", steps=3)
    module = env.connector.module
    expected = lambda which, t: module(direct[which].expand(t.shape[0], -1, -1), t)  # noqa: E731
    assert assert_contexts_exact(rec.calls, expected) == 2 * len(rec.calls)
    assert all(len(c["cond_or_uncond"]) == 2 for c in rec.calls)  # batched together in one UNet call
