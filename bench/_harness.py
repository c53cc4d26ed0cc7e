"""Set-up shared by the sampling benches: ComfyUI imported in-process, this pack loaded the way ComfyUI
loads it, and the real SD1.5 UNet / released connector architectures with random weights (no downloads).

Benches do not import tests/: this is their own copy of the few helpers they need.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "ella_tsc_bench_pack"

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=False,
                 context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)
# A one-level, 64-channel SD1.5-class UNet (context 768) for quick smoke runs.
TINY_UNET = dict(SD15_UNET, model_channels=64, num_heads=4, num_res_blocks=[1], channel_mult=[1],
                 transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1)


def import_comfy(cpu: bool) -> None:
    """Make ComfyUI ($COMFYUI_PATH) importable; cpu forces its model management onto the CPU."""
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "main.py").is_file():
        raise SystemExit("COMFYUI_PATH is not set to a ComfyUI tree; run: eval \"$(bash scripts/setup_env.sh)\"")
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu


def load_pack():
    """Import this repository as a ComfyUI custom-node package (relative imports work as in ComfyUI)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = pack
    spec.loader.exec_module(pack)
    return pack


def pack_module(name: str):
    """A module of the loaded pack, e.g. "nodes.hook" or "ella_core.conditioning"."""
    return importlib.import_module(f"{PACK_MODULE}.{name}")


def random_like(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Plausible random init by parameter role: norms 1, biases 0, weights ~ N(0, 1/fan_in)."""
    if len(shape) == 0:
        return torch.zeros(())
    lname = name.lower()
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape) if ("norm" in lname or "ln" in lname) else torch.zeros(shape)
    fan_in = int(torch.tensor(shape[1:]).prod())
    return torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5


def build_unet(unet_config: dict, dtype: torch.dtype = torch.float32):
    """A ModelPatcher of an SD1.5-class UNet with random weights, managed like a loaded checkpoint."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(0)
    state = {k: random_like(k, v.shape, gen).to(dtype) for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(state)
    params = sum(v.numel() for v in state.values())
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device()), params


def build_connector(config=None):
    """A ManagedConnector with random weights (default: the released SD1.5 connector's layout)."""
    ella_core = pack_module("ella_core")
    ELLA, ELLAConfig = ella_core.ELLA, ella_core.ELLAConfig
    managed = pack_module("nodes.managed")
    torch.manual_seed(0)
    module = ELLA(config or ELLAConfig()).eval().requires_grad_(False)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return managed.ManagedConnector.create(module, None, "bench-connector")


def ella_conditioning(connector, seed: int, tokens: int):
    """An ELLA Prompt Encode-shaped CONDITIONING with random LLM features (1, tokens, input_dim)."""
    EllaPrompt = pack_module("ella_core.conditioning").EllaPrompt
    hook = pack_module("nodes.hook")
    cfg = connector.module.config
    g = torch.Generator().manual_seed(seed)
    prompt = EllaPrompt(features=torch.randn(1, tokens, cfg.input_dim, generator=g), connector=connector,
                        text=f"bench prompt {seed}", name="bench")
    return [[torch.zeros(1, cfg.num_latents, cfg.width), {"model_conds": {hook.COND_KEY: hook.ELLACond(prompt)}}]]


def static_conditioning(seed: int, tokens: int, width: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=g), {}]]
