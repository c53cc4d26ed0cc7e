"""Tiny stand-ins for the extra models some example workflows load: an SD1.5 ControlNet and a LoRA.

Both match the tiny SD1.5 UNet of tests/support/tiny_models.py, so ComfyUI's own loaders detect and apply
them like real files (ControlNet: ldm layout with the `control_model.` prefix; LoRA: kohya `lora_unet_*` keys).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.support.tiny_models import _random_like, import_comfy, tiny_unet_config

CONTROLNET_NAME = "tiny_controlnet_sd15.safetensors"
LORA_NAME = "tiny_lora_sd15.safetensors"


def write_tiny_controlnet(models_dir: Path, name: str = CONTROLNET_NAME, seed: int = 5) -> Path:
    """models/controlnet/<name>: a random ControlNet with the tiny UNet's config and a 3-channel hint."""
    import_comfy()
    import comfy.cldm.cldm
    import comfy.ops

    config = dict(tiny_unet_config())
    config.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, device="meta",
                                     operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    sd = {f"control_model.{k}": _random_like(k, v.shape, gen).to(torch.float16) for k, v in net.state_dict().items()}
    # Real ControlNets start with zero convs; non-zero ones make the control really reach the UNet.
    path = Path(models_dir) / "controlnet" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


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
