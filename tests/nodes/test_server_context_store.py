"""The cross-run context store in a real ComfyUI server over HTTP: queueing the same workflow again with a new
seed reuses every context (the pack's DEBUG log line of each run says how many were computed and reused),
and its images and UNet contexts are those of a server with the store off (ELLA_TSC_CONTEXT_STORE_MB=0),
where the seeds differ exactly as they do here.

The shared tiny checkpoint's UNet outputs zeros (test_server_prompt_weights.py), so this module uses a copy
whose final GroupNorm weight is 1: the images then depend on the contexts."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from devtools import tiny_models as tm
from tests.nodes.conftest import TEST_PACKS
from tests.nodes.graphs import assert_contexts_exact, connector_reference, ella_prompt, read_calls
from tests.support.comfy_server import ComfyServer

VISIBLE_CKPT = "tiny_sd15_visible_unet.safetensors"
RUN_LINE = re.compile(r"ELLA run: (\d+) contexts computed in (\d+) connector forwards \((\d+) precomputed\), "
                      r"(\d+) reused from the context store")


@pytest.fixture(scope="module")
def models(tiny_base, tmp_path_factory):
    """The node tests' models, the checkpoints folder holding a copy of the tiny checkpoint whose UNet output
    is not zero."""
    root = tmp_path_factory.mktemp("store-models")
    for entry in (tiny_base / "models").iterdir():
        if entry.name != "checkpoints":
            (root / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    state = load_file(str(tiny_base / "models" / "checkpoints" / tm.CHECKPOINT_NAME))
    state["model.diffusion_model.out.0.weight"] = torch.ones_like(state["model.diffusion_model.out.0.weight"])
    (root / "checkpoints").mkdir()
    save_file(state, str(root / "checkpoints" / VISIBLE_CKPT))
    return root


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """Two servers with DEBUG logs: the store at its default budget, and switched off."""
    started = {}
    try:
        for name, budget in (("store", ""), ("off", "0")):  # "": the default budget
            base = tmp_path_factory.mktemp(f"server-{name}")
            (base / "models").symlink_to(models, target_is_directory=True)
            server = ComfyServer(base, extra_packs=TEST_PACKS, extra_args=["--verbose", "DEBUG"],
                                 env={"ELLA_TSC_CONTEXT_STORE_MB": budget})
            started[name] = server.start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def _pixels(server, result) -> list:
    return [np.asarray(Image.open(io.BytesIO(server.view(image)))) for image in result.images]


def test_requeued_workflow_reuses_every_context_and_matches_the_store_off_server(servers, models, tmp_path):
    from ella_core import load_ella
    from ella_core.text_encoder import load_text_encoder

    pos, neg = "a lighthouse on a cliff at dusk", "blurry"
    got, runs = {}, {}
    for name, server in servers.items():
        assert server.alive()
        for seed in (11, 12):
            out_dir = tmp_path / f"{name}-{seed}"
            graph = ella_prompt(out_dir=str(out_dir), positive=pos, negative=neg, sampler="dpm_2",
                                scheduler="karras", steps=4, batch=2, seed=seed)
            graph["ckpt"]["inputs"]["ckpt_name"] = VISIBLE_CKPT
            result = server.run(graph)
            got[name, seed] = (_pixels(server, result), read_calls(out_dir))
        runs[name] = [tuple(int(v) for v in m.groups()) for m in RUN_LINE.finditer(server.log_tail(10**7))]

    (computed, forwards, _, reused), second = runs["store"]  # (computed, forwards, precomputed, reused) per run
    assert computed > 0 and forwards > 0 and reused == 0, runs["store"]
    assert second[:2] == (0, 0) and second[3] > 0, f"the re-queued run computed contexts: {second}"
    assert [run[3] for run in runs["off"]] == [0, 0] and runs["off"][1][0] == computed, runs["off"]

    for seed in (11, 12):
        (images, calls), (images_off, calls_off) = got["store", seed], got["off", seed]
        assert len(images) == 2 and all(np.array_equal(a, b) for a, b in zip(images, images_off)), seed
        assert len(calls) == len(calls_off) > 0
        assert all(torch.equal(a["context"], b["context"]) for a, b in zip(calls, calls_off)), seed
    assert not np.array_equal(got["store", 11][0][0], got["store", 12][0][0])  # seeds differ, as without the store

    encoder = load_text_encoder(str(models / "text_encoders" / tm.T5_NAME), dtype="fp32", device="cpu")
    connector = load_ella(models / "ella" / tm.ELLA_NAME, dtype=torch.float32)
    refs = {i: connector_reference(connector, encoder.encode([text], mode="fixed", max_length=16).features)
            for i, text in enumerate((pos, neg))}
    calls = got["store", 12][1]
    assert assert_contexts_exact(calls, lambda which, t: refs[which](t)) == 2 * len(calls)
