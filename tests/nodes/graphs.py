"""API-format prompts (what POST /prompt takes) for the node tests, and reading back recorded UNet calls."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from devtools import tiny_models as tm


def ella_prompt(*, out_dir: str, positive: str = "a red fox in the snow", negative: str = "",
                ella: str = tm.ELLA_NAME, sampler: str = "euler", scheduler: str = "normal", steps: int = 3,
                cfg: float = 5.0, batch: int = 1, denoise: float = 1.0, with_clip: bool = False,
                clip_negative: bool = False, hook: bool = True, other_pack_dir: str | None = None,
                seed: int = 1) -> dict:
    """Checkpoint -> (ELLA Timestep Conditioning) -> recorder -> KSampler with ELLA Prompt Encode conds -> SaveImage.

    with_clip: the positive also gets the checkpoint's CLIP tokens; clip_negative: negative is plain CLIP.
    hook=False leaves out ELLA Timestep Conditioning (must fail with a clear message).
    """
    g: dict = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tm.CHECKPOINT_NAME}},
        "ella": {"class_type": "EllaTSCConnectorLoader", "inputs": {"ella_name": ella}},
        "llm": {"class_type": "EllaTSCTextEncoderLoader",
                "inputs": {"model_name": tm.T5_NAME, "dtype": "fp32", "device": "cpu", "token_mode": "fixed",
                           "max_length": 16}},
        "pos": {"class_type": "EllaTSCEncode", "inputs": {"text_encoder": ["llm", 0], "ella": ["ella", 0], "text": positive}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "ella_test"}},
    }
    if with_clip:
        g["pos"]["inputs"].update({"clip": ["ckpt", 1], "clip_weight": 0.5})
    if clip_negative:
        g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": negative}}
    else:
        g["neg"] = {"class_type": "EllaTSCEncode", "inputs": {"text_encoder": ["llm", 0], "ella": ["ella", 0], "text": negative}}
    model = ["ckpt", 0]
    if hook:
        g["hook"] = {"class_type": "EllaTSCTimestepConditioning", "inputs": {"model": model, "ella": ["ella", 0]}}
        model = ["hook", 0]
    if other_pack_dir:
        g["other"] = {"class_type": "OtherPackWrapper", "inputs": {"model": model, "out_dir": other_pack_dir}}
        model = ["other", 0]
    g["rec"] = {"class_type": "ELLATestRecorder", "inputs": {"model": model, "out_dir": out_dir}}
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": ["rec", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": denoise}}
    return g


def read_calls(out_dir: Path) -> list[dict]:
    """Recorded UNet calls in order: {"t": (B,), "context": (B, N, C), "sigma", "cond_or_uncond": [...]}."""
    calls = []
    for path in sorted(Path(out_dir).glob("call_*.safetensors")):
        with safe_open(str(path), "pt") as f:
            call = {k: f.get_tensor(k) for k in f.keys()}
            call["cond_or_uncond"] = json.loads(f.metadata()["cond_or_uncond"])
        calls.append(call)
    return calls


def chunks(call: dict):
    """(cond_or_uncond index, t (b,), context (b, N, C)) for each cond chunk of one batched UNet call."""
    n = len(call["cond_or_uncond"])
    b = call["context"].shape[0] // n
    for i, which in enumerate(call["cond_or_uncond"]):
        yield which, call["t"][i * b:(i + 1) * b], call["context"][i * b:(i + 1) * b]


def assert_contexts_exact(calls: list[dict], expected, atol: float = 1e-5) -> int:
    """Every chunk of every call equals expected(which, t) (a (b, N, C) tensor) at the t the UNet got.

    Returns the number of chunks checked, so callers can assert something was checked.
    """
    checked = 0
    assert calls, "the recorder saw no UNet calls"
    for n, call in enumerate(calls):
        for which, t, ctx in chunks(call):
            ref = expected(which, t)
            if ref is None:
                continue
            assert ref.shape == ctx.shape, f"call {n}: context shape {tuple(ctx.shape)} != expected {tuple(ref.shape)}"
            err = (ref - ctx).abs().max().item()
            assert err <= atol, f"call {n} (cond_or_uncond {which}, t {t.tolist()}): max error {err:.3g}"
            checked += 1
    return checked


def connector_reference(connector, features: torch.Tensor):
    """expected(t) -> connector(features tiled to len(t), t): the context ELLA defines at each UNet timestep."""
    def at(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return connector(features.expand(t.shape[0], -1, -1), t.float())
    return at
