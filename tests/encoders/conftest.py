"""Tiny real models for the text-encoder tests: random T5/UMT5/MT5 encoders with ComfyUI's real T5
tokenizer, a tiny Llama-style decoder with a word-level tokenizer, and the real SmolLM2 GGUF (once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from encoder_builders import build_llama_folder, build_t5_folder, t5_tokenizer_source


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    return t5_tokenizer_source()


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return build_t5_folder(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_llama_folder(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_t5_fp32(tiny_t5_dir):
    from ella_core.text_encoder import load_text_encoder

    return load_text_encoder(str(tiny_t5_dir), dtype="fp32")


@pytest.fixture(scope="session")
def tiny_t5_hf(tiny_t5_dir):
    """transformers' own fp32 model: the reference numerics."""
    from transformers import T5EncoderModel

    from ella_core.llm_loading import hf_dtype_kwargs

    return T5EncoderModel.from_pretrained(tiny_t5_dir, **hf_dtype_kwargs(torch.float32)).eval()


@pytest.fixture(scope="session")
def hf_t5_tokenizer(t5_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(t5_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = os.environ.get("ELLA_SMOLLM2_GGUF")
    if not path:
        pytest.skip("ELLA_SMOLLM2_GGUF is not set (scripts/setup_env.sh exports it); the real SmolLM2 is needed")
    if not os.path.isfile(path):
        pytest.fail(f"ELLA_SMOLLM2_GGUF={path} does not exist")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from ella_core.text_encoder import load_text_encoder

    return load_text_encoder(smollm2_path, dtype="fp32")
