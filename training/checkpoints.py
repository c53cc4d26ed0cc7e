"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder `step-<N>` holding:
  connector.safetensors   the connector (ella_core.save_ella, loads in the nodes' "Load ELLA Connector")
  ema.safetensors         EMA weights, when enabled
  optimizer.pt            AdamW state (tensors and numbers only; loaded with weights_only=True)
  rng.pt                  python, numpy, torch (and CUDA) RNG states of every rank (weights_only=True)
  trainer_state.json      step, data position, skipped-sample counts, grad scaler, the resolved config
  checksums.json          sha256 of each file above, written last
It is written into a hidden temporary folder and renamed into place, so an interrupted save leaves no
checkpoint rather than a broken one (and the orphan `.tmp-step-*` folder is removed by the next run). Only
rank 0 writes; the other ranks send it their RNG states. On resume a damaged checkpoint (a file missing,
cut or changed) is reported and `latest` falls back to the newest intact one.
"""

from __future__ import annotations

import hashlib
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
from safetensors.torch import load_file

from ella_core import ELLA, load_ella, save_ella
from ella_core.checkpoint import atomic_save_file

from .distributed import Dist
from .errors import TrainingError

log = logging.getLogger("training")
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_DIR = ".tmp-step-"
REQUIRED = ("connector.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")


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
    """`step-<N>` folders under `root` (intact or not), oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def remove_orphans(root: Path) -> int:
    """Removes `.tmp-step-*` folders left by saves that were killed; returns how many."""
    orphans = [p for p in root.glob(f"{TMP_DIR}*") if p.is_dir()] if root.is_dir() else []
    for p in orphans:
        shutil.rmtree(p, ignore_errors=True)
    if orphans:
        log.info("removed %d unfinished checkpoint folder(s) of killed saves: %s", len(orphans),
                 [p.name for p in orphans])
    return len(orphans)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def damage(path: Path) -> Optional[str]:
    """What is wrong with the checkpoint folder `path`, or None when it is intact."""
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        return f"missing {missing}"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not {"step", "position", "samples_seen"} <= set(state):
            return "trainer_state.json lacks step/position/samples_seen"
    except (ValueError, UnicodeDecodeError) as e:
        return f"trainer_state.json is not valid JSON ({e})"
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        return "missing checksums.json"
    try:
        sums = json.loads(sums_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return f"checksums.json is not valid JSON ({e})"
    for name, expected in sums.items():
        if not (path / name).is_file():
            return f"missing {name}"
        if _sha256(path / name) != expected:
            return f"{name} does not match its checksum (cut or changed after saving)"
    return None


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """"latest" -> the newest intact checkpoint under root (None when there is none yet; damaged newer ones
    are reported and passed over); else that folder, which must be intact."""
    if resume != "latest":
        path = Path(resume).expanduser()
        problem = damage(path) if path.is_dir() else "not a folder"
        if problem:
            raise TrainingError(f"train.resume={resume}: the checkpoint is damaged ({problem}); resume from another "
                                f"one (resume=latest picks the newest intact one)")
        return path
    damaged = []
    for _, path in reversed(list_checkpoints(root)):
        problem = damage(path)
        if problem is None:
            return path
        log.warning("resume: checkpoint %s is damaged (%s); falling back to an older one", path, problem)
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise TrainingError(f"resume=latest: every checkpoint in {root} is damaged ({'; '.join(damaged)}); remove "
                            "them to start afresh, or resume from a copy")
    return None


def save_checkpoint(root: Path, step: int, ella: ELLA, metadata: dict[str, Any], optimizer: torch.optim.Optimizer,
                    ema_shadow: Optional[dict[str, torch.Tensor]], state: dict[str, Any], dist: Dist,
                    keep: int) -> Optional[Path]:
    """Collective: every rank calls it (RNG states are gathered); rank 0 writes and prunes old checkpoints."""
    rngs = _gather_rng(dist)
    if not dist.is_main:
        return None
    final = root / f"step-{step:08d}"
    if final.exists():
        if damage(final) is None:
            return final
        shutil.rmtree(final)  # a damaged one that resume passed over: replaced by this save
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_DIR}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_ella(ella, tmp / "connector.safetensors", metadata)
        if ema_shadow is not None:
            atomic_save_file(ema_shadow, tmp / "ema.safetensors")  # safetensors' own save_file makes 0600 files
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"world": dist.world, "ranks": rngs}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (tmp / "checksums.json").write_text(json.dumps({f.name: _sha256(f) for f in sorted(tmp.iterdir())}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def saved_global_batch(state: dict[str, Any], batch_size: int, world: int) -> int:
    """The global micro-batch (batch_size x processes) the checkpoint was trained with."""
    saved_batch = int(state["config"]["train"]["batch_size"]) if "config" in state else batch_size
    return saved_batch * int(state.get("world", 1))


def check_layout(state: dict[str, Any], batch_size: int, world: int) -> None:
    """Any layout continues a map-style data stream: the position counts samples of the epoch's seeded order
    (data.DataPosition), and the rest of the epoch is dealt to the new one, so no sample of it is skipped or
    repeated. A change is logged, since it changes the batches (and the result)."""
    if "parts" in state.get("position", {}):
        raise TrainingError("cannot resume: the checkpoint streamed its source (data.streaming, a webdataset "
                            "without the cache) and this run indexes it; set data.streaming and cache.enabled "
                            "as they were")
    saved = saved_global_batch(state, batch_size, world)
    if saved != batch_size * world:
        log.info("resume: global micro-batch %d (train.batch_size x processes) -> %d (%d x %d); the epoch continues "
                 "at the same sample of its order, in batches of the new size", saved, batch_size * world,
                 batch_size, world)


def load_checkpoint(path: Path, ella: ELLA, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """Restores connector, optimizer and this rank's RNG; returns the trainer state (with "ema" if saved)."""
    saved = load_ella(path / "connector.safetensors", dtype=torch.float32)
    ella.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    if rng["world"] == dist.world:
        set_rng_state(rng["ranks"][dist.rank])
    else:  # the per-sample seeds continue at the saved sample position
        log.info("checkpoint was written by %d processes, now %d: the global RNG states are not restored; "
                 "nothing the run draws comes from them (order, captions, dropout, timesteps and noise are "
                 "seeded per sample), so the sample sequence continues exactly", rng["world"], dist.world)
    if (path / "ema.safetensors").is_file():
        state["ema"] = load_file(str(path / "ema.safetensors"))
    return state
