"""Feature-cache storage: bytes per sample on disk and index memory per million samples, before vs after.

Bytes: real shards written by the trainer's own shard writer (training.cache._ShardWriter) at the released
shapes: flan-t5-xl features 2048 wide x 128 tokens, SD1.5 512 px latents (4 x 64 x 64). "before" is the
version-2 layout (features always fp32); "after" stores them in the LLM's dtype (fp16), flexible mode only
the caption's own tokens. Index: `n` synthetic rows written by training.cache_index and opened with
CacheIndex, against the version-2 index.json (a JSON list of every entry, loaded by every process), each in
a fresh child process; RSS deltas scaled per million samples.

    python bench/bench_training.py --cache-storage      (or: python bench/training_cache.py [--rows 200000])
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAIRS = 34_000_000  # the paper's training set
KEY = "/data/laion-cc-sbu/shard-{:05d}.tar#{:09d}"
CAPTION = ("A photograph of a small wooden table by a window, with a blue ceramic teapot, two cups and a plate of "
           "lemon cake, warm afternoon light")  # about 130 characters


def _rss(kind: str = "VmRSS") -> int:
    """Resident bytes: VmRSS (all), RssAnon (private memory), RssFile (mapped file pages: page cache)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(kind + ":"))


def _in_child(work: Callable[[], dict], *args) -> dict:
    """Runs work(*args) in a forked child; returns its dict (RSS figures are the child's own)."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=lambda: queue.put(work(*args)))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def _shard_bytes(folder: Path, feature_dtype, latent_dtype, lengths: list[int]) -> float:
    """Bytes per sample of one real shard of len(lengths) samples (one caption each)."""
    import torch

    from training.cache import _ShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(folder, 0, 1, len(lengths))
    for i, n in enumerate(lengths):
        entry = {"ordinal": i, "key": KEY.format(0, i), "bucket": [512, 512], "captions": [CAPTION],
                 "original_size": [768, 1024], "crop_top_left": [0, 128]}
        writer.add(entry, torch.randn(4, 64, 64).to(latent_dtype), [torch.randn(n, 2048).to(feature_dtype)])
    writer.flush(len(lengths) - 1)
    return (folder / writer.shard_name(0)).stat().st_size / len(lengths)


def _synthetic_rows(folder: Path, rows: int, world: int = 2) -> list[int]:
    from training.cache_index import RankIndexWriter, record_rows

    writers = [RankIndexWriter(folder, r) for r in range(world)]
    for start in range(0, rows, 4096):
        block = range(start, min(rows, start + 4096))
        for r, writer in enumerate(writers):
            mine = [i for i in block if i % world == r]
            entries = [{"ordinal": i, "slot": k % 256, "bucket": [512, 512], "key": KEY.format(i // 10000, i),
                        "captions": [CAPTION, CAPTION[:60]], "original_size": [768, 1024], "crop_top_left": [0, 128]}
                       for k, i in enumerate(mine)]
            writer.append(record_rows(entries, start // 256), [{"key": e["key"], "captions": e["captions"]}
                                                              for e in entries])
    return [w.rows for w in writers]


def _open_new(folder: str, counts: list[int]) -> dict:
    before = _rss()
    from training.cache_index import CacheIndex  # imported before measuring: numpy is already loaded

    start, start_file = _rss("RssAnon"), _rss("RssFile")
    index = CacheIndex(Path(folder), counts)
    buckets = index.buckets()
    opened, opened_file = _rss("RssAnon"), _rss("RssFile")
    for i in range(0, len(index), 97):  # touch rows all over the files (pages mapped in)
        index.locate(i)
    return {"open": opened - start, "file": opened_file - start_file, "touched": _rss("RssAnon") - start,
            "import": start - before, "n": len(buckets)}


def _open_old(path: str) -> dict:
    start = _rss()
    entries = json.loads(Path(path).read_text())["entries"]
    buckets = [tuple(e["bucket"]) for e in entries]  # what FeatureCache.buckets built from it
    return {"open": _rss() - start, "n": len(buckets)}


def report(rows: int = 200_000) -> list[str]:
    import torch

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        f32, f16 = torch.float32, torch.float16
        shapes = {
            "v2, features fp32 x 128, latents fp32": _shard_bytes(root / "a", f32, f32, [128] * 8),
            "v3 fixed, features fp16 x 128, latents fp32": _shard_bytes(root / "b", f16, f32, [128] * 8),
            "v3 fixed, features fp16 x 128, latents fp16": _shard_bytes(root / "c", f16, f16, [128] * 8),
            "v3 flexible, 40 tokens on average, latents fp16": _shard_bytes(root / "d", f16, f16, [20, 60] * 4),
        }
        lines.append("cache bytes per sample (one caption; T5-XL 2048 wide, SD1.5 512 px latents 4x64x64), "
                     "real shards incl. headers:")
        for name, size in shapes.items():
            lines.append(f"  {name:<50} {size:12,.0f} B   {PAIRS / 1e6:.0f} M pairs: {size * PAIRS / 1e12:6.1f} TB")
        v2, v3 = shapes["v2, features fp32 x 128, latents fp32"], shapes["v3 fixed, features fp16 x 128, latents fp16"]
        lines.append(f"  two captions per pair: v2 {(v2 + 128 * 2048 * 4) * PAIRS / 1e12:.1f} TB, v3 fixed with fp16 "
                     f"latents {(v3 + 128 * 2048 * 2) * PAIRS / 1e12:.1f} TB")

        folder = root / "index"
        folder.mkdir()
        counts = _synthetic_rows(folder, rows)
        disk = sum(p.stat().st_size for p in folder.iterdir())
        new = _in_child(_open_new, str(folder), counts)
        old_path = root / "index.json"
        old_entries = [{"ordinal": i, "key": KEY.format(i // 10000, i), "bucket": [512, 512],
                        "captions": [CAPTION, CAPTION[:60]], "original_size": [768, 1024], "crop_top_left": [0, 128],
                        "shard": f"r{i % 2}-{i // 512:05d}.safetensors", "slot": i % 256} for i in range(rows)]
        old_path.write_text(json.dumps({"entries": old_entries, "skipped": {}}))
        del old_entries
        old = _in_child(_open_old, str(old_path))
        old_disk = old_path.stat().st_size
    scale = 1e6 / rows
    lines.append(f"cache index, {rows:,} synthetic samples (2 captions, ~{len(CAPTION)}-char captions), per million "
                 f"samples and for {PAIRS / 1e6:.0f} M:")
    lines.append(f"  v2 index.json: file {old_disk * scale / 1e6:8.1f} MB/M "
                 f"({old_disk * PAIRS / rows / 1e9:6.1f} GB); RSS after loading {old['open'] * scale / 1e6:8.1f} MB/M ({old['open'] * PAIRS / rows / 1e9:6.1f} GB) "
                 "in every process")
    lines.append(f"  v3 index files: file {disk * scale / 1e6:8.1f} MB/M ({disk * PAIRS / rows / 1e9:6.1f} GB); "
                 f"private RSS after opening {new['open'] * scale / 1e6:6.1f} MB/M "
                 f"({new['open'] * PAIRS / rows / 1e9:5.2f} GB), {new['touched'] * scale / 1e6:6.1f} MB/M after "
                 f"reading rows all over; plus {new['file'] * scale / 1e6:.1f} MB/M of mapped index pages (page cache, shared "
                 "by a node's processes, reclaimable)")
    return lines


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    print("\n".join(report(parser.parse_args().rows)))
