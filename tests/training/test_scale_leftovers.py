"""What was left of issue 10 (the trainer at scale): one format rule for the config check and the readers;
the held-out split's keys read from the cache index in one pass; samples_seen exact when the ranks'
micro-batches differ; a streamed run resumed mid-epoch with another layout visits the epoch exactly once."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
from tests.training.train_helpers import TINY_CONFIG, synthetic_samples, write_csv, write_folder, write_jsonl, write_tars

from training.config import ConfigError, _resolved_format, load_config, streamed_run
from training.data import source_format
from training.streaming import streams


# ---------------------------------------------------------------- one format rule
@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every kind of data.path, with the format it names."""
    root = tmp_path_factory.mktemp("paths")
    samples = synthetic_samples(4, seed=1)
    tars = write_tars(root / "tars", samples, per_shard=2)
    imagefolder = write_folder(root / "imagefolder", samples)
    (imagefolder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{k}.png", "text": c[0]}) + "\n"
                                                        for k, _, c in samples))
    return {
        "folder": (str(write_folder(root / "folder", samples)), "folder"),
        "imagefolder": (str(imagefolder), "folder"),
        "jsonl": (str(write_jsonl(root / "jsonl", samples)), "jsonl"),
        "csv": (str(write_csv(root / "csv", samples)), "csv"),
        "tar folder": (str(tars[0].parent), "webdataset"),  # a folder of .tar files (the two rules differed here)
        "brace": (str(tars[0].parent / "shard-{0000..0001}.tar"), "webdataset"),
        "one tar": (str(tars[0]), "webdataset"),
        "list": ([str(t) for t in tars], "webdataset"),
        "url": ("https://example.org/shards/{000..009}.tar", "webdataset"),
        "pipe": ("pipe:curl -s https://example.org/a.tar", "webdataset"),
    }


KINDS = ["folder", "imagefolder", "jsonl", "csv", "tar folder", "brace", "one tar", "list", "url", "pipe"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_config_check_and_the_readers_resolve_the_same_format(paths, tmp_path, kind):
    """Every data.format x cache.mode x data.streaming for each kind of path: the format and the decision to
    stream are the same in the config check and in the readers, and are what the path names."""
    path, named = paths[kind]
    models = tmp_path / "models"
    models.mkdir()
    for fmt, mode, streaming in itertools.product(("auto", "folder", "jsonl", "csv", "webdataset"),
                                                  ("full", "latents", "none"), (None, True, False)):
        overrides = [f"model.pretrained={models}", f"llm.source={models}", f"data.format={fmt}", f"cache.mode={mode}",
                     f"data.streaming={'null' if streaming is None else str(streaming).lower()}"]
        expected = named if fmt == "auto" else fmt
        case = (kind, fmt, mode, streaming)
        try:
            config = load_config(TINY_CONFIG, overrides + ([f"data.path={path}"] if isinstance(path, str) else []))
            if not isinstance(path, str):
                config.data.path = path
        except ConfigError as e:  # webdataset indexed without a cache, or a manifest format on a folder
            assert (expected, mode, streaming) == ("webdataset", "none", False) or "data.path" in str(e), (case, e)
            continue
        assert _resolved_format(config.data) == source_format(config.data) == expected, case
        assert streamed_run(config) == streams(config) == (
            mode == "none" and (streaming if streaming is not None else expected == "webdataset")), case


# ---------------------------------------------------------------- held-out keys from the cache index
def _index(folder: Path, keys_by_rank: dict[int, list[tuple[int, str]]]):
    """A real v3 index: each rank's (ordinal, key) rows appended in shards of 3, as the build writes them."""
    from training.cache_index import RankIndexWriter, record_rows

    for rank, rows in keys_by_rank.items():
        writer = RankIndexWriter(folder, rank)
        for start in range(0, len(rows), 3):
            chunk = rows[start:start + 3]
            entries = [{"ordinal": o, "slot": k, "bucket": [32, 32], "captions": [f"caption of {key}", "two"],
                        "original_size": [32, 32], "crop_top_left": [0, 0]} for k, (o, key) in enumerate(chunk)]
            writer.append(record_rows(entries, start // 3), [{"key": key, "captions": e["captions"]}
                                                            for (_, key), e in zip(chunk, entries)])
    return [len(rows) for _, rows in sorted(keys_by_rank.items())]


ODD_KEYS = ['plain.png', 'with "quotes".png', 'back\\slash.png', 'ünïcødé/猫.jpg', 'new\nline', '{"key": "x"}',
            'shard-0001.tar#img0003', '']


@pytest.mark.parametrize("world, n", [(1, 1), (1, 17), (2, 16), (3, 40), (4, 5)])
def test_cache_index_keys_in_one_pass_equal_the_entries_one_by_one(tmp_path, monkeypatch, world, n):
    import os

    from training import cache_index
    from training.cache_index import CacheIndex
    from training.split import split_holdout

    keys = [ODD_KEYS[i % len(ODD_KEYS)] + f"-{i}" for i in range(n)]
    by_rank = {r: [(o, keys[o]) for o in range(r, n, world)] for r in range(world)}  # ordinals dealt to ranks
    counts = _index(tmp_path, by_rank)
    index = CacheIndex(tmp_path, counts)
    one_by_one = [index.text(*index.locate(i))["key"] for i in range(len(index))]
    reads = []
    monkeypatch.setattr(cache_index.os, "pread", lambda *a: reads.append(a) or os.pread(*a))
    assert index.keys() == one_by_one == keys  # source order, whatever the ranks
    assert reads == []  # sequential reads of the entries files, no read per row
    assert split_holdout(index.keys(), 0.25, seed=3) == split_holdout(one_by_one, 0.25, seed=3)


def test_cache_index_keys_name_an_entries_file_shorter_than_its_rows(tmp_path):
    from training.cache_index import CacheIndex, entries_name

    counts = _index(tmp_path, {0: [(i, f"k{i}") for i in range(6)]})
    path = tmp_path / entries_name(0)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:4]))
    with pytest.raises(ValueError, match=r"entries-r0.jsonl: 4 entries, the index has 6 rows"):
        CacheIndex(tmp_path, counts).keys()


# ---------------------------------------------------------------- a streamed epoch re-dealt to another layout
RELAYOUT_SOURCES = ["folder", "jsonl", "wds-1", "wds-3", "wds-5", "wds-8"]


@pytest.mark.parametrize("kind", RELAYOUT_SOURCES)
def test_a_layouts_own_tasks_read_what_its_parts_read(tmp_path, kind):
    """training.relayout's positions are training.parts' positions: the tasks of part p of P, read from any
    position, give part_items' entries, positions and ordinals."""
    from tests.training.test_source_parts import _source, _what

    from training.parts import part_items
    from training.relayout import part_tasks, task_items

    config = _source(kind, tmp_path)
    for parts in (1, 2, 4, 5):
        for part in range(parts):
            full = [(pos, o, _what(i)) for pos, o, i in part_items(config, part, parts)]
            assert [(pos, o, _what(i)) for pos, o, i in task_items(config, part_tasks(config, part, parts))] == full
            for pos, _, _ in full[::3]:
                assert [(q, o, _what(i)) for q, o, i in task_items(config, part_tasks(config, part, parts), pos)] == [
                    x for x in full if x[0] >= pos], (parts, part, pos)


def _run_layout(config, parts, batch, history, stops):
    """Every part of a layout from the epoch's start under `history`, each stopped after stops[p] batches
    (None: to its end): ((key, seed) trained, the skips listed, {part: its PartPosition list} at the stop)."""
    from training.streaming import part_batches

    keys, skipped, saved = [], [], {}
    for part in range(parts):
        for k, b in enumerate(part_batches(config, 7, 0, part, parts, batch, None, history)):
            if stops[part] is not None and k >= stops[part]:
                break
            keys.extend(zip(b.get("key", []), b.get("seed", [])))
            skipped.extend((key, reason) for key, reason, _ in b["skipped"])
            saved[part] = b["stream"][1].to_list()
    return keys, skipped, saved


@pytest.mark.parametrize("kind", RELAYOUT_SOURCES)
@pytest.mark.parametrize("chain", [(4, 1), (1, 4), (2, 3), (3, 2, 5), (4, 4)], ids=lambda c: "-".join(map(str, c)))
def test_an_epoch_stopped_anywhere_and_re_dealt_visits_every_sample_once(tmp_path, kind, chain):
    """The epoch's parts stopped after various numbers of batches (buckets of two sizes, so entries wait),
    then the next layouts of `chain` go on from the positions reached: over all layouts every usable entry
    is trained once, with the seed of its ordinal, and every rejected entry is counted once."""
    import random as rnd

    from PIL import Image

    from tests.training.test_source_parts import _source

    from training.data import Rejected, stream_items

    config = _source(kind, tmp_path)
    config.resolution, config.bucket_step, config.buckets = 32, 8, True
    if kind == "folder":  # images of two sizes: two buckets fill at different rates (positions wait)
        for i in range(0, 21, 3):
            Image.new("RGB", (64, 32), (i * 10, 0, 0)).save(Path(config.path) / f"img{i:04d}.png")
    usable = Counter(i.key for i in stream_items(config) if not isinstance(i, Rejected) and i.key != "img0016.png")
    rejected = Counter((i.key, i.reason) for i in stream_items(config) if isinstance(i, Rejected))
    if kind == "folder":
        rejected[("img0016.png", "unreadable image")] += 1
    whole = Counter(_run_layout(config, 1, 2, [], [None])[0])  # (key, seed) of the uninterrupted epoch
    assert Counter(k for k, _ in whole) == usable
    rng = rnd.Random(f"{kind}{chain}")
    waited = False
    for trial in range(4):  # every part stopped after 1, after 2, then at random
        history, keys, skipped = [], [], []
        for n, parts in enumerate(chain):
            last = n == len(chain) - 1
            stops = [None if last else trial + 1 if trial < 2 else rng.choice([0, 1, 2, 3, None])
                     for _ in range(parts)]
            got, skips, saved = _run_layout(config, parts, 2, history, stops)
            keys += got
            skipped += skips
            waited |= any(len(v) > 1 for v in saved.values())
            if saved or history:
                history = history + ([{"layout": [parts, 1], "parts": saved}] if saved else [])
        assert Counter(keys) == whole, (trial, history)  # each once, with its own seed
        assert Counter(skipped) == rejected, (trial, history)
    assert waited or len(chain) == 1 or kind != "folder"  # resumed with entries waiting in a bucket


# ---------------------------------------------------------------- the real trainer: re-dealt epoch, samples_seen
def test_a_streamed_run_resumed_mid_epoch_at_other_layouts_visits_the_epoch_once_and_counts_exactly(
        tiny_sd15, tiny_t5, tmp_path):
    """26 samples in 9 tar shards (the parts hold 9, 8, 6 or 3 samples: short last batches, and ranks whose
    parts are through train on empty batches), batch 2: 2 processes x 2 workers stopped mid-epoch at step 2,
    resumed by 1 process without workers to step 4 (still mid-epoch: the 2 x 2 parts re-dealt to one), then
    by 2 x 2 again past the epoch's end (the one part's rest, itself a re-deal, dealt to four). Every sample of
    epoch 0 is trained exactly once over the three runs, with the seed an uninterrupted run gives it;
    samples_seen in each checkpoint and in metrics.jsonl is the number of sample visits the ranks trained on."""
    from tests.training.test_resume_layouts import _train, _visits

    from training.streaming import part_batches

    tars = tmp_path / "tars"
    write_tars(tars, synthetic_samples(26, seed=6), per_shard=3)
    out = tmp_path / "run"
    common = [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={tars}", "cache.mode=none",
              "train.backend=gloo", "train.batch_size=2", "train.checkpoint_every=1", "train.collective_timeout_s=300",
              "data.caption_dropout=0", f"output_dir={out}"]
    runs = [((2, 2), 2), ((1, 0), 4), ((2, 2), 12)]  # (processes, data.num_workers), train.max_steps
    visits = []
    for n, ((world, workers), steps) in enumerate(runs):
        _train(world, common + [f"data.num_workers={workers}", f"train.max_steps={steps}"]
               + (["train.resume=latest"] if n else []), tmp_path / f"seen-{n}")
        run = _visits(tmp_path / f"seen-{n}")
        assert {v["world"] for v in run} == {world}
        visits.append(run)
        state = json.loads((out / "checkpoints" / f"step-{steps:08d}" / "trainer_state.json").read_text())
        assert state["samples_seen"] == sum(len(v) for v in visits)  # exact over the ranks
        if n < 2:
            assert state["position"]["parts"] and len(state["position"].get("history", [])) == n  # mid-epoch
    every = [v for run in visits for v in run]
    config = load_config(TINY_CONFIG, common).data
    whole = Counter((k, s) for b in part_batches(config, 0, 0, 0, 1, 2) for k, s in zip(b["key"], b["seed"]))
    assert len(whole) == 26
    assert Counter((v["key"], v["seed"]) for v in every if v["epoch"] == 0) == whole  # once each
    assert any(v["epoch"] == 1 for v in visits[2])  # and on into the next epoch
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in train if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, 13))
    assert [train[steps - 1]["samples_seen"] for _, steps in runs] == list(
        itertools.accumulate(len(run) for run in visits))
