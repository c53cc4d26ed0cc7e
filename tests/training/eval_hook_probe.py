"""Evaluation hooks used by the trainer's tests (validation.hooks): they record what they were given."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ella_core import save_ella


def probe(ctx) -> dict:
    """Saves the connector it got and what it saw; returns how much the context moves with t, the mean of
    one sampled image (the sample helper), and a NaN (logged as such)."""
    folder = Path(ctx.output_dir) / "hook_probe"
    folder.mkdir(exist_ok=True)
    save_ella(ctx.connector, folder / f"step-{ctx.step}.safetensors")
    features = ctx.encode(["a plain red picture"])
    f = features[0][None].to(ctx.device)
    spread = (ctx.connector(f, torch.tensor([999.0])) - ctx.connector(f, torch.tensor([0.0]))).abs().max()
    image = ctx.sample(features, steps=2)
    seen = {"step": ctx.step, "final": ctx.final, "training": ctx.connector.training,
            "grad_enabled": torch.is_grad_enabled(), "rank": int(os.environ.get("RANK", "0")),
            "image_shape": list(image.shape), "time_aware": ctx.connector.config.time_aware,
            "input_pool": ctx.connector.config.input_pool}
    with open(folder / "seen.jsonl", "a") as out:
        out.write(json.dumps(seen) + "\n")
    return {"t_spread": float(spread), "image_mean": float(image.mean()), "undefined": math.nan}


def summary(ctx) -> dict:
    """A second hook (named by module): the step it ran at and the connector's ablation settings."""
    return {"at_step": ctx.step, "time_aware": ctx.connector.config.time_aware,
            "pooled": ctx.connector.config.input_pool == "mean"}
