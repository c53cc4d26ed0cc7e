"""A base kept as ONE original-layout (ldm) `.safetensors` file, as ComfyUI users keep checkpoints, loaded by
the trainer through diffusers' `from_single_file` offline with `model.single_file_config` (a local diffusers
folder of the same base), and trained from.

The file is written from the tiny diffusers base of the other trainer tests: UNet keys mapped to the ldm
layout with ComfyUI's own map (`comfy.utils.unet_to_diffusers`) under `model.diffusion_model.`, the VAE with
ComfyUI's converter under `first_stage_model.`. No CLIP: the trainer loads only the UNet and the VAE.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devtools.tiny_models import import_comfy
from tests.training.train_helpers import read_metrics, run_trainer


def _ldm_unet_config(unet) -> dict:
    """ComfyUI's description of a diffusers UNet's block structure (what `unet_to_diffusers` needs)."""
    cfg = unet.config
    levels = len(cfg.block_out_channels)
    per_level = cfg.layers_per_block
    down_attn = [1 if "CrossAttn" in t else 0 for t in cfg.down_block_types]
    up_attn = [1 if "CrossAttn" in t else 0 for t in cfg.up_block_types]  # deepest level first
    return {"num_res_blocks": [per_level] * levels, "channel_mult": [1] * levels,
            "transformer_depth": [d for d in down_attn for _ in range(per_level)],
            # highest resolution first; ComfyUI pops from the end while walking diffusers' up_blocks
            "transformer_depth_output": [d for d in reversed(up_attn) for _ in range(per_level + 1)],
            "transformer_depth_middle": 1}


def write_ldm_checkpoint(base: Path, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The diffusers base's UNet and VAE as one ldm-layout safetensors file; returns the original weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import_comfy()
    import comfy.diffusers_convert
    import comfy.utils

    unet = UNet2DConditionModel.from_pretrained(base / "unet").state_dict()
    vae = AutoencoderKL.from_pretrained(base / "vae")
    to_ldm = comfy.utils.unet_to_diffusers(_ldm_unet_config(UNet2DConditionModel.from_pretrained(base / "unet")))
    unmapped = sorted(k for k in unet if k not in to_ldm)
    assert not unmapped, f"diffusers UNet keys without an ldm name: {unmapped[:5]}"
    tensors = {f"model.diffusion_model.{to_ldm[k]}": v for k, v in unet.items()}
    # ComfyUI's VAE map numbers decoder levels for SD's 4-level VAE (up.{3-i}); ldm numbers them 0..n-1
    shift = 4 - len(vae.config.block_out_channels)
    for key, value in comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items():
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{int(m.group(1)) - shift}.", key)
        tensors[f"first_stage_model.{key}"] = value
    assert len(tensors) == len(unet) + len(vae.state_dict())  # no two weights landed on one name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return {"unet": unet, "vae": vae.state_dict()}


@pytest.fixture(scope="module")
def single_file(tiny_sd15, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("single") / "tiny_sd15_ldm.safetensors"
    return path, write_ldm_checkpoint(tiny_sd15, path)


def test_the_trainer_loads_a_single_file_base_offline(tiny_sd15, single_file, monkeypatch):
    from diffusers import UNet2DConditionModel

    from training.config import ModelConfig
    from training.models import load_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, original = single_file
    base = load_base(ModelConfig(pretrained=str(path), single_file_config=str(tiny_sd15)), torch.device("cpu"),
                     torch.float32)
    assert base.kind == "sd15" and base.prediction_type == "epsilon"
    for name, module in (("unet", base.unet), ("vae", base.vae)):
        loaded = module.state_dict()
        assert loaded.keys() == original[name].keys()
        differing = [k for k in loaded if not torch.equal(loaded[k], original[name][k])]
        assert not differing, f"{name} weights changed in the round trip: {differing[:5]}"
    assert base.vae.config.scaling_factor == 3.5  # the config came from the diffusers folder
    # and the loaded UNet computes what the diffusers folder's UNet computes
    reference = UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)  # latents, context
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=ctx).sample
        got = base.unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(got, expected)
    assert got.abs().mean() > 0.01  # a real output, not a vacuous comparison of zeros


def test_training_from_the_single_file_equals_training_from_the_folder(tiny_sd15, tiny_t5, datasets, single_file,
                                                                        tmp_path):
    path, _ = single_file
    common = [f"llm.source={tiny_t5}", f"data.path={datasets['jsonl']}", "train.max_steps=2",
              "train.checkpoint_every=1000"]
    folder_run, file_run = tmp_path / "folder", tmp_path / "file"
    run_trainer(*common, f"model.pretrained={tiny_sd15}", f"output_dir={folder_run}")
    run_trainer(*common, f"model.pretrained={path}", f"model.single_file_config={tiny_sd15}",
                f"output_dir={file_run}", env={"HF_HUB_OFFLINE": "1"})
    losses = [m["loss"] for m in read_metrics(file_run)]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert losses == [m["loss"] for m in read_metrics(folder_run)]  # same weights, same run, bit for bit on CPU
