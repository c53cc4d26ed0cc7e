"""The cross-run context store through ComfyUI's real sampling path, in-process.

A re-queued graph (same prompt objects, same patched model, new seed) runs no connector forward; a changed
schedule computes only its new timesteps; other connectors, prompts, prompt weights and regional prompts
never receive another's entry; the byte budget evicts and 0 turns the store off; dropped prompts and
connectors are collected. Every context any UNet call receives is still, bit for bit, the connector's
forward of that prompt alone at that call's t (torch.equal), and samples equal those of store-less runs.
"""

from __future__ import annotations

import gc
import random
import sys
import weakref

import pytest
import torch

from tests.nodes.graphs import chunks
from tests.nodes.inprocess import PACK_MODULE, Recorder, make_env, sample
from devtools import tiny_models as tm

STORE_ENV = "ELLA_TSC_CONTEXT_STORE_MB"
ACT = "connector attention"


@pytest.fixture(autouse=True)
def context_store_env(monkeypatch):
    """Overrides tests/nodes/conftest.py's fixture of the same name: the store is on (its default budget)."""
    monkeypatch.delenv(STORE_ENV, raising=False)


@pytest.fixture(scope="module")
def env(tiny_base):
    return make_env(tiny_base)


@pytest.fixture
def store():
    """The pack's process-wide store (the pack is imported under its own module name)."""
    return sys.modules[f"{PACK_MODULE}.ella_core.context_store"].shared_store()


def prompt_of(conditioning):
    return conditioning[0][1]["model_conds"]["ella"].cond


def encode(env, text: str, weighting=None):
    kwargs = {} if weighting is None else {"weighting": weighting}
    return env.nodes.EllaTSCEncode.execute(env.text_encoder, env.connector, text, **kwargs).result[0]


def patched(env, connector):
    model = env.nodes.EllaTSCTimestepConditioning.execute(env.model, connector).result[0]
    rec = Recorder()
    model.add_wrapper_with_key("diffusion_model", "test_recorder", rec)
    return model, rec


class Exact:
    """Asserts every chunk of recorded UNet calls equals one allowed prompt's connector forward alone at the
    chunk's t, bit for bit (references memoised per prompt and t)."""

    def __init__(self, module):
        self.module, self.memo = module, {}

    def alone(self, prompt, t: float) -> torch.Tensor:
        key = (id(prompt), t)
        if key not in self.memo:
            with torch.no_grad():
                projected = self.module.project_text(prompt.features)
                self.memo[key] = (prompt, self.module.forward_projected(projected, t, text_bias=prompt.text_bias).float())
        return self.memo[key][1]

    def check(self, calls, allowed: dict) -> int:
        """allowed: cond_or_uncond (0 positive, 1 negative) -> the ELLA prompts that chunk may come from."""
        checked = 0
        for call in calls:
            for which, t, ctx in chunks(call):
                for row in range(ctx.shape[0]):
                    refs = [self.alone(p, float(t[row])) for p in allowed[which]]
                    assert any(torch.equal(ctx[row:row + 1], r) for r in refs), (which, float(t[row]))
                    checked += 1
        return checked


def distinct_t(calls) -> set:
    return {float(x) for call in calls for x in call["t"]}


@pytest.mark.parametrize("sampler, scheduler", [("euler", "normal"), ("heun", "karras"), ("dpm_2", "exponential"),
                                                ("euler_ancestral", "sgm_uniform"), ("dpmpp_2m", "simple"),
                                                ("lms", "beta")])
def test_a_requeued_graph_runs_no_connector_forward(env, monkeypatch, sampler, scheduler):
    """Same conditioning objects and patched model, a new seed: 0 forwards, every context reused and exact,
    the sample identical to a run with the store off, and different from the first seed's as without it."""
    pos, neg = encode(env, f"a lighthouse at dusk, {sampler}"), encode(env, f"low quality, {scheduler}")
    exact = Exact(env.connector.module)
    allowed = {0: [prompt_of(pos)], 1: [prompt_of(neg)]}
    model, rec = patched(env, env.connector)
    hook = env.hook.installed_hook(model)
    first = sample(model, pos, neg, sampler=sampler, scheduler=scheduler, steps=4, batch=2, seed=1)
    cold = hook.last_stats
    assert cold.connector_calls > 0 and cold.reused == 0
    start = len(rec.calls)
    second = sample(model, pos, neg, sampler=sampler, scheduler=scheduler, steps=4, batch=2, seed=2)
    warm = hook.last_stats
    assert (warm.forwards, warm.connector_calls, warm.projections) == (0, 0, 0)
    assert warm.reused == 2 * len(distinct_t(rec.calls[start:])) <= cold.connector_calls  # (cond, uncond) per t
    assert exact.check(rec.calls, allowed) == 4 * len(rec.calls)  # (cond, uncond) x batch 2 per call
    assert len(rec.calls) == 2 * start

    monkeypatch.setenv(STORE_ENV, "0")
    off_model, off_rec = patched(env, env.connector)
    without = [sample(off_model, pos, neg, sampler=sampler, scheduler=scheduler, steps=4, batch=2, seed=s)
               for s in (1, 2)]
    assert env.hook.installed_hook(off_model).last_stats.reused == 0
    assert torch.equal(first, without[0]) and torch.equal(second, without[1])
    assert not torch.equal(first, second)
    assert all(torch.equal(a["context"], b["context"]) for a, b in zip(rec.calls, off_rec.calls))


SCHEDULE_CHANGES = [(dict(steps=4), dict(steps=6)), (dict(steps=4), dict(steps=4, scheduler="karras")),
                    (dict(steps=5), dict(steps=3, denoise=0.6)), (dict(steps=3, sampler="euler"), dict(steps=3, sampler="heun")),
                    (dict(steps=4, scheduler="karras"), dict(steps=8, scheduler="karras")),
                    (dict(steps=6, scheduler="exponential"), dict(steps=2, scheduler="exponential"))]


@pytest.mark.parametrize("before, after", SCHEDULE_CHANGES)
def test_a_changed_schedule_computes_only_its_new_timesteps(env, before, after):
    """euler/heun evaluate exactly their planned timesteps: the second run computes (cond, uncond) at each t
    the first run did not have, in few forwards, and takes the others from the store."""
    pos, neg = encode(env, f"two cats on a sofa {before} {after}"), encode(env, "blurry")
    model, rec = patched(env, env.connector)
    hook = env.hook.installed_hook(model)
    run = lambda kw: sample(model, pos, neg, **{"sampler": "euler", "scheduler": "normal", **kw})  # noqa: E731
    run(before)
    seen, start = distinct_t(rec.calls), len(rec.calls)
    run(after)
    now = distinct_t(rec.calls[start:])
    stats = hook.last_stats
    assert stats.connector_calls == 2 * len(now - seen), (sorted(now), sorted(seen))
    assert stats.reused == 2 * len(now & seen)
    assert stats.forwards == (1 if now - seen else 0)  # the new part of the schedule in one forward
    assert Exact(env.connector.module).check(rec.calls, {0: [prompt_of(pos)], 1: [prompt_of(neg)]}) == 2 * len(rec.calls)


def test_random_runs_never_take_another_prompts_or_connectors_entry(env, tiny_base):
    """Runs drawn at random from graph variants (the same prompt re-encoded into a new object, a weighted
    prompt, regional prompts, a second loader of the same connector file, a re-applied ELLA Timestep
    Conditioning): each run computes exactly the (prompt, connector, t) no earlier run computed, and every
    context is that prompt's own under the connector that ran."""
    import node_helpers

    gen = random.Random(7)
    a, b, neg = encode(env, "a red fox in the snow"), encode(env, "a castle on a hill"), encode(env, "ugly")
    a_again = encode(env, "a red fox in the snow")  # same features tensor (encoder cache), another prompt
    weighted = encode(env, "a (red:1.7) fox in the (snow:0.5)", ACT)
    assert prompt_of(a_again) is not prompt_of(a) and prompt_of(a_again).features is prompt_of(a).features
    assert prompt_of(weighted).text_bias is not None
    area = lambda c, x: node_helpers.conditioning_set_values(  # noqa: E731
        c, {"area": (8, 4, 0, x), "strength": 1.0, "set_area_to_bounds": False})
    regional = area(a, 0) + area(b, 4)
    positives = {"a": (a, [a]), "a_again": (a_again, [a_again]), "weighted": (weighted, [weighted]),
                 "regional": (regional, [a, b])}
    same_file = env.nodes.EllaTSCConnectorLoader.execute(tm.ELLA_NAME).result[0]
    connectors = {"wired": env.connector, "same file": same_file}
    models = {name: patched(env, c) for name, c in connectors.items()}
    seen: set = set()
    for n in range(10):
        pos_name, conn_name = gen.choice(sorted(positives)), gen.choice(sorted(connectors))
        if gen.random() < 0.3:  # the node re-executed (e.g. a LoRA changed upstream): a new hook, same connector
            models[conn_name] = patched(env, connectors[conn_name])
        model, rec = models[conn_name]
        pos, allowed = positives[pos_name]
        kwargs = dict(sampler=gen.choice(["euler", "heun"]), scheduler=gen.choice(["normal", "karras"]),
                      steps=gen.randint(2, 4), seed=gen.randrange(100))
        start = len(rec.calls)
        sample(model, pos, neg, **kwargs)
        calls = rec.calls[start:]
        module = connectors[conn_name].module
        needed = {(id(prompt_of(c)), id(module), t) for c in [*allowed, neg] for t in distinct_t(calls)}
        stats = env.hook.installed_hook(model).last_stats
        assert stats.connector_calls == len(needed - seen), (n, pos_name, conn_name, kwargs)
        assert stats.reused == len(needed & seen)
        seen |= needed
        exact = Exact(module)
        assert exact.check(calls, {0: [prompt_of(c) for c in allowed], 1: [prompt_of(neg)]}) > 0
        if pos_name == "regional":  # both regions really reach the UNet
            refs = {name: [exact.alone(prompt_of(c), float(x["t"][0])) for x in calls] for name, c in (("a", a), ("b", b))}
            got = [x["context"][i:i + 1] for x in calls for i, w in enumerate(x["cond_or_uncond"]) if w == 0]
            assert any(torch.equal(g, r) for g in got for r in refs["a"])
            assert any(torch.equal(g, r) for g in got for r in refs["b"])
    assert {p for p, _, _ in seen} >= {id(prompt_of(c)) for c in (a, neg)}


def test_budget_evicts_least_recently_used_and_zero_is_off(env, monkeypatch, store):
    config = env.connector.module.config
    context_bytes = config.num_latents * config.width * 4  # fp32 on the CPU
    pos, neg = encode(env, "a quiet harbour at night"), encode(env, "noise")
    model, rec = patched(env, env.connector)
    hook = env.hook.installed_hook(model)
    exact = Exact(env.connector.module)
    allowed = {0: [prompt_of(pos)], 1: [prompt_of(neg)]}

    monkeypatch.setenv(STORE_ENV, repr(3 * context_bytes / 2**20))  # room for exactly three contexts
    sample(model, pos, neg, steps=4, seed=1)
    assert hook.last_stats.connector_calls == 8 and len(store) == 3 and store.nbytes == 3 * context_bytes
    sample(model, pos, neg, steps=4, seed=2)
    assert (hook.last_stats.reused, hook.last_stats.connector_calls) == (3, 5)
    assert store.nbytes <= 3 * context_bytes

    monkeypatch.setenv(STORE_ENV, "0")
    for seed in (3, 4):
        sample(model, pos, neg, steps=4, seed=seed)
        assert (hook.last_stats.reused, hook.last_stats.connector_calls) == (0, 8)
        assert len(store) == 0
    assert exact.check(rec.calls, allowed) == 2 * len(rec.calls)

    monkeypatch.setenv(STORE_ENV, "lots")
    with pytest.raises(ValueError, match=r"ELLA_TSC_CONTEXT_STORE_MB must be a number of MiB >= 0.*'lots'"):
        sample(model, pos, neg, steps=2)


def test_dropped_prompts_and_connectors_are_collected(env, store):
    """After a run, the store holds neither the prompts nor the connector: dropping them (as ComfyUI's cache
    does when a graph changes) collects them, and their contexts leave the store."""
    import comfy.model_management as mm

    connector = env.nodes.EllaTSCConnectorLoader.execute(tm.ELLA_NAME).result[0]
    pos, neg = encode(env, "a (tall:1.4) tower of books", ACT), encode(env, "dull")
    model, _ = patched(env, connector)
    sample(model, pos, neg, steps=3)
    held = len(store)
    assert held >= 6
    refs = {"positive": weakref.ref(prompt_of(pos)), "its text bias": weakref.ref(prompt_of(pos).text_bias),
            "negative": weakref.ref(prompt_of(neg)), "connector module": weakref.ref(connector.module),
            "managed connector": weakref.ref(connector)}
    del pos, neg, model, connector
    gc.collect()
    mm.cleanup_models()
    gc.collect()
    alive = [name for name, ref in refs.items() if ref() is not None]
    assert not alive, f"still alive after the graph was dropped: {alive}"
    assert len(store) == held - 6
