"""A small generic epsilon-prediction loop for a diffusers UNet2DConditionModel on cached latents, and the
DDIM sampler every method of the benchmark shares (context given per step, so ELLA arms call the connector
at each step's t). Used by the base (stage 4) and the upper bound (stage 7)."""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Context = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]  # (B, L, D) or t -> (B, L, D)


def make_scheduler(num_train_timesteps: int) -> Any:
    """The base's noise schedule: DDPM's linear betas (suited to small images), epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon", clip_sample=False)


def train_unet(unet: Any, context_fn: Callable[[list[str]], torch.Tensor], latents: torch.Tensor,
               captions: Sequence[Union[str, Sequence[str]]], steps: int, batch: int, lr: float, seed: int,
               trainable: Optional[Iterable[torch.nn.Parameter]] = None, *, scheduler: Any = None,
               caption_dropout: float = 0.1, warmup: int = 0, ema: float = 0.0, min_snr_gamma: float = 0.0,
               progress: Callable[[str], None] = print, log_every: int = 0) -> dict[str, Any]:
    """Train `trainable` (default: the UNet's parameters) to predict the noise added to `latents` (N, C, h, w),
    conditioned on `context_fn(captions of the batch)`; a caption is replaced by "" with probability
    `caption_dropout` (for CFG). With `ema` > 0 the parameters end as their exponential moving average. With
    `min_snr_gamma` > 0 each sample's loss is weighted min(SNR, gamma) / SNR (Hang et al. 2023): the nearly
    clean timesteps, which teach fine detail, stop dominating the gradient of the layout and colours.
    Returns figures: first/last logged losses and seconds per step."""
    import time

    params = list(trainable if trainable is not None else unet.parameters())
    scheduler = scheduler or make_scheduler(1000)
    gen = torch.Generator().manual_seed(seed)
    pick = random.Random(seed)
    alphas = scheduler.alphas_cumprod.float()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, steps)))) * 0.9 + 0.1)
    shadow = [p.detach().clone() for p in params] if ema > 0 else None
    log_every = log_every or max(1, steps // 10)
    unet.train()
    losses, window, t0 = [], [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        texts = [_one(captions[i], pick) if pick.random() >= caption_dropout else "" for i in idx.tolist()]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = noised(scheduler, x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=context_fn(texts)).sample
        loss = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma > 0:
            snr = alphas[t] / (1 - alphas[t])  # the noise level noised() applied
            loss = loss * snr.clamp(max=min_snr_gamma) / snr
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if shadow is not None:
            decay = min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(shadow, [p.detach() for p in params], 1 - decay)
        window.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses.append(float(torch.stack(window).mean()))
            window = []
            progress(f"step {step + 1}/{steps} loss {losses[-1]:.4f} ({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    if shadow is not None:
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
    unet.eval()
    return {"steps": steps, "batch": batch, "losses": losses, "seconds_per_step": (time.perf_counter() - t0) / max(1, steps)}


def noised(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The forward process the base was trained with: sqrt(a_t) x0 + sqrt(1 - a_t) noise (a: alphas_cumprod);
    x0, noise (B, C, h, w), t (B,) integer timesteps."""
    a = scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _one(caption: Union[str, Sequence[str]], pick: random.Random) -> str:
    return caption if isinstance(caption, str) else caption[pick.randrange(len(caption))]


def _at(context: Context, t: torch.Tensor) -> torch.Tensor:
    return context(t) if callable(context) else context


@torch.no_grad()
def sample(unet: Any, scheduler: Any, context: Context, uncond_context_or_fn: Optional[Context], steps: int,
           guidance: float, seed: Union[int, Sequence[int]]) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance -> latents (B, C, h, w) in the UNet's (scaled) latent space.

    context: (B, L, D), or a function of the step's timestep t (0-d tensor) returning it (an ELLA connector at
    each step's t); uncond_context_or_fn the same for the unconditional half ((1, L, D) is broadcast), or None
    for no guidance. seed: one int for the batch, or one per sample (so a prompt's noise does not depend on
    its batch). The same seeds give every method the same starting noise."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(steps)
    device, dtype = unet.device, unet.dtype
    first = _at(context, ddim.timesteps[0])
    b = first.shape[0]
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size) if isinstance(size, int) else (unet.config.in_channels, *size)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if isinstance(seed, int):
        latents = torch.randn((b, *shape), generator=torch.Generator().manual_seed(seed))
    else:
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for a batch of {b} contexts")
        latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    latents = latents.to(device) * ddim.init_noise_sigma
    guided = uncond_context_or_fn is not None and guidance != 1.0
    for i, t in enumerate(ddim.timesteps):
        cond = first if i == 0 else _at(context, t)
        if guided:
            uncond = _at(uncond_context_or_fn, t).expand(b, -1, -1)
            ctx = torch.cat([uncond.to(cond), cond])
            eps_u, eps_c = unet(torch.cat([latents, latents]).to(dtype), t.to(device),
                                encoder_hidden_states=ctx.to(device, dtype)).sample.float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = unet(latents.to(dtype), t.to(device), encoder_hidden_states=cond.to(device, dtype)).sample.float()
        latents = ddim.step(eps, t, latents).prev_sample
    return latents
