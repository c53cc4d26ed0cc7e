"""What the stand-in's nodes do: our own minimal code with the reference's data flow, not its algorithm.

As in the reference, the loaders return dicts `{"model", "file"}`, ELLA_EMBEDS is a dict of `ella_`-prefixed
tensors, Set ELLA Timesteps adds `timesteps` to the ELLA dict, and the encoders return one CONDITIONING
entry per sampling step (start/end percent). The "connector" here is only the checkpoint's text projection
`connector.proj_in` (no resampler, no timestep): enough to give the UNet a context of the right width.
As in the reference's per-step path, CLIP embeds combined into ELLA_EMBEDS are carried but not used; ELLA
Text Encode appends its CLIP tokens after the ELLA tokens.
"""

from __future__ import annotations

import os

import comfy.samplers
import folder_paths
import torch
import torch.nn.functional as F

PREFIX = "ella_"
DTYPES = {"FP16": torch.float16, "FP32": torch.float32, "auto": torch.float32}  # auto: the tests run on CPU


class TextProjection:
    """context (1, L, width) = features (1, L, D) @ proj_in.T + bias."""

    def __init__(self, path: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(path)
        try:
            self.weight = tensors["connector.proj_in.weight"].float()
            self.bias = tensors["connector.proj_in.bias"].float()
        except KeyError:
            raise ValueError(f"stand-in Load ELLA Model: {path} has no connector.proj_in weights") from None

    def __call__(self, t5_embeds: torch.Tensor) -> torch.Tensor:
        if t5_embeds.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"stand-in: T5 width {t5_embeds.shape[-1]} != connector input {self.weight.shape[1]}")
        return F.linear(t5_embeds.float(), self.weight, self.bias)


class T5Features:
    """Last hidden state of a T5 encoder folder; max_length 0 means no padding or truncation."""

    def __init__(self, path: str, max_length: int, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = T5EncoderModel.from_pretrained(path).to(dtype).eval()
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, text: str) -> torch.Tensor:
        fixed = dict(padding="max_length", truncation=True, max_length=self.max_length) if self.max_length else {}
        tokens = self.tokenizer(text, return_tensors="pt", **fixed)
        return self.model(**tokens).last_hidden_state.float()


def config_dirs(folder: str) -> list[str]:
    """Folders holding a config.json under every path of `folder`, relative to that path."""
    found = []
    for root in folder_paths.get_folder_paths(folder):
        for dirpath, _, files in os.walk(root, followlinks=True):
            if "config.json" in files:
                found.append(os.path.relpath(dirpath, root))
    return found


def _per_step(ella: dict, embeds: dict) -> list:
    timesteps = ella.get("timesteps")
    if timesteps is None:
        raise ValueError("stand-in: timesteps missing; use Set ELLA Timesteps (or Apply ELLA's sigmas) first")
    context = ella["model"](embeds[PREFIX + "t5_embeds"])
    steps = len(timesteps) - 1
    return [[context, {"start_percent": i / steps, "end_percent": (i + 1) / steps}] for i in range(steps)]


def ella_loader(name):
    path = folder_paths.get_full_path_or_raise("ella", name)
    return ({"model": TextProjection(path), "file": path},)


def t5_loader(name, max_length, dtype):
    for root in folder_paths.get_folder_paths("ella_encoder"):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return ({"model": T5Features(path, max_length, DTYPES[dtype]), "file": path},)
    raise FileNotFoundError(f"stand-in: T5 folder {name!r} not in {folder_paths.get_folder_paths('ella_encoder')}")


def set_timesteps(model, ella, scheduler, steps, denoise, sigmas=None):
    sampling = model.get_model_object("model_sampling")
    if sigmas is None:
        if denoise <= 0:
            raise ValueError("stand-in Set ELLA Timesteps: denoise must be > 0")
        total = steps if denoise >= 1 else int(steps / denoise)
        sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, total).cpu()[-(steps + 1):]
    return ({**ella, "timesteps": sampling.timestep(sigmas)},)


def apply(model, ella, positive, negative, sigmas=None):
    if sigmas is not None:
        ella = {**ella, "timesteps": model.get_model_object("model_sampling").timestep(sigmas)}
    return (model, _per_step(ella, positive), _per_step(ella, negative))


def t5_text_encode(text, text_encoder, embeds=None):
    return ({**(embeds or {}), PREFIX + "t5_embeds": text_encoder["model"](text)},)


def ella_encode(ella, embeds):
    return (_per_step(ella, embeds),)


def ella_text_encode(ella, text_encoder, text, clip=None, text_clip=""):
    embeds = {PREFIX + "t5_embeds": text_encoder["model"](text)}
    if clip is None:
        if text_clip:
            raise ValueError("stand-in ELLA Text Encode: text_clip needs a clip")
        return (_per_step(ella, embeds), None)
    tokens, pooled = clip.encode_from_tokens(clip.tokenize(text_clip), return_pooled=True)
    conds = [[torch.cat([context, tokens.to(context)], dim=1), options] for context, options in _per_step(ella, embeds)]
    return (conds, [[tokens, {"pooled_output": pooled}]])


def combine_embeds(embeds, embeds_add):
    return ({**embeds, **embeds_add},)


def clip_into_embeds(cond, embeds=None):
    return ({**(embeds or {}), PREFIX + "clip_embeds": cond[0][0]},)


NODES = {
    "EllaApply": apply,
    "EllaEncode": ella_encode,
    "T5TextEncode #ELLA": t5_text_encode,
    "EllaTextEncode": ella_text_encode,
    "ELLALoader": ella_loader,
    "T5TextEncoderLoader #ELLA": t5_loader,
    "EllaCombineEmbeds": combine_embeds,
    "ConditionToEllaEmbeds": clip_into_embeds,
    "ConcatConditionEllaEmbeds": clip_into_embeds,
    "CombineClipEllaEmbeds": clip_into_embeds,
    "SetEllaTimesteps": set_timesteps,
}
