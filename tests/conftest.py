"""Shared test set-up: repository paths, the golden data in tests/data, and a calm thread count on 2-core machines."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(int(os.environ.get("ELLA_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Reference outputs (golden connector, released key manifest): data kept with the tests."""
    return DATA
