"""Costs of the usability checks of a run's start: choosing the held-out split (a hash per sample key),
reading the keys of a cached run from its index (one row at a time before, one pass over the entries files
now), and listing a folder until one global batch is found before the cache pass (training.split).

    python bench/bench_training.py --split
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(keys: tuple[int, ...] = (100_000, 1_000_000), folder_images: int = 2000) -> list[str]:
    """Printed lines: split time per key count; listing time of a folder, stopping early vs to the end."""
    from PIL import Image

    from training.config import load_config
    from training.split import check_source_size, split_holdout

    lines = []
    for n in keys:
        names = [f"shard-{i // 10000:05d}.tar#sample{i:09d}" for i in range(n)]
        start = time.perf_counter()
        split_holdout(names, 0.01, seed=0)
        lines.append(f"split_holdout: {n:>9,} keys, 1 % held out: {time.perf_counter() - start:.2f} s")
    lines.extend(index_keys())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        Image.new("RGB", (8, 8)).save(root / "proto.png")
        data = (root / "proto.png").read_bytes()
        for i in range(folder_images):
            (root / f"{i:06d}.png").write_bytes(data)
            (root / f"{i:06d}.txt").write_text("a caption\n")
        (root / "proto.png").unlink()
        base = ["model.pretrained=org/base", "llm.source=org/llm", f"data.path={root}"]
        for label, batch in (("stops at one batch (8)", 8), ("lists to the end", folder_images)):
            config = load_config(None, base + [f"train.batch_size={batch}"])
            start = time.perf_counter()
            check_source_size(config, world=1)
            lines.append(f"check_source_size: folder of {folder_images} images, {label}: "
                         f"{time.perf_counter() - start:.3f} s")
    return lines


def index_keys(rows: int = 100_000, world: int = 2) -> list[str]:
    """Printed lines: a cached run's held-out keys from a synthetic v3 index of `rows` rows over `world` ranks
    (two ~130-character captions each), per row (before: locate + pread + JSON per row) against one pass."""
    from training.cache_index import CacheIndex, RankIndexWriter, record_rows, row_entry

    caption = "a photograph of a red bicycle leaning against a blue wall in the afternoon sun, long shadows " \
              "on the cobblestones and a cat"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        writers = [RankIndexWriter(folder, r) for r in range(world)]
        for start in range(0, rows, 256):
            entries = [{"ordinal": i, "slot": i - start, "bucket": [512, 512], "captions": [caption, caption],
                        "original_size": [512, 512], "crop_top_left": [0, 0],
                        "key": f"shard-{i // 10000:05d}.tar#sample{i:09d}"} for i in range(start, min(rows, start + 256))]
            writers[(start // 256) % world].append(record_rows(entries, start // 256 // world),
                                                   [{"key": e["key"], "captions": e["captions"]} for e in entries])
        counts = [w.rows for w in writers]
        index = CacheIndex(folder, counts)
        def entry_key(i: int) -> str:  # what FeatureCache.entry(i) did for the split before
            rank, row = index.locate(i)
            return row_entry(rank, row, index.text(rank, row))["key"]

        start = time.perf_counter()
        before = [entry_key(i) for i in range(len(index))]
        per_row = time.perf_counter() - start
        index.close()
        index = CacheIndex(folder, counts)
        start = time.perf_counter()
        after = index.keys()
        one_pass = time.perf_counter() - start
        assert after == before
        index.close()
    return [f"held-out keys of a cached run, {rows:,} rows over {world} ranks (page cache warm): "
            f"per row {per_row:.2f} s, one pass over the entries files {one_pass:.2f} s "
            f"({per_row / max(one_pass, 1e-9):.1f}x)"]


if __name__ == "__main__":
    print("\n".join(measure()))
