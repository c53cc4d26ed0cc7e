"""A real ComfyUI server started with a text-encoder precision flag: a tokenizer-less single T5 file is listed,
loads with ComfyUI's T5 tokenizer in the flag's dtype, and the graph renders over HTTP. Runs under the same
python as the test (so also on the transformers floor)."""

from __future__ import annotations

import sys

import pytest

from devtools import tiny_models as tm
from tests.support.comfy_server import ComfyServer

from encoder_builders import write_t5_single_file

SINGLE = "tiny_t5_single_fp16.safetensors"


@pytest.fixture(scope="module")
def fp8_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fp8-server")
    models = base / "models"
    tm.write_all(models, with_clip=False)
    write_t5_single_file(models / "text_encoders" / tm.T5_NAME, models / "text_encoders" / SINGLE)
    srv = ComfyServer(base, extra_args=["--fp8_e4m3fn-text-enc"], python=sys.executable)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _graph(prompt: str) -> dict:
    llm = {"model_name": SINGLE, "dtype": "default", "device": "cpu", "token_mode": "flexible", "max_length": 8}
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tm.CHECKPOINT_NAME}},
        "ella": {"class_type": "EllaTSCConnectorLoader", "inputs": {"ella_name": tm.ELLA_NAME}},
        "llm": {"class_type": "EllaTSCTextEncoderLoader", "inputs": llm},
        "pos": {"class_type": "EllaTSCEncode", "inputs": {"text_encoder": ["llm", 0], "ella": ["ella", 0], "text": prompt}},
        "neg": {"class_type": "EllaTSCEncode", "inputs": {"text_encoder": ["llm", 0], "ella": ["ella", 0], "text": ""}},
        "hook": {"class_type": "EllaTSCTimestepConditioning", "inputs": {"model": ["ckpt", 0], "ella": ["ella", 0]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["hook", 0], "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "ella_fp8"}},
    }  # fmt: skip


def test_fp8_flag_and_tokenizer_less_t5_file_on_a_real_server(fp8_server):
    info = fp8_server.object_info("EllaTSCTextEncoderLoader")["EllaTSCTextEncoderLoader"]
    required = info["input"]["required"]
    options = {k: v[0] if isinstance(v[0], list) else v[1]["options"] for k, v in required.items()
               if k in ("model_name", "dtype")}  # V3 combos: ["COMBO", {"options": [...]}]
    assert SINGLE in options["model_name"]  # listed although no tokenizer lies beside it
    assert "fp8_e4m3fn" in options["dtype"]
    long_prompt = "a lighthouse on a cliff at sunset with waves and seagulls and clouds"  # > 8 tokens
    result = fp8_server.run(_graph(long_prompt))
    assert len(result.images) == 1 and fp8_server.view(result.images[0])[:4] == b"\x89PNG"
    log = fp8_server.log_tail(200_000)
    assert "--fp8_e4m3fn-text-enc -> weights in fp8_e4m3fn" in log
