"""Part p of P of a source (training.parts): over all parts every entry, usable or rejected, comes exactly
once, the ordinals put them back in source order, a part resumed from any of its positions continues
exactly, and a part opens only what it owns (its own tar shards; its own captions files). For every
format, with shard counts that divide the parts, that do not, and fewer shards than parts; then through
real DataLoader workers (2 ranks x 2 workers), the same as in one process."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from tests.training.train_helpers import TINY_CONFIG, png_bytes, synthetic_samples, write_folder

from training import data as data_module
from training import parts as parts_module
from training.config import load_config
from training.data import Record, Rejected, make_buckets, stream_items
from training.decoding import prepared_part
from training.parts import part_items, source_signature, split_note

SAMPLES = synthetic_samples(21, seed=3)


def _config(path, *extra: str):
    return load_config(TINY_CONFIG, ["model.pretrained=org/base", "llm.source=org/llm", f"data.path={path}",
                                     *extra]).data


def _folder(root: Path) -> Path:
    folder = write_folder(root, SAMPLES)
    (folder / "img0002.txt").unlink()  # missing caption
    (folder / "img0007.txt").write_bytes(b"\xff\n")  # invalid UTF-8
    (folder / "img0011.txt").write_text("  \n")  # empty caption
    (folder / "img0016.png").write_bytes(b"not a png")  # rejected later (decoding), still one entry
    return folder


def _manifest(root: Path, fmt: str) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (key, image, captions) in enumerate(SAMPLES):
        image.save(root / "images" / f"{key}.png")
        rows.append({"image": f"images/{key}.png", "caption": captions[0]})
        if i % 5 == 2:
            rows.append({"image": "", "caption": "no image"})  # rejected: missing image field
        if i % 7 == 3:
            rows.append({"image": f"images/{key}.png", "caption": " "})  # rejected: empty caption
    if fmt == "jsonl":
        lines = [json.dumps(r).encode() for r in rows]
        lines.insert(4, b'{"image": "images/x.png", "capt')  # rejected: invalid JSON
        lines.insert(9, b"")  # a blank line: not an entry
        lines.insert(12, b"[1, 2]")  # rejected: not an object
        path = root / "train.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path
    path = root / "train.csv"
    path.write_text("image,caption\n" + "".join(f"{r['image']},\"{r['caption']}\"\n" for r in rows))
    return path


def _tars(root: Path, shards: int) -> list[str]:
    """SAMPLES over `shards` tars; some samples without an image, the last shard cut short, a shard missing."""
    root.mkdir(parents=True)
    urls = []
    for s in range(shards):
        path = root / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, (key, image, captions) in enumerate(SAMPLES[s::shards]):
                members = [(f"{key}.txt", "\n".join(captions).encode())]
                if (i + s) % 4 != 1:
                    members.insert(0, (f"{key}.png", png_bytes(image)))  # else: no image in sample
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        urls.append(str(path))
    last = Path(urls[-1])
    last.write_bytes(last.read_bytes()[:-3000])  # truncated: its tail samples and one "truncated shard"
    urls.insert(len(urls) // 2, str(root / "missing.tar"))  # unreadable shard
    return urls


def _source(kind: str, root: Path):
    if kind == "folder":
        return _config(_folder(root / "folder"))
    if kind in ("jsonl", "csv"):
        return _config(_manifest(root / kind, kind))
    config = _config(root, "data.format=webdataset")
    config.path = _tars(root / kind, int(kind.split("-")[1]))  # a list of shards
    return config


def _what(item) -> tuple:
    return (type(item).__name__, item.key, item.reason if isinstance(item, Rejected) else tuple(item.captions))


SOURCES = ["folder", "jsonl", "csv", "wds-1", "wds-2", "wds-3", "wds-4", "wds-7", "wds-8"]


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5])
def test_the_parts_hold_every_entry_once_and_in_source_order(tmp_path, kind, parts):
    config = _source(kind, tmp_path)
    whole = [_what(item) for item in stream_items(config)]
    assert any(w[0] == "Rejected" for w in whole) and any(w[0] == "Record" for w in whole)
    split = {p: list(part_items(config, p, parts)) for p in range(parts)}
    union = [_what(item) for p in range(parts) for _, _, item in split[p]]
    assert Counter(union) == Counter(whole)  # every entry once: no sample lost, no skip counted twice
    by_ordinal = sorted((ordinal, _what(item)) for p in range(parts) for _, ordinal, item in split[p])
    assert [w for _, w in by_ordinal] == whole and len({o for o, _ in by_ordinal}) == len(whole)
    for p in range(parts):
        positions = [pos for pos, _, _ in split[p]]
        assert positions == sorted(set(positions))
        sizes = [len(split[q]) for q in range(parts)]
        if kind in ("folder", "jsonl", "csv") or split_note(config, parts):
            assert max(sizes) - min(sizes) <= 1  # dealt by position: balanced


@pytest.mark.parametrize("kind", ["folder", "jsonl", "wds-3", "wds-8"])
def test_a_part_resumed_at_any_position_continues_exactly(tmp_path, kind):
    config = _source(kind, tmp_path)
    for part in range(3):
        full = [(pos, ordinal, _what(item)) for pos, ordinal, item in part_items(config, part, 3)]
        for k, (pos, _, _) in enumerate(full):
            resumed = [(p, o, _what(item)) for p, o, item in part_items(config, part, 3, start=pos)]
            assert resumed == full[k:], (part, k)
        after = full[-1][0] + 1 if full else 0
        assert list(part_items(config, part, 3, start=after)) == []


@pytest.mark.parametrize("shards, parts", [(8, 4), (7, 4), (4, 4), (5, 2), (3, 4), (1, 2)])
def test_a_part_opens_only_its_own_shards(tmp_path, monkeypatch, shards, parts):
    config = _source(f"wds-{shards}", tmp_path)
    urls = list(config.path)
    real_open = data_module._open_shard
    for part in range(parts):
        opened = []
        monkeypatch.setattr(data_module, "_open_shard", lambda url: opened.append(url) or real_open(url))
        list(part_items(config, part, parts))
        if len(urls) >= parts:
            assert opened == urls[part::parts] and split_note(config, parts) is None
        else:
            assert opened == urls  # fewer shards than parts: every part reads all, keeps its samples
            note = split_note(config, parts)
            assert note and f"{len(urls)} webdataset shard(s) for {parts} parts" in note
    # a resumed part does not open the shards it had finished
    opened = []
    monkeypatch.setattr(data_module, "_open_shard", lambda url: opened.append(url) or real_open(url))
    if len(urls) >= 2 * parts:
        list(part_items(config, 0, parts, start=1 << parts_module.SHARD_BITS))
        assert opened == urls[parts::parts]


def test_a_folder_part_reads_only_its_own_captions(tmp_path, monkeypatch):
    config = _source("folder", tmp_path)
    read = []
    real = parts_module.folder_entry
    monkeypatch.setattr(parts_module, "folder_entry", lambda root, image, config=None: read.append(image.name) or real(root, image, config))
    items = list(part_items(config, 1, 4))
    assert read == [item.key for _, _, item in items] == [f"img{i:04d}.png" for i in range(1, 21, 4)]
    assert all(isinstance(item, Rejected) or isinstance(item, Record) for _, _, item in items)


@pytest.mark.parametrize("kind", ["folder", "wds-5", "wds-1"])
def test_prepared_in_two_workers_per_rank_equals_one_process(tmp_path, kind):
    """2 ranks x 2 real DataLoader workers: the same entries, decoded the same, in the same order as without
    workers; over both ranks each entry once."""
    import torch

    config = _source(kind, tmp_path)
    buckets = make_buckets(32, 8, 2.0)
    seen = []
    for rank in range(2):
        alone = list(prepared_part(config, rank, 2, 0, buckets, num_workers=0))
        workers = list(prepared_part(config, rank, 2, 0, buckets, num_workers=2))
        assert [(p.position, p.ordinal, p.key, p.skip) for p in workers] == [
            (p.position, p.ordinal, p.key, p.skip) for p in alone]
        for a, b in zip(alone, workers):
            assert (a.sample is None) == (b.sample is None)
            if a.sample is not None:
                assert torch.equal(a.sample.pixels, b.sample.pixels) and a.bucket == b.bucket
        k = len(alone) // 2
        resumed = list(prepared_part(config, rank, 2, alone[k].position, buckets, num_workers=2))
        assert [p.key for p in resumed] == [p.key for p in alone[k:]]
        seen.extend((p.key, p.skip[0] if p.skip else None) for p in alone)
    whole = [(item.key, item.reason if isinstance(item, Rejected) else None) for item in stream_items(config)]
    if kind == "folder":  # the broken PNG is an entry that fails to decode
        whole = [(k, "unreadable image" if k == "img0016.png" else r) for k, r in whole]
    assert Counter(seen) == Counter(whole)


def test_every_process_agrees_on_a_cheap_signature(tmp_path):
    folder = _source("folder", tmp_path)
    assert source_signature(folder) == 21
    assert source_signature(_source("wds-4", tmp_path)) == 5  # 4 shards and the missing one
    manifest = _source("jsonl", tmp_path)
    assert source_signature(manifest) == Path(manifest.path).stat().st_size


@pytest.mark.parametrize("workers,lookahead", [(1, 8), (2, 8), (2, 13), (3, 12)])
def test_workers_keep_the_lookahead_ready_while_the_consumer_encodes(tmp_path, monkeypatch, workers, lookahead):
    """A cache build takes a chunk, then encodes it: meanwhile the workers must go on preparing up to the
    lookahead (with too shallow a prefetch they stopped after 4 and overlapped nothing), and no further."""
    import os
    import time

    from training import decoding

    config = _source("folder", tmp_path)
    marks = tmp_path / "prepared"
    marks.mkdir()
    real = decoding.prepare

    def counted(position, ordinal, item, buckets):  # runs in the (forked) worker processes
        (marks / f"{os.getpid()}-{position}").touch()
        return real(position, ordinal, item, buckets)

    monkeypatch.setattr(decoding, "prepare", counted)
    source = prepared_part(config, 0, 1, 0, make_buckets(32, 8, 2.0), num_workers=workers, lookahead=lookahead)
    first = next(source)  # the consumer holds it (encoding) and asks for nothing more
    deadline = time.monotonic() + 60
    while len(list(marks.iterdir())) < 1 + lookahead and time.monotonic() < deadline:
        time.sleep(0.05)
    reached = len(list(marks.iterdir()))
    time.sleep(0.5)  # anything the workers would still start
    settled = len(list(marks.iterdir()))
    rest = list(source)
    assert first.position == 0 and len(rest) == 20
    assert reached >= 1 + lookahead, f"only {reached} of {1 + lookahead} prepared while the consumer waited"
    assert settled <= 1 + lookahead + 2 * workers, f"{settled} prepared ahead, lookahead {lookahead}"
