"""Connector and LLM under ComfyUI's model management (ModelPatcher: load to GPU when used, offload after).

The objects here are what flows through the `ELLA` and `ELLA_TSC_TEXT_ENCODER` sockets.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..ella_core import ELLA, EllaMetadata

ENCODING_CACHE_SIZE = 32  # prompts kept per text encoder for graphs whose prompt changed back and forth


class _Holder(torch.nn.Module):
    """ModelPatcher writes bookkeeping attributes (`device`, ...) onto its model; ELLA and HF models expose a
    read-only `device` property, so the patcher manages this plain holder of the real module instead."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


def _module_size(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())


@dataclass(eq=False)
class ManagedConnector:
    """A loaded connector: the ELLA module wrapped in a ModelPatcher that loads/offloads with the UNet."""

    module: ELLA
    patcher: comfy.model_patcher.ModelPatcher
    metadata: EllaMetadata
    name: str
    _variants: dict = field(default_factory=dict, repr=False)  # dtype -> ManagedConnector (see for_dtype)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, module: ELLA, metadata: EllaMetadata, name: str) -> "ManagedConnector":
        patcher = comfy.model_patcher.ModelPatcher(_Holder(module), load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device(),
                                                   size=_module_size(module))
        return cls(module, patcher, metadata, name)

    def __call__(self) -> ELLA:
        """The module, wherever model management put it (the cond's `connector` getter)."""
        return self.patcher.model.inner

    def for_dtype(self, dtype: torch.dtype) -> "ManagedConnector":
        """This connector with weights in `dtype` (itself if they already are; a copy made once otherwise)."""
        if self.module.dtype == dtype:
            return self
        with self._lock:
            if dtype not in self._variants:
                module = copy.deepcopy(self.module).to(device=mm.unet_offload_device(), dtype=dtype)
                self._variants[dtype] = ManagedConnector.create(module, self.metadata, self.name)
            return self._variants[dtype]

    def __deepcopy__(self, memo):  # weights are read-only: share, never copy
        return self


@dataclass(eq=False)
class ManagedTextEncoder:
    """An LLM text encoder (ella_core LLMTextEncoder) with a token mode, max length and an LRU of encodings."""

    encoder: object  # ella_core.text_encoder.LLMTextEncoder
    patcher: comfy.model_patcher.ModelPatcher
    name: str
    mode: str = "fixed"
    max_length: int = 128
    _cache: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, encoder, name: str, load_device: torch.device, offload_device: torch.device,
               mode: str, max_length: int) -> "ManagedTextEncoder":
        patcher = comfy.model_patcher.ModelPatcher(_Holder(encoder.model), load_device=load_device,
                                                   offload_device=offload_device, size=_module_size(encoder.model))
        return cls(encoder, patcher, name, mode, max_length)

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    def encode(self, text: str) -> torch.Tensor:
        """Prompt -> LLM features (1, L, hidden) float32 on CPU; cached by (prompt, mode, max_length)."""
        key = (text, self.mode, self.max_length)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # Whole module onto its load device (evicting others if needed): plain HF layers cannot run split
        # across devices the way ComfyUI's cast-aware layers can in its partial ("lowvram") loads.
        mm.load_models_gpu([self.patcher], force_full_load=True)
        with torch.no_grad():
            encoded = self.encoder.encode([text], mode=self.mode, max_length=self.max_length)
        # float32 and finite: ella_core's encode recomputes overflows and raises on anything non-finite
        features = encoded.prompt_features(0).detach().to("cpu")  # (1, L, D)
        with self._lock:
            self._cache[key] = features
            while len(self._cache) > ENCODING_CACHE_SIZE:
                self._cache.popitem(last=False)
        return features

    def __deepcopy__(self, memo):
        return self
