"""Stage 2, the VAE: a tiny diffusers `AutoencoderKL` (f=2: 32 px -> 16x16x4 latents) trained on the world's
training renders, its `shift_factor` and `scaling_factor` set so the scaled latents have zero mean and unit
std (training/models.py applies both, as diffusers does for SD3/Flux VAEs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.alignment import stage_io, world

SETTINGS = ("vae_channels", "vae_latent_channels", "vae_steps", "vae_batch", "vae_lr", "vae_kl_weight",
            "vae_eval_images")


def make_vae(profile: Any) -> Any:
    from diffusers import AutoencoderKL

    channels = tuple(profile.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                         layers_per_block=1, latent_channels=profile.vae_latent_channels,
                         norm_num_groups=min(8, channels[0]), sample_size=profile.image_size)


def load_images(paths: list[Path]) -> torch.Tensor:
    """PNG files -> (N, 3, H, W) float in [0, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def folder_images(folder: Path) -> torch.Tensor:
    return load_images([path for path, _, _ in world.load_scenes(folder)])


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> scaled latents (N, C, H/f, W/f): the posterior's mode (deterministic)."""
    out = [vae.encode(x * 2 - 1).latent_dist.mode() for x in images.split(batch)]
    return (torch.cat(out) - _shift(vae)) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latents -> images (N, 3, H, W) in [0, 1]."""
    out = [vae.decode(z / vae.config.scaling_factor + _shift(vae)).sample for z in latents.split(batch)]
    return (torch.cat(out).float() / 2 + 0.5).clamp(0, 1)


def _shift(vae: Any) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


def round_trip(vae: Any, images: torch.Tensor) -> torch.Tensor:
    return decode(vae, encode(vae, images))


def train_vae(vae: Any, images: torch.Tensor, profile: Any, progress: Any) -> list[float]:
    """MSE in [-1, 1] plus a small KL term, Adam with a cosine decay; returns the logged losses."""
    gen = torch.Generator().manual_seed(profile.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=profile.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / profile.vae_steps)))
    vae.train()
    losses = []
    log_every = max(1, profile.vae_steps // 10)
    for step in range(profile.vae_steps):
        x = images[torch.randint(len(images), (profile.vae_batch,), generator=gen)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x) + profile.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            losses.append(loss.item())
            progress(f"step {step + 1}/{profile.vae_steps} loss {losses[-1]:.5f}")
    return losses


def load_vae(workdir: Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(Path(workdir) / "vae" / "vae").eval().requires_grad_(False)


def build(workdir: Path, profile: Any) -> dict[str, Any]:
    """Stage 2: `<workdir>/vae/vae/` (diffusers AutoencoderKL folder); figures: reconstruction MSE (pixels in
    [0, 1]) on training and test renders, latent shape and scaling factor."""
    workdir = Path(workdir)
    stage = workdir / "vae"
    settings = {"world": stage_io.settings_of(workdir / "world"), **profile.settings(*SETTINGS)}
    if (figures := stage_io.cached(stage, settings)) is not None:
        return figures
    progress = stage_io.begin(stage, profile, seed=True)
    train = folder_images(workdir / "world" / "train")
    test = torch.cat([folder_images(workdir / "world" / s) for s in ("test_seen", "test_heldout")])
    vae = make_vae(profile)
    losses = train_vae(vae, train, profile, progress)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        raw = torch.cat([vae.encode(x * 2 - 1).latent_dist.mode() for x in train[: profile.vae_eval_images * 4].split(256)])
        vae.register_to_config(shift_factor=float(raw.mean()), scaling_factor=float(1 / raw.std()))
        figures = {"steps": profile.vae_steps, "final_loss": losses[-1], "latent_shape": list(raw.shape[1:]),
                   "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor}
        n = profile.vae_eval_images
        for name, images in (("train", train[:n]), ("test", test[:n])):
            figures[f"recon_mse_{name}"] = float(F.mse_loss(round_trip(vae, images), images))
    vae.save_pretrained(stage / "vae", safe_serialization=True)
    figures["seconds"] = round(progress.elapsed, 1)
    progress(f"recon MSE test {figures['recon_mse_test']:.5f}, scaling factor {vae.config.scaling_factor:.3f}")
    return stage_io.finish(stage, settings, figures)
