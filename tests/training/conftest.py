"""Session fixtures of the trainer's tests (builders in tests/training/train_helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.training.train_helpers import (build_diffusers_base, build_tiny_t5, pretrain_text_reliant_unet,
                                          synthetic_samples, write_csv, write_folder, write_jsonl, write_tars)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    return build_diffusers_base(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_diffusers_base(tmp_path_factory.mktemp("sdxl"), sdxl=True, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def text_reliant_sd15(tmp_path_factory, tiny_sd15, tiny_t5) -> Path:
    return pretrain_text_reliant_unet(tiny_sd15, tiny_t5, tmp_path_factory.mktemp("trained") / "base")


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict:
    """The same 24 synthetic samples in every supported format."""
    root = tmp_path_factory.mktemp("data")
    samples = synthetic_samples(24, seed=0)
    write_tars(root / "tars", samples, per_shard=8)
    return {"folder": write_folder(root / "folder", samples), "jsonl": write_jsonl(root / "jsonl", samples),
            "csv": write_csv(root / "csv", samples), "webdataset": f"{root / 'tars'}/shard-{{0000..0002}}.tar"}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = os.environ.get("ELLA_SMOLLM2_GGUF")
    if not path or not Path(path).is_file():
        pytest.fail("ELLA_SMOLLM2_GGUF is not set or missing (eval \"$(bash scripts/setup_env.sh)\")")
    return Path(path)


