"""A real ComfyUI server with this pack and tiny models, shared by the example-workflow tests of this folder."""
from __future__ import annotations

import pytest

from tests.support.comfy_server import ComfyServer
from tests.workflows.examples import tiny_models_base

NODES = ("EllaTSCConnectorLoader", "EllaTSCTextEncoderLoader", "EllaTSCEncode", "EllaTSCTimestepConditioning")


@pytest.fixture(scope="session")
def example_server(tmp_path_factory):
    """(server, names): server with tiny models for every loader the examples use; names maps roles to files."""
    base = tmp_path_factory.mktemp("comfy-examples")
    names = tiny_models_base(base)
    server = ComfyServer(base)
    server.start()
    try:
        yield server, names
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_info(example_server):
    server, _ = example_server
    info = server.object_info()
    missing = [n for n in NODES if n not in info]
    if missing:
        pytest.fail(f"the server did not load the pack's nodes {missing}:\n{server.log_tail()}")
    return info
