"""Costs of the usability checks of a run's start: choosing the held-out split (a hash per sample key) and
listing a folder until one global batch is found before the cache pass (training.split).

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


if __name__ == "__main__":
    print("\n".join(measure()))
