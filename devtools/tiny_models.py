"""Tiny random models laid out in a ComfyUI base directory's `models/` folders, for tests and demos.

Nothing here is downloaded: every model is random but has the real *layout*, so ComfyUI's own loaders
detect and load it like a real one:

- `write_tiny_sd15_checkpoint`: an SD1.5-detected checkpoint (UNet with model_channels 320, context 768,
  one level / one res block / one transformer block, about 26 M parameters), a random TAESD as its VAE and
  (optionally) a random full-size CLIP-L text model so `CheckpointLoaderSimple` also returns a CLIP.
- `write_tiny_vae`: the same random TAESD as a stand-alone file for `VAELoader`.
- `write_tiny_t5`: a tiny `T5EncoderModel` HF folder with ComfyUI's T5 tokenizer (models/text_encoders).
- `write_tiny_ella`: a tiny connector saved with `ella_core.save_ella` (models/ella).
- `write_all`: all of the above with the default names below; returns a `TinyModels` record.

Files are generated deterministically once per machine into a cache folder (`ELLA_TEST_CACHE`, default
`~/.cache/comfyui-ella/test-models`) and then copied/linked into each `models_dir`, so repeated test
sessions do not pay the generation cost. Functions take `models_dir` (the `models` folder of a ComfyUI
base directory) and return the path they wrote.

The UNet/VAE builders import ComfyUI (from `$COMFYUI_PATH`, devtools.comfy_env) on CPU to get exact key
layouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from devtools.comfy_env import comfyui_path, import_comfy  # noqa: F401 (re-exported)

# Default file names used by the shared tests and the example workflows.
CHECKPOINT_NAME = "tiny_sd15.safetensors"
VAE_NAME = "tiny_taesd.safetensors"
T5_NAME = "tiny-t5"
ELLA_NAME = "tiny_ella_sd15.safetensors"
T5_HIDDEN = 64  # tiny T5 d_model == the tiny connector's input_dim
_VERSION = "2"  # bump when a generator below changes, so stale cached files are not reused


def _cache_dir() -> Path:
    path = Path(os.environ.get("ELLA_TEST_CACHE", Path.home() / ".cache" / "comfyui-ella" / "test-models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached(key: str, build) -> Path:
    """Path of a generated file/folder in the cache, building it (atomically, via rename) when absent."""
    digest = hashlib.sha1(f"{_VERSION}:{key}".encode()).hexdigest()[:12]
    target = _cache_dir() / f"{digest}-{key}"
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    build(tmp)
    os.replace(tmp, target)
    return target


def _place(src: Path, dst: Path) -> Path:
    """Copy a cached file or folder into a models folder (symlinks would break under some ComfyUI listers)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        try:
            os.link(src, dst)  # hard link: free and safe (files are never modified in place)
        except OSError:
            shutil.copy2(src, dst)
    return dst


def random_like(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Plausible random init by parameter role: norms 1, biases 0, weights ~ N(0, 1/fan_in)."""
    if len(shape) == 0:
        return torch.ones(()) if name.endswith("vae_scale") else torch.zeros(())
    if name.endswith("bias"):
        return torch.zeros(shape)
    lname = name.lower()
    if len(shape) == 1:  # every 1-D weight of these models is a norm's scale (GroupNorm `in_layers.0`, `out.0`...)
        return torch.ones(shape) if (name.endswith("weight") or "norm" in lname or "ln" in lname) else torch.zeros(shape)
    fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else shape[0]
    if "embedding" in lname and len(shape) == 2:
        return torch.randn(shape, generator=gen) * 0.02
    return torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5


def tiny_unet_config() -> dict:
    """ComfyUI UNetModel kwargs that `model_detection` recognises as SD1.5 (one level, depth one)."""
    return dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
        channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
        context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
        use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False,
    )


def tiny_unet_state_dict(seed: int = 0, config: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Random weights for a ComfyUI UNetModel (keys without the `model.diffusion_model.` prefix)."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**(config or tiny_unet_config()), device="meta", operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    return {k: random_like(k, v.shape, gen) for k, v in unet.state_dict().items()}


def tiny_taesd_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random TAESD weights (`taesd_encoder.*`, `taesd_decoder.*`): ComfyUI's VAE detects them."""
    import_comfy()
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        taesd = TAESD()
    gen = torch.Generator().manual_seed(seed)
    return {k: random_like(k, v.shape, gen) for k, v in taesd.state_dict().items()}


def clip_l_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    """Random CLIP-L text model (full size: ComfyUI builds CLIP-L from a fixed config), fp16."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=768)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        out[k] = random_like(k, v.shape, gen).to(torch.float16)
    return out


def write_tiny_sd15_checkpoint(models_dir: Path, name: str = CHECKPOINT_NAME, *, with_clip: bool = True,
                               seed: int = 0) -> Path:
    """models/checkpoints/<name>: SD1.5-detected UNet + TAESD VAE (+ random CLIP-L when `with_clip`)."""
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        sd = {f"model.diffusion_model.{k}": v.to(torch.float16) for k, v in tiny_unet_state_dict(seed).items()}
        sd.update({f"first_stage_model.{k}": v for k, v in tiny_taesd_state_dict(seed + 1).items()})
        if with_clip:
            sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_l_state_dict(seed + 2).items()})
        save_file(sd, str(tmp))

    src = _cached(f"sd15-clip{int(with_clip)}-s{seed}.safetensors", build)
    return _place(src, Path(models_dir) / "checkpoints" / name)


def write_tiny_vae(models_dir: Path, name: str = VAE_NAME, seed: int = 1) -> Path:
    """models/vae/<name>: a random TAESD, loadable with VAELoader."""
    from safetensors.torch import save_file

    src = _cached(f"taesd-s{seed}.safetensors", lambda tmp: save_file(tiny_taesd_state_dict(seed), str(tmp)))
    return _place(src, Path(models_dir) / "vae" / name)


def tiny_controlnet_state_dict(seed: int = 5) -> dict[str, torch.Tensor]:
    """Random SD1.5-layout ControlNet matching `tiny_unet_config` (ComfyUI's cldm ControlNet keys)."""
    import_comfy()
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    cfg = {k: v for k, v in tiny_unet_config().items() if k not in ("out_channels", "transformer_depth_output",
                                                                     "use_temporal_attention")}
    net = ControlNet(hint_channels=3, device="meta", operations=comfy.ops.disable_weight_init, **cfg)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.state_dict().items():
        # zero convs are zero in a fresh ControlNet; random here so the residuals really reach the UNet
        out[k] = random_like(k, v.shape, gen)
    return out


def write_tiny_controlnet(models_dir: Path, name: str = "tiny_controlnet_sd15.safetensors", seed: int = 5) -> Path:
    """models/controlnet/<name>: a random ControlNet for the tiny SD1.5 UNet (loads with ControlNetLoader)."""
    from safetensors.torch import save_file

    src = _cached(f"controlnet-s{seed}.safetensors",
                  lambda tmp: save_file({k: v.to(torch.float16) for k, v in tiny_controlnet_state_dict(seed).items()},
                                        str(tmp)))
    return _place(src, Path(models_dir) / "controlnet" / name)


def t5_tokenizer_dir() -> Path:
    """ComfyUI's bundled T5 sentencepiece tokenizer (loads offline with transformers' AutoTokenizer)."""
    return comfyui_path() / "comfy" / "text_encoders" / "t5_tokenizer"


def write_tiny_t5(models_dir: Path, name: str = T5_NAME, *, d_model: int = T5_HIDDEN, num_layers: int = 2,
                  seed: int = 3) -> Path:
    """models/text_encoders/<name>/: HF folder (config.json, model.safetensors, tokenizer) of a tiny T5 encoder."""
    from transformers import T5Config, T5EncoderModel

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        config = T5Config(vocab_size=32128, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=num_layers,
                          num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                          is_encoder_decoder=False, use_cache=False)
        T5EncoderModel(config).save_pretrained(str(tmp), safe_serialization=True)
        for f in t5_tokenizer_dir().iterdir():
            shutil.copy2(f, tmp / f.name)

    src = _cached(f"t5-d{d_model}-l{num_layers}-s{seed}", build)
    return _place(src, Path(models_dir) / "text_encoders" / name)


def write_tiny_ella(models_dir: Path, name: str = ELLA_NAME, *, input_dim: int = T5_HIDDEN, width: int = 768,
                    layers: int = 1, heads: int = 8, num_latents: int = 8, base_model: str = "sd15",
                    pooled_dim: Optional[int] = None, seed: int = 4, token_length: int = 16) -> Path:
    """models/ella/<name>: a random connector (non-zero AdaLN so the output really depends on t)."""
    from ella_core import ELLA, ELLAConfig, save_ella

    path = Path(models_dir) / "ella" / name
    config = ELLAConfig(input_dim=input_dim, width=width, layers=layers, heads=heads, num_latents=num_latents,
                        time_channel=32, time_embed_dim=64, pooled_dim=pooled_dim)
    torch.manual_seed(seed)
    module = ELLA(config)
    with torch.no_grad():
        for p in module.parameters():  # the reference init zeroes AdaLN: randomise everything instead
            p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.02))
    save_ella(module, path, {"base_model": base_model, "llm": "tiny-t5", "llm_dtype": "float32",
                             "token_length": token_length, "token_mode": "fixed"})
    return path


@dataclass(frozen=True)
class TinyModels:
    """File names (as ComfyUI lists them) of the models `write_all` placed."""

    models_dir: Path
    checkpoint: str = CHECKPOINT_NAME
    vae: str = VAE_NAME
    text_encoder: str = T5_NAME
    ella: str = ELLA_NAME


def write_all(models_dir: Path, *, with_clip: bool = True) -> TinyModels:
    """Every tiny model with its default name: checkpoint (+CLIP), VAE, T5 folder, connector."""
    models_dir = Path(models_dir)
    write_tiny_sd15_checkpoint(models_dir, with_clip=with_clip)
    write_tiny_vae(models_dir)
    write_tiny_t5(models_dir)
    write_tiny_ella(models_dir)
    return TinyModels(models_dir)


if __name__ == "__main__":  # python devtools/tiny_models.py <base_dir>: fill <base_dir>/models
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-comfy-base") / "models"
    print(json.dumps({k: str(v) for k, v in write_all(target).__dict__.items()}, indent=1))
