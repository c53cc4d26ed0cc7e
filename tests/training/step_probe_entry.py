"""training/train.py with the step observed (tests only): what happens during each optimizer step, per rank.

Written to $ELLA_TEST_PROBE_DIR/rank<R>.json at exit, as a list of events in order:
  ["step", n]           optimizer step n (1-based) begins; its window ends where step n + 1 begins
  ["micro", i]          micro-batch i of the current step computes its loss (its backward follows)
  ["sync", what, file]  Tensor.item/tolist/__float__/__int__/__bool__ called from the trainer's step-path
                        modules (a host sync on an accelerator); the data modules (data.py, cache.py,
                        tarfiles.py) are left out: in real runs they work in DataLoader workers
  ["collective", name]  a torch.distributed call from Python (all_reduce, all_gather, barrier, ...)
  ["grad_allreduce"]    DDP all-reduces one gradient bucket (counted by a communication hook)
  ["exit", code]        the script's exit status
ELLA_TEST_SIGNAL_AT="<step>@<rank>": that rank sends itself SIGTERM as optimizer step <step> begins.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from training import loop  # noqa: E402
from training.train import main  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
EVENTS: list[list] = []
IN_HOOK = [False]  # the communication hook's own all_reduce is a gradient sync, not another collective
STEP_PATH = {str(ROOT / "training" / name) for name in ("loop.py", "models.py", "optim.py", "distributed.py",
                                                        "stopping.py", "checkpoints.py", "sampling.py")}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "gather", "gather_object", "scatter", "reduce_scatter", "all_to_all", "monitored_barrier")


def _watch_host_syncs() -> None:
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def watched(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller in STEP_PATH:
                EVENTS.append(["sync", _name, Path(caller).name])
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, watched)


def _watch_collectives() -> None:
    for name in COLLECTIVES:
        real = getattr(tdist, name)

        def watched(*args, _real=real, _name=name, **kwargs):
            if not IN_HOOK[0]:
                EVENTS.append(["collective", _name])
            return _real(*args, **kwargs)

        setattr(tdist, name, watched)


def _watch_steps() -> None:
    real_step, real_micro = loop.optimizer_step, loop.micro_step_loss
    signal_at = os.environ.get("ELLA_TEST_SIGNAL_AT")
    steps, micros = [0], [0]

    def optimizer_step(*args, **kwargs):
        steps[0] += 1
        micros[0] = 0
        EVENTS.append(["step", steps[0]])
        if signal_at and signal_at == f"{steps[0]}@{RANK}":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    def micro_step_loss(*args, **kwargs):
        EVENTS.append(["micro", micros[0]])
        micros[0] += 1
        return real_micro(*args, **kwargs)

    loop.optimizer_step, loop.micro_step_loss = optimizer_step, micro_step_loss


def _watch_gradient_sync() -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    class CountingDDP(loop.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

            def hook(state, bucket):
                EVENTS.append(["grad_allreduce"])
                IN_HOOK[0] = True
                try:
                    return allreduce_hook(state, bucket)
                finally:
                    IN_HOOK[0] = False

            self.register_comm_hook(None, hook)

    loop.DistributedDataParallel = CountingDDP


if __name__ == "__main__":
    _watch_steps()
    _watch_host_syncs()
    _watch_collectives()
    _watch_gradient_sync()
    code = 1
    try:
        code = main(sys.argv[1:])
    finally:
        EVENTS.append(["exit", code])
        folder = Path(os.environ["ELLA_TEST_PROBE_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{RANK}.json").write_text(json.dumps(EVENTS))
    sys.exit(code)
