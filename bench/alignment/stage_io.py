"""The one caching policy of the benchmark's stages: `<workdir>/<stage>/done.json` holds the stage's settings
and figures, is written last and atomically, and a stage whose done.json has the same settings is skipped.

A stage's settings include those of the stages it reads, so changing a world setting redoes every later stage.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

DONE = "done.json"


def cached(stage_dir: Path, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The figures of a finished stage with these settings, or None (then the stage must run)."""
    done = stage_dir / DONE
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    return record.get("figures") if record.get("settings") == _jsonable(settings) else None


def settings_of(stage_dir: Path) -> dict[str, Any]:
    """The settings a finished stage ran with (what a later stage folds into its own)."""
    done = stage_dir / DONE
    if not done.is_file():
        raise FileNotFoundError(f"{done} is missing: run the stage {stage_dir.name!r} first")
    return json.loads(done.read_text())["settings"]


def start(stage_dir: Path) -> Path:
    """An empty stage folder: what an interrupted or older run left there is removed first."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    return stage_dir


def begin(stage_dir: Path, profile: Any, *, seed: bool = False) -> "Progress":
    """Set up a stage that must run (not cached): its threads, optionally the profile's torch seed, an empty
    folder (`start`), and its progress lines, named for the folder."""
    set_threads(profile)
    if seed:
        torch.manual_seed(profile.seed)
    progress = Progress(stage_dir.name)
    start(stage_dir)
    return progress


def finish(stage_dir: Path, settings: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    """Write done.json atomically (temporary file + rename), after everything else of the stage."""
    tmp = stage_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps({"settings": _jsonable(settings), "figures": _jsonable(figures)}, indent=1))
    os.replace(tmp, stage_dir / DONE)
    return figures


def _jsonable(value: Any) -> Any:
    """Tuples as lists, so a dict compares equal to its JSON round trip."""
    return json.loads(json.dumps(value))


class Progress:
    """Progress lines with the elapsed time of the stage: `[base 12.3s] step 100/3000 loss 0.21`."""

    def __init__(self, stage: str) -> None:
        self.stage, self.t0 = stage, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, message: str) -> None:
        print(f"[{self.stage} {self.elapsed:6.1f}s] {message}", flush=True)


def set_threads(profile: Any) -> None:
    """The budget is for `profile.threads` idle cores: use that many, whatever the machine has. On a busy
    machine fewer threads waste less time spinning: ALIGNMENT_THREADS overrides (it changes no result)."""
    torch.set_num_threads(int(os.environ.get("ALIGNMENT_THREADS") or profile.threads))


def parallel_width(profile: Any, jobs: int) -> int:
    """How many of a stage's `jobs` (trainer runs, models to sample) run at once, each with an equal share of
    the threads: `profile.parallel_runs`, at most one a thread and one a job."""
    return max(1, min(int(profile.parallel_runs), torch.get_num_threads(), jobs))
