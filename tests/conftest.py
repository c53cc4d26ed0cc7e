"""Shared test set-up: repository paths, the shared golden data, and a calm thread count on 2-core machines."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ELLA_SHARED_DIR", ROOT.parent / "shared"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(int(os.environ.get("ELLA_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "ella").is_dir():
        pytest.fail(f"shared data folder not found at {SHARED} (set ELLA_SHARED_DIR)")
    return SHARED
