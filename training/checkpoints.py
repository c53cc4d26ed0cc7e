"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder `step-<N>` holding:
  connector.safetensors   the connector (ella_core.save_ella, loads in the nodes' "Load ELLA Connector")
  ema.safetensors         EMA weights, when enabled
  optimizer.pt            AdamW state (tensors and numbers only; loaded with weights_only=True)
  rng.pt                  python, numpy, torch (and CUDA) RNG states of every rank (weights_only=True)
  trainer_state.json      step, data position, skipped-sample counts, grad scaler, the resolved config
It is written into a hidden temporary folder and renamed into place, so an interrupted save leaves no
checkpoint rather than a broken one. Only rank 0 writes; the other ranks send it their RNG states.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from ella_core import ELLA, load_ella, save_ella

from .distributed import Dist

log = logging.getLogger("training")
STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (safe for weights-only loading)."""
    version, mt, pos = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), pos],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, pos = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), pos))
    name, keys, p, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), p, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng(dist: Dist) -> Optional[list[dict[str, Any]]]:
    mine = rng_state()
    if not dist.enabled:
        return [mine]
    gathered: Optional[list[Any]] = [None] * dist.world if dist.is_main else None
    tdist.gather_object(mine, gathered, dst=0)
    return gathered


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return sorted(found)


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """"latest" -> newest complete checkpoint under root (None when there is none yet); else a folder."""
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a checkpoint folder (no trainer_state.json)")
    return path


def save_checkpoint(root: Path, step: int, ella: ELLA, metadata: dict[str, Any], optimizer: torch.optim.Optimizer,
                    ema_shadow: Optional[dict[str, torch.Tensor]], state: dict[str, Any], dist: Dist,
                    keep: int) -> Optional[Path]:
    """Collective: every rank calls it (RNG states are gathered); rank 0 writes and prunes old checkpoints."""
    rngs = _gather_rng(dist)
    if not dist.is_main:
        return None
    final = root / f"step-{step:08d}"
    if final.exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_ella(ella, tmp / "connector.safetensors", metadata)
        if ema_shadow is not None:
            save_file({k: v.contiguous() for k, v in ema_shadow.items()}, str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"world": dist.world, "ranks": rngs}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: Path, ella: ELLA, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """Restores connector, optimizer and this rank's RNG; returns the trainer state (with "ema" if saved)."""
    saved = load_ella(path / "connector.safetensors", dtype=torch.float32)
    ella.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    if rng["world"] == dist.world:
        set_rng_state(rng["ranks"][dist.rank])
    else:
        log.warning("checkpoint was written by %d processes, now %d: RNG states not restored "
                    "(sample noise is seeded per sample, so data and noise still follow the same sequence)",
                    rng["world"], dist.world)
    if (path / "ema.safetensors").is_file():
        state["ema"] = load_file(str(path / "ema.safetensors"))
    return state
