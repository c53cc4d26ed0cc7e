"""Training data: where samples come from, how captions are picked, how images fit aspect-ratio buckets,
and the order samples are visited in.

Sources: an image folder with same-named .txt captions (one caption per line), a JSONL or CSV manifest,
or webdataset tar shards (local paths or URLs). Anything unreadable is skipped and counted, never fatal.

Determinism: every sample visit gets its own seed from (run seed, epoch, position in the epoch). Caption
choice, caption dropout, timestep and noise all derive from it, so a resumed run and a run split over
several processes see exactly the samples and noise an uninterrupted single-process run sees.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .config import DataConfig

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ---------------------------------------------------------------- skipped samples
@dataclass
class SkipCounter:
    """Counts skipped samples by reason and keeps a few examples for the log."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: dict[str, Any]) -> None:
        self.counts.update(other.get("counts", {}))
        self.examples.extend(other.get("examples", [])[: max(0, 20 - len(self.examples))])

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": self.examples}


# ---------------------------------------------------------------- records
@dataclass
class Record:
    """One image and its captions. `load` returns the image bytes (or raises)."""

    key: str
    captions: list[str]
    load: Callable[[], bytes]
    size: Optional[tuple[int, int]] = None  # (height, width), when known without decoding


def _clean_captions(values: Sequence[Any]) -> list[str]:
    """Non-empty stripped strings from strings and (nested) lists; None and other types are ignored."""
    out: list[str] = []
    for value in values:
        if isinstance(value, str) and value.strip():
            out.append(value.strip())
        elif isinstance(value, (list, tuple)):
            out.extend(_clean_captions(value))
    return out


def _caption_lines(text: str) -> list[str]:
    """A caption text file: one caption per non-empty line (e.g. a short one, then a dense one)."""
    return _clean_captions(text.splitlines())


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _file_loader(path: Path) -> Callable[[], bytes]:
    return functools.partial(_read_bytes, path)  # picklable, for DataLoader workers started by spawn


def detect_format(path: str) -> str:
    p = str(path)
    if p.endswith(".jsonl"):
        return "jsonl"
    if p.endswith(".csv"):
        return "csv"
    if ".tar" in p or p.startswith(("http://", "https://", "pipe:")):
        return "webdataset"
    if Path(p).is_dir() and any(Path(p).glob("*.tar")):
        return "webdataset"  # a folder of shards
    if Path(p).is_dir():
        return "folder"
    raise ValueError(f"data.path {p!r}: cannot tell its format; set data.format to folder, jsonl, csv or webdataset")


def folder_records(root: Path, skips: SkipCounter) -> list[Record]:
    """Images under `root` (recursive) with captions in `<same name>.txt`, one caption per line."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {root} is not a folder")
    records = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            skips.add("missing caption file", str(image))
            continue
        try:
            captions = _caption_lines(txt.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            skips.add(f"unreadable caption ({type(e).__name__})", str(txt))
            continue
        if not captions:
            skips.add("empty caption", str(txt))
            continue
        records.append(Record(str(image.relative_to(root)), captions, _file_loader(image)))
    return records


def _row_record(row: dict[str, Any], base: Path, config: DataConfig, where: str, skips: SkipCounter) -> Optional[Record]:
    image = row.get(config.image_column)
    if not image:
        skips.add(f"no {config.image_column!r} field", where)
        return None
    captions = _clean_captions([row.get(c) for c in config.caption_columns if row.get(c) is not None])
    if not captions:
        skips.add(f"no caption in {config.caption_columns}", where)
        return None
    path = Path(image) if Path(image).is_absolute() else base / image
    return Record(str(image), captions, _file_loader(path))


def jsonl_records(path: Path, config: DataConfig, skips: SkipCounter) -> list[Record]:
    """One JSON object per line: {"image": "a.jpg", "caption": "..." or [...], ...}; paths relative to the file."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skips.add(f"invalid JSON ({e.msg})", f"{path}:{n}")
                continue
            if not isinstance(row, dict):
                skips.add("line is not a JSON object", f"{path}:{n}")
                continue
            record = _row_record(row, path.parent, config, f"{path}:{n}", skips)
            if record:
                records.append(record)
    return records


def csv_records(path: Path, config: DataConfig, skips: SkipCounter) -> list[Record]:
    """A header row naming the image column and caption column(s); paths relative to the file."""
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in [config.image_column] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r}; its columns are {reader.fieldnames}")
        for n, row in enumerate(reader, 2):
            record = _row_record(row, path.parent, config, f"{path}:{n}", skips)
            if record:
                records.append(record)
    return records


def _tar_urls(path: Any) -> list[str]:
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


def webdataset_records(path: Any, config: DataConfig, skips: SkipCounter) -> Iterator[Record]:
    """Streams samples from tar shards (local or URLs, through webdataset). Images: jpg/png/webp; captions:
    `.txt` (one per line) or `.json` fields named by data.caption_columns."""
    import webdataset as wds

    def on_error(exn: Exception) -> bool:
        skips.add(f"unreadable shard data ({type(exn).__name__}: {exn})", "webdataset")
        return True  # keep going

    stream = wds.WebDataset(_tar_urls(path), shardshuffle=False, handler=on_error, empty_check=False)
    for sample in stream:
        key = f"{sample.get('__url__', '')}#{sample.get('__key__', '?')}"
        image_ext = next((e.lstrip(".") for e in IMAGE_EXTS if e.lstrip(".") in sample), None)
        if image_ext is None:
            skips.add("no image in sample", key)
            continue
        captions: list[str] = []
        try:
            if "txt" in sample:
                captions = _caption_lines(sample["txt"].decode("utf-8"))
            if not captions and "json" in sample:
                meta = json.loads(sample["json"])
                captions = _clean_captions([meta.get(c) for c in config.caption_columns if meta.get(c) is not None])
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            skips.add(f"unreadable caption ({type(e).__name__})", key)
            continue
        if not captions:
            skips.add("missing caption", key)
            continue
        data = sample[image_ext]
        yield Record(key, captions, lambda data=data: data)


def indexable_records(config: DataConfig, skips: SkipCounter) -> list[Record]:
    fmt = config.format if config.format != "auto" else detect_format(config.path)
    path = Path(config.path)
    if fmt == "folder":
        return folder_records(path, skips)
    if fmt in ("jsonl", "csv"):
        if not path.is_file():
            raise FileNotFoundError(f"data.path {path}: manifest not found")
        return jsonl_records(path, config, skips) if fmt == "jsonl" else csv_records(path, config, skips)
    raise ValueError("webdataset shards are streamed, not indexed: keep cache.enabled=true so they are read once "
                     "into the feature cache")


def stream_records(config: DataConfig, skips: SkipCounter) -> Iterator[Record]:
    """Every record of any format, in source order."""
    fmt = config.format if config.format != "auto" else detect_format(config.path)
    if fmt == "webdataset":
        yield from webdataset_records(config.path, config, skips)
    else:
        yield from indexable_records(config, skips)


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
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # SDXL conditioning


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so truncated files fail here
    return image.convert("RGB")


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> ImageSample:
    """Resize to cover the bucket (keeping aspect), centre-crop to it, scale to [-1, 1]."""
    bh, bw = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resized = image.resize((rw, rh), Image.BICUBIC)
    top, left = (rh - bh) // 2, (rw - bw) // 2
    cropped = resized.crop((left, top, left + bw, top + bh))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
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
def epoch_batches(buckets: Sequence[tuple[int, int]], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample indices grouped into global micro-batches, each from a single bucket, in a seeded order.

    `buckets[i]` is sample i's bucket. Incomplete batches at the end of a bucket are dropped this epoch
    (they come in other orders next epoch).
    """
    rng = random.Random(f"{seed}/{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(tuple(bucket), []).append(index)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches.extend(indices[i:i + global_batch] for i in range(0, len(indices) - global_batch + 1, global_batch))
    rng.shuffle(batches)
    return batches


@dataclass
class DataPosition:
    """Where the data stream is: the epoch and the next global micro-batch within it."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


class BatchPlan:
    """Endless stream of this rank's micro-batches: lists of (sample index, position seed)."""

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, world: int, rank: int, seed: int,
                 position: Optional[DataPosition] = None) -> None:
        self.buckets, self.batch_size, self.world, self.rank, self.seed = list(buckets), batch_size, world, rank, seed
        self.position = position or DataPosition()
        global_batch = batch_size * world
        if not epoch_batches(self.buckets, global_batch, seed, 0):
            counts = Counter(tuple(b) for b in self.buckets)
            raise ValueError(
                f"no bucket holds a full global batch of {global_batch} samples (batch_size {batch_size} x "
                f"{world} processes); bucket sizes: {dict(counts)}. Lower train.batch_size, add data, or set "
                "data.buckets=false")

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world
        while True:
            batches = epoch_batches(self.buckets, global_batch, self.seed, self.position.epoch)
            while self.position.batch < len(batches):
                b = self.position.batch
                chunk = batches[b][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                first = b * global_batch + self.rank * self.batch_size
                self.position.batch += 1
                yield [(i, sample_seed(self.seed, self.position.epoch, first + j)) for j, i in enumerate(chunk)]
            self.position = DataPosition(self.position.epoch + 1, 0)


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
            return {"skip": f"unreadable image ({type(e).__name__}: {e})", "key": record.key}
        return {"pixels": sample.pixels, "text": "" if choice < 0 else record.captions[choice],
                "original_size": sample.original_size, "crop_top_left": sample.crop_top_left,
                "seed": seed, "key": record.key}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks tensors; samples that failed to load are listed under "skipped" (and left out)."""
    good = [it for it in items if "skip" not in it]
    batch: dict[str, Any] = {"skipped": [(it["key"], it["skip"]) for it in items if "skip" in it]}
    if not good:
        return batch
    for name in good[0]:
        values = [it[name] for it in good]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
