"""Batched connector work is exact: one forward for many (prompt, t) rows, whole-schedule precompute and
on-demand evaluation all give, bit for bit (torch.equal), the connector's forward of each prompt alone.
Also: the connector wired into ELLA Timestep Conditioning is the one that runs, in the UNet's dtype."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from ella_core import ELLA, ELLAConfig
from ella_core.conditioning import ContextCache, ELLAConnectorMismatch, EllaPrompt, check_same_connector
from tests.nodes.inprocess import Recorder, make_env, sample
from devtools import tiny_models as tm


def _random_connector(seed: int, **overrides) -> ELLA:
    gen = random.Random(seed)
    heads = gen.choice([1, 2, 4])
    fields = dict(input_dim=gen.choice([8, 24]), width=heads * gen.choice([4, 8]), layers=gen.choice([1, 2]),
                  heads=heads, num_latents=gen.choice([1, 3, 8, 16, 24]), time_channel=gen.choice([4, 16]),
                  time_embed_dim=gen.choice([8, 16]))
    fields.update(overrides)
    torch.manual_seed(seed)
    module = ELLA(ELLAConfig(**fields)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in module.parameters():  # non-zero AdaLN, so every output really depends on t
            p.normal_(0, 0.3)
    return module


def _timesteps(gen: random.Random, n: int) -> list[float]:
    pool = [0.0, 999.0, 500.0, 0.25, 13.75, 981.0]
    return [gen.choice(pool) if gen.random() < 0.5 else gen.uniform(0, 1000) for _ in range(n)]


@pytest.mark.parametrize("seed", range(8))
def test_forward_many_rows_equal_each_prompt_alone(seed):
    """Any mix of prompts and timesteps (duplicates, fractional, 0 and 999) in one forward: row i is
    exactly module(features_i, t_i) computed for that prompt alone."""
    module = _random_connector(seed)
    gen = random.Random(100 + seed)
    rows = gen.randint(1, 9)
    length = gen.randint(1, 7)
    features = torch.randn(rows, length, module.config.input_dim)
    t = torch.tensor(_timesteps(gen, rows))
    with torch.no_grad():
        projected = torch.cat([module.project_text(features[i:i + 1]) for i in range(rows)])
        many = module.forward_many(projected, t)
        for i in range(rows):
            alone = module(features[i:i + 1], t[i:i + 1])
            assert torch.equal(many[i:i + 1], alone), f"row {i} of {rows} at t {float(t[i])}"
    assert len({float(v) for v in t}) > 1 or rows == 1


def test_forward_many_stacks_prompts_once_they_have_enough_rows(monkeypatch):
    """Above STACK_MIN_ROWS latents the rows go through one product (one call of each block); below, one
    forward per row keeps the result exact (see ella_core.connector)."""
    from ella_core import connector as connector_module

    for latents, block_calls in ((connector_module.STACK_MIN_ROWS, 1), (connector_module.STACK_MIN_ROWS - 1, 5)):
        module = _random_connector(3, num_latents=latents, layers=1)
        calls = []
        block = module.connector.perceiver_blocks[0]
        monkeypatch.setattr(block, "forward", lambda *a, _f=block.forward, **k: calls.append(1) or _f(*a, **k))
        with torch.no_grad():
            module.forward_many(torch.randn(5, 4, module.config.width), torch.arange(5.0))
        assert len(calls) == block_calls, latents


def test_forward_many_released_shapes_one_thread():
    """The released SD1.5 shapes (6 blocks, width 768, 64 latents, 128 tokens of width 2048), 2 prompts x
    2 timesteps in one forward, with one CPU thread (see ella_core.connector on several threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        module = ELLA(ELLAConfig()).eval().requires_grad_(False)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
            features = torch.randn(2, 128, 2048)
            projected = module.project_text(features).repeat_interleave(2, dim=0)  # rows: a, a, b, b
            t = torch.tensor([999.0, 421.0, 999.0, 3.0])
            many = module.forward_many(projected, t)
            for i in range(4):
                assert torch.equal(many[i:i + 1], module(features[i // 2:i // 2 + 1], t[i:i + 1])), i
    finally:
        torch.set_num_threads(threads)


def test_forward_many_rejects_a_timestep_count_that_does_not_fit():
    module = _random_connector(0)
    with pytest.raises(ValueError, match=r"3 timesteps for 2 rows"):
        module.forward_many(torch.zeros(2, 3, module.config.width), torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("seed", range(4))
def test_precompute_equals_on_demand(seed):
    """A schedule precomputed in chunked forwards (prompts of two token lengths) gives the same contexts,
    bit for bit, as computing each (prompt, t) alone on demand; counters say what ran."""
    module = _random_connector(seed)
    gen = random.Random(seed)
    prompts = [EllaPrompt(features=torch.randn(1, length, module.config.input_dim), connector=lambda: module)
               for length in (5, 5, 2)]
    schedule = sorted(set(_timesteps(gen, 9)), reverse=True)
    rows = [(p, 0, t) for t in schedule for p in prompts]
    ahead = ContextCache(max_rows_per_forward=4)
    assert ahead.precompute(rows) == len(rows)
    per_length = {5: 2 * len(schedule), 2: len(schedule)}
    assert ahead.stats.forwards == sum(math.ceil(n / 4) for n in per_length.values())
    assert ahead.precompute(rows) == 0  # nothing twice
    on_demand = ContextCache()
    for row in rows:
        expected = on_demand.fetch([row])[0]
        with torch.no_grad():
            alone = module(row[0].features, torch.tensor([row[2]]))[0]
        assert torch.equal(ahead.fetch([row])[0], expected) and torch.equal(expected, alone)
    assert ahead.stats.connector_calls == ahead.stats.precomputed == len(rows)  # all served from the plan
    assert on_demand.stats.forwards == on_demand.stats.connector_calls == len(rows)


def test_precompute_respects_its_memory_budget():
    module = _random_connector(1)
    prompt = EllaPrompt(features=torch.randn(1, 3, module.config.input_dim), connector=lambda: module)
    per_context = module.config.num_latents * module.config.width * 4
    cache = ContextCache(precompute_budget_bytes=5 * per_context)
    rows = [(prompt, 0, float(t)) for t in range(20)]
    assert cache.precompute(rows) == 5 and len(cache.planned) == 5
    assert cache.precompute(rows[5:]) == 5 and len(cache.planned) == 5  # the earlier window was dropped
    fresh = ContextCache()
    for row in rows[5:10]:
        assert torch.equal(cache.fetch([row])[0], fresh.fetch([row])[0])
    assert cache.stats.connector_calls == 10


def test_same_connector_rule():
    a = SimpleNamespace(name="a.safetensors", module=SimpleNamespace(config=ELLAConfig()))
    a_again = SimpleNamespace(name="a.safetensors", module=SimpleNamespace(config=ELLAConfig()))
    b = SimpleNamespace(name="b.safetensors", module=SimpleNamespace(config=ELLAConfig()))
    a_other_cfg = SimpleNamespace(name="a.safetensors", module=SimpleNamespace(config=ELLAConfig(layers=2)))
    prompt = EllaPrompt(features=torch.zeros(1, 1, 2048), connector=a, text="a cat on a mat")
    for ok in (a, a_again, None):
        check_same_connector(prompt, ok)
    for bad in (b, a_other_cfg):
        with pytest.raises(ELLAConnectorMismatch, match=r"'a cat on a mat'.*'a\.safetensors'.*runs connector"):
            check_same_connector(prompt, bad)


# --- in ComfyUI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tiny_base):
    return make_env(tiny_base)


def _prompt_of(conditioning) -> EllaPrompt:
    return conditioning[0][1]["model_conds"]["ella"].cond


def _assert_bit_identical(calls, by_which, module) -> int:
    """Every row of every chunk of every UNet call equals module(its prompt's features, its t) exactly."""
    checked = 0
    for call in calls:
        n = len(call["cond_or_uncond"])
        b = call["context"].shape[0] // n
        for i, which in enumerate(call["cond_or_uncond"]):
            for j in range(b):
                row = i * b + j
                with torch.no_grad():
                    alone = module(by_which[which].features, call["t"][row:row + 1]).float()
                assert torch.equal(call["context"][row:row + 1], alone), (which, float(call["t"][row]))
                checked += 1
    return checked


@pytest.fixture(scope="module")
def stacking_connector(env, tiny_base):
    """A tiny connector with enough latents (STACK_MIN_ROWS) that prompts are stacked into one product."""
    from ella_core.connector import STACK_MIN_ROWS

    tm.write_tiny_ella(tiny_base / "models", "tiny_ella_stacking.safetensors", num_latents=STACK_MIN_ROWS, seed=5)
    return env.nodes.EllaTSCConnectorLoader.execute("tiny_ella_stacking.safetensors").result[0]


@pytest.mark.parametrize("sampler, scheduler", [("euler", "normal"), ("heun", "karras"), ("dpm_2", "exponential"),
                                                ("euler_ancestral", "sgm_uniform")])
def test_sampling_contexts_bit_identical_and_precompute_changes_nothing(env, stacking_connector, monkeypatch,
                                                                        sampler, scheduler):
    """With the schedule precomputed and with every context computed on demand (planning switched off), the
    UNet gets exactly module(features, t) at every call, and the two runs' samples are identical."""
    encode = lambda text: env.nodes.EllaTSCEncode.execute(env.text_encoder, stacking_connector, text).result[0]  # noqa: E731
    pos, neg = encode("a lighthouse at dusk"), encode("low quality")
    by_which = {0: _prompt_of(pos), 1: _prompt_of(neg)}
    module = stacking_connector.module
    rows_per_forward = []
    original = module.forward_many
    monkeypatch.setattr(module, "forward_many", lambda p, t: rows_per_forward.append(p.shape[0]) or original(p, t))
    results = {}
    for mode in ("precompute", "on_demand"):
        if mode == "on_demand":
            monkeypatch.setattr(env.hook, "_planned_rows", lambda *a, **k: [])
        model = env.nodes.EllaTSCTimestepConditioning.execute(env.model, stacking_connector).result[0]
        rec = Recorder()
        model.add_wrapper_with_key("diffusion_model", "test_recorder", rec)
        rows_per_forward.clear()
        results[mode] = (sample(model, pos, neg, sampler=sampler, scheduler=scheduler, steps=4, batch=2), rec.calls,
                         env.hook.installed_hook(model).last_stats, list(rows_per_forward))
        assert _assert_bit_identical(rec.calls, by_which, module) == 4 * len(rec.calls)
    (x_a, calls_a, stats_a, rows_a), (x_b, calls_b, stats_b, rows_b) = results["precompute"], results["on_demand"]
    assert torch.equal(x_a, x_b) and len(calls_a) == len(calls_b)
    assert all(torch.equal(a["context"], b["context"]) for a, b in zip(calls_a, calls_b))
    assert stats_a.precomputed > 0 and stats_b.precomputed == 0
    distinct_t = len({float(c["t"][0]) for c in calls_b})
    assert rows_b == [2] * distinct_t  # on demand: cond and uncond stacked, one forward per distinct t
    assert rows_a[0] >= 2 * 4 and len(rows_a) < len(rows_b)  # the schedule in one forward, then midpoints


def test_the_wired_connector_runs_and_a_different_one_is_refused(env, tiny_base, monkeypatch):
    """ELLA Timestep Conditioning's connector is the one that runs: a second loader of the same file is fine
    (and is what runs), a different connector file is refused naming both."""
    pos, neg = env.encode("two cats on a sofa"), env.encode("")
    assert "additional_models" not in pos[0][1]  # attached once, by ELLA Timestep Conditioning
    same_file = env.nodes.EllaTSCConnectorLoader.execute(tm.ELLA_NAME).result[0]
    assert same_file is not env.connector
    ran = {"encode's": 0, "wired": 0}
    for key, managed in (("encode's", env.connector), ("wired", same_file)):
        original = managed.module.forward_many
        monkeypatch.setattr(managed.module, "forward_many",
                            lambda *a, _k=key, _o=original, **kw: ran.__setitem__(_k, ran[_k] + 1) or _o(*a, **kw))
    model = env.nodes.EllaTSCTimestepConditioning.execute(env.model, same_file).result[0]
    sample(model, pos, neg, sampler="euler", steps=2)
    assert ran["encode's"] == 0 and ran["wired"] > 0

    tm.write_tiny_ella(tiny_base / "models", "tiny_ella_other.safetensors", seed=11)
    other = env.nodes.EllaTSCConnectorLoader.execute("tiny_ella_other.safetensors").result[0]
    model = env.nodes.EllaTSCTimestepConditioning.execute(env.model, other).result[0]
    with pytest.raises(ValueError, match=r"tiny_ella_sd15\.safetensors.*runs connector 'tiny_ella_other\.safetensors'") as err:
        sample(model, pos, neg, sampler="euler", steps=2)
    assert type(err.value).__name__ == "ELLAConnectorMismatch"


def test_connector_dtype_policy(env):
    """fp32 on CPU; on a GPU the UNet's compute dtype (its manual-cast dtype if its weights are stored in
    another); the node hands the hook a copy of the connector in that dtype, made once."""
    hook = env.hook
    assert hook.connector_dtype(env.model) == torch.float32

    def fake(dtype, manual=None):
        return SimpleNamespace(load_device=torch.device("cuda"),
                               model=SimpleNamespace(manual_cast_dtype=manual, get_dtype=lambda: dtype))

    assert hook.connector_dtype(fake(torch.bfloat16)) == torch.bfloat16
    assert hook.connector_dtype(fake(torch.float16)) == torch.float16
    assert hook.connector_dtype(fake(torch.float8_e4m3fn, torch.bfloat16)) == torch.bfloat16
    connector = env.connector
    assert connector.for_dtype(torch.float32) is connector
    half = connector.for_dtype(torch.bfloat16)
    assert half is connector.for_dtype(torch.bfloat16) and half.module.dtype == torch.bfloat16
    assert half.name == connector.name and connector.module.dtype == torch.float32
    for p, q in zip(connector.module.parameters(), half.module.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q)
    check_same_connector(_prompt_of(env.encode("a prompt")), half)  # a dtype copy counts as the same connector
