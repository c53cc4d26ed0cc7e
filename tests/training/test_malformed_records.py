"""Every malformed record is skipped and counted under one stable reason, never fatal: a table of bad
records for each source format, tar shards cut at every kind of offset (against an oracle built from
tarfile's member offsets), and broken images through the cache build and the online path."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from tests.training.train_helpers import TINY_CONFIG, png_bytes, synthetic_samples, write_folder, write_tars

from training.config import load_config
from training.data import OnlineDataset, Skip, SkipCounter, stream_records

REASONS = {v for k, v in vars(Skip).items() if k.isupper()}
GOOD = synthetic_samples(3, seed=7)


def _config(path, *extra: str):
    return load_config(TINY_CONFIG, ["model.pretrained=org/base", "llm.source=org/llm", f"data.path={path}",
                                     "data.caption_columns=[caption, dense]", *extra])


def _read(path, *extra: str) -> tuple[list, SkipCounter]:
    skips = SkipCounter()
    records = list(stream_records(_config(path, *extra).data, skips))
    return records, skips


def _assert_one_skip(records, skips, reason):
    assert len(records) == len(GOOD), (len(records), skips.to_dict())
    assert skips.counts == Counter({reason: 1}), skips.to_dict()
    assert [r.captions[0] for r in records] == [c[0] for _, _, c in GOOD]  # the good ones, in order
    assert all(k in REASONS and "0x" not in k for k in skips.counts)


def _images(root: Path) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for key, image, _ in GOOD:
        image.save(root / "images" / f"{key}.png")
    image_bytes = png_bytes(GOOD[0][1])
    (root / "images" / "bad.png").write_bytes(image_bytes)


# ---------------------------------------------------------------- manifests
JSONL_BAD = [  # (the bad line as bytes, reason)
    (b'{"image": "images/bad.png", "caption": "caf\xe9"}', Skip.INVALID_UTF8),
    (b'\xff\xfe{"image": "images/bad.png", "caption": "x"}', Skip.INVALID_UTF8),
    (b'{"image": "images/bad.png", "capt', Skip.INVALID_JSON),
    (b"{'image': 'images/bad.png'}", Skip.INVALID_JSON),
    (b"[1, 2]", Skip.NOT_AN_OBJECT),
    (b'"images/bad.png"', Skip.NOT_AN_OBJECT),
    (b"5", Skip.NOT_AN_OBJECT),
    (b"null", Skip.NOT_AN_OBJECT),
    (b'{"caption": "no image"}', Skip.NO_IMAGE_FIELD),
    (b'{"image": null, "caption": "x"}', Skip.NO_IMAGE_FIELD),
    (b'{"image": "", "caption": "x"}', Skip.NO_IMAGE_FIELD),
    (b'{"image": 5, "caption": "x"}', Skip.BAD_IMAGE_FIELD),
    (b'{"image": ["images/bad.png"], "caption": "x"}', Skip.BAD_IMAGE_FIELD),
    (b'{"image": {"path": "images/bad.png"}, "caption": "x"}', Skip.BAD_IMAGE_FIELD),
    (b'{"image": true, "caption": "x"}', Skip.BAD_IMAGE_FIELD),
    (b'{"image": "images/\\udc80.png", "caption": "x"}', Skip.INVALID_UTF8),
    (b'{"image": "images/bad.png"}', Skip.NO_CAPTION),
    (b'{"image": "images/bad.png", "caption": null}', Skip.NO_CAPTION),
    (b'{"image": "images/bad.png", "caption": ""}', Skip.EMPTY_CAPTION),
    (b'{"image": "images/bad.png", "caption": "   \\n "}', Skip.EMPTY_CAPTION),
    (b'{"image": "images/bad.png", "caption": []}', Skip.EMPTY_CAPTION),
    (b'{"image": "images/bad.png", "caption": ["", " "]}', Skip.EMPTY_CAPTION),
    (b'{"image": "images/bad.png", "caption": 5}', Skip.BAD_CAPTION),
    (b'{"image": "images/bad.png", "caption": {"en": "x"}}', Skip.BAD_CAPTION),
    (b'{"image": "images/bad.png", "caption": [1, 2]}', Skip.BAD_CAPTION),
    (b'{"image": "images/bad.png", "caption": "ok", "dense": false}', Skip.BAD_CAPTION),
    (b'{"image": "images/bad.png", "caption": "\\ud800 lone surrogate"}', Skip.INVALID_UTF8),
]


@pytest.mark.parametrize("line, reason", JSONL_BAD, ids=[f"jsonl{i}" for i in range(len(JSONL_BAD))])
@pytest.mark.parametrize("where", ["first", "middle", "last-no-newline"])
def test_jsonl_bad_line_is_one_counted_skip(tmp_path, line, reason, where):
    _images(tmp_path)
    good = [json.dumps({"image": f"images/{k}.png", "caption": c[0], "dense": c[1]}).encode() for k, _, c in GOOD]
    lines = {"first": [line] + good, "middle": good[:1] + [line] + good[1:], "last-no-newline": good + [line]}[where]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"" if where == "last-no-newline" else b"\n"))
    records, skips = _read(path)
    _assert_one_skip(records, skips, reason)
    assert any(f"train.jsonl:{lines.index(line) + 1}" in e for e in skips.examples)  # names file and line


CSV_BAD = [  # (the bad row as bytes, reason)
    (b"images/bad.png,caf\xe9 au lait,dense", Skip.INVALID_UTF8),
    (b"images/b\xffd.png,a caption,dense", Skip.INVALID_UTF8),
    (b"images/bad.png,,", Skip.EMPTY_CAPTION),
    (b"images/bad.png,  ,\t", Skip.EMPTY_CAPTION),
    (b"images/bad.png", Skip.NO_CAPTION),  # a short row: the caption fields are missing
    (b",a caption,dense", Skip.NO_IMAGE_FIELD),
    (b"images/bad.png,\"" + b"x" * 200_000 + b"\",dense", Skip.MALFORMED_ROW),  # over csv's field limit
]


@pytest.mark.parametrize("row, reason", CSV_BAD, ids=[f"csv{i}" for i in range(len(CSV_BAD))])
def test_csv_bad_row_is_one_counted_skip(tmp_path, row, reason):
    _images(tmp_path)
    rows = [f"images/{k}.png,{c[0]},{c[1]}".encode() for k, _, c in GOOD]
    path = tmp_path / "train.csv"
    path.write_bytes(b"\n".join([b"image,caption,dense", rows[0], row, *rows[1:]]) + b"\n")
    records, skips = _read(path)
    _assert_one_skip(records, skips, reason)


# ---------------------------------------------------------------- image folders
FOLDER_BAD = [  # (caption file bytes or None for no file, reason)
    (None, Skip.NO_CAPTION),
    (b"", Skip.EMPTY_CAPTION),
    (b"\n  \n\t\n", Skip.EMPTY_CAPTION),
    (b"caf\xe9\n", Skip.INVALID_UTF8),
    (b"\xef\xbb", Skip.INVALID_UTF8),  # a cut byte-order mark
]


@pytest.mark.parametrize("caption, reason", FOLDER_BAD, ids=[f"folder{i}" for i in range(len(FOLDER_BAD))])
def test_folder_bad_caption_is_one_counted_skip(tmp_path, caption, reason):
    folder = write_folder(tmp_path / "f", GOOD)
    (folder / "img0001b.png").write_bytes(png_bytes(GOOD[0][1]))  # sorts between img0001 and img0002
    if caption is not None:
        (folder / "img0001b.txt").write_bytes(caption)
    records, skips = _read(folder)
    _assert_one_skip(records, skips, reason)


# ---------------------------------------------------------------- webdataset
def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _good_members() -> list[tuple[str, bytes]]:
    return [m for key, image, caps in GOOD for m in ((f"{key}.png", png_bytes(image)),
                                                    (f"{key}.txt", "\n".join(caps).encode()))]


PNG = png_bytes(GOOD[0][1])
TAR_BAD = [  # (members of the bad sample, reason)
    ([("bad.txt", b"a caption")], Skip.NO_IMAGE),
    ([("bad.json", b'{"caption": "x"}')], Skip.NO_IMAGE),
    ([("bad.png", PNG)], Skip.NO_CAPTION),
    ([("bad.png", PNG), ("bad.txt", b"")], Skip.EMPTY_CAPTION),
    ([("bad.png", PNG), ("bad.txt", b"caf\xe9")], Skip.INVALID_UTF8),
    ([("bad.png", PNG), ("bad.json", b"[1]")], Skip.NOT_AN_OBJECT),
    ([("bad.png", PNG), ("bad.json", b"{nope")], Skip.INVALID_JSON),
    ([("bad.png", PNG), ("bad.json", b'{"caption": 3}')], Skip.BAD_CAPTION),
    ([("bad.png", PNG), ("bad.json", b'{"other": "x"}')], Skip.NO_CAPTION),
    ([("bad.png", PNG), ("bad.json", b'{"caption": "caf\xe9"}')], Skip.INVALID_UTF8),
]


@pytest.mark.parametrize("members, reason", TAR_BAD, ids=[f"tar{i}" for i in range(len(TAR_BAD))])
def test_webdataset_bad_sample_is_one_counted_skip(tmp_path, members, reason):
    good = _good_members()
    (tmp_path / "shard-0000.tar").write_bytes(_tar(good[:2] + members + good[2:]))
    records, skips = _read(tmp_path / "shard-0000.tar")
    _assert_one_skip(records, skips, reason)


@pytest.mark.parametrize("content, reason", [(None, Skip.UNREADABLE_SHARD), (b"<html>404</html>" * 40,
                                                                               Skip.UNREADABLE_SHARD)])
def test_unreadable_shard_is_counted_once_and_the_others_are_read(tmp_path, content, reason):
    write_tars(tmp_path, GOOD, per_shard=3)  # shard-0000.tar with the 3 good samples
    bad = tmp_path / "shard-0001.tar"
    if content is not None:
        bad.write_bytes(content)
    records, skips = _read(f"{tmp_path}/shard-{{0000..0001}}.tar")
    _assert_one_skip(records, skips, reason)


def _oracle(raw: bytes, cut: int) -> int:
    """Samples a correct reader yields from the first `cut` bytes: a sample is known complete once the next
    sample's first member was read whole, the last one once the end-of-archive block was read."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    end = lambda m: m.offset_data + -(-m.size // 512) * 512  # noqa: E731 (data padded to a block)
    firsts = [m for m in members if m.name.endswith(".png")]
    complete = sum(1 for nxt in firsts[1:] if cut >= end(nxt))
    return complete + (1 if cut >= end(members[-1]) + 512 else 0)


def test_truncated_shard_at_every_kind_of_offset(tmp_path):
    """Cut in headers, in data, in padding, exactly on boundaries, in the end blocks: every sample before the
    cut is read, the shard is counted once as truncated, the other shards are read whole."""
    good = synthetic_samples(6, seed=11)
    paths = write_tars(tmp_path, good, per_shard=3)  # two shards of 3
    raw = paths[0].read_bytes()
    with tarfile.open(paths[0]) as tar:
        members = tar.getmembers()
    last_data_end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    cuts = {0, 1, 511, 512, 513, last_data_end, last_data_end + 511, last_data_end + 512}
    for m in members:
        cuts |= {m.offset, m.offset + 100, m.offset + 512, m.offset_data + m.size // 2, m.offset_data + m.size,
                 m.offset_data + m.size + 1}
    tried = 0
    for cut in sorted(c for c in cuts if c < len(raw)):
        paths[0].write_bytes(raw[:cut])
        records, skips = _read(tmp_path)
        expected = _oracle(raw, cut)
        assert len(records) == expected + 3, (cut, len(records), expected)
        assert [r.captions for r in records] == [c for _, _, c in good[:expected] + good[3:]], cut
        truncated = cut < last_data_end + 512
        assert skips.counts == (Counter({Skip.TRUNCATED_SHARD: 1}) if truncated else Counter()), (cut, skips.counts)
        tried += 1
    assert tried >= 40


# ---------------------------------------------------------------- images: in the cache build and online
BAD_IMAGES = {  # file name -> (bytes or None for no file, reason)
    "corrupt.png": (b"\x89PNG\r\n\x1a\n garbage", Skip.UNREADABLE_IMAGE),
    "truncated.png": (PNG[: len(PNG) // 2], Skip.UNREADABLE_IMAGE),
    "empty.png": (b"", Skip.UNREADABLE_IMAGE),
    "text.png": (b"just some text, not an image\n", Skip.UNREADABLE_IMAGE),
    "jpeg-cut.jpg": (None, Skip.UNREADABLE_IMAGE),  # filled below: a JPEG cut in its scan data
    "missing.png": (None, Skip.IMAGE_NOT_FOUND),
    "a-folder.png": (None, Skip.IMAGE_NOT_FOUND),
}


def _bad_image_manifest(root: Path) -> Path:
    _images(root)
    jpeg = io.BytesIO()
    GOOD[0][1].resize((64, 64)).save(jpeg, format="JPEG")
    for name, (payload, _) in BAD_IMAGES.items():
        if name == "jpeg-cut.jpg":
            payload = jpeg.getvalue()[:300]
        if name == "a-folder.png":
            (root / "images" / name).mkdir()
        elif payload is not None:
            (root / "images" / name).write_bytes(payload)
    rows = [{"image": f"images/{k}.png", "caption": c[0]} for k, _, c in GOOD]
    rows[1:1] = [{"image": f"images/{name}", "caption": "a plain red picture"} for name in BAD_IMAGES]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_broken_images_are_counted_in_the_cache_build(tmp_path, tiny_sd15, tiny_t5):
    from training import cache as feature_cache
    from training.distributed import Dist
    from training.models import load_base, load_llm
    from training.stopping import Stop

    config = _config(_bad_image_manifest(tmp_path), f"output_dir={tmp_path / 'run'}",
                     f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}")
    base = load_base(config.model, torch.device("cpu"), torch.float32)
    folder = feature_cache.cache_dir(config, base.vae.dtype)
    feature_cache.build_cache(config, folder, base, lambda: load_llm(config.llm, torch.device("cpu")), Dist(), Stop())
    index = json.loads((folder / "index.json").read_text())
    cache = feature_cache.FeatureCache(folder)
    assert [cache.entry(i)["key"] for i in range(len(cache))] == [f"images/{k}.png" for k, _, _ in GOOD]
    assert index["skipped"]["counts"] == dict(Counter(reason for _, reason in BAD_IMAGES.values()))


def test_broken_images_are_counted_online(tmp_path):
    config = _config(_bad_image_manifest(tmp_path))
    records, skips = _read(config.data.path)
    assert skips.total == 0  # images are only opened when used
    dataset = OnlineDataset(records, [(32, 32)] * len(records), config.data)
    reasons = {records[i].key: dataset[(i, 0)].get("skip") for i in range(len(records))}
    assert reasons == {**{f"images/{k}.png": None for k, _, _ in GOOD},
                       **{f"images/{name}": reason for name, (_, reason) in BAD_IMAGES.items()}}
