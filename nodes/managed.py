"""Connector and LLM under ComfyUI's model management (ModelPatcher: load to GPU when used, offload after).

The objects here are what flows through the `ELLA` and `ELLA_TSC_TEXT_ENCODER` sockets.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
import comfy.model_patcher
from comfy.cli_args import args

from ..ella_core import ELLA, EllaMetadata
from ..ella_core.encoding_settings import EncodingSettings
from ..ella_core.cast_weights import make_cast_aware
from ..ella_core.dtypes import CHOICES, canonical_name

logger = logging.getLogger(__name__)
ENCODING_CACHE_SIZE = 32  # prompts kept per text encoder for graphs whose prompt changed back and forth
# ComfyUI's text-encoder precision flags (comfy/cli_args.py): args attribute -> (flag, ella_core.dtypes name).
PRECISION_FLAGS = {
    "fp8_e4m3fn_text_enc": ("--fp8_e4m3fn-text-enc", "fp8_e4m3fn"),
    "fp8_e5m2_text_enc": ("--fp8_e5m2-text-enc", "fp8_e5m2"),
    "fp16_text_enc": ("--fp16-text-enc", "fp16"),
    "bf16_text_enc": ("--bf16-text-enc", "bf16"),
    "fp32_text_enc": ("--fp32-text-enc", "fp32"),
}
DTYPE_WIDGET = ("default", *CHOICES[1:])  # the loader's dtype options


def text_encoder_precision(widget: str, load_device: torch.device) -> str:
    """The loader's dtype widget + ComfyUI's precision flag -> an ella_core.dtypes name (or "auto").

    "default": the flag when one is given, else fp32 on a CPU load device (half matmuls are slow there) and
    the family default (T5 fp16, decoders bf16) elsewhere. An explicit widget value wins over a flag, with a
    warning naming the flag.
    """
    flag, flag_dtype = next((v for attr, v in PRECISION_FLAGS.items() if getattr(args, attr, False)), (None, None))
    if widget in (None, "default"):
        if flag is not None:
            logger.info("ELLA text encoder: %s -> weights in %s", flag, flag_dtype)
            return flag_dtype
        return "fp32" if load_device.type == "cpu" else "auto"
    name = canonical_name(widget)
    if flag is not None and name != flag_dtype:
        logger.warning("ELLA text encoder: dtype %s set on the node overrides ComfyUI's %s", name, flag)
    return name


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


def _allow_partial_load(model: torch.nn.Module) -> None:
    """Give every module holding weights the attributes ComfyUI's partial loader looks for (`comfy_cast_weights`,
    `weight_function`, `bias_function`), and a forward that copies offloaded weights to the activations' device
    (ella_core.cast_weights), as ComfyUI's own cast-aware layers do."""
    for module in make_cast_aware(model):
        if not hasattr(module, "comfy_cast_weights"):
            module.comfy_cast_weights = False
            module.weight_function = []
            module.bias_function = []


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
        _allow_partial_load(encoder.model)
        patcher = comfy.model_patcher.ModelPatcher(_Holder(encoder.model), load_device=load_device,
                                                   offload_device=offload_device, size=_module_size(encoder.model))
        return cls(encoder, patcher, name, mode, max_length)

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def settings(self) -> EncodingSettings:
        """What the loader's widgets ask for (a connector's metadata may override it: EllaTSCEncode)."""
        return EncodingSettings(self.mode, self.max_length, self.encoder.hidden_layer)

    def _encoder_for(self, hidden_layer: int | None):
        """The encoder reading `hidden_layer`: the same model and tokenizer, another hidden-state index."""
        if hidden_layer == self.encoder.hidden_layer:
            return self.encoder
        enc = self.encoder
        other = type(enc)(enc.model, enc.tokenizer, enc.family, name=enc.name, hidden_layer=hidden_layer)
        other.precision = enc.precision
        return other

    def encode(self, text: str, settings: EncodingSettings | None = None) -> torch.Tensor:
        """Prompt -> LLM features (1, L, hidden) float32 on CPU; cached by (prompt, settings)."""
        settings = settings or self.settings
        key = (text, settings)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        encoder = self._encoder_for(settings.hidden_layer)  # checks the layer exists before any loading
        # Partial loads are allowed (--lowvram, or too little free memory): layers left on the offload device
        # are copied to the compute device when they run (_allow_partial_load).
        mm.load_models_gpu([self.patcher])
        with torch.no_grad():
            encoded = encoder.encode([text], mode=settings.mode, max_length=settings.max_length)
        # float32 and finite: ella_core's encode recomputes overflows and raises on anything non-finite
        features = encoded.prompt_features(0).detach().to("cpu")  # (1, L, D)
        with self._lock:
            self._cache[key] = features
            while len(self._cache) > ENCODING_CACHE_SIZE:
                self._cache.popitem(last=False)
        return features

    def __deepcopy__(self, memo):
        return self
