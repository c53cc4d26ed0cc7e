"""The benchmark's statistics (bench/alignment/evaluate.py) against their definitions: the bootstrap by weights
equals explicit resampling, intervals cover the truth at about their level, paired differences are paired,
and several training seeds widen the interval by their spread."""

from __future__ import annotations

import numpy as np
import pytest

from bench.alignment import evaluate


@pytest.mark.parametrize("seed", range(20))
def test_weighted_replicate_is_the_mean_of_the_resampled_prompts_and_models(seed):
    rng = np.random.default_rng(seed)
    m, p, s = rng.integers(1, 4), rng.integers(2, 30), rng.integers(1, 5)
    scores = rng.random((m, p, s))
    idx_m, idx_p = rng.integers(m, size=m), rng.integers(p, size=p)
    wm, wp = np.bincount(idx_m, minlength=m) / m, np.bincount(idx_p, minlength=p) / p
    explicit = scores[idx_m][:, idx_p].mean()  # every noise seed of a drawn prompt stays with it
    assert np.einsum("m,mp,p->", wm, evaluate.per_prompt(scores), wp) == pytest.approx(explicit, abs=1e-12)


def test_bootstrap_weights_are_resampling_counts():
    w = evaluate.bootstrap_weights(np.random.default_rng(0), 7, 500)
    assert w.shape == (500, 7)
    assert np.allclose(w.sum(axis=1), 1.0)
    assert np.allclose((w * 7) % 1, 0)  # whole draws
    assert abs(w.mean() - 1 / 7) < 0.01


@pytest.mark.parametrize("truth", [0.1, 0.5, 0.8])
def test_interval_covers_the_true_rate_at_about_95_percent(truth):
    rng = np.random.default_rng(int(truth * 100))
    covered = 0
    trials = 300
    for _ in range(trials):
        scores = (rng.random((1, 80, 1)) < truth).astype(float)
        stats, _ = evaluate.method_stats(scores, evaluate.bootstrap_weights(rng, 80, 400), rng)
        covered += stats["ci"][0] <= truth <= stats["ci"][1]
    assert 0.89 <= covered / trials <= 0.99, covered / trials


def test_paired_difference_of_a_shift_is_the_shift_exactly():
    rng = np.random.default_rng(1)
    y = rng.random((1, 40, 3)) * 0.5
    results = evaluate.statistics({"tsc": {"test_seen": {k: y + 0.25 for k in evaluate.METRICS}},
                                   "base": {"test_seen": {k: y for k in evaluate.METRICS}}}, draws=300)
    diff = results["differences"]["tsc-base"]["test_seen"]["binding"]
    assert diff["mean"] == pytest.approx(0.25)
    assert diff["ci"] == pytest.approx([0.25, 0.25])  # each replicate draws the same prompts for both
    single = results["methods"]["tsc"]["test_seen"]["binding"]["ci"]
    assert single[1] - single[0] > 0.02  # while each method alone varies with the prompts drawn


def test_training_seeds_spread_is_in_the_interval():
    flat = np.full((2, 50, 2), 0.5)
    apart = np.stack([np.full((50, 2), 0.3), np.full((50, 2), 0.7)])
    rng = np.random.default_rng(0)
    same, _ = evaluate.method_stats(flat, evaluate.bootstrap_weights(rng, 50, 2000), rng)
    spread, _ = evaluate.method_stats(apart, evaluate.bootstrap_weights(rng, 50, 2000), rng)
    assert same["ci"] == pytest.approx([0.5, 0.5])
    assert spread["mean"] == pytest.approx(0.5)
    assert spread["ci"] == pytest.approx([0.3, 0.7])  # a quarter of the replicates draw one model twice
    assert spread["per_model"] == pytest.approx([0.3, 0.7])
