"""ella_core.context_store on its own and under ContextCache (no ComfyUI): the budget policy, LRU eviction by
bytes against a model, weak ownership (dropped prompts/connectors are collected and their entries go), and
runs sharing a store: a repeated run computes nothing and every context is still the connector's own."""

from __future__ import annotations

import copy
import gc
import math
import random
import weakref
from collections import OrderedDict

import pytest
import torch

from ella_core import ELLA, ELLAConfig
from ella_core.conditioning import ContextCache, EllaPrompt
from ella_core.context_store import MIB, STORE_ENV, ContextStore, budget_from_env


class Owner:
    """A weak-referenceable stand-in for a prompt or a connector."""


@pytest.mark.parametrize("raw, expected", [(None, 256 * MIB), ("", 256 * MIB), ("  ", 256 * MIB), ("0", 0),
                                           ("1", MIB), ("1.5", int(1.5 * MIB)), (" 64 ", 64 * MIB),
                                           ("0.0", 0), ("4096", 4096 * MIB)])
def test_budget_from_env(raw, expected):
    assert budget_from_env({} if raw is None else {STORE_ENV: raw}) == expected


@pytest.mark.parametrize("raw", ["abc", "-1", "nan", "inf", "-0.5", "1e999", "12MB", "0x10"])
def test_bad_budget_is_named(raw):
    with pytest.raises(ValueError, match=rf"\$ELLA_TSC_CONTEXT_STORE_MB must be a number of MiB >= 0.*got {raw!r}"):
        budget_from_env({STORE_ENV: raw})


@pytest.mark.parametrize("seed", range(12))
def test_lru_by_bytes_matches_a_model(seed):
    """Random puts and gets of tensors of random sizes: the store holds exactly what an LRU of the same byte
    budget holds, never more bytes than the budget, and a value larger than the budget is not kept."""
    gen = random.Random(seed)
    budget = gen.choice([0, 64, 1000, 4096])
    store = ContextStore(budget)
    owners = [Owner() for _ in range(3)]
    model: OrderedDict = OrderedDict()  # (owner index, key) -> (tensor, bytes)
    for _ in range(200):
        o, k = gen.randrange(3), gen.randrange(8)
        if gen.random() < 0.5:
            value = torch.full((gen.randint(1, 300),), float(gen.random()))
            kept = store.put((owners[o],), (k,), value)
            assert torch.equal(kept, value)
            model.pop((o, k), None)
            if value.nbytes <= budget:
                model[(o, k)] = (value, value.nbytes)
                while sum(b for _, b in model.values()) > budget:
                    model.popitem(last=False)
        else:
            got = store.get((owners[o],), (k,))
            expected = model.get((o, k))
            assert (got is None) == (expected is None)
            if expected is not None:
                assert torch.equal(got, expected[0])
                model.move_to_end((o, k))
        assert store.nbytes == sum(b for _, b in model.values()) <= budget
        assert len(store) == len(model)


def test_views_are_compacted_and_keys_need_every_owner():
    store = ContextStore(10 * MIB)
    a, b = Owner(), Owner()
    batch = torch.randn(8, 16, 32)  # like one forward's (R, N, W) result
    kept = store.put((a, b), (0,), batch[3])
    assert torch.equal(kept, batch[3]) and kept.untyped_storage().nbytes() == batch[3].nbytes
    assert store.nbytes == batch[3].nbytes
    assert store.get((a, b), (0,)) is kept
    assert store.get((b, a), (0,)) is None and store.get((a, Owner()), (0,)) is None
    assert store.get((a, b), (1,)) is None


def test_collected_owners_take_their_entries_with_them():
    store = ContextStore(10 * MIB)
    keep, drop = Owner(), Owner()
    features = torch.randn(1, 4, 8)  # something a prompt would hold
    drop.features = features
    for k in range(5):
        store.put((keep, drop), (k,), torch.randn(4, 4))
        store.put((keep,), (k,), torch.randn(4, 4))
    assert len(store) == 10
    watched, watched_features = weakref.ref(drop), weakref.ref(features)
    del drop, features
    gc.collect()
    assert watched() is None and watched_features() is None  # the store did not keep them alive
    assert len(store) == 5 and store.nbytes == 5 * 64
    assert all(store.get((keep,), (k,)) is not None for k in range(5))
    assert len(store._owners) == 1
    resized = weakref.ref(store)
    del store
    gc.collect()
    assert resized() is None  # owners' callbacks do not keep the store alive either


def test_resize_evicts_least_recently_used_first():
    store = ContextStore(10 * MIB)
    owner = Owner()
    for k in range(6):
        store.put((owner,), (k,), torch.zeros(16))  # 64 bytes each
    store.get((owner,), (0,))  # now the most recently used
    store.resize(3 * 64)
    assert [k for k in range(6) if store.get((owner,), (k,)) is not None] == [0, 4, 5]


# --- ContextCache runs sharing a store -------------------------------------------------------------------

def _connector(seed: int) -> ELLA:
    torch.manual_seed(seed)
    module = ELLA(ELLAConfig(input_dim=8, width=16, layers=2, heads=2, num_latents=6, time_channel=8,
                             time_embed_dim=16)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in module.parameters():  # non-zero AdaLN, so every output really depends on t
            p.normal_(0, 0.3)
    return module


def _alone(module: ELLA, prompt: EllaPrompt, row: int, t: float) -> torch.Tensor:
    with torch.no_grad():
        bias = None if prompt.text_bias is None else prompt.text_bias[row:row + 1]
        return module.forward_projected(module.project_text(prompt.features[row:row + 1]), t, text_bias=bias)[0]


def _run(module, store, rows, precompute: bool):
    """One sampling run's worth of lookups: optionally the planned rows ahead, then each call's rows."""
    cache = ContextCache(connector=lambda: module, store=store, max_rows_per_forward=4)
    if precompute:
        cache.precompute(rows)
    got = [cache.fetch(rows[i:i + 3]) for i in range(0, len(rows), 3)]
    return cache.stats, [v for chunk in got for v in chunk]


@pytest.mark.parametrize("seed", range(10))
def test_runs_sharing_a_store_compute_only_what_no_earlier_run_did(seed):
    """Random prompts (batches, biases, equal values in other objects) and schedules, run after run with one
    store: each run computes exactly the (prompt, row, t) no earlier run computed, the rest is reused, and
    every value equals that row's connector forward alone, bit for bit."""
    gen = random.Random(seed)
    module = _connector(seed)
    base = torch.randn(2, 5, 8)
    prompts = [EllaPrompt(base, lambda: module), EllaPrompt(base.clone(), lambda: module),
               EllaPrompt(torch.randn(1, 3, 8), lambda: module),
               EllaPrompt(base, lambda: module, text_bias=torch.log(torch.rand(2, 5) + 0.5))]
    store = ContextStore(64 * MIB)
    seen: set = set()
    pool = [999.0, 981.0, 500.0, 0.25, 13.75, 1.0]
    for _ in range(5):
        schedule = gen.sample(pool, gen.randint(1, 4))
        used = gen.sample(prompts, gen.randint(1, 3))
        rows = [(p, i, t) for t in schedule for p in used for i in range(p.batch)]
        stats, values = _run(module, store, rows, precompute=gen.random() < 0.5)
        new = {(id(p), i, t) for p, i, t in rows} - seen
        assert stats.connector_calls == len(new), (len(rows), len(new))
        assert stats.reused == len({(id(p), i, t) for p, i, t in rows}) - len(new)
        assert (stats.forwards == 0) == (not new) and (stats.projections == 0) == (not new)
        seen |= {(id(p), i, t) for p, i, t in rows}
        for (p, i, t), value in zip(rows, values):
            assert torch.equal(value, _alone(module, p, i, t)), (prompts.index(p), i, t)


def test_other_connector_weights_dtype_never_share_entries():
    """A copy of the connector (same weights, other module), weights changed in place, and the same module
    cast to another dtype all miss; casting back finds the first entries again (the same bits)."""
    module = _connector(0)
    prompt = EllaPrompt(torch.randn(1, 4, 8), lambda: module)
    rows = [(prompt, 0, t) for t in (999.0, 321.5)]
    store = ContextStore(64 * MIB)
    first, values = _run(module, store, rows, precompute=True)
    assert first.connector_calls == 2

    twin = copy.deepcopy(module)
    stats, twin_values = _run(twin, store, rows, precompute=True)
    assert stats.reused == 0 and stats.connector_calls == 2
    assert all(torch.equal(a, b) for a, b in zip(values, twin_values))

    with torch.no_grad():
        twin.connector.perceiver_blocks[0].attn.out_proj.weight.mul_(1.5)
    stats, changed = _run(twin, store, rows, precompute=False)
    assert stats.reused == 0 and stats.connector_calls == 2
    assert all(torch.equal(v, _alone(twin, prompt, 0, t)) for v, (_, _, t) in zip(changed, rows))
    assert not any(torch.equal(a, b) for a, b in zip(values, changed))

    module.double()
    stats, doubled = _run(module, store, rows, precompute=False)
    assert stats.reused == 0 and all(v.dtype == torch.float64 for v in doubled)
    assert all(torch.equal(v, _alone(module, prompt, 0, t)) for v, (_, _, t) in zip(doubled, rows))
    module.float()
    stats, again = _run(module, store, rows, precompute=False)
    assert stats.reused == 2 and stats.connector_calls == 0
    assert all(torch.equal(a, b) for a, b in zip(values, again))


def test_in_place_edits_of_a_prompts_tensors_miss():
    module = _connector(1)
    prompt = EllaPrompt(torch.randn(1, 4, 8), lambda: module, text_bias=torch.zeros(1, 4))
    rows = [(prompt, 0, 400.0)]
    store = ContextStore(64 * MIB)
    _run(module, store, rows, precompute=False)
    for edit in (lambda: prompt.features.mul_(2), lambda: prompt.text_bias.add_(math.log(3.0))):
        edit()
        stats, (value,) = _run(module, store, rows, precompute=False)
        assert stats.reused == 0 and torch.equal(value, _alone(module, prompt, 0, 400.0))


def test_a_dropped_prompt_and_connector_are_collected():
    store = ContextStore(64 * MIB)
    module = _connector(2)
    prompt = EllaPrompt(torch.randn(1, 4, 8), lambda: module)
    other = EllaPrompt(torch.randn(1, 4, 8), lambda: module)
    for p in (prompt, other):
        _run(module, store, [(p, 0, t) for t in (999.0, 500.0)], precompute=True)
    assert len(store) == 4
    refs = [weakref.ref(prompt), weakref.ref(prompt.features)]
    del prompt
    gc.collect()
    assert all(r() is None for r in refs) and len(store) == 2
    module_ref = weakref.ref(module)
    other.connector = None  # the prompt's getter closes over the module
    del module
    gc.collect()
    assert module_ref() is None and len(store) == 0 and store.nbytes == 0


def test_inference_tensors_are_stored_too():
    """ComfyUI loads models and runs nodes under torch.inference_mode: such tensors have no version counter,
    and a run with them still finds the previous run's contexts."""
    with torch.inference_mode():
        module = _connector(3)
        prompt = EllaPrompt(torch.randn(1, 4, 8), lambda: module, text_bias=torch.zeros(1, 4))
    assert prompt.features.is_inference() and next(module.parameters()).is_inference()
    store = ContextStore(64 * MIB)
    rows = [(prompt, 0, t) for t in (999.0, 12.5)]
    with torch.inference_mode():
        first, values = _run(module, store, rows, precompute=True)
        again, reused = _run(module, store, rows, precompute=True)
    assert (first.connector_calls, again.connector_calls, again.reused) == (2, 0, 2)
    assert all(torch.equal(a, b) for a, b in zip(values, reused))
