"""A real ComfyUI server for the robustness suite: the tiny models, the real SmolLM2 GGUF tokenizer, a
truncated GGUF, and connectors with broken metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devtools import tiny_models as tm
from tests.support.comfy_server import ComfyServer

SUPPORT = Path(__file__).resolve().parents[1] / "support"
SMOLLM2 = "SmolLM2-135M.gguf"
CUT_GGUF = "cut.gguf"
# Connector files whose metadata is wrong: name -> (metadata change, what the error must say)
BAD_CONNECTORS = {
    "bad_config_list.safetensors": ({"ella_config": "[1,2]"}, "'ella_config' must be a JSON object"),
    "bad_token_length.safetensors": ({"ella_token_length": "abc"}, "'ella_token_length' must be an integer, got 'abc'"),
    "huge_config.safetensors": (None, "layers=3000 (tensors say 1)"),
}


def _write_bad_connectors(models: Path) -> None:
    good = models / "ella" / tm.ELLA_NAME
    with safe_open(str(good), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for name, (change, _) in BAD_CONNECTORS.items():
        if change is None:  # a declared 3000-layer x 65536-wide config over the tiny tensors
            config = json.loads(meta["ella_config"])
            change = {"ella_config": json.dumps({**config, "layers": 3000, "width": 65536})}
        save_file(tensors, str(models / "ella" / name), {**meta, **change})


@pytest.fixture(scope="session")
def robust_base(tmp_path_factory) -> Path:
    gguf = os.environ.get("ELLA_SMOLLM2_GGUF")
    if not gguf or not os.path.isfile(gguf):
        pytest.fail("ELLA_SMOLLM2_GGUF is not set: run eval \"$(bash scripts/setup_env.sh)\"")
    base = tmp_path_factory.mktemp("ella-robust")
    models = base / "models"
    tm.write_all(models)
    (models / "LLM").mkdir(parents=True, exist_ok=True)
    (models / "LLM" / SMOLLM2).symlink_to(gguf)
    with open(gguf, "rb") as src, open(models / "LLM" / CUT_GGUF, "wb") as dst:
        dst.write(src.read(os.path.getsize(gguf) // 2))
    _write_bad_connectors(models)
    return base


@pytest.fixture(scope="session")
def rserver(robust_base):
    srv = ComfyServer(robust_base, extra_packs=[SUPPORT / "ella_test_recorder"])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def truth_tokenizers(robust_base):
    """The route's tokenizers loaded here, single-threaded: the ground truth for every count."""
    from ella_core.tokenization import load_tokenizer

    torch.set_num_threads(1)
    models = robust_base / "models"
    return {tm.T5_NAME: load_tokenizer(str(models / "text_encoders" / tm.T5_NAME)),
            SMOLLM2: load_tokenizer(str(models / "LLM" / SMOLLM2))}
