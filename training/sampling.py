"""Validation images: a plain DDIM loop in which the connector is called at every step's timestep, as in
the reference pipeline (the unconditional half uses the empty-prompt features)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ella_core import ELLA

from .features import pad_batch
from .models import Base, sdxl_time_ids


@torch.no_grad()
def sample(base: Base, ella: ELLA, prompts: Sequence[torch.Tensor], empty: torch.Tensor, *, steps: int,
           guidance_scale: float, height: int, width: int, seed: int) -> torch.Tensor:
    """prompts (P, L, D) or P tensors (L_i, D), empty (L, D) features -> images (P, 3, height, width) in [0, 1].
    Prompts of unequal lengths (flexible mode) are padded with a -inf text_bias (training.features)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    scheduler.set_timesteps(steps)
    device, dtype = base.unet.device, base.unet.dtype
    p = len(prompts)
    f = base.latent_scale
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(p, base.unet.config.in_channels, height // f, width // f, generator=generator)
    latents = (latents * scheduler.init_noise_sigma).to(device)
    features, text_bias = pad_batch([empty.to(prompts[0])] * p + list(prompts))  # (2P, L, D), (2P, L) or None
    features = features.to(device)
    added: Optional[dict[str, torch.Tensor]] = None
    time_ids = torch.tensor([sdxl_time_ids((height, width), (0, 0), (height, width))] * 2 * p, device=device)
    for t in scheduler.timesteps:
        context = ella(features, t.float().to(device), text_bias)  # (2P, N, W), the connector at this step's t
        if base.kind == "sdxl":
            added = {"text_embeds": ella.pooled(context).to(dtype), "time_ids": time_ids.to(dtype)}
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        out = base.unet(model_in.to(dtype), t.to(device), encoder_hidden_states=context.to(dtype),
                        added_cond_kwargs=added).sample.float()
        uncond, cond = out.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    return base.decode(latents).cpu()
