"""A tiny SD1.5 UNet in both worlds: a ComfyUI `diffusion_models` file and the same weights as a diffusers
`UNet2DConditionModel`, converted with ComfyUI's own key map.

ComfyUI's `comfy.utils.unet_to_diffusers(unet_config)` maps diffusers parameter names to its own; the
diffusers config below is the one-level SD1.5 layout of `devtools.tiny_models.tiny_unet_config`
(320 channels, one res block and one transformer block per level, heads 8, context 768, no downsampling).
Weights load strictly: every diffusers parameter gets exactly one checkpoint tensor and none is left over.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from devtools import tiny_models as tm

PARITY_UNET = "parity_unet_sd15.safetensors"


def parity_unet_state_dict(seed: int = 11) -> dict[str, torch.Tensor]:
    """Random weights of the one-level SD1.5 UNet (ComfyUI names) whose output really depends on its inputs.

    Every 1-D weight of this UNet is a norm's scale; `devtools.tiny_models` sets them to one, here they get a
    little noise on top, so a norm applied with the wrong scale or to the wrong axis would show.
    """
    gen = torch.Generator().manual_seed(seed)
    state = tm.tiny_unet_state_dict(seed)
    for name, value in state.items():
        if value.ndim == 1 and name.endswith("weight"):
            state[name] = 1 + 0.1 * torch.randn(value.shape, generator=gen)
    return {k: v.to(torch.float16) for k, v in state.items()}  # stored like an fp16 SD1.5 file


def write_parity_unet(models_dir: Path, name: str = PARITY_UNET) -> Path:
    """models/diffusion_models/<name> (UNETLoader), without the checkpoint's key prefix; generated once per
    machine into devtools' test-model cache (deterministic), then linked into place."""
    from safetensors.torch import save_file

    src = tm._cached("parity-unet-sd15-v1-s11.safetensors", lambda tmp: save_file(parity_unet_state_dict(), str(tmp)))
    return tm._place(src, Path(models_dir) / "diffusion_models" / name)


def diffusers_config(unet_config: dict) -> dict:
    """UNet2DConditionModel kwargs equal to a one-level ComfyUI SD1.5 UNet config."""
    if len(unet_config["channel_mult"]) != 1:
        raise ValueError("only the one-level tiny UNet is converted here")
    width = unet_config["model_channels"]
    return dict(
        sample_size=unet_config["image_size"], in_channels=unet_config["in_channels"],
        out_channels=unet_config["out_channels"], block_out_channels=(width,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=unet_config["num_res_blocks"][0], cross_attention_dim=unet_config["context_dim"],
        attention_head_dim=unet_config["num_heads"], use_linear_projection=unet_config["use_linear_in_transformer"],
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    )


def load_diffusers_unet(unet_file: Path, unet_config: dict | None = None):
    """unet_file (ComfyUI SD1.5 UNet weights, no key prefix) -> diffusers UNet2DConditionModel, fp32, eval."""
    tm.import_comfy()
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet_config = unet_config or tm.tiny_unet_config()
    ours = load_file(str(unet_file))
    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers name -> ComfyUI name
    with torch.device("meta"):  # no random init: every tensor is assigned below
        unet = UNet2DConditionModel(**diffusers_config(unet_config))
    wanted = unet.state_dict()
    converted = {}
    for name in wanted:
        source = mapping.get(name)
        if source is None or source not in ours:
            raise KeyError(f"no checkpoint tensor for diffusers parameter {name} (mapped from {source})")
        converted[name] = ours[source].float()
    used = {mapping[name] for name in converted}
    left = sorted(set(ours) - used)
    if left:
        raise KeyError(f"{len(left)} checkpoint tensors have no diffusers parameter, e.g. {left[:5]}")
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.eval().requires_grad_(False)
