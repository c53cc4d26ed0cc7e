"""Prompt weights in a real ComfyUI server over HTTP: with weighting "connector attention" a weighted prompt
changes the image; with "strip" (and in graphs saved without the widget) it is the plain prompt's image.

The shared tiny SD1.5 checkpoint's UNet outputs zeros (its final GroupNorm weight is 0), so no prompt can
change its images; this module adds a copy whose final GroupNorm weight is 1 to the node tests' server."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from devtools import tiny_models as tm
from tests.nodes.graphs import ella_prompt
from tests.support.comfy_server import PromptFailed

OUT_NORM = "model.diffusion_model.out.0.weight"


VISIBLE_CKPT = "tiny_sd15_visible_unet.safetensors"


@pytest.fixture(scope="module")
def server(server, tiny_base):
    """The node tests' server (tests/nodes/conftest.py), its checkpoints folder holding the visible copy too
    (ComfyUI lists the folder again when it changes)."""
    checkpoints = tiny_base / "models" / "checkpoints"
    state = load_file(str(checkpoints / tm.CHECKPOINT_NAME))
    state[OUT_NORM] = torch.ones_like(state[OUT_NORM])
    save_file(state, str(checkpoints / VISIBLE_CKPT))  # a new file: the shared one (a link) is never written
    return server

PLAIN = "a red fox in the snow"
WEIGHTED = "a (red:1.8) fox in the (snow:0.3)"


def _pixels(server, tmp_path, text: str, weighting: str | None) -> np.ndarray:
    graph = ella_prompt(out_dir=str(tmp_path / f"rec-{weighting}-{len(text)}"), positive=text, steps=2, seed=3)
    graph["ckpt"]["inputs"]["ckpt_name"] = VISIBLE_CKPT
    if weighting is not None:
        graph["pos"]["inputs"]["weighting"] = weighting
    result = server.run(graph)
    assert len(result.images) == 1
    return np.asarray(Image.open(io.BytesIO(server.view(result.images[0]))).convert("RGB"), dtype=np.int16)


def test_weighted_prompt_changes_the_image_and_strip_does_not(server, tmp_path):
    plain = _pixels(server, tmp_path, PLAIN, None)
    assert np.array_equal(_pixels(server, tmp_path, WEIGHTED, "strip"), plain)
    assert np.array_equal(_pixels(server, tmp_path, WEIGHTED, None), plain)  # graphs saved before the widget
    assert np.array_equal(_pixels(server, tmp_path, "a (red:1.0) fox in the (snow:1)", "connector attention"), plain)
    weighted = _pixels(server, tmp_path, WEIGHTED, "connector attention")
    assert np.abs(weighted - plain).max() > 0


def test_unusable_weight_is_refused_at_queue_time(server, tmp_path):
    graph = ella_prompt(out_dir=str(tmp_path / "bad"), positive="a (red:-1) fox", steps=1)
    graph["pos"]["inputs"]["weighting"] = "connector attention"
    with pytest.raises(PromptFailed, match=r"weight -1.0 on 'red'"):
        server.run(graph)
    assert server.alive()
