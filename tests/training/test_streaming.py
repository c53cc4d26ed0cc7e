"""The streamed (no-cache) path: over 2 processes x 2 workers every sample is trained on exactly once per
epoch and every rejected entry is counted once; a part resumed after any of its batches continues with
exactly the batches it would have had; the process's stream (real loader workers) resumed at any step
continues exactly; and the real trainer under gloo, 2 ranks x 2 workers on tar shards, stopped at a step
and resumed, visits exactly the samples of an uninterrupted run. A resume with another layout mid-epoch
continues (re-dealt: tests/training/test_scale_leftovers.py) unless the source changed, refused with the
numbers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tests.training.test_resume_layouts import _train, _visits
from tests.training.train_helpers import TINY_CONFIG, synthetic_samples, write_tars
from tests.training.test_source_parts import _source

from training.config import load_config
from training.data import Rejected, stream_items
from training.distributed import Dist
from training.errors import TrainingError
from training.streaming import (StreamingBatches, StreamPosition, check_stream_layout, part_batches,
                                streams)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b.get("key", [])]


def _usable(config) -> Counter:
    """Keys of the entries that decode (the folder's broken PNG does not)."""
    return Counter(item.key for item in stream_items(config) if not isinstance(item, Rejected)
                   and item.key != "img0016.png")


@pytest.mark.parametrize("kind", ["folder", "jsonl", "wds-3", "wds-5", "wds-8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_sample_once_per_epoch_over_2_ranks_x_2_workers(tmp_path, kind, batch):
    config = _source(kind, tmp_path)
    config.resolution, config.bucket_step, config.buckets = 32, 16, True  # the folder's images: one bucket
    for epoch in (0, 1):
        batches = [b for part in range(4) for b in part_batches(config, 7, epoch, part, 4, batch)]
        assert Counter(_keys(batches)) == _usable(config)  # each usable sample once
        assert all(len(b.get("key", [])) <= batch for b in batches)
        skipped = Counter((key, reason) for b in batches for key, reason, _ in b["skipped"])
        rejected = Counter((i.key, i.reason) for i in stream_items(config) if isinstance(i, Rejected))
        if kind == "folder":
            rejected[("img0016.png", "unreadable image")] += 1
        assert skipped == (rejected if epoch == 0 else Counter())  # once: in the first epoch only
        seeds = [s for b in batches for s in b.get("seed", [])]
        assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("kind", ["wds-3", "folder"])
def test_a_part_resumed_after_any_batch_continues_exactly(tmp_path, kind):
    config = _source(kind, tmp_path)
    config.resolution, config.bucket_step, config.buckets = 32, 8, True  # 32x32 and 64x32: two buckets
    if kind == "folder":  # images of two sizes: two buckets fill at different rates (positions wait)
        from PIL import Image

        for i in range(0, 21, 3):
            Image.new("RGB", (64, 32), (i * 10, 0, 0)).save(Path(config.path) / f"img{i:04d}.png")
    for part in range(2):
        full = list(part_batches(config, 7, 1, part, 2, 2))
        assert any(b["stream"][1].pending for b in full) or kind != "folder"
        for k, b in enumerate(full):
            resumed = list(part_batches(config, 7, 1, part, 2, 2, resume=b["stream"][1]))
            assert [(x.get("key"), x.get("seed"), x["stream"][1]) for x in resumed] == [
                (x.get("key"), x.get("seed"), x["stream"][1]) for x in full[k + 1:]], (part, k)
            for x, y in zip(resumed, full[k + 1:]):
                assert ("pixels" in x) == ("pixels" in y) and ("pixels" not in x or torch.equal(x["pixels"], y["pixels"]))


def _stream_config(tmp_path, workers, *extra):
    samples = synthetic_samples(30, seed=4)
    write_tars(tmp_path / "tars", samples, per_shard=4)  # 8 shards
    return load_config(TINY_CONFIG, ["model.pretrained=o/b", "llm.source=o/l", f"data.path={tmp_path / 'tars'}",
                                     "cache.enabled=false", f"data.num_workers={workers}", "train.batch_size=3",
                                     *extra])


@pytest.mark.parametrize("workers", [0, 2])
def test_the_process_stream_resumed_at_any_step_continues_exactly(tmp_path, workers):
    config = _stream_config(tmp_path, workers)
    assert streams(config)
    it = iter(StreamingBatches(config, Dist()))
    full = [next(it) for _ in range(30)]  # 10 + 1 batches an epoch (two parts of 4 shards: 15 samples each)
    epoch0 = [b for b in full if b["position"].epoch == 0]
    assert Counter(_keys(epoch0)) == Counter(f"{tmp_path / 'tars'}/shard-{i // 4:04d}.tar#img{i:04d}" for i in range(30))
    for k in (0, 3, 9, 10, 11, 17):
        saved = StreamPosition.from_dict(json.loads(json.dumps(full[k]["position"].to_dict())))
        resumed = iter(StreamingBatches(config, Dist(), saved))
        rest = [next(resumed) for _ in range(len(full) - k - 1)]
        assert [(b.get("key"), b.get("seed")) for b in rest] == [(b.get("key"), b.get("seed")) for b in full[k + 1:]], k


def test_another_layout_mid_epoch_continues_unless_the_source_changed(tmp_path):
    config = _stream_config(tmp_path, 2).data  # 8 shards
    mid = {"position": {"epoch": 2, "parts": {"0": [5], "1": [7, 3]}, "turns": {"0": 1}, "layout": [2, 2],
                        "source": 8}}
    for world, workers in ((2, 2), (1, 2), (1, 0), (4, 3)):
        check_stream_layout(mid, world, workers, config)  # re-dealt (tests/training/test_scale_leftovers.py)
    with pytest.raises(TrainingError) as info:
        check_stream_layout({"position": {**mid["position"], "source": 9}}, 1, 2, config)
    text = str(info.value)
    assert "2 x 2 -> 1 x 2" in text and "has 8 tar shards, the checkpoint's run 9" in text and "data.num_workers=2" in text
    check_stream_layout({"position": {**mid["position"], "source": 9}}, 2, 2, config)  # the same layout: as before
    check_stream_layout({"position": {"epoch": 3, "parts": {}, "turns": {}, "layout": [2, 2]}}, 1, 0, config)
    with pytest.raises(TrainingError, match="map-style source"):
        check_stream_layout({"position": {"epoch": 0, "sample": 8, "order_batch": 4}}, 1, 0, config)


def test_streaming_is_the_default_for_webdataset_without_the_cache_only(tmp_path):
    tars = _stream_config(tmp_path, 0)
    assert streams(tars)
    assert not streams(load_config(TINY_CONFIG, ["model.pretrained=o/b", "llm.source=o/l",
                                                 f"data.path={tmp_path / 'tars'}"]))  # the cache is on
    folder = ["model.pretrained=o/b", "llm.source=o/l", f"data.path={tmp_path}", "cache.enabled=false"]
    assert not streams(load_config(TINY_CONFIG, folder)) and streams(load_config(TINY_CONFIG, folder + [
        "data.streaming=true"]))


# ---------------------------------------------------------------- the real trainer
def test_trainer_2_ranks_x_2_workers_stopped_and_resumed_visits_what_an_uninterrupted_run_does(
        tiny_sd15, tiny_t5, tmp_path):
    write_tars(tmp_path / "tars", synthetic_samples(26, seed=6), per_shard=3)  # 9 shards for 4 parts
    common = [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={tmp_path / 'tars'}",
              "cache.enabled=false", "data.num_workers=2", "train.backend=gloo", "train.batch_size=2",
              "train.checkpoint_every=1", "train.collective_timeout_s=300", "data.caption_dropout=0"]
    steps = 9  # over 2 epochs
    _train(2, common + [f"output_dir={tmp_path / 'whole'}", f"train.max_steps={steps}"], tmp_path / "seen-whole")
    whole = _visits(tmp_path / "seen-whole")
    epoch0 = Counter(v["key"] for v in whole if v["epoch"] == 0)
    assert epoch0 == Counter(f"{tmp_path / 'tars'}/shard-{i // 3:04d}.tar#img{i:04d}" for i in range(26))
    assert any(v["epoch"] == 1 for v in whole)
    _train(2, common + [f"output_dir={tmp_path / 'cut'}", "train.max_steps=4"], tmp_path / "seen-cut")
    _train(2, common + [f"output_dir={tmp_path / 'cut'}", f"train.max_steps={steps}", "train.resume=latest"],
           tmp_path / "seen-cut")
    cut = _visits(tmp_path / "seen-cut")
    as_set = lambda visits: Counter((v["key"], v["seed"], v["epoch"]) for v in visits)  # noqa: E731
    assert as_set(cut) == as_set(whole)
