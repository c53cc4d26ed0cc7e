"""The connector's optimizer and gradient clipping, chosen for the step's speed without changing its maths.

The optimizer's work is memory traffic over every parameter (66.8 M for the released connector's shape), so
the number of passes decides its cost: torch's default AdamW on a CPU is the single-tensor loop (about a
dozen passes over parameters, gradients and both moments); the fused kernel reads and writes each once.
Same update rule: the two agree to rounding (tests/training/test_step.py), and a run resumes bit-exactly
because the implementation travels in the checkpoint's optimizer state (a checkpoint written by the loop
resumes with the loop). bench/training_step.py measures both.
"""

from __future__ import annotations

from typing import Iterable, Optional

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
