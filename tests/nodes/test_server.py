"""The ELLA nodes inside a real ComfyUI server, driven over HTTP like the frontend does.

The recorder pack (tests/support/ella_test_recorder) saves what the UNet receives at every call; the
context must equal the connector applied to the prompt's LLM features at the UNet's own timestep.
"""

from __future__ import annotations

import pytest
import torch

from ella_core import load_ella
from ella_core.text_encoder import load_text_encoder
from tests.nodes.conftest import NARROW_LLM_ELLA, WIDE_ELLA
from tests.nodes.graphs import assert_contexts_exact, connector_reference, ella_prompt, read_calls
from devtools import tiny_models as tm
from tests.support.comfy_server import PromptFailed

NODE_IDS = ("EllaTSCConnectorLoader", "EllaTSCTextEncoderLoader", "EllaTSCEncode", "EllaTSCTimestepConditioning")


@pytest.fixture(scope="module")
def reference(tiny_base):
    """(features(text) -> (1, L, D), connector) computed here, independently of the server."""
    models = tiny_base / "models"
    encoder = load_text_encoder(str(models / "text_encoders" / tm.T5_NAME), dtype="fp32", device="cpu")
    connector = load_ella(models / "ella" / tm.ELLA_NAME, dtype=torch.float32)

    def features(text: str) -> torch.Tensor:
        return encoder.encode([text], mode="fixed", max_length=16).features

    return features, connector


def test_nodes_schema(server):
    info = server.object_info()
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["description"], f"{node_id} has no description"
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        for name, spec in inputs.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert tm.ELLA_NAME in info["EllaTSCConnectorLoader"]["input"]["required"]["ella_name"][1]["options"]
    assert tm.T5_NAME in info["EllaTSCTextEncoderLoader"]["input"]["required"]["model_name"][1]["options"]
    assert info["EllaTSCEncode"]["output"] == ["CONDITIONING"]
    assert info["EllaTSCTimestepConditioning"]["output"] == ["MODEL"]


def test_exact_context_every_call_with_other_pack_wrappers(server, reference, tmp_path):
    """dpm_2 + karras (intermediate evaluations), batch 2, cfg: ELLA positive and negative, exact at every
    UNet call; another pack's APPLY_MODEL and CALC_COND_BATCH wrappers run too."""
    features, connector = reference
    pos, neg = "a red fox in the snow", "blurry"
    prompt = ella_prompt(out_dir=str(tmp_path / "rec"), positive=pos, negative=neg, sampler="dpm_2",
                         scheduler="karras", steps=3, batch=2, other_pack_dir=str(tmp_path / "other"))
    result = server.run(prompt)
    assert len(result.images) == 2
    calls = read_calls(tmp_path / "rec")
    refs = {0: connector_reference(connector, features(pos)), 1: connector_reference(connector, features(neg))}
    checked = assert_contexts_exact(calls, lambda which, t: refs[which](t))
    assert checked >= 2 * len(calls) - 1  # positive and negative in every call
    distinct_t = {tuple(c["t"].tolist()) for c in calls}
    assert len(distinct_t) >= 4, f"dpm_2/karras should evaluate at several timesteps, got {distinct_t}"
    apply_calls = (tmp_path / "other" / "apply_model.log").read_text().split()
    batch_calls = (tmp_path / "other" / "calc_cond_batch.log").read_text().split()
    assert len(apply_calls) == len(calls) and len(batch_calls) >= len(distinct_t)


def test_clip_mixed_graph(server, reference, tmp_path):
    """ELLA positive with CLIP tokens appended, plain CLIP negative: both reach the UNet, ELLA part exact."""
    features, connector = reference
    pos = "a castle on a hill, oil painting"
    result = server.run(ella_prompt(out_dir=str(tmp_path / "rec"), positive=pos, negative="ugly",
                                    with_clip=True, clip_negative=True, sampler="heun", steps=2))
    assert result.images
    ref = connector_reference(connector, features(pos))
    n_latents = connector.config.num_latents
    checked = 0
    for call in read_calls(tmp_path / "rec"):
        n = len(call["cond_or_uncond"])
        b = call["context"].shape[0] // n
        for i, which in enumerate(call["cond_or_uncond"]):
            ctx = call["context"][i * b:(i + 1) * b]
            if which == 0:
                assert ctx.shape[1] == n_latents + 77, ctx.shape  # ELLA tokens then CLIP tokens
                torch.testing.assert_close(ctx[:, :n_latents], ref(call["t"][i * b:(i + 1) * b]), atol=1e-5, rtol=0)
                checked += 1
            else:
                assert ctx.shape[1] == 77  # the plain CLIP negative is untouched
    assert checked > 0


def test_missing_hook_is_a_clear_error(server, tmp_path):
    with pytest.raises(PromptFailed, match="ELLA Timestep Conditioning"):
        server.run(ella_prompt(out_dir=str(tmp_path / "rec"), hook=False, steps=1))


@pytest.mark.parametrize("ella, numbers", [(WIDE_ELLA, ("512", "768")), (NARROW_LLM_ELLA, ("64", "32"))])
def test_width_mismatch_errors_and_server_survives(server, tmp_path, ella, numbers):
    with pytest.raises(PromptFailed) as failure:
        server.run(ella_prompt(out_dir=str(tmp_path / "bad"), ella=ella, steps=1))
    message = str(failure.value)
    assert all(n in message for n in numbers), message
    assert server.alive()
    ok = server.run(ella_prompt(out_dir=str(tmp_path / "good"), steps=1, seed=7))  # next prompt works
    assert ok.images
