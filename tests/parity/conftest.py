"""Fixtures of the parity tests: one model folder for both worlds, the reference models, and one real
ComfyUI server for the session (it boots in a thread while the reference models load: on a 2-core CI
machine that takes the slowest part of the set-up off the critical path)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from devtools import tiny_models as tm
from tests.parity.diffusers_unet import PARITY_UNET, load_diffusers_unet, write_parity_unet
from tests.parity.reference_ella import RefConnector, RefT5Embedder
from tests.support.comfy_server import ComfyServer

HERE = Path(__file__).resolve().parent
PACKS = [HERE.parent / "support" / "ella_test_recorder", HERE / "mutation_pack"]
PARITY_ELLA = "parity_ella_sd15.safetensors"
# The released connector's layout (reference key names, AdaLN everywhere, packed attention, squared-ReLU
# MLP) at a small size: the SD1.5 context width, the tiny T5's width, 2 blocks, 16 latents.
ELLA_CONFIG = dict(time_channel=32, time_embed_dim=64, width=768, layers=2, heads=8, num_latents=16,
                   input_dim=tm.T5_HIDDEN)


@dataclass
class Worlds:
    base: Path  # the ComfyUI base directory (models/, output/)
    server: ComfyServer  # our side: a real ComfyUI with this pack, the recorder and the mutation pack
    reference: dict  # the reference side: unet (diffusers), connector, t5 (see reference_ella.run_reference)
    runs: dict = field(default_factory=dict)  # (case, prompt) -> our side's run, shared by the tests


def write_models(models: Path) -> None:
    write_parity_unet(models)
    tm.write_tiny_t5(models)
    cfg = ELLA_CONFIG
    path = tm.write_tiny_ella(models, PARITY_ELLA, input_dim=cfg["input_dim"], width=cfg["width"], layers=cfg["layers"],
                              heads=cfg["heads"], num_latents=cfg["num_latents"], token_length=128)
    # weights only, like the released file: a connector that records its token mode would override the
    # loader's token_mode (ella_core.encoding_settings), and the flexible case would not be flexible
    save_file(load_file(str(path)), str(path))


def reference_models(models: Path) -> dict:
    return dict(unet=load_diffusers_unet(models / "diffusion_models" / PARITY_UNET),
                connector=RefConnector.from_file(models / "ella" / PARITY_ELLA, **ELLA_CONFIG),
                t5=RefT5Embedder(models / "text_encoders" / tm.T5_NAME))


@pytest.fixture(scope="session")
def worlds(tmp_path_factory):
    base = tmp_path_factory.mktemp("ella-parity")
    write_models(base / "models")
    server = ComfyServer(base, extra_packs=PACKS)
    failure: list[BaseException] = []

    def boot() -> None:
        try:
            server.start()
        except BaseException as error:  # re-raised below, in the test's thread
            failure.append(error)

    thread = threading.Thread(target=boot, daemon=True)
    thread.start()
    try:
        reference = reference_models(base / "models")
        thread.join()
        if failure:
            raise failure[0]
        yield Worlds(base, server, reference)
    finally:
        thread.join()
        server.stop()
