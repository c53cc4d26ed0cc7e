"""Host-to-device copies that do not make the host wait for the device.

A plain `tensor.to("cuda")` from ordinary (pageable) memory waits until the copy is done, and the copy waits
for everything queued before it on the stream: a host sync per batch, which stops the host from queueing
the next micro-step while the device works. From pinned memory with non_blocking=True the copy is queued
like a kernel (torch's pinned-memory allocator keeps the buffer until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, queued without a host sync when `device` is a CUDA device; on the CPU, as is."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
