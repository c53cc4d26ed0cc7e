"""Resuming the map-style data stream (the cache; small online sources) with another number of processes or
another batch size continues at the global sample position: over the run before and the run after, every
sample of the interrupted epoch is visited exactly once, with the seed of its place in the epoch's order,
and the epochs after it are whole. A table of layouts and stop points on BatchPlan, then the real trainer
under gloo: 2 -> 1 and 1 -> 2 processes, batch 4 -> 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from tests.training.train_helpers import ROOT, TINY_CONFIG, python

from training.data import BatchPlan, DataPosition, epoch_batches, sample_seed

BUCKETS = [(32, 32)] * 21 + [(32, 64)] * 14 + [(64, 32)] * 9


def _global_batches(buckets, batch, world, position, count):
    """`count` global batches of `world` ranks' plans from `position`: [(epoch, [(index, seed), ...])], and
    the position after them (every rank's plan agrees on it)."""
    plans = [BatchPlan(buckets, batch, world, r, seed=5, position=DataPosition(**position.to_dict()))
             for r in range(world)]
    iters = [iter(p) for p in plans]
    out = []
    for _ in range(count):
        shares = [next(it) for it in iters]
        assert len({(p.position.epoch, p.position.sample) for p in plans}) == 1
        out.append((plans[0].position.epoch, [x for share in shares for x in share]))
        assert len({buckets[i] for i, _ in out[-1][1]}) == 1  # one bucket per global batch
    return out, plans[0].position


LAYOUT_CHANGES = [  # (batch, world) before -> after
    ((4, 1), (2, 1)), ((2, 2), (4, 1)), ((4, 1), (4, 2)), ((4, 2), (4, 1)), ((3, 1), (2, 2)), ((2, 1), (3, 2)),
    ((1, 4), (2, 3)), ((5, 1), (1, 1)),
]


@pytest.mark.parametrize("before, after", LAYOUT_CHANGES)
@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 5])
def test_the_interrupted_epoch_is_finished_by_the_new_layout_sample_for_sample(before, after, stop_after):
    order_batch = (before if stop_after else after)[0] * (before if stop_after else after)[1]  # drawn by the first
    epoch0 = epoch_batches(BUCKETS, order_batch, 5, 0)
    order = [i for block in epoch0 for i in block]  # the epoch's order, with its seeds
    expected = {i: sample_seed(5, 0, k) for k, i in enumerate(order)}
    if stop_after > len(epoch0):
        pytest.skip("the epoch is shorter")
    first, position = _global_batches(BUCKETS, *before, DataPosition(), stop_after)
    rest, _ = _global_batches(BUCKETS, *after, position, 60)
    visits = [x for epoch, group in first + rest if epoch == 0 for x in group]
    assert Counter(i for i, _ in visits) == Counter(order)  # nothing skipped, nothing repeated
    assert all(seed == expected[i] for i, seed in visits)
    # the next epoch is drawn for the new layout and is whole
    new_batch = after[0] * after[1]
    epoch1 = [x for epoch, group in rest if epoch == 1 for x in group]
    order1 = [i for block in epoch_batches(BUCKETS, new_batch, 5, 1) for i in block]
    assert [i for i, _ in epoch1][:len(order1)] == order1[:len(epoch1)]
    assert all(len(group) == new_batch for epoch, group in rest if epoch == 1)


def test_an_unchanged_layout_resumes_the_same_stream_and_old_positions_load():
    run, _ = _global_batches(BUCKETS, 2, 2, DataPosition(), 12)
    head, position = _global_batches(BUCKETS, 2, 2, DataPosition(), 5)
    tail, _ = _global_batches(BUCKETS, 2, 2, position, 7)
    assert head + tail == run
    # a checkpoint written before positions counted samples: {"epoch", "batch"} of global batches of 4
    assert DataPosition.from_dict({"epoch": 1, "batch": 3}, 4) == DataPosition(1, 12, 4)


# ---------------------------------------------------------------- the real trainer under gloo
ENTRY = ROOT / "tests" / "training" / "trainer_entry.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(world: int, args: list[str], seen: Path) -> None:
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ELLA_TEST_SEEN": str(seen)}
    if world > 1:
        env.update({"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    procs = [subprocess.Popen([python(), str(ENTRY), "--config", str(TINY_CONFIG), *args], cwd=str(ROOT),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)} if world > 1 else env)
             for r in range(world)]
    try:
        errs = [p.communicate(timeout=400)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-4000:]


def _visits(seen: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(seen.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.mark.parametrize("before, after, stop_step", [((4, 2), (4, 1), 1), ((4, 1), (4, 2), 3), ((4, 1), (2, 1), 3)],
                         ids=["2to1", "1to2", "batch4to2"])
def test_resumed_with_another_layout_no_sample_of_the_epoch_is_skipped_or_repeated(
        tiny_sd15, tiny_t5, datasets, tmp_path, before, after, stop_step):
    """24 cached samples; the first run stops at a checkpoint mid-epoch, the second resumes with another
    number of processes or batch size and trains past the epoch's end."""
    common = [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={datasets['folder']}",
              f"output_dir={tmp_path / 'run'}", "train.backend=gloo", "data.caption_dropout=0",
              "train.checkpoint_every=1", "train.collective_timeout_s=300"]
    _train(before[1], common + [f"train.batch_size={before[0]}", f"train.max_steps={stop_step}"], tmp_path / "a")
    first = _visits(tmp_path / "a")
    assert len(first) == stop_step * before[0] * before[1]
    # past the epoch's end: its blocks of the old size are cut into batches of at most the new size
    steps_left = (24 - len(first)) // min(before[0] * before[1], after[0] * after[1]) + 1
    _train(after[1], common + [f"train.batch_size={after[0]}", f"train.max_steps={stop_step + steps_left}",
                               "train.resume=latest"], tmp_path / "b")
    second = _visits(tmp_path / "b")
    assert {v["world"] for v in first} == {before[1]} and {v["world"] for v in second} == {after[1]}
    epoch0 = [(v["key"], v["seed"]) for v in first + second if v["epoch"] == 0]
    assert Counter(k for k, _ in epoch0) == Counter(f"img{i:04d}.png" for i in range(24))  # each once
    order = [i for block in epoch_batches([(32, 32)] * 24, before[0] * before[1], 0, 0) for i in block]
    assert sorted(epoch0) == sorted((f"img{i:04d}.png", sample_seed(0, 0, k)) for k, i in enumerate(order))
    assert any(v["epoch"] == 1 for v in second)  # and it went on into the next epoch
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert train[stop_step - 1]["samples_seen"] == len(first)  # every rank's own samples, summed
    assert train[-1]["samples_seen"] == len(first) + len(second)
