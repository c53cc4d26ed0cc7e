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
