"""SIGTERM/SIGINT in every phase of a run.

Installed before anything else. Phases that cannot stop halfway on their own (start-up: config, imports,
model loading) are interrupted at once: the handler raises `StopRequested`. Phases that can stop cleanly
(the feature-cache build, the training loop) run `deferred()`: the handler only sets a flag, which they
check often, then they save what is resumable (finished cache shards, a checkpoint) and raise it themselves.
`train.py` exits with 128 + the signal number (143 for SIGTERM), so a job chain never takes a stopped run
for a finished one.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator, Optional


class StopRequested(BaseException):
    """Raised to end the run on a signal. A BaseException, so `except Exception` in libraries cannot swallow it."""

    def __init__(self, signum: int, what: str) -> None:
        super().__init__(what)
        self.signum, self.what = signum, what

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Stop:
    """The run's signal state: `requested` once a SIGTERM/SIGINT arrived."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.phase = "start-up"  # named in the message of an immediate stop
        self._deferred = 0

    def install(self) -> "Stop":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        # a second Ctrl-C while deferred stops now; SIGTERM often arrives twice (the scheduler signals the
        # whole process group and torchrun forwards it too), so a repeated SIGTERM changes nothing
        if not self._deferred or (not first and signum == signal.SIGINT):
            name = signal.Signals(signum).name
            raise StopRequested(signum, f"{name} during {self.phase}" if first else f"second {name}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator["Stop"]:
        """Signals only set `requested` inside (the phase checks it and stops at a resumable point)."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    def raise_now(self, what: str) -> None:
        raise StopRequested(self.signum or signal.SIGTERM, what)


def stop_check_due(step: int, every: int, distributed: bool) -> bool:
    """Whether the training loop looks for stop requests after optimizer step `step`. In a single process
    that is free, so every step; with several, the ranks must agree (an all-reduce, a host sync), so every
    `every` steps: a signal stops the run within `every` steps of its arrival, at a multiple of `every`."""
    return not distributed or step % every == 0
