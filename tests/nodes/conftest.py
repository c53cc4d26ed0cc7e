"""Fixtures for the node tests: tiny models in a ComfyUI base directory, and one real server for the module."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools import tiny_models as tm
from tests.support.comfy_server import ComfyServer

SUPPORT = Path(__file__).resolve().parents[1] / "support"
TEST_PACKS = [SUPPORT / "ella_test_recorder", SUPPORT / "other_wrapper_pack"]

# Connectors that must be refused (point 7): wrong output width, wrong LLM width.
WIDE_ELLA = "tiny_ella_width512.safetensors"  # width 512 vs the SD1.5 model's 768
NARROW_LLM_ELLA = "tiny_ella_input32.safetensors"  # input_dim 32 vs the tiny T5's 64


@pytest.fixture(autouse=True)
def context_store_env(monkeypatch):
    """In-process runs start without the cross-run context store (ella_core/context_store.py), so a test's
    counts of connector work per run do not depend on which tests ran before it in this process;
    tests/nodes/test_context_reuse.py overrides this fixture to switch the store on."""
    monkeypatch.setenv("ELLA_TSC_CONTEXT_STORE_MB", "0")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A ComfyUI base directory whose models/ holds every tiny model the node tests use."""
    base = tmp_path_factory.mktemp("ella-nodes")
    models = base / "models"
    tm.write_all(models)
    tm.write_tiny_ella(models, WIDE_ELLA, width=512)
    tm.write_tiny_ella(models, NARROW_LLM_ELLA, input_dim=32)
    return base


@pytest.fixture(scope="session")
def server(tiny_base):
    """A real ComfyUI (subprocess, HTTP) with this pack and the two test-only packs installed."""
    srv = ComfyServer(tiny_base, extra_packs=TEST_PACKS)
    srv.start()
    try:
        info = srv.object_info()
        missing = [n for n in ("EllaTSCConnectorLoader", "EllaTSCEncode", "ELLATestRecorder", "OtherPackWrapper") if n not in info]
        if missing:
            pytest.fail(f"server did not load nodes {missing}\n{srv.log_tail()}")
        yield srv
    finally:
        srv.stop()
