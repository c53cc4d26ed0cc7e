"""Stage 7 `upper`: the upper bound (e): the base UNet fine-tuned jointly with a trainable per-token projection
of the same LLM features (LayerNorm, then Linear(D_llm -> cross_attention_dim)), no connector in between.

Same data as the arms and the same features: the latents and SmolLM2 features are read from the arms' feature
cache (written by training/train.py in stage 5), so nothing is encoded twice and (e) sees exactly what (b)-(d)
saw; the empty prompt (caption dropout, the unconditional half of CFG) is the cache's. The loop is the
bench's generic `unet_training.train_unet` (the one the base was trained with), for `profile.upper_steps`
steps (about the arms' budget). Unlike the arms, the UNet's weights change here: that is why it is a bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.alignment import arms as arms_stage
from bench.alignment import stage_io

PROJECTION_FILE = "projection.safetensors"


SETTINGS = ("upper_steps", "upper_batch", "upper_lr", "caption_dropout", "arm_warmup")


class Projection(nn.Module):
    """LLM features (B, L, D_llm) -> UNet context (B, L, D_ctx), token by token."""

    def __init__(self, input_dim: int, context_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(input_dim)
        self.linear = nn.Linear(input_dim, context_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


def cached_training_set(workdir: Path) -> tuple[torch.Tensor, list[list[str]], dict[str, torch.Tensor]]:
    """From the arms' feature cache: latents (N, C, h, w), each sample's captions, caption -> features (L, D)
    (the empty prompt under "")."""
    from training.cache import FeatureCache
    from training.config import load_config

    first = arms_stage.arm_runs_from_done(workdir)[0]
    config = load_config(first["config"], [])
    folder = arms_stage.trainer_cache_dir(config)
    if not FeatureCache.is_complete(folder):
        raise RuntimeError(f"upper: the arms' feature cache {folder} is not complete (run the arms stage again: "
                           "python bench/alignment/run.py --force arms)")
    cache = FeatureCache(folder)
    from safetensors import safe_open

    latents, captions, features = [], [], {"": cache.empty_features()}
    handles: dict[str, Any] = {}
    for i in range(len(cache)):
        entry = cache.entry(i)
        shard = handles.get(entry["shard"]) or handles.setdefault(
            entry["shard"], safe_open(str(folder / entry["shard"]), framework="pt"))
        slot = int(entry["slot"])
        latents.append(shard.get_tensor(f"{slot}.latent").float())
        captions.append(list(entry["captions"]))
        for j, text in enumerate(entry["captions"]):
            if text not in features:
                features[text] = shard.get_tensor(f"{slot}.text.{j}").float()
    return torch.stack(latents), captions, features


def build(workdir: Path, profile: Any) -> dict[str, Any]:
    """Stage 7: fine-tunes the base UNet with the projection; saves both under `<workdir>/upper/`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    from bench.alignment import unet_training

    workdir = Path(workdir)
    stage = workdir / "upper"
    own = {"arms": stage_io.settings_of(workdir / "arms"), **profile.settings(*SETTINGS)}
    if (figures := stage_io.cached(stage, own)) is not None:
        return figures
    progress = stage_io.begin(stage, profile, seed=True)
    latents, captions, features = cached_training_set(workdir)
    unet = UNet2DConditionModel.from_pretrained(str(workdir / "base" / "model" / "unet"), torch_dtype=torch.float32)
    input_dim = next(iter(features.values())).shape[-1]
    projection = Projection(input_dim, int(unet.config.cross_attention_dim))

    def context(texts: list[str]) -> torch.Tensor:
        return projection(torch.stack([features[t] for t in texts]))

    scheduler = DDPMScheduler.from_pretrained(str(workdir / "base" / "model" / "scheduler"))
    unet.requires_grad_(True)
    figures = unet_training.train_unet(unet, context, latents, captions, int(profile.upper_steps),
                                       int(profile.upper_batch), float(profile.upper_lr), int(profile.seed),
                                       [*unet.parameters(), *projection.parameters()], scheduler=scheduler,
                                       caption_dropout=float(profile.caption_dropout),
                                       warmup=int(profile.arm_warmup), progress=progress)
    out = stage
    unet.save_pretrained(str(out / "unet"))
    save_file({k: v.contiguous() for k, v in projection.state_dict().items()}, str(out / PROJECTION_FILE),
              metadata={"input_dim": str(input_dim), "context_dim": str(unet.config.cross_attention_dim)})
    progress(f"{len(latents)} samples, {profile.upper_steps} steps")
    return stage_io.finish(stage, own, {"samples": len(latents), "seconds": round(progress.elapsed, 1),
                                        **(figures if isinstance(figures, dict) else {})})


def load_upper(workdir: Path) -> tuple[Any, Projection]:
    """The fine-tuned UNet and its projection, in eval mode."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = workdir / "upper"
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"), torch_dtype=torch.float32).eval()
    with safe_open(str(out / PROJECTION_FILE), framework="pt") as f:
        meta = f.metadata()
    projection = Projection(int(meta["input_dim"]), int(meta["context_dim"]))
    projection.load_state_dict(load_file(str(out / PROJECTION_FILE)))
    return unet.requires_grad_(False), projection.eval().requires_grad_(False)
