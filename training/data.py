"""Training data: where samples come from, how captions are picked, how images fit aspect-ratio buckets,
and the order samples are visited in.

Sources: an image folder with same-named .txt captions (one caption per line), a JSONL or CSV manifest,
or webdataset tar shards (local paths or URLs). Anything unreadable is skipped and counted under a fixed reason (`Skip`), never fatal.

Determinism: every sample visit gets its own seed from (run seed, epoch, position in the epoch). Caption
choice, caption dropout, timestep and noise all derive from it, so a resumed run and a run split over
several processes see exactly the samples and noise an uninterrupted single-process run sees.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .config import DataConfig, caption_extensions
from .distributed import Dist
from .errors import TrainingError
from .features import pad_batch
from .formats import resolve_format
from .tarfiles import CorruptTar, TruncatedTar, tar_members

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ---------------------------------------------------------------- skipped samples
class Skip:
    """Why a sample was skipped. Fixed strings, so one kind of fault is always counted under one key; the
    particulars (file, line, exception message) go into the examples only."""

    INVALID_UTF8 = "invalid UTF-8"
    INVALID_JSON = "invalid JSON"
    NOT_AN_OBJECT = "not a JSON object"
    MALFORMED_ROW = "malformed CSV row"
    NO_IMAGE_FIELD = "missing image field"
    BAD_IMAGE_FIELD = "image field is not a path"
    NO_IMAGE = "no image in sample"
    IMAGE_NOT_FOUND = "image file not found"
    UNREADABLE_IMAGE = "unreadable image"
    NO_CAPTION = "missing caption"
    EMPTY_CAPTION = "empty caption"
    BAD_CAPTION = "caption is not text"
    TRUNCATED_SHARD = "truncated shard"  # once per shard: the sample cut and any after it (a tar has no count)
    UNREADABLE_SHARD = "unreadable shard"  # once per shard that cannot be opened or parsed


@dataclass
class SkipCounter:
    """Counts skipped samples by reason and keeps a few examples for the log."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}" + (f" ({detail[:200]})" if detail else ""))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: dict[str, Any]) -> None:
        self.counts.update(other.get("counts", {}))
        self.examples.extend(other.get("examples", [])[: max(0, 20 - len(self.examples))])

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": list(self.examples)}


def describe(error: BaseException) -> str:
    """An exception for the examples: its type and message without object addresses."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", f"{type(error).__name__}: {error}")


def image_failure(error: BaseException) -> str:
    """The skip reason of an image that could not be loaded or decoded."""
    return Skip.IMAGE_NOT_FOUND if isinstance(error, (FileNotFoundError, IsADirectoryError)) else Skip.UNREADABLE_IMAGE


# ---------------------------------------------------------------- records
@dataclass
class Record:
    """One image and its captions. `load` returns the image bytes (or raises)."""

    key: str
    captions: list[str]
    load: Callable[[], bytes]
    size: Optional[tuple[int, int]] = None  # (height, width), when known without decoding


@dataclass
class Rejected:
    """A source entry that is not a usable sample, in its place in the source order."""

    key: str
    reason: str  # a Skip constant
    detail: str = ""


def _is_text(value: str) -> bool:
    """False for strings holding undecodable bytes (surrogate escapes) or lone surrogates."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def captions_from(values: Sequence[Any]) -> tuple[list[str], Optional[str]]:
    """Caption fields (strings or lists of strings, None when absent) -> (stripped captions, None), or
    ([], the Skip reason) when there is none, one is not text, or all are empty."""
    present = [v for v in values if v is not None]
    if not present:
        return [], Skip.NO_CAPTION
    out: list[str] = []
    for value in present:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, str):
                return [], Skip.BAD_CAPTION
            if not _is_text(item):
                return [], Skip.INVALID_UTF8
            if item.strip():
                out.append(item.strip())
    return (out, None) if out else ([], Skip.EMPTY_CAPTION)


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _file_loader(path: Path) -> Callable[[], bytes]:
    return functools.partial(_read_bytes, path)  # picklable, for DataLoader workers started by spawn


def detect_format(path: Any) -> str:
    """data.format=auto: training.formats.resolve_format (the config check's rule), or an error."""
    fmt = resolve_format("auto", path)
    if fmt is None:
        raise TrainingError(f"data.path {str(path)!r}: cannot tell its format; set data.format to folder, jsonl, "
                            "csv or webdataset")
    return fmt


def folder_images(root: Path) -> list[Path]:
    """The images under `root` (recursive), in source order: a listing only, nothing is read."""
    if not root.is_dir():
        raise TrainingError(f"data.path {root} is not a folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def folder_entry(root: Path, image: Path, config: Optional[DataConfig] = None) -> Record | Rejected:
    """One image of a folder source with its captions from `<same name><data.caption_extension>`, one caption
    per line."""
    extensions = caption_extensions((config or DataConfig()).caption_extension)
    key = str(image.relative_to(root))
    txt = next((c for c in (image.with_suffix(e) for e in extensions) if c.is_file()), image.with_suffix(extensions[0]))
    try:
        text = txt.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return Rejected(key, Skip.NO_CAPTION, f"no {' or '.join(image.stem + e for e in extensions)}")
    except UnicodeDecodeError as e:
        return Rejected(key, Skip.INVALID_UTF8, f"{txt.name}: {e.reason} at byte {e.start}")
    except OSError as e:
        return Rejected(key, Skip.NO_CAPTION, f"{txt.name}: {e}")
    captions, reason = captions_from(text.splitlines() or [""])  # an empty file: an empty caption
    return Rejected(key, reason, txt.name) if reason else Record(key, captions, _file_loader(image))


def is_imagefolder(root: Path) -> bool:
    """A folder holding `metadata.jsonl`/`metadata.csv`: a Hugging Face imagefolder (`imagefolder_items`)."""
    return bool(_metadata_files(root))


def folder_items(root: Path, config: Optional[DataConfig] = None) -> Iterator[Record | Rejected]:
    """Images under `root` (recursive) with captions in `<same name><data.caption_extension>`, one caption per
    line; a folder holding `metadata.jsonl`/`metadata.csv` is a Hugging Face imagefolder (`imagefolder_items`)."""
    config = config or DataConfig()
    if root.is_dir() and is_imagefolder(root):
        yield from imagefolder_items(root, config)
        return
    for image in folder_images(root):
        yield folder_entry(root, image, config)


METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
IMAGEFOLDER_COLUMN = "file_name"  # the image column of a Hugging Face imagefolder


def _metadata_files(root: Path) -> list[Path]:
    return sorted(p for name in METADATA_NAMES for p in root.rglob(name) if p.is_file())


def imagefolder_items(root: Path, config: DataConfig) -> Iterator[Record | Rejected]:
    """A Hugging Face imagefolder: `metadata.jsonl` (or `.csv`) files, each naming images relative to its own
    folder in `file_name`, captions in data.caption_columns. Images that no metadata row names are counted
    as missing captions, not silently left out."""
    rows = dataclasses.replace(config, image_column=IMAGEFOLDER_COLUMN)
    listed: set[Path] = set()
    for meta in _metadata_files(root):
        _check_caption_columns(meta, config)
        items = jsonl_items(meta, rows) if meta.suffix == ".jsonl" else csv_items(meta, rows)
        for item in items:
            if isinstance(item, Record):
                path = Path(item.key) if Path(item.key).is_absolute() else meta.parent / item.key
                listed.add(path.resolve())
                item = Record(str(path.relative_to(root)) if path.is_relative_to(root) else item.key,
                              item.captions, item.load, item.size)
            yield item
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        if image.resolve() not in listed:
            yield Rejected(str(image.relative_to(root)), Skip.NO_CAPTION, f"not named in a {METADATA_NAMES[0]}")


def _check_caption_columns(meta: Path, config: DataConfig) -> None:
    """A metadata file none of whose first rows has a caption column is a setting to fix, not bad data."""
    columns: set[str] = set()
    if meta.suffix == ".csv":
        columns = set(next(csv.reader(io.StringIO(meta.read_text(encoding="utf-8", errors="replace"))), []))
    else:
        with open(meta, encoding="utf-8", errors="replace") as f:
            for line in itertools.islice(f, 20):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    columns |= set(row)
    if columns and not columns & set(config.caption_columns):
        raise TrainingError(f"{meta}: no caption column {list(config.caption_columns)}; its columns are "
                            f"{sorted(columns)}: set data.caption_columns (e.g. data.caption_columns=[text])")


def _row_item(row: dict[str, Any], base: Path, config: DataConfig, where: str) -> Record | Rejected:
    image = row.get(config.image_column)
    if image is None or image == "":
        return Rejected(where, Skip.NO_IMAGE_FIELD, f"no {config.image_column!r}")
    if not isinstance(image, str):
        return Rejected(where, Skip.BAD_IMAGE_FIELD, f"{config.image_column}={image!r}")
    if not _is_text(image):
        return Rejected(where, Skip.INVALID_UTF8, f"in {config.image_column!r}")
    captions, reason = captions_from([row.get(c) for c in config.caption_columns])
    if reason:
        return Rejected(where, reason, f"columns {list(config.caption_columns)}")
    path = Path(image) if Path(image).is_absolute() else base / image
    return Record(image, captions, _file_loader(path))


def jsonl_items(path: Path, config: DataConfig) -> Iterator[Record | Rejected]:
    """One JSON object per line: {"image": "a.jpg", "caption": "..." or [...], ...}; paths relative to the file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Rejected(where, Skip.INVALID_UTF8, f"{e.reason} at byte {e.start}")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield Rejected(where, Skip.INVALID_JSON, e.msg)
                continue
            if not isinstance(row, dict):
                yield Rejected(where, Skip.NOT_AN_OBJECT, type(row).__name__)
                continue
            yield _row_item(row, path.parent, config, where)


def csv_items(path: Path, config: DataConfig) -> Iterator[Record | Rejected]:
    """A header row naming the image column and caption column(s); paths relative to the file. Undecodable
    bytes are kept as surrogate escapes so that only the rows holding them are skipped."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None) or []
    if config.image_column not in header:
        raise TrainingError(f"{path}: no column {config.image_column!r}; its columns are {header}")
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Rejected(f"{path}:{reader.line_num}", Skip.MALFORMED_ROW, str(e))
            continue
        if not any(v.strip() for v in values):
            continue  # blank line
        row = dict(zip(header, values))
        yield _row_item(row, path.parent, config, f"{path}:{reader.line_num}")


def tar_urls(path: Any) -> list[str]:
    """The shards of a webdataset source, in source order: a list, brace patterns joined by "::", a folder of
    .tar files, or one path/URL."""
    if isinstance(path, (list, tuple)):
        return [str(p) for p in path]
    text = str(path)
    if "{" in text or "::" in text:
        import braceexpand  # installed with webdataset

        return [u for part in text.split("::") for u in braceexpand.braceexpand(part)]
    p = Path(text)
    if p.is_dir():
        return [str(t) for t in sorted(p.glob("*.tar"))]
    return [text]


def _open_shard(url: str) -> Any:
    if url.startswith(("http://", "https://", "pipe:", "gs://", "s3://")):
        from webdataset.gopen import gopen  # curl/pipe streams

        return gopen(url, "rb")
    return open(url, "rb")


def webdataset_items(path: Any, config: DataConfig) -> Iterator[Record | Rejected]:
    """Samples of tar shards (local or URLs), shard after shard (see `shard_items`)."""
    for url in tar_urls(path):
        yield from shard_items(url, config)


def shard_items(url: str, config: DataConfig) -> Iterator[Record | Rejected]:
    """Samples of one tar shard: members grouped by key (`key.png`, `key.txt`, `key.json`), in member order.
    Images: jpg/png/webp; captions: `.txt` (one per line) or `.json` fields named by data.caption_columns.
    A shard cut short or unparseable costs the sample it was in and is counted once, never fatal."""
    try:
        stream = _open_shard(url)
    except OSError as e:
        yield Rejected(url, Skip.UNREADABLE_SHARD, str(e))
        return
    try:
        group: dict[str, bytes] = {}
        key = None
        try:
            for name, payload in tar_members(stream):
                base, ext = _split_key(name)
                if base is None:
                    continue
                if base != key and group:
                    yield _tar_sample(f"{url}#{key}", group, config)
                    group = {}
                key = base
                group[ext] = payload
            if group:
                yield _tar_sample(f"{url}#{key}", group, config)
        except TruncatedTar as e:
            yield Rejected(url, Skip.TRUNCATED_SHARD, str(e))
        except (CorruptTar, OSError) as e:
            yield Rejected(url, Skip.UNREADABLE_SHARD, str(e))
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 (a failed curl pipe reports on close; the shard is counted above)
            pass


def _split_key(name: str) -> tuple[Optional[str], str]:
    """"a/b/img001.seg.png" -> ("a/b/img001", "seg.png"): webdataset's key is all before the basename's first dot."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None, ""
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_sample(key: str, group: dict[str, bytes], config: DataConfig) -> Record | Rejected:
    image_ext = next((e.lstrip(".") for e in IMAGE_EXTS if e.lstrip(".") in group), None)
    if image_ext is None:
        return Rejected(key, Skip.NO_IMAGE, f"members {sorted(group)}")
    values: list[Any] = []
    if "txt" in group:
        try:
            values.extend(group["txt"].decode("utf-8").splitlines() or [""])
        except UnicodeDecodeError as e:
            return Rejected(key, Skip.INVALID_UTF8, f"txt: {e.reason} at byte {e.start}")
    captions, reason = captions_from(values)
    if reason and "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8"))
        except UnicodeDecodeError:
            return Rejected(key, Skip.INVALID_UTF8, "json")
        except json.JSONDecodeError as e:
            return Rejected(key, Skip.INVALID_JSON, e.msg)
        if not isinstance(meta, dict):
            return Rejected(key, Skip.NOT_AN_OBJECT, type(meta).__name__)
        captions, reason = captions_from([meta.get(c) for c in config.caption_columns])
    if reason:
        return Rejected(key, reason)
    data = group[image_ext]
    return Record(key, captions, functools.partial(bytes, data))


# ---------------------------------------------------------------- all sources
def source_format(config: DataConfig) -> str:
    return config.format if config.format != "auto" else detect_format(config.path)


def stream_items(config: DataConfig) -> Iterator[Record | Rejected]:
    """Every entry of the source, usable or not, in source order (the same order on every process)."""
    fmt = source_format(config)
    if fmt == "webdataset":
        yield from webdataset_items(config.path, config)
        return
    path = Path(config.path)
    if fmt == "folder":
        yield from folder_items(path, config)
        return
    yield from manifest_items(path, fmt, config)


def manifest_items(path: Path, fmt: str, config: DataConfig) -> Iterator[Record | Rejected]:
    """The rows of a JSONL or CSV manifest."""
    if not path.is_file():
        raise TrainingError(f"data.path {path}: manifest not found")
    yield from jsonl_items(path, config) if fmt == "jsonl" else csv_items(path, config)


def stream_records(config: DataConfig, skips: SkipCounter) -> Iterator[Record]:
    """The usable records in source order; the others are counted in `skips`."""
    for item in stream_items(config):
        if isinstance(item, Rejected):
            skips.add(item.reason, item.key, item.detail)
        else:
            yield item


def indexable_records(config: DataConfig, skips: SkipCounter) -> list[Record]:
    if source_format(config) == "webdataset":
        raise TrainingError("webdataset shards are streamed, not indexed: leave data.streaming unset (or true) to "
                            "train from the stream, or use cache.mode=full or latents to read them once into a cache")
    return list(stream_records(config, skips))


# ---------------------------------------------------------------- buckets and images
def make_buckets(resolution: int, step: int, max_aspect: float, enabled: bool = True) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of `step`, area <= resolution^2, aspect within max_aspect."""
    if not enabled:
        return [(resolution, resolution)]
    area = resolution * resolution
    buckets = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-6:
            buckets.add((h, w))
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    h, w = size
    target = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - target), -b[0] * b[1]))


@dataclass
class ImageSample:
    pixels: torch.Tensor  # (3, H, W) uint8: the encoder's device scales it (models.encode_pixels)
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # SDXL conditioning


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so truncated files fail here
    return image.convert("RGB")


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> ImageSample:
    """Resize to cover the bucket (keeping aspect), centre-crop to it. Kept as bytes: loader workers hand
    the main process, and it the GPU, a quarter of what float pixels would weigh."""
    bh, bw = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resized = image.resize((rw, rh), Image.BICUBIC)
    top, left = (rh - bh) // 2, (rw - bw) // 2
    cropped = resized.crop((left, top, left + bw, top + bh))
    array = np.array(cropped, dtype=np.uint8)  # (H, W, 3), writable (from_numpy warns on a read-only view)
    return ImageSample(torch.from_numpy(array).permute(2, 0, 1).contiguous(), (h, w), (top, left))


def image_size(record: Record) -> tuple[int, int]:
    """(height, width) from the header only."""
    with Image.open(io.BytesIO(record.load())) as image:
        return image.size[1], image.size[0]


# ---------------------------------------------------------------- captions
def choose_caption(captions: Sequence[str], rule: str, generator: torch.Generator,
                   weights: Optional[Sequence[float]] = None) -> int:
    """Index of the caption to train on. Always draws one random number so rules do not shift the stream."""
    u = float(torch.rand((), generator=generator))
    n = len(captions)
    if rule == "first":
        return 0
    if rule == "longest":
        return max(range(n), key=lambda i: len(captions[i]))
    if rule == "weighted":
        w = [float(weights[i]) if weights and i < len(weights) else 0.0 for i in range(n)]
        total = sum(w)
        if total <= 0:
            return min(int(u * n), n - 1)
        acc = 0.0
        for i, wi in enumerate(w):
            acc += wi / total
            if u < acc:
                return i
        return n - 1
    return min(int(u * n), n - 1)  # random


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of one sample visit: independent of how batches are split across processes."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


def pick_text(captions: Sequence[str], seed: int, config: DataConfig) -> int:
    """Caption index for this visit, or -1 for the empty prompt (caption dropout)."""
    generator = torch.Generator().manual_seed(seed)
    dropped = float(torch.rand((), generator=generator)) < config.caption_dropout
    index = choose_caption(captions, config.caption_rule, generator, config.caption_weights)
    return -1 if dropped else index


# ---------------------------------------------------------------- visiting order
def bucket_members(buckets: Sequence[tuple[int, int]] | np.ndarray) -> dict[tuple[int, int], list[int]]:
    """(height, width) -> the indices of its samples, ascending. `buckets`: (h, w) pairs or an (N, 2) integer
    array (the feature cache's; grouped without a Python object per sample until the lists are made)."""
    if isinstance(buckets, np.ndarray):
        if not len(buckets):
            return {}
        unique, inverse = np.unique(buckets.reshape(len(buckets), -1), axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        parts = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1])
        return {tuple(int(x) for x in u): part.tolist() for u, part in zip(unique, parts)}
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(tuple(bucket), []).append(index)
    return by_bucket


def epoch_batches(buckets: Sequence[tuple[int, int]] | np.ndarray, global_batch: int, seed: int, epoch: int
                  ) -> list[list[int]]:
    """Sample indices grouped into global micro-batches, each from a single bucket, in a seeded order.

    `buckets[i]` is sample i's bucket (pairs, or an (N, 2) array: the same result). Incomplete batches at
    the end of a bucket are dropped this epoch (they come in other orders next epoch).
    """
    rng = random.Random(f"{seed}/{epoch}")
    by_bucket = bucket_members(buckets)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches.extend(indices[i:i + global_batch] for i in range(0, len(indices) - global_batch + 1, global_batch))
    rng.shuffle(batches)
    return batches


@dataclass
class DataPosition:
    """Where the data stream is: the epoch, how many samples of the epoch's order are done, and the global
    micro-batch that order was drawn with (`epoch_batches`; 0: the current one). The order is a sequence of
    single-bucket blocks; any layout consumes it front to back, so a run resumed with another number of
    processes or batch size continues at the same sample."""

    epoch: int = 0
    sample: int = 0
    order_batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "sample": self.sample, "order_batch": self.order_batch}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], saved_global_batch: int) -> "DataPosition":
        """From a checkpoint; older ones counted global micro-batches ({"epoch", "batch"})."""
        if "sample" in saved:
            return cls(int(saved["epoch"]), int(saved["sample"]), int(saved["order_batch"]))
        return cls(int(saved["epoch"]), int(saved["batch"]) * saved_global_batch, saved_global_batch)


def even_share(n: int, world: int, rank: int) -> slice:
    """Rank's contiguous share of n samples dealt as evenly as possible (n = batch x world: batch each)."""
    return slice(rank * n // world, (rank + 1) * n // world)


class BatchPlan:
    """Endless stream of this rank's micro-batches: lists of (sample index, position seed).

    Global micro-batches of batch_size x world samples are cut from the blocks of the epoch's order; where
    a block does not divide into them (an epoch begun with another layout), the rest of the block is one
    smaller global batch dealt evenly (a rank may get none: an empty list). The seed of a sample visit is
    that of its place in the epoch's order, whatever the layout."""

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, world: int, rank: int, seed: int,
                 position: Optional[DataPosition] = None) -> None:
        self.buckets = buckets if isinstance(buckets, np.ndarray) else list(buckets)
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed
        self.position = position or DataPosition()
        global_batch = batch_size * world
        if not epoch_batches(self.buckets, global_batch, seed, 0):
            counts = {b: len(m) for b, m in bucket_members(self.buckets).items()}
            raise TrainingError(
                f"no bucket holds a full global batch of {global_batch} samples (batch_size {batch_size} x "
                f"{world} processes); bucket sizes: {counts}. Lower train.batch_size, add data, or set "
                "data.buckets=false")

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world
        while True:
            epoch, done = self.position.epoch, self.position.sample
            order_batch = self.position.order_batch or global_batch
            first = 0  # place in the epoch's order of the block's first sample
            for block in epoch_batches(self.buckets, order_batch, self.seed, epoch):
                start = max(first, done)
                while start < first + len(block):
                    piece = block[start - first:start - first + global_batch]
                    share = even_share(len(piece), self.world, self.rank)
                    self.position = DataPosition(epoch, start + len(piece), order_batch)
                    yield [(i, sample_seed(self.seed, epoch, start + share.start + j))
                           for j, i in enumerate(piece[share])]
                    start += len(piece)
                first += len(block)
            self.position = DataPosition(epoch + 1, 0, global_batch)


# ---------------------------------------------------------------- datasets
class OnlineDataset(torch.utils.data.Dataset):
    """Decodes images each visit; the loop encodes them with the VAE and the captions with the LLM."""

    def __init__(self, records: list[Record], buckets: list[tuple[int, int]], config: DataConfig) -> None:
        self.records, self.buckets, self.config = records, buckets, config

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        record = self.records[index]
        choice = pick_text(record.captions, seed, self.config)
        try:
            sample = fit_to_bucket(decode_image(record.load()), self.buckets[index])
        except Exception as e:  # PIL raises many types for corrupt files
            return {"skip": image_failure(e), "key": record.key, "detail": describe(e)}
        return {"pixels": sample.pixels, "text": "" if choice < 0 else record.captions[choice],
                "original_size": sample.original_size, "crop_top_left": sample.crop_top_left,
                "seed": seed, "key": record.key}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks tensors; samples that failed to load are listed under "skipped" (and left out)."""
    good = [it for it in items if "skip" not in it]
    batch: dict[str, Any] = {"skipped": [(it["key"], it["skip"], it["detail"]) for it in items if "skip" in it]}
    if not good:
        return batch
    for name in good[0]:
        values = [it[name] for it in good]
        if name == "features":  # flexible mode: padded to the longest, the padding hidden by text_bias
            batch[name], bias = pad_batch(values)
            if bias is not None:
                batch["text_bias"] = bias
            continue
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


# ---------------------------------------------------------------- what the loop reads
class Data:
    """The dataset of a run plus what the loop needs besides: the empty prompt, the LLM if resident, the
    feature cache (a training.cache.FeatureCache) if used."""

    def __init__(self, dataset: torch.utils.data.Dataset, buckets: list[tuple[int, int]], empty: torch.Tensor,
                 llm: Any, skipped: SkipCounter, cache: Optional[Any]) -> None:
        self.dataset, self.buckets, self.empty, self.llm, self.skipped, self.cache = (
            dataset, buckets, empty, llm, skipped, cache)
        self.validation_prompts: Optional[list[torch.Tensor]] = None  # P tensors (L_i, D) once encoded
        self.runtime_skips = SkipCounter()  # this rank's samples that failed while training (no cache)

    def all_skips(self, dist: Dist) -> SkipCounter:
        """Collective: source/cache skips plus every rank's runtime skips."""
        total = SkipCounter()
        total.merge(self.skipped.to_dict())
        for part in dist.gather(self.runtime_skips.to_dict()):
            total.merge(part)
        return total

    @property
    def hidden_size(self) -> int:
        return int(self.empty.shape[-1])


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan

    def __iter__(self):  # yields lists of (index, seed, the data position after this batch)
        for items in self.plan:
            pos = (self.plan.position.epoch, self.plan.position.sample, self.plan.position.order_batch)
            yield [(i, s) + pos for i, s in items] or [(-1, 0) + pos]  # -1: this rank has none this time


class _WithPosition(torch.utils.data.Dataset):
    """Adds the data position after this batch to each item, so a checkpoint knows where to continue even
    when loader workers have prefetched further."""

    def __init__(self, inner: torch.utils.data.Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, item: tuple[int, ...]) -> dict[str, Any]:
        index, seed, *position = item
        if index < 0:
            return {"position": tuple(position)}
        return {**self.inner[(index, seed)], "position": tuple(position)}


def _collate_with_position(items: list[dict[str, Any]]) -> dict[str, Any]:
    position = items[0]["position"]
    batch = collate([{k: v for k, v in it.items() if k != "position"} for it in items if len(it) > 1])
    batch["position"] = DataPosition(*position)
    return batch

def make_loader(dataset: torch.utils.data.Dataset, plan: BatchPlan, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches in the plan's order; each carries the data position after it (for checkpoints)."""
    return torch.utils.data.DataLoader(_WithPosition(dataset), batch_sampler=_PlanSampler(plan),
                                       collate_fn=_collate_with_position, num_workers=num_workers)
