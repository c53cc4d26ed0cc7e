"""Validation: the loss on held-out samples, and images of the validation prompts.

The validation loss is the plain noise-prediction MSE (unweighted, no noise offset) on samples that are never
trained on (training.split), each with its first caption and its own fixed timestep and noise, drawn from a
seed of (validation.seed, sample key): the same numbers at every validation, so the curve shows the connector
changing and nothing else. Every process evaluates a share of the held-out batches; the batches are the same
whatever the number of processes, so the value is too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ella_core import ELLA

from . import features as llm_features
from .config import Config
from .data import Data, OnlineDataset, collate
from .distributed import Dist
from .models import Base, ConnectorStep, encode_texts, load_llm, sdxl_time_ids
from .sampling import sample

log = logging.getLogger("training")


def heldout_seed(seed: int, key: str) -> int:
    """The fixed seed of one held-out sample's timestep and noise."""
    return int.from_bytes(hashlib.sha256(f"validation/{seed}/{key}".encode()).digest()[:8], "little") >> 1


def sample_key(data: Data, index: int) -> str:
    """The key of sample `index` of the whole data set (cache entry or source record)."""
    if data.cache is not None:
        return data.cache.entry(index)["key"]
    return data.dataset.records[index].key


def _eval_dataset(data: Data, config: Config) -> torch.utils.data.Dataset:
    """The data set read with the first caption of each sample and no caption dropout."""
    fixed = dataclasses.replace(config.data, caption_dropout=0.0, caption_rule="first")
    if data.cache is not None:
        from .cache import CachedDataset

        return CachedDataset(data.cache, fixed)
    return OnlineDataset(data.dataset.records, data.dataset.buckets, fixed)


class HeldOut:
    """The held-out samples of a run, grouped into fixed batches (one bucket each, in index order)."""

    def __init__(self, data: Data, indices: list[int], config: Config) -> None:
        self.data, self.config = data, config
        self.dataset = _eval_dataset(data, config)
        self.seeds = {i: heldout_seed(config.validation.seed, sample_key(data, i)) for i in indices}
        size = config.train.batch_size
        self.batches: list[list[int]] = []
        ordered = sorted(indices, key=lambda i: (tuple(data.buckets[i]), i))
        for _, group in itertools.groupby(ordered, key=lambda i: tuple(data.buckets[i])):
            members = list(group)
            self.batches.extend(members[j:j + size] for j in range(0, len(members), size))

    def __len__(self) -> int:
        return len(self.seeds)

    @torch.no_grad()
    def loss(self, base: Base, ella: ELLA, dist: Dist, autocast: Any) -> tuple[float, int]:
        """Collective: (mean held-out loss, samples evaluated); batch b is evaluated by rank b % world."""
        step_module = ConnectorStep(ella)
        mine = []
        for b in range(dist.rank, len(self.batches), dist.world):
            batch = collate([self.dataset[(i, self.seeds[i])] for i in self.batches[b]])
            mine.append((b, _per_sample_losses(batch, base, self.data, step_module, self.config, dist.device,
                                               autocast) if "seed" in batch else []))
        parts = sorted(p for rank_parts in dist.gather(mine) for p in rank_parts)
        losses = [x for _, batch_losses in parts for x in batch_losses]
        return (sum(losses) / len(losses) if losses else float("nan")), len(losses)


def _per_sample_losses(batch: dict[str, Any], base: Base, data: Data, step_module: torch.nn.Module,
                       config: Config, device: torch.device, autocast: Any) -> list[float]:
    from .loop import batch_inputs, draw_noise  # the training loop's inputs and noise policy (seed -> t, noise)

    latents, features, text_bias = batch_inputs(batch, base, data, config, device)
    timesteps, noise = draw_noise(batch["seed"], tuple(latents.shape[1:]), base.scheduler.config.num_train_timesteps,
                                  0.0)
    timesteps, noise = timesteps.to(device), noise.to(device)
    noisy = base.scheduler.add_noise(latents, noise, timesteps)
    target = noise if base.prediction_type == "epsilon" else base.scheduler.get_velocity(latents, noise, timesteps)
    added = None
    with autocast:
        context, pooled = step_module(features, timesteps.float(), text_bias)
        if base.kind == "sdxl":
            target_size = (latents.shape[2] * base.latent_scale, latents.shape[3] * base.latent_scale)
            time_ids = torch.tensor([sdxl_time_ids(o, c, target_size) for o, c in
                                     zip(batch["original_size"], batch["crop_top_left"])], device=device)
            added = {"text_embeds": pooled.to(base.unet.dtype), "time_ids": time_ids.to(base.unet.dtype)}
        pred = base.unet(noisy.to(base.unet.dtype), timesteps, encoder_hidden_states=context.to(base.unet.dtype),
                         added_cond_kwargs=added).sample
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).tolist()


# ---------------------------------------------------------------- images
def prompt_texts(config: Config) -> list[str]:
    """The texts validation images need encoded: the prompts, then the negative prompt when it is not ""."""
    v = config.validation
    return list(v.prompts) + ([v.negative_prompt] if v.negative_prompt else [])


def _prompt_features(config: Config, data: Data, dist: Dist) -> tuple[list[torch.Tensor], torch.Tensor]:
    """P tensors (L_i, D) of the prompts and (L, D) of the negative prompt (the cached empty prompt for "");
    L_i is each prompt's own length in flexible mode."""
    texts = prompt_texts(config)
    features = data.cache.prompt_features(texts) if data.cache is not None else None
    if features is None:
        if data.validation_prompts is None:  # not cached (prompts changed since the cache was built)
            llm = data.llm or load_llm(config.llm, dist.device)
            encoded = encode_texts(llm, texts, config.llm).float().cpu()
            data.validation_prompts = llm_features.unpadded(llm, texts, config.llm, encoded)
        features = data.validation_prompts
    n = len(config.validation.prompts)
    negative = features[n] if config.validation.negative_prompt else data.empty
    return features[:n], negative


def validation_images(config: Config, base: Base, model: ELLA, data: Data, dist: Dist, out: Path,
                      step: int) -> torch.Tensor:
    """Rank 0: validation.images_per_prompt images of each prompt (CFG against the negative prompt), saved
    as samples/step-<N>/<prompt>.png (or <prompt>-<k>.png when several); returns them (N, 3, H, W)."""
    v = config.validation
    prompts, negative = _prompt_features(config, data, dist)
    n = v.images_per_prompt
    was_training = model.training
    model.eval()
    images = sample(base, model, [p for p in prompts for _ in range(n)], negative, steps=v.steps,
                    guidance_scale=v.guidance_scale, height=v.height or config.data.resolution,
                    width=v.width or config.data.resolution, seed=v.seed)
    model.train(was_training)
    folder = out / "samples" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, image in enumerate(images):
        name = f"{i:02d}.png" if n == 1 else f"{i // n:02d}-{i % n}.png"
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(folder / name)
    log.info("validation images in %s", folder)
    return images


def ema_model(ella: ELLA, ema: Optional[Any], device: torch.device) -> ELLA:
    """The connector whose images are shown: the EMA weights when EMA is on."""
    if ema is None:
        return ella
    model = ELLA(ella.config).to(device)
    ema.copy_to(model)
    return model
