"""Process group set-up from the launcher's environment (torchrun, `accelerate launch`, SLURM via torchrun).

A single process needs no launcher. Under torchrun/accelerate, RANK/WORLD_SIZE/LOCAL_RANK are set and the
default group is created here (nccl on CUDA, gloo on CPU), with `train.collective_timeout_s` as the longest
wait for the others. Only rank 0 logs and saves.

No process may wait forever for one that failed: phases in which ranks work apart (start-up, the cache
build, rank 0's merge) run inside `failing_together()` and meet at `agree()`. A rank that raises posts its
error at the others' next `agree()`, where every rank raises `PeerFailed` naming it; a rank that died or
hangs makes the others' `agree()` fail with a lost-contact error (at once, or after the timeout).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as tdist

from .errors import TrainingError

_OK, _STOP, _FAILED = 0, 1, 2


class PeerFailed(TrainingError):
    """Raised on every process when one of them failed, died or fell out of step."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average of a tensor over ranks (for logging the global loss)."""
        if self.enabled:
            value = value.detach().clone()
            tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
            value /= self.world
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (e.g. a SIGTERM seen by one process)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable, small), on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def agree(self, where: str, tag: int = 0, stop: bool = False) -> bool:
        """Collective status exchange; every rank must pass the same `tag` (e.g. a position in the data).
        Returns True when any rank asks to stop; raises PeerFailed when a rank failed or is out of step."""
        if not self.enabled:
            return stop
        return self._exchange(_STOP if stop else _OK, tag, where, None)

    @contextlib.contextmanager
    def failing_together(self, where: str) -> Iterator[None]:
        """An exception inside is posted to the other ranks (they raise PeerFailed at their next `agree`)."""
        try:
            yield
        except PeerFailed:
            raise
        except BaseException as e:
            if self.enabled:
                try:
                    self._exchange(_FAILED, -1, where, f"{type(e).__name__}: {e}")
                except PeerFailed:
                    pass  # the others now know; this rank raises its own error
            raise

    def _exchange(self, code: int, tag: int, where: str, message: Optional[str]) -> bool:
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        mine = torch.tensor([code, tag], dtype=torch.int64, device=device)
        every = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(self.world)]
        try:
            tdist.all_gather(every, mine)
            status = [tuple(int(x) for x in t.tolist()) for t in every]
            messages = self.gather(message) if any(c == _FAILED for c, _ in status) else []
        except Exception as e:  # noqa: BLE001 (gloo/nccl raise RuntimeError subclasses on a lost peer or timeout)
            raise PeerFailed(f"{where}: lost contact with the other processes ({type(e).__name__}: {e}); one of "
                             "them crashed, was killed or hangs: see its log") from e
        if messages:
            failed = [f"rank {r} failed: {m}" for r, ((c, _), m) in enumerate(zip(status, messages)) if c == _FAILED]
            raise PeerFailed(f"{where}: " + "; ".join(failed))
        tags = [t for _, t in status]
        if len(set(tags)) > 1:
            raise PeerFailed(f"{where}: the processes are out of step (positions {tags} by rank); do all nodes see "
                             "the same data.path contents and the same code?")
        return any(c == _STOP for c, _ in status)

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


def setup(device: Optional[str] = None, backend: Optional[str] = None, timeout_s: int = 1800) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank, dev)
