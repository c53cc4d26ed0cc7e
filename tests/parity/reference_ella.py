"""The ELLA authors' inference path (TencentQQGYLab/ELLA: model.py, inference.py), rewritten for the parity
test from reading it: nothing here imports `ella_core` or the pack, so a defect on our side cannot hide
in both worlds.

What the reference does, and what is rebuilt here:
- T5 text embedder: tokenizer with special tokens (EOS appended); fixed mode pads/truncates to
  `max_length` (128) and gives T5 the attention mask; flexible mode (max_length None) neither pads nor
  truncates. The encoder's last hidden state (padding positions included) is the feature.
- Connector: diffusers `Timesteps(time_channel, flip_sin_to_cos=True, downscale_freq_shift=0)` ->
  `TimestepEmbedding` (Linear, SiLU, Linear); a Perceiver resampler whose blocks use
  `torch.nn.MultiheadAttention` (batch_first) and LayerNorms without affine (eps 1e-6) modulated by the
  time embedding ([shift, scale] rows); squared-ReLU MLP. Weights load strictly from the released key names.
- Proxy UNet: at every UNet call the connector runs at the scheduler's own timestep on the embeds the
  pipeline passes (uncond first, then cond, as diffusers concatenates them); with flexible lengths each
  row is cut back to its own length before the connector (the reference's `flexible_max_length_workaround`).
- The pipeline: diffusers `StableDiffusionPipeline` with `prompt_embeds` and `negative_prompt_embeds`
  (the negative is the empty string, encoded the same way), `guidance_scale`, the scheduler under test,
  and the initial noise given as `latents=` (the pipeline multiplies it by `init_noise_sigma`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn


# ---------------------------------------------------------------------------------------------- connector
class RefAdaLN(nn.Module):
    def __init__(self, width: int, temb_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(temb_dim, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(torch.nn.functional.silu(temb)).view(len(h), 1, -1).chunk(2, dim=-1)
        return self.norm(h) * (1 + scale) + shift


class RefSquaredReLU(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(h) ** 2


class RefBlock(nn.Module):
    def __init__(self, width: int, heads: int, temb_dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), sq_relu=RefSquaredReLU(),
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_1, self.ln_2, self.ln_ff = (RefAdaLN(width, temb_dim) for _ in range(3))

    def forward(self, text: torch.Tensor, latents: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        q = self.ln_1(latents, temb)
        kv = torch.cat([q, self.ln_2(text, temb)], dim=1)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.mlp(self.ln_ff(latents, temb))


class RefResampler(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, num_latents: int, input_dim: int, temb_dim: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(num_latents, width))
        self.time_aware_linear = nn.Linear(temb_dim, width)
        self.proj_in = nn.Linear(input_dim, width)
        self.perceiver_blocks = nn.Sequential(*[RefBlock(width, heads, temb_dim) for _ in range(layers)])

    def forward(self, features: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        latents = self.latents[None].repeat(len(features), 1, 1) + self.time_aware_linear(
            torch.nn.functional.silu(temb))
        text = self.proj_in(features)
        for block in self.perceiver_blocks:
            latents = block(text, latents, temb)
        return latents


class RefConnector(nn.Module):
    """The reference ELLA module: (B, L, input_dim) features and timesteps -> (B, num_latents, width)."""

    def __init__(self, *, time_channel: int, time_embed_dim: int, width: int, layers: int, heads: int,
                 num_latents: int, input_dim: int) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.position = Timesteps(time_channel, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(in_channels=time_channel, time_embed_dim=time_embed_dim)
        self.connector = RefResampler(width, layers, heads, num_latents, input_dim, time_embed_dim)

    def forward(self, features: torch.Tensor, timesteps) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=features.device).reshape(-1)
        sinusoid = self.position(timesteps).to(features.device, features.dtype)[:, None]  # (1 or B, 1, C)
        temb = self.time_embedding(sinusoid.expand(len(features), -1, -1))
        return self.connector(features, temb)

    @classmethod
    def from_file(cls, path: Path, **config) -> "RefConnector":
        module = cls(**config)
        module.load_state_dict(load_file(str(path)), strict=True)
        return module.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- T5
class RefT5Embedder:
    """T5 encoder + tokenizer as the reference calls them; max_length None is the flexible mode."""

    def __init__(self, folder: Path) -> None:
        from transformers import T5EncoderModel, T5Tokenizer

        self.model = T5EncoderModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.tokenizer = T5Tokenizer.from_pretrained(str(folder))

    @torch.no_grad()
    def __call__(self, captions: list[str], max_length: Optional[int]) -> torch.Tensor:
        if max_length is None:
            tokens = self.tokenizer(captions, return_tensors="pt", add_special_tokens=True)
        else:
            tokens = self.tokenizer(captions, return_tensors="pt", add_special_tokens=True, max_length=max_length,
                                    padding="max_length", truncation=True)
        return self.model(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state


# ---------------------------------------------------------------------------------------------- UNet proxy
@dataclass
class UNetCall:
    t: torch.Tensor  # the timestep the UNet and the connector got
    x: torch.Tensor  # (B, 4, h, w) the UNet's input sample (rows: uncond then cond under CFG)
    context: torch.Tensor  # (B, N, W) the connector's output given to the UNet


class RefProxyUNet(nn.Module):
    """The diffusers UNet with the connector in front of its `encoder_hidden_states`, recording every call."""

    def __init__(self, connector: RefConnector, unet: nn.Module) -> None:
        super().__init__()
        self.ella, self.unet = connector, unet
        self.config, self.dtype, self.device = unet.config, unet.dtype, unet.device
        self.row_lengths: Optional[list[int]] = None  # flexible mode: each row's own token count
        self.calls: list[UNetCall] = []

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if self.row_lengths is None:
            context = self.ella(encoder_hidden_states, timestep)
        else:
            context = torch.cat([self.ella(encoder_hidden_states[i:i + 1, :n], timestep)
                                 for i, n in enumerate(self.row_lengths)])
        self.calls.append(UNetCall(torch.as_tensor(timestep).detach().float().reshape(-1).clone(),
                                   sample.detach().clone(), context.detach().clone()))
        return self.unet(sample, timestep, context, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- pipeline
@dataclass
class RefRun:
    latent: torch.Tensor  # (B, 4, h, w) final latent, in the UNet's (scaled) latent space
    sigmas: torch.Tensor  # the scheduler's sigmas, 0 appended where the scheduler ends at 0
    timesteps: torch.Tensor
    calls: list[UNetCall] = field(default_factory=list)


def first_unet_input_scale(scheduler, steps: int) -> float:
    """What the pipeline's first UNet input is, per unit of the `latents=` it was given.

    diffusers multiplies `latents` by `init_noise_sigma`, then `scale_model_input` divides by
    sqrt(sigma^2 + 1) (Euler-type, sigma space) or not at all (DDIM, DPM-Solver, alpha space). ComfyUI's
    first UNet input at the top of the schedule is the unit noise itself (x = noise * sqrt(1 + sigma_max^2),
    then divided by the same sqrt). These agree except for diffusers' Euler with "linspace"/"trailing"
    spacing, whose init_noise_sigma is sigma_max instead of sqrt(sigma_max^2 + 1) (docs/parity.md).
    """
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    one = torch.ones(1) * probe.init_noise_sigma
    return float(probe.scale_model_input(one, probe.timesteps[0]))


def run_reference(*, unet: nn.Module, connector: RefConnector, t5: RefT5Embedder, scheduler, prompt: str,
                  noise: torch.Tensor, steps: int, guidance_scale: float, max_length: Optional[int],
                  comfy_start: bool = True) -> RefRun:
    """One txt2img run of the reference pipeline (fixed mode: max_length 128; flexible: None) -> RefRun.

    noise: the unit-variance initial noise (B, 4, h, w); latents come out unscaled (output_type latent).
    comfy_start: give the pipeline `noise / first_unet_input_scale`, so its first UNet input is the noise
    itself, as in ComfyUI when the schedule starts at sigma_max; False passes `noise` as the diffusers docs
    do (Euler with trailing spacing then starts 0.23 % lower).
    """
    from diffusers import StableDiffusionPipeline

    proxy = RefProxyUNet(connector, unet)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.unet = proxy  # as the reference swaps its proxy in after building the pipeline
    pipe.set_progress_bar_config(disable=True)
    batch = noise.shape[0]
    positive = t5([prompt] * batch, max_length)
    negative = t5([""] * batch, max_length)
    if max_length is None:  # flexible: zero-pad both to one length, the proxy cuts each row back
        proxy.row_lengths = [negative.shape[1]] * batch + [positive.shape[1]] * batch
        longest = max(positive.shape[1], negative.shape[1])
        positive, negative = (torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e in (positive, negative))
    h, w = noise.shape[-2:]
    start = first_unet_input_scale(scheduler, steps)
    with torch.no_grad():
        latents = noise / start if comfy_start else noise.clone()
        out = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=steps,
                   guidance_scale=guidance_scale, latents=latents, height=8 * h, width=8 * w, output_type="latent",
                   return_dict=True)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:  # DDIM keeps alphas: sigma = sqrt((1 - a) / a) at each timestep, then the final alpha
        a = scheduler.alphas_cumprod
        alphas = torch.cat([a[scheduler.timesteps.long()], scheduler.final_alpha_cumprod.reshape(1)])
        sigmas = ((1 - alphas) / alphas).sqrt()
    return RefRun(out.images, sigmas.detach().float().clone(), scheduler.timesteps.detach().clone(), proxy.calls)
