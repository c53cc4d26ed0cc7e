"""The one dtype policy for ELLA's text encoders: the names users type, what each means, the defaults.

Used by the nodes, the trainer and the benches (and nothing else keeps its own table).
A precision is a pair: the dtype the weights are *stored* in and the dtype the LLM *computes* in. They differ
only for fp8, where Linear weights are stored in fp8 and cast to the compute dtype layer by layer (fp8 has no
matmul kernels on most devices, and its range is too small for activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # canonical name, as in NAMES
    storage: torch.dtype  # dtype Linear weights are kept in
    compute: torch.dtype  # dtype of every other weight and of the activations

    @property
    def is_fp8(self) -> bool:
        return self.storage != self.compute


# Canonical names -> storage dtype. fp8 computes in the family's default half type (below).
NAMES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32",
           "float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2"}  # fmt: skip
AUTO = ("auto", "default")
# T5: the released connector was trained on fp16 flan-t5-xl features. Decoders: bf16 keeps fp32's range
# (decoder LLMs are trained in bf16 and often overflow fp16) at half the memory.
FAMILY_DEFAULT = {"t5": "fp16", "decoder": "bf16"}
CHOICES = (*AUTO[:1], *NAMES)  # what a user may pass: "auto" or a canonical name (aliases accepted too)


class PrecisionError(ValueError):
    """An unknown or unusable dtype name; the message lists the valid ones."""


def canonical_name(value: str | torch.dtype) -> str:
    """"float16" / torch.float16 / "FP16" -> "fp16"; "auto" stays "auto"."""
    if isinstance(value, torch.dtype):
        for name, dtype in NAMES.items():
            if dtype == value:
                return name
        raise PrecisionError(f"text encoder dtype {value} is not supported; use one of {', '.join(CHOICES)}")
    if not isinstance(value, str):
        raise PrecisionError(
            f"text encoder dtype must be a name or torch.dtype, got {type(value).__name__} {value!r}; "
            f"use one of {', '.join(CHOICES)}"
        )
    key = value.strip().lower()
    if key in AUTO:
        return "auto"
    key = ALIASES.get(key, key)
    if key not in NAMES:
        raise PrecisionError(f"unknown text encoder dtype {value!r}; use one of {', '.join(CHOICES)}")
    return key


def parse_precision(value: str | torch.dtype | Precision | None, family: str) -> Precision:
    """None / "auto" -> the family default; a name, alias or torch dtype as asked. family: "t5" | "decoder"."""
    if isinstance(value, Precision):
        return value
    if family not in FAMILY_DEFAULT:
        raise PrecisionError(f"family must be one of {sorted(FAMILY_DEFAULT)}, got {family!r}")
    name = "auto" if value is None else canonical_name(value)
    if name == "auto":
        name = FAMILY_DEFAULT[family]
    storage = NAMES[name]
    compute = NAMES[FAMILY_DEFAULT[family]] if storage.itemsize == 1 else storage
    return Precision(name=name, storage=storage, compute=compute)


def parse_dtype(value: str | torch.dtype | None, family: str = "t5") -> torch.dtype:
    """The compute dtype of a precision name (what the trainer and the benches run the LLM in)."""
    return parse_precision(value, family).compute


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "fp16" (for metadata and messages)."""
    return canonical_name(dtype)
