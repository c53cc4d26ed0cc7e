"""The models of a run: the frozen base (UNet, VAE, noise schedule), the frozen LLM, the trainable connector.

Bases load with diffusers from a diffusers folder, a hub id, or a single-file checkpoint as ComfyUI users
keep them (`from_single_file`, which needs the base's diffusers config: online, or `model.single_file_config`).
Only the connector has gradients; everything else is frozen, in eval mode, in the compute dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ella_core import ELLA, ELLAConfig, load_ella
from ella_core.dtypes import ALIASES, NAMES, canonical_name

from .config import ConnectorConfig, LLMConfig, ModelConfig
from .errors import TrainingError

log = logging.getLogger("training")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# UNet, VAE and latent-cache dtypes: the names of the one dtype table (ella_core.dtypes) that compute (fp8 only
# stores LLM weights). The config schema mirrors these names without importing torch (a test keeps them equal).
DTYPES = {name: NAMES[canonical_name(name)] for name in (*NAMES, *ALIASES) if NAMES[canonical_name(name)].itemsize > 1}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# uint8 -> [-1, 1] as a lookup table computed once in float32 on the host: the same 256 values on every device
# (a device's `x / 127.5` may round differently), so latents cached on one machine match online ones on another.
_PIXEL_VALUES = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0


def vae_input(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The VAE's input on `device`: uint8 pixels are sent as bytes (a quarter of float's traffic) and scaled
    there; float pixels are taken as already in [-1, 1]."""
    if pixels.dtype != torch.uint8:
        return pixels.to(device, dtype)
    return _PIXEL_VALUES.to(device)[pixels.to(device).long()].to(dtype)


@dataclass
class Base:
    """The frozen diffusion model and what the loop needs to know about it."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    scheduler: Any  # diffusers DDPMScheduler (training noise schedule)
    kind: str  # "sd15" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> Optional[int]:
        """SDXL: width of the pooled text embedding inside `add_embedding` (total minus 6 size/crop embeddings)."""
        if self.kind != "sdxl":
            return None
        cfg = self.unet.config
        return int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)

    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 (or float already in [-1, 1]) -> scaled latents (B, C, H/f, W/f): the
        distribution's mean (deterministic, so cached and online latents agree)."""
        latents = self.vae.encode(vae_input(pixels, self.vae.device, self.vae.dtype)).latent_dist.mode()
        return self.scale_latents(latents)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents.float() - shift) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [0, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return (self.vae.decode(latents.to(self.vae.device, self.vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)


def sdxl_time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> list[float]:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return [float(original[0]), float(original[1]), float(crop[0]), float(crop[1]), float(target[0]), float(target[1])]


def _detect_kind(unet: Any, requested: str) -> str:
    is_xl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    kind = "sdxl" if is_xl else "sd15"
    if requested != "auto" and requested != kind:
        raise TrainingError(f"model.base={requested} but the UNet is an {kind} UNet "
                         f"(addition_embed_type={getattr(unet.config, 'addition_embed_type', None)!r}); "
                         "fix model.base or model.pretrained")
    return kind


def load_base(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Base:
    """UNet, VAE and noise schedule from a diffusers folder, a hub id or a single-file checkpoint."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    vae_dtype = parse_dtype(config.vae_dtype) if config.vae_dtype else dtype
    source = config.pretrained
    if not source:
        raise TrainingError("model.pretrained is empty: set a diffusers folder, a hub id or a single-file checkpoint")
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise TrainingError(f"model.pretrained {source} does not exist")
    source = str(Path(source).expanduser()) if source.startswith("~") else source
    single = Path(source).is_file() and Path(source).suffix in SINGLE_FILE_SUFFIXES
    if single:
        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        unet_kwargs, vae_kwargs = dict(kwargs), {"torch_dtype": vae_dtype}
        if config.single_file_config:
            # `config` is the pipeline's root (folder or hub id); diffusers reads `<config>/<subfolder>/config.json`
            # and, given `config`, does not add the component's subfolder itself
            unet_kwargs.update(config=config.single_file_config, subfolder="unet")
            vae_kwargs.update(config=config.single_file_config, subfolder="vae")
        try:
            unet = UNet2DConditionModel.from_single_file(source, **unet_kwargs)
            vae = AutoencoderKL.from_single_file(source, **vae_kwargs)
        except Exception as e:
            raise TrainingError(
                f"could not load the single-file checkpoint {source}: {e}. diffusers needs the base's config: "
                "be online once, or set model.single_file_config to a diffusers folder/hub id of the same base "
                "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)") from e
        if config.single_file_config:
            scheduler = DDPMScheduler.from_pretrained(config.single_file_config, subfolder="scheduler")
        else:  # the schedule every SD1.x/SDXL checkpoint was trained with
            scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, clip_sample=False)
    else:
        kwargs = {"revision": config.revision, "variant": config.variant}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if Path(source).exists() and not (Path(source) / "unet").is_dir():
            raise TrainingError(f"model.pretrained {source} is not a diffusers folder (no unet/ subfolder) "
                                    "nor a single-file checkpoint (.safetensors/.ckpt)")
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype, **kwargs)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    kind = _detect_kind(unet, config.base)
    prediction = config.prediction_type or scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise TrainingError(f"prediction type {prediction!r} is not supported; use epsilon or v_prediction")
    scheduler.register_to_config(prediction_type=prediction)
    for module in (unet, vae):
        module.requires_grad_(False).eval().to(device)  # already in their dtypes (torch_dtype above)
    return Base(unet, vae, scheduler, kind, prediction)


def load_llm(config: LLMConfig, device: torch.device) -> Any:
    """The frozen text encoder through ella_core (T5 folders, decoder LLMs, GGUF, single files)."""
    from ella_core import load_text_encoder

    encoder = load_text_encoder(config.source, tokenizer=config.tokenizer, dtype=config.dtype,  # ella_core.dtypes
                                device=config.device or device, hidden_layer=config.hidden_layer)
    encoder.model.requires_grad_(False).eval()
    return encoder


def encode_texts(encoder: Any, texts: list[str], config: LLMConfig) -> torch.Tensor:
    """Prompts -> features (B, L, D) exactly as the nodes encode them (same encoder, mode and length)."""
    with torch.no_grad():
        return encoder.encode(list(texts), mode=config.token_mode, max_length=config.max_length).features


def build_connector(config: ConnectorConfig, input_dim: int, base: Base) -> ELLA:
    """A new connector for this base and LLM, or `init_from` an existing one (checked to fit both).

    connector.time_aware and connector.input_pool are the run's, also for init_from: they leave the weights
    as they are, so a file trained with either setting starts a run with the other (with a warning)."""
    ablations = {"time_aware": config.time_aware, "input_pool": config.input_pool}
    if config.init_from:
        ella = load_ella(config.init_from, dtype=torch.float32)
        c = ella.config
        changed = [f"connector.{k}={v!r} (the file: {getattr(c, k)!r})" for k, v in ablations.items()
                   if getattr(c, k) != v]
        if changed:
            log.warning("connector.init_from %s was trained with other settings; this run uses %s",
                        config.init_from, ", ".join(changed))
            ella = _with_config(ella, replace(c, **ablations))
        problems = []
        if c.input_dim != input_dim:
            problems.append(f"its LLM width is {c.input_dim}, the configured LLM gives {input_dim}")
        if c.width != base.context_dim:
            problems.append(f"its output width is {c.width}, the UNet's context is {base.context_dim}")
        if c.pooled_dim != base.pooled_dim:
            problems.append(f"its pooled head is {c.pooled_dim}, the base needs {base.pooled_dim}")
        if problems:
            raise TrainingError(f"connector.init_from {config.init_from} does not fit: " + "; ".join(problems))
        log.info("connector initialised from %s", config.init_from)
    else:
        ella = ELLA(ELLAConfig(input_dim=input_dim, width=base.context_dim, layers=config.layers, heads=config.heads,
                               num_latents=config.num_latents, time_channel=config.time_channel,
                               time_embed_dim=config.time_embed_dim, pooled_dim=base.pooled_dim, **ablations))
    return ella.float().train().requires_grad_(True)


def _with_config(ella: ELLA, config: ELLAConfig) -> ELLA:
    """The same weights in a connector of another (weight-compatible) config; draws no random numbers."""
    with torch.device("meta"):
        other = ELLA(config)
    other.load_state_dict(ella.state_dict(), strict=True, assign=True)
    return other


class ConnectorStep(nn.Module):
    """The trainable part of one step as a single module, so DDP sees every parameter in one forward."""

    def __init__(self, ella: ELLA) -> None:
        super().__init__()
        self.ella = ella

    def forward(self, features: torch.Tensor, timesteps: torch.Tensor, text_bias: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """features (B, L, D_llm), timesteps (B,), text_bias (B, L) or None (training.features: -inf on the
        padding of flexible-mode batches) -> context (B, N, D_ctx), pooled (B, D_pool) or None."""
        context = self.ella(features, timesteps, text_bias)
        pooled = self.ella.pooled(context) if self.ella.config.pooled_dim else None
        return context, pooled


class EMA:
    """Exponential moving average of the connector's weights in float32 (with the usual warm-up of the decay).

    One multi-tensor lerp per step over every tensor (torch._foreach_lerp_: the same per-element maths as
    Tensor.lerp_), no host sync; `shadow` may be replaced (resume), so the tensor lists are read at each update."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        state = module.state_dict()
        shadow = [self.shadow[key] for key in state]
        values = [v.detach() if v.dtype == torch.float32 else v.detach().float() for v in state.values()]
        torch._foreach_lerp_(shadow, values, 1.0 - decay)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})
