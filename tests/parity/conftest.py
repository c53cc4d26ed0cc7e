"""Fixtures of the parity tests: one model folder for both worlds and one real ComfyUI server for the module."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from devtools import tiny_models as tm
from tests.parity.diffusers_unet import write_parity_unet
from tests.support.comfy_server import ComfyServer

HERE = Path(__file__).resolve().parent
PACKS = [HERE.parent / "support" / "ella_test_recorder", HERE / "mutation_pack"]
PARITY_ELLA = "parity_ella_sd15.safetensors"
# The released connector's layout (reference key names, AdaLN everywhere, packed attention, squared-ReLU
# MLP) at a small size: the SD1.5 context width, the tiny T5's width, 2 blocks, 16 latents.
ELLA_CONFIG = dict(time_channel=32, time_embed_dim=64, width=768, layers=2, heads=8, num_latents=16,
                   input_dim=tm.T5_HIDDEN)


@pytest.fixture(scope="session")
def parity_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ella-parity")
    models = base / "models"
    write_parity_unet(models)
    tm.write_tiny_t5(models)
    cfg = ELLA_CONFIG
    path = tm.write_tiny_ella(models, PARITY_ELLA, input_dim=cfg["input_dim"], width=cfg["width"], layers=cfg["layers"],
                              heads=cfg["heads"], num_latents=cfg["num_latents"], token_length=128)
    # weights only, like the released file: a connector that records its token mode would override the
    # loader's token_mode (ella_core.encoding_settings), and the flexible case would not be flexible
    save_file(load_file(str(path)), str(path))
    return base


@pytest.fixture(scope="session")
def parity_server(parity_base):
    srv = ComfyServer(parity_base, extra_packs=PACKS)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
