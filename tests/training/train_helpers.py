"""Helpers of the trainer's tests: tiny real models, synthetic data sets, running the script.

Models: a diffusers UNet2DConditionModel + AutoencoderKL + DDPMScheduler saved as a diffusers folder (SD1.5
and SDXL layouts), and a tiny T5 encoder (random weights, ComfyUI's real T5 tokenizer).
Data: "a <colour> <shape>" captions that fully determine 32x32 images (the shape slightly jittered so
held-out images are new), written as an image folder, a JSONL and a CSV manifest and webdataset tars.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "training" / "train.py"
TINY_CONFIG = ROOT / "training" / "configs" / "tiny_cpu.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 40),
           "white": (240, 240, 240), "black": (10, 10, 10), "purple": (140, 40, 180), "cyan": (30, 210, 210)}


def synthetic_samples(n: int, seed: int, size: int = 32) -> list[tuple[str, Image.Image, list[str]]]:
    """Images filled with one colour named by the caption (brightness jittered, so held-out images are new).
    Two captions each: a short one and a longer "dense" one."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        jitter = rng.randint(-12, 12)
        rgb = tuple(int(np.clip(c + jitter, 0, 255)) for c in COLOURS[colour])
        captions = [f"a plain {colour} picture", f"a picture filled edge to edge with a flat {colour} colour"]
        out.append((f"img{i:04d}", Image.new("RGB", (size, size), rgb), captions))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, samples) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for key, image, captions in samples:
        image.save(root / f"{key}.png")
        (root / f"{key}.txt").write_text("\n".join(captions) + "\n")
    return root


def write_jsonl(root: Path, samples) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for key, image, captions in samples:
        image.save(root / "images" / f"{key}.png")
        lines.append(json.dumps({"image": f"images/{key}.png", "caption": captions[0], "dense": captions[1]}))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(root: Path, samples) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "dense"])
        for key, image, captions in samples:
            image.save(root / "images" / f"{key}.png")
            w.writerow([f"images/{key}.png", captions[0], captions[1]])
    return path


def write_tars(root: Path, samples, per_shard: int = 8) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(samples), per_shard):
        path = root / f"shard-{s // per_shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, image, captions in samples[s:s + per_shard]:
                for name, payload in ((f"{key}.png", png_bytes(image)), (f"{key}.txt", "\n".join(captions).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def tiny_unet_kwargs(sdxl: bool) -> dict:
    kwargs = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8)
    if sdxl:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=48)
    return kwargs


def build_diffusers_base(folder: Path, sdxl: bool = False, prediction_type: str = "epsilon") -> Path:
    """A tiny diffusers folder: unet/, vae/ (latent scale 4: 32 px -> 8x8 latents), scheduler/."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**tiny_unet_kwargs(sdxl)).save_pretrained(folder / "unet")
    # scaling_factor makes this random VAE's latents of the synthetic images about unit variance
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  norm_num_groups=8, sample_size=32, scaling_factor=3.5).save_pretrained(folder / "vae")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def build_tiny_t5(models_dir: Path) -> Path:
    """Random tiny T5 encoder (d_model 32) with ComfyUI's real T5 tokenizer, from the shared test support."""
    from devtools import tiny_models

    return tiny_models.write_tiny_t5(models_dir, "tiny-t5-d32", d_model=32)


def pretrain_text_reliant_unet(base: Path, t5: Path, out: Path, steps: int = 120) -> Path:
    """A base whose UNet has learned to use text: UNet and a throwaway connector trained jointly on the
    synthetic colours. A random frozen UNet barely reacts to its context, so no connector could show that
    it learned the captions; with this one, a newly trained connector must recover the UNet's text mapping."""
    import shutil

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from ella_core import ELLA, ELLAConfig, load_text_encoder
    from training.data import fit_to_bucket
    from training.models import vae_input

    shutil.copytree(base, out)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    vae = AutoencoderKL.from_pretrained(base / "vae")
    scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
    encoder = load_text_encoder(str(t5), dtype="fp32")
    samples = synthetic_samples(96, seed=5)
    with torch.no_grad():
        pixels = torch.stack([fit_to_bucket(image, (32, 32)).pixels for _, image, _ in samples])
        latents = vae.encode(vae_input(pixels, vae.device, vae.dtype)).latent_dist.mode()
        latents = latents * vae.config.scaling_factor  # (96, 4, 8, 8)
        features = encoder.encode([c[0] for _, _, c in samples], max_length=16).features
    torch.manual_seed(12345)  # unrelated to the seeds the tests give new connectors
    ella = ELLA(ELLAConfig(input_dim=features.shape[-1], width=32, layers=2, heads=4, num_latents=8,
                           time_channel=32, time_embed_dim=32))
    optimizer = torch.optim.AdamW(list(unet.parameters()) + list(ella.parameters()), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(samples), (32,), generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        pred = unet(scheduler.add_noise(latents[idx], noise, t), t,
                    encoder_hidden_states=ella(features[idx], t.float())).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.save_pretrained(out / "unet")
    return out


def python() -> str:
    """The interpreter the trainer's subprocesses run under: a warm stand-in for sys.executable that skips
    the ~8 s of library imports per process (tests/support/warm_python.py; ELLA_TEST_COLD_PYTHON=1: cold)."""
    from tests.support import warm_python

    return warm_python.interpreter()


def run_trainer(*overrides: str, config: Path = TINY_CONFIG, env: dict | None = None, timeout: int = 300,
                launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Runs training/train.py as a real script (optionally under a launcher such as torchrun)."""
    cmd = (launcher or [python()]) + [str(TRAIN_SCRIPT), "--config", str(config), *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
