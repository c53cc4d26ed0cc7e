"""Weights kept in another dtype or on another device than the computation, cast when their layer runs.

Two users: fp8 storage (Linear weights held in fp8, cast to the activations' dtype per layer, since fp8 has
neither the range for activations nor matmul kernels on most devices), and partial offloading (a model
manager leaves some layers' weights on the CPU; they are copied to the activations' device for the call).
The wrapped forward changes nothing when every weight already has the device and dtype it needs, so it is
bit-identical to the plain module then.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _cast_forward(module: torch.nn.Module, forward, *args: Any, **kwargs: Any):
    ref = _first_tensor(args, kwargs)
    if ref is None:
        return forward(*args, **kwargs)
    compute = ref.dtype if ref.is_floating_point() else None
    saved: list[tuple[dict, str, torch.Tensor]] = []
    for table in (module._parameters, module._buffers):
        for name, tensor in table.items():
            if tensor is None:
                continue
            dtype = compute if (tensor.dtype in FP8_DTYPES and compute is not None) else tensor.dtype
            if tensor.device != ref.device or tensor.dtype != dtype:
                saved.append((table, name, tensor))
                table[name] = tensor.detach().to(device=ref.device, dtype=dtype)
    if not saved:
        return forward(*args, **kwargs)
    try:
        return forward(*args, **kwargs)
    finally:  # the stored weights stay where and as they were
        for table, name, tensor in saved:
            table[name] = tensor


def modules_holding_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """Every submodule with parameters or buffers of its own."""
    for name, module in model.named_modules():
        if any(t is not None for t in (*module._parameters.values(), *module._buffers.values())):
            yield name, module


def make_cast_aware(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Wrap the forward of every module holding tensors (idempotent); returns those modules."""
    wrapped = []
    for _name, module in modules_holding_tensors(model):
        if not getattr(module, "_ella_cast_aware", False):
            module.forward = functools.partial(_cast_forward, module, module.forward)
            module._ella_cast_aware = True
        wrapped.append(module)
    return wrapped


def store_linear_weights(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> int:
    """Hold every Linear weight that is in `compute` dtype in `storage` (fp8) instead; returns how many.

    Linear layers transformers keeps in fp32 (T5's `wo`, `_keep_in_fp32_modules`) stay as they are: T5 casts
    its hidden states to that layer's dtype before calling it.
    """
    if storage not in FP8_DTYPES:
        raise ValueError(f"weight storage must be an fp8 dtype, got {storage}")
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == compute:
            module.weight = torch.nn.Parameter(module.weight.detach().to(storage), requires_grad=False)
            count += 1
    make_cast_aware(model)
    return count
