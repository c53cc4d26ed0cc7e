"""The connector's optimizer and gradient clipping, chosen for the step's speed without changing its maths.

The optimizer's work is memory traffic over every parameter (66.8 M for the released connector's shape), so
the number of passes decides its cost: torch's default AdamW on a CPU is the single-tensor loop (about a
dozen passes over parameters, gradients and both moments); the fused kernel reads and writes each once.
Same update rule: the two agree to rounding (tests/training/test_step.py), and a run resumes bit-exactly
because the implementation travels in the checkpoint's optimizer state (a checkpoint written by the loop
resumes with the loop). bench/training_step.py measures both.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from .config import OptimConfig

# devices with torch's fused AdamW kernel (torch.optim.optimizer._get_fused_kernels_supported_devices)
FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def implementation(device: torch.device) -> dict[str, bool]:
    """AdamW's keyword for the fastest kernel on `device`: fused where torch has one, else foreach."""
    return {"fused": True} if device.type in FUSED_DEVICES else {"foreach": True}


def make_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig, device: torch.device,
                   kernel: Optional[dict[str, bool]] = None) -> torch.optim.AdamW:
    """AdamW with the run's settings; `kernel` overrides the implementation (the bench's comparisons)."""
    return torch.optim.AdamW(list(params), lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             weight_decay=config.weight_decay, **(kernel if kernel is not None else implementation(device)))


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clips the total gradient norm to `max_norm` (torch's multi-tensor kernels wherever the device has them);
    returns the norm as a device tensor: reading it is a host sync, which only log steps may do."""
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm, foreach=None)


def clip_and_step(optimizer: torch.optim.Optimizer, scaler: Any, params: Iterable[torch.nn.Parameter],
                  max_norm: Optional[float]) -> None:
    """Gradient clipping (if `max_norm`) and the optimizer step, with no host sync.

    With the fused AdamW and no fp16 loss scaling, the clipping factor goes into the fused kernel, which
    divides every gradient by the `grad_scale` it is given (the protocol torch's GradScaler uses): the norm
    still takes one pass over the gradients, but rewriting them scaled (two more) is saved. Otherwise (fp16,
    or another kernel) the gradients are unscaled and clipped in place first, as torch documents."""
    params = list(params)
    folded = max_norm and not scaler.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False) \
        and all(g.get("fused") for g in optimizer.param_groups)
    grads = [p.grad for p in params if p.grad is not None]
    if folded and grads:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s factor, inverted
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        if max_norm:
            scaler.unscale_(optimizer)
            clip_gradients(params, max_norm)
        scaler.step(optimizer)
    scaler.update()
