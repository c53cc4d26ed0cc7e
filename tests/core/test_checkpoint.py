"""Checkpoint I/O: strict loading of the released layout, config inference, metadata, atomic saving."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ella_core.checkpoint as checkpoint
from ella_core import ELLA, ELLACheckpointError, ELLAConfig, EllaMetadata, load_ella, load_ella_with_metadata, read_ella_metadata, save_ella

TINY = ELLAConfig(input_dim=24, width=32, layers=2, heads=4, num_latents=6, time_channel=16, time_embed_dim=24)


@pytest.fixture(scope="module")
def released_shapes(golden_dir):
    return json.loads((golden_dir / "ella_sd15_t5xl_keys.json").read_text())


def random_state_dict(config: ELLAConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in ELLA(config).state_dict().items()}


def test_default_config_is_the_released_layout(released_shapes):
    state = ELLA().state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == released_shapes
    assert sum(v.numel() for v in state.values()) == 66_820_608


def test_released_file_layout_loads_strictly_and_infers_config(tmp_path, released_shapes):
    """A file exactly like ella-sd1.5-tsc-t5xl.safetensors: 93 tensors, no metadata."""
    tensors = {k: torch.randn(shape) * 0.02 for k, shape in released_shapes.items()}
    path = tmp_path / "ella-sd1.5-tsc-t5xl.safetensors"
    save_file(tensors, str(path))
    model, meta = load_ella_with_metadata(path)
    assert model.config == ELLAConfig()
    assert meta.base_model == "sd15" and meta.llm == "google/flan-t5-xl"
    assert (meta.llm_dtype, meta.token_length, meta.token_mode) == ("float16", 128, "fixed")
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[key])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_golden_weights_load_from_reference_key_names(golden_dir):
    with safe_open(str(golden_dir / "ella_tiny_golden.safetensors"), "pt") as f:
        weights = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
        expected = f.get_tensor("output.expected")
        text, t = f.get_tensor("input.text"), f.get_tensor("input.timesteps")
    model = load_ella(weights)  # no metadata: heads fall back to 8, so give the golden's 4 through a file
    assert model.config.heads == 8 and model.config.width == 48
    model4 = ELLA(ELLAConfig(**{**model.config.to_dict(), "heads": 4}))
    model4.load_state_dict(weights, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model4.eval()(text, t), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        ELLAConfig(input_dim=576, width=64, layers=3, heads=8, num_latents=16, time_channel=32, time_embed_dim=48),
        ELLAConfig(input_dim=40, width=128, layers=1, heads=8, num_latents=4, time_channel=16, time_embed_dim=16, pooled_dim=96),
    ],
)
def test_config_inferred_from_shapes(config):
    state = random_state_dict(config)
    assert checkpoint.infer_config(state, heads=config.heads) == config
    assert checkpoint.infer_config(state).heads == 8  # nothing records heads: the released value


def test_heads_come_from_metadata(tmp_path):
    model = ELLA(TINY)
    save_ella(model, tmp_path / "c.safetensors")
    assert load_ella(tmp_path / "c.safetensors").config.heads == 4  # without metadata this would be 8


def test_metadata_round_trip(tmp_path):
    config = ELLAConfig.for_base("sdxl", input_dim=576, layers=1, num_latents=4, time_channel=16, time_embed_dim=32)
    model = ELLA(config)
    path = tmp_path / "sdxl.safetensors"
    save_ella(model, path, {"base_model": "sdxl", "llm": "HuggingFaceTB/SmolLM2-135M-Instruct", "llm_dtype": "bfloat16",
                            "llm_hidden_layer": -2, "token_length": 256, "token_mode": "flexible", "steps": 1200})
    meta = read_ella_metadata(path)
    assert meta == EllaMetadata(config=config, base_model="sdxl", llm="HuggingFaceTB/SmolLM2-135M-Instruct",
                                llm_dtype="bfloat16", llm_hidden_layer=-2, token_length=256, token_mode="flexible",
                                extra={"steps": "1200"})
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
        assert set(f.keys()) == set(model.state_dict())
    assert raw["format"] == "ella-connector" and json.loads(raw["ella_config"])["pooled_dim"] == 1280
    loaded, meta2 = load_ella_with_metadata(path)
    assert meta2 == meta and loaded.config == config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_saved_tiny_file_uses_exactly_the_reference_keys(tmp_path, golden_dir):
    """What the reference's strict load checks: the same names and shapes, nothing extra."""
    with safe_open(str(golden_dir / "ella_tiny_golden.safetensors"), "pt") as f:
        reference = {k[len("model."):]: f.get_slice(k).get_shape() for k in f.keys() if k.startswith("model.")}
        config = ELLAConfig.from_dict(json.loads(f.metadata()["config"]))
    save_ella(ELLA(config), tmp_path / "tiny.safetensors")
    with safe_open(str(tmp_path / "tiny.safetensors"), "pt") as f:
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == reference


def test_dtype_and_device_arguments(tmp_path):
    save_ella(ELLA(TINY).half(), tmp_path / "half.safetensors")
    assert load_ella(tmp_path / "half.safetensors").dtype == torch.float16  # file dtype by default
    model = load_ella(tmp_path / "half.safetensors", device="cpu", dtype=torch.float32)
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_save_unwraps_compiled_and_ddp_style_wrappers(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    inner = ELLA(TINY)
    save_ella(Wrapper(inner), tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert not any(k.startswith("module.") for k in f.keys())


def test_missing_and_unexpected_keys_are_named():
    state = random_state_dict(TINY)
    del state["connector.perceiver_blocks.1.mlp.c_fc.bias"]
    state["connector.extra.weight"] = torch.zeros(2)
    with pytest.raises(ELLACheckpointError, match=r"1 of the model's 37 weights are missing.*c_fc\.bias.*1 keys are not part of this model.*connector\.extra"):
        load_ella(state)


def test_shape_mismatch_is_named(tmp_path):
    state = random_state_dict(TINY)
    state["connector.perceiver_blocks.0.mlp.c_fc.weight"] = torch.zeros(100, 32)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ELLACheckpointError, match=r"bad\.safetensors.*1 shape mismatches \(connector\.perceiver_blocks\.0\.mlp\.c_fc\.weight: file \[100, 32\], config \[128, 32\]"):
        load_ella(path)


def test_not_a_connector_is_named(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ELLACheckpointError, match=r"unet\.safetensors is not an ELLA connector"):
        load_ella(path)


def test_nan_weights_are_refused_on_load_and_save(tmp_path):
    state = random_state_dict(TINY)
    state["connector.latents"][0, 0] = float("nan")
    with pytest.raises(ELLACheckpointError, match="NaN or inf.*connector.latents"):
        load_ella(state)
    model = ELLA(TINY)
    with torch.no_grad():
        model.connector.proj_in.weight[0, 0] = float("inf")
    with pytest.raises(ELLACheckpointError, match="refusing to save"):
        save_ella(model, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def test_corrupt_and_missing_files(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_ella(ELLA(TINY), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ELLACheckpointError, match=r"cut\.safetensors is not a readable safetensors file"):
        load_ella(path)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_ella(tmp_path / "nowhere.safetensors")
    with pytest.raises(ELLACheckpointError, match="unsupported file type"):
        (tmp_path / "x.onnx").write_bytes(b"0")
        load_ella(tmp_path / "x.onnx")


class Payload:
    """An arbitrary Python object: unpickling it could run code, so weights-only loading refuses it."""


def test_pickled_code_is_refused_but_plain_weights_load(tmp_path):
    torch.save(random_state_dict(TINY), tmp_path / "weights.pt")
    assert load_ella(tmp_path / "weights.pt").config.width == 32

    torch.save({"connector.latents": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ELLACheckpointError, match="weights only"):
        load_ella(tmp_path / "evil.pt")


def test_width_without_recorded_heads_must_divide_by_eight():
    state = random_state_dict(ELLAConfig(input_dim=8, width=36, layers=1, heads=4, num_latents=2, time_channel=8, time_embed_dim=8))
    with pytest.raises(ELLACheckpointError, match="width 36 is not divisible by 8 heads"):
        load_ella(state)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_ella(ELLA(TINY), path)
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_ella(ELLA(TINY), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]
