"""Cache-pass throughput of the source side: images/s read, decoded and fitted to 512 px buckets with
data.num_workers = 0, 1, 2 loader workers (training/decoding.py), alone and with an encoder taking chunks
of 16 in the main process meanwhile (as the cache build does). Two encoders: a tiny VAE on the CPU (it
competes with the workers for the cores), and a stand-in for a GPU's encoders that waits as long per image
as decoding takes here with no workers and leaves the CPU free, as a GPU does: with one worker or more the
two should overlap, towards twice the 0-worker rate.

Synthetic photos-like data (smooth noise, JPEG q90 and PNG, 640x480 and 480x704), a folder with captions.

    python bench/bench_training.py --source [--source-images 96]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.cache import CHUNK  # noqa: E402 (the encoder chunk of the cache build)
from training.config import DataConfig  # noqa: E402
from training.data import make_buckets  # noqa: E402
from training.decoding import prepared_part  # noqa: E402
from training.models import vae_input  # noqa: E402


def _write_images(folder: Path, count: int, fmt: str) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = (640, 480) if i % 2 == 0 else (480, 704)
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)  # smooth: compresses like a photo
        image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        name = folder / f"img{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}"
        image.save(name, **({"quality": 90} if fmt == "jpeg" else {}))
        name.with_suffix(".txt").write_text(f"a synthetic picture number {i}\n")


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # four levels, as SD's VAE: 512 px -> 64x64 latents (three levels would put the mid-block attention on 128x128)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=8, sample_size=512).eval()


def _vae_encoder(vae) -> Callable[[list], None]:
    def encode(chunk: list) -> None:
        by_bucket: dict = {}
        for p in chunk:
            by_bucket.setdefault(p.bucket, []).append(p.sample.pixels)
        with torch.no_grad():
            for pixels in by_bucket.values():
                vae.encode(vae_input(torch.stack(pixels), vae.device, vae.dtype)).latent_dist.mode()
    return encode


def _device_stand_in(seconds: float) -> Callable[[list], None]:
    """A GPU's encoders as the host sees them: the main process waits `seconds` per image, the CPU is idle."""
    return lambda chunk: time.sleep(seconds * len(chunk))


def _rate(config: DataConfig, workers: int, encode: Optional[Callable[[list], None]]) -> float:
    """Images/s of one pass over the folder (the first item's start-up included)."""
    buckets = make_buckets(config.resolution, config.bucket_step, config.max_aspect, config.buckets)
    started, count, chunk = time.perf_counter(), 0, []
    for prepared in prepared_part(config, 0, 1, 0, buckets, workers, 2 * CHUNK):
        count += 1
        if encode is not None and prepared.sample is not None:
            chunk.append(prepared)
            if len(chunk) == CHUNK:
                encode(chunk)
                chunk = []
    if encode is not None and chunk:
        encode(chunk)
    return count / (time.perf_counter() - started)


def source_lines(images: int = 96, workers: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    """The measurement as printed lines."""
    lines = [f"cache pass, source side: {images} synthetic images at 512 px buckets, torch threads "
             f"{torch.get_num_threads()}, {len(os.sched_getaffinity(0))} CPU(s)"]
    vae = _vae_encoder(_tiny_vae())
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jpeg", "png"):
            folder = Path(tmp) / fmt
            folder.mkdir()
            _write_images(folder, images, fmt)
            config = DataConfig(format="folder", path=str(folder), resolution=512, bucket_step=64)
            alone = {w: _rate(config, w, None) for w in workers}
            per_image = 1.0 / alone[workers[0]]
            stand_in = _device_stand_in(per_image)
            rows = [("decode + resize", alone),
                    (f"+ GPU stand-in ({per_image * 1e3:.0f} ms/img)", {w: _rate(config, w, stand_in) for w in workers}),
                    ("+ tiny VAE on CPU", {w: _rate(config, w, vae) for w in workers})]
            for label, rates in rows:
                shown = ", ".join(f"{w} worker(s) {r:6.1f}" for w, r in rates.items())
                lines.append(f"  {fmt:<4} {label:<28} images/s: {shown}")
    return lines


if __name__ == "__main__":
    print("\n".join(source_lines()))
