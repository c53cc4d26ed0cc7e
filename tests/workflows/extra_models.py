"""A tiny LoRA for the example workflows (the tiny ControlNet is devtools/tiny_models.py's).

It matches the tiny SD1.5 UNet of devtools/tiny_models.py, so ComfyUI's LoraLoader applies it like a real
file (kohya `lora_unet_*` keys).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


LORA_NAME = "tiny_lora_sd15.safetensors"


def write_tiny_lora(models_dir: Path, checkpoint: Path, name: str = LORA_NAME, rank: int = 4, seed: int = 6) -> Path:
    """models/loras/<name>: a rank-`rank` LoRA on every 2-D UNet weight of `checkpoint` (kohya key names)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, w in load_file(str(checkpoint)).items():
        if not key.startswith("model.diffusion_model.") or not key.endswith(".weight") or w.ndim != 2:
            continue
        stem = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        out_f, in_f = w.shape
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        sd[f"{stem}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
        sd[f"{stem}.alpha"] = torch.tensor(float(rank))
    if not sd:
        raise ValueError(f"{checkpoint}: no 2-D UNet weights to put a LoRA on")
    path = Path(models_dir) / "loras" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
