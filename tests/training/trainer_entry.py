"""training/train.py with test-only slowdowns and faults injected from the environment (tests only):

  ELLA_TEST_SLOW_STARTUP_S   sleep this long inside model loading (a slow start-up to signal)
  ELLA_TEST_SLOW_ENCODE_S    sleep this long before each cache chunk is encoded (a slow cache build)
  ELLA_TEST_FAULT            "<where>:<how>@<rank>": where in (merge, encode), how in (raise, exit)
  ELLA_TEST_ARGS_<rank>      extra overrides for that rank only (e.g. its own cache.dir)
  ELLA_TEST_SEEN             a folder: every trained sample visit (key, seed, epoch, world) appended to
                             <folder>/r<rank>.jsonl
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training import cache, loop  # noqa: E402
from training.train import main  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def _fail(how: str) -> None:
    if how == "exit":
        os._exit(3)  # a crash: no exception, no clean-up
    raise RuntimeError(f"injected fault on rank {RANK}")


def _install() -> list[str]:
    startup = float(os.environ.get("ELLA_TEST_SLOW_STARTUP_S", "0"))
    if startup:
        real_load = loop.load_base

        def slow_load(*args, **kwargs):
            print("test: slow start-up begins", file=sys.stderr, flush=True)
            time.sleep(startup)
            return real_load(*args, **kwargs)

        loop.load_base = slow_load
    encode = float(os.environ.get("ELLA_TEST_SLOW_ENCODE_S", "0"))
    if encode:
        real_encode = cache.encode_texts

        def slow_encode(*args, **kwargs):
            time.sleep(encode)
            return real_encode(*args, **kwargs)

        cache.encode_texts = slow_encode
    seen = os.environ.get("ELLA_TEST_SEEN")
    if seen:
        import json

        real_loss = loop.micro_step_loss
        Path(seen).mkdir(parents=True, exist_ok=True)
        world = os.environ.get("WORLD_SIZE", "1")

        def recording_loss(batch, *args, **kwargs):
            with open(Path(seen) / f"r{RANK}.jsonl", "a") as f:
                for key, seed in zip(batch.get("key", []), batch.get("seed", [])):
                    f.write(json.dumps({"key": key, "seed": seed, "epoch": batch["position"].epoch,
                                        "world": int(world)}) + "\n")
            return real_loss(batch, *args, **kwargs)

        loop.micro_step_loss = recording_loss
    fault = os.environ.get("ELLA_TEST_FAULT")
    if fault:
        spec, rank = fault.split("@")
        where, how = spec.split(":")
        if int(rank) == RANK and where == "merge":
            cache._merge = lambda *a, **k: _fail(how)
        elif int(rank) == RANK and where == "encode":
            real = cache.encode_texts
            calls = []

            def failing_encode(*args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    _fail(how)
                return real(*args, **kwargs)

            cache.encode_texts = failing_encode
    return os.environ.get(f"ELLA_TEST_ARGS_{RANK}", "").split()


if __name__ == "__main__":
    extra = _install()
    sys.exit(main(sys.argv[1:] + extra))
