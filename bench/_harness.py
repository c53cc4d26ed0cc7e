"""Set-up shared by the sampling benches: ComfyUI imported in-process, this pack loaded the way ComfyUI
loads it, and the real SD1.5 UNet / released connector architectures with random weights (no downloads).

Benches do not import tests/: what they share with the tests lives in devtools/.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from devtools import comfy_env  # noqa: E402
from devtools.tiny_models import random_like  # noqa: E402
from ella_core.context_store import STORE_ENV  # noqa: E402

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
    try:
        comfy_env.import_comfy(cpu)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def load_pack():
    return comfy_env.load_pack(PACK_MODULE)


def pack_module(name: str):
    """A module of the loaded pack, e.g. "nodes.hook" or "ella_core.conditioning"."""
    return comfy_env.pack_module(PACK_MODULE, name)


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


@contextlib.contextmanager
def context_store(mib: str):
    """$ELLA_TSC_CONTEXT_STORE_MB for the sampling runs inside: "0" for cold runs (no context reused from an
    earlier run, and the store emptied), "" for the default budget."""
    old = os.environ.get(STORE_ENV)
    os.environ[STORE_ENV] = mib
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(STORE_ENV)
        else:
            os.environ[STORE_ENV] = old
