"""Stage 5 `arms`: the ELLA connectors, trained by the project's own trainer (`training/train.py`, its YAML
config and CLI) against the frozen base UNet of stage 4.

Three arms, each a real trainer option and nothing else different:
  tsc        (b) the Timestep-Aware Semantic Connector as released (its AdaLN reads t);
  no_time    (c) `connector.time_aware: false`: the same resampler always at t = 0, one context for every step;
  mean_pool  (d) `connector.input_pool: mean`: the LLM features averaged into one token before the resampler.
The arms share one feature cache (`<workdir>/cache`: same data, same LLM settings, so the trainer's
settings hash is the same and SmolLM2 encodes the captions once). Each arm is trained with `profile.arm_seeds`
training seeds, so the confidence intervals of stage 8 include training-seed variance; `profile.parallel_runs`
runs train at once (train_all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from bench.alignment import stage_io

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "training" / "train.py"

# arm -> the connector keys that make it (everything else in the config is shared)
ARMS: dict[str, dict[str, Any]] = {
    "tsc": {},
    "no_time": {"time_aware": False},
    "mean_pool": {"input_pool": "mean"},
}


@dataclass(frozen=True)
class ArmRun:
    arm: str  # a key of ARMS
    seed: int  # the trainer's seed (data order, caption choice, noise, initial connector)

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


def arm_runs(profile: Any) -> list[ArmRun]:
    """Every trainer run of the stage, in the order they are trained."""
    return [ArmRun(arm, seed) for arm in ARMS for seed in range(max(1, int(profile.arm_seeds)))]


SETTINGS = ("arm_images", "arm_captions", "llm_max_length", "arm_steps", "arm_batch", "arm_lr", "arm_warmup",
            "arm_seeds", "arm_layers", "arm_heads", "arm_latents", "arm_time_channel", "arm_time_embed_dim",
            "caption_dropout", "min_snr_gamma", "arm_holdout", "arm_val_every")


def settings(workdir: Path, profile: Any, llm: str) -> dict[str, Any]:
    """What the stage's result depends on: the base's settings (and so the world's), the LLM, its own."""
    return {"base": stage_io.settings_of(workdir / "base"), "llm": str(llm), **profile.settings(*SETTINGS)}


def cache_folder(workdir: Path, profile: Any) -> Path:
    """The arms' feature cache, outside the stage folder, so a rerun with other training settings reuses what
    the trainer encoded. The trainer's settings hash (its subfolder) covers the LLM settings but sees the data
    and the base only by path: the digest here covers what those paths hold (the world and VAE settings, the
    images and captions the arms keep), so a changed world, VAE or data subset never reads stale latents."""
    import hashlib

    what = {"vae": stage_io.settings_of(workdir / "vae"), **profile.settings("arm_images", "arm_captions")}
    return workdir / "cache" / hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def write_data(workdir: Path, profile: Any) -> Path:
    """`<workdir>/arms/data/`: the first `arm_images` training images of the world, each with its first
    `arm_captions` captions (SmolLM2 encodes every caption of the folder once, 0.05-0.2 s each on 2 cores,
    so the arms' share of the world's 3 phrasings per image is bounded here)."""
    import shutil

    from bench.alignment import world

    out = workdir / "arms" / "data"
    out.mkdir(parents=True, exist_ok=True)
    rows = world.load_scenes(workdir / "world" / "train")[: int(profile.arm_images)]
    for image, _, captions in rows:
        shutil.copyfile(image, out / image.name)
        (out / image.with_suffix(".txt").name).write_text("\n".join(captions[: int(profile.arm_captions)]) + "\n")
    return out


def trainer_config(workdir: Path, profile: Any, llm: str, run: ArmRun) -> dict[str, Any]:
    """The YAML config of one arm's run. The connector's width is not set: the trainer makes it the base UNet's
    cross_attention_dim (its output is the UNet's whole context)."""
    out = workdir / "arms" / run.name
    steps = int(profile.arm_steps)
    size = int(profile.image_size)
    return {
        "output_dir": str(out),
        "seed": run.seed,
        "model": {"pretrained": str(workdir / "base" / "model"), "base": "sd15"},
        # SmolLM2 (hidden 576) from its GGUF, in float32 on the CPU; fixed length: templated captions are short
        "llm": {"source": str(llm), "dtype": "float32", "token_mode": "fixed", "max_length": int(profile.llm_max_length)},
        "connector": {"layers": int(profile.arm_layers), "heads": int(profile.arm_heads),
                      "num_latents": int(profile.arm_latents), "time_channel": int(profile.arm_time_channel),
                      "time_embed_dim": int(profile.arm_time_embed_dim), **ARMS[run.arm]},
        "data": {"path": str(workdir / "arms" / "data"), "caption_rule": "random",
                 "caption_dropout": float(profile.caption_dropout), "resolution": size, "buckets": False,
                 "bucket_step": _bucket_step(size), "num_workers": 0},
        "cache": {"mode": "full", "dir": str(cache_folder(workdir, profile)), "shard_size": 256},
        "optim": {"lr": float(profile.arm_lr), "weight_decay": 0.01, "warmup_steps": int(profile.arm_warmup),
                  "schedule": "cosine"},
        "train": {"batch_size": int(profile.arm_batch), "max_steps": steps, "mixed_precision": "no",
                  "min_snr_gamma": profile.min_snr_gamma, "checkpoint_every": steps, "keep_checkpoints": 1,
                  "log_every": max(1, min(25, steps // 4)), "report_to": "none", "device": "cpu",
                  "threads": torch.get_num_threads()},  # stage_io.set_threads' choice
        "validation": {"every": int(profile.arm_val_every) or steps, "holdout": int(profile.arm_holdout)},
    }


def _bucket_step(size: int) -> int:
    """The largest of 64, 32, 16, 8 dividing the image size (the trainer wants resolution % bucket_step == 0)."""
    return next((s for s in (64, 32, 16, 8) if size % s == 0), size)


def read_metrics(path: Path) -> dict[str, Any]:
    """metrics.jsonl -> the last training-loss record's loss and the last held-out loss (None if absent)."""
    loss = val = None
    val_curve = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            loss = float(record["loss"])
        if "val_loss" in record:
            val = float(record["val_loss"])
            val_curve.append([int(record["step"]), val])
    return {"final_loss": loss, "heldout_loss": val, "heldout_curve": val_curve}


class Training:
    """One arm run's train.py subprocess, started with `threads` CPU threads."""

    def __init__(self, workdir: Path, profile: Any, llm: str, run: ArmRun, threads: int) -> None:
        config = trainer_config(workdir, profile, llm, run)
        config["train"]["threads"] = threads
        self.run, self.timeout = run, float(profile.arm_timeout_s)
        self.out = Path(config["output_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "arms" / f"{run.name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = self.out / "train.stdout.log"
        self._log = open(self.log_path, "w")
        self.start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config", str(self.config_path)],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=_env())
        self.ended: float | None = None  # set the moment the process exits, not when a poll notices it
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        self.proc.wait()
        self.ended = time.perf_counter()

    def poll(self) -> bool:
        """True once the run has ended; a run past profile.arm_timeout_s is killed and is an error."""
        if self.ended is not None:
            return True
        if time.perf_counter() - self.start > self.timeout:
            self.stop()
            raise RuntimeError(f"arm {self.run.name}: train.py ran past {self.timeout:.0f} s; its log is {self.log_path}")
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def result(self) -> dict[str, Any]:
        """The ended run's figures; an error (with the log's tail) if it failed or wrote no connector."""
        self._log.close()
        wall = (self.ended if self.ended is not None else time.perf_counter()) - self.start
        if self.proc.returncode != 0:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"arm {self.run.name}: train.py exited with {self.proc.returncode} (config "
                               f"{self.config_path}, log {self.log_path}):\n{tail}")
        if not (self.out / "ella.safetensors").is_file():
            raise RuntimeError(f"arm {self.run.name}: train.py finished but wrote no {self.out / 'ella.safetensors'}")
        return {"arm": self.run.arm, "seed": self.run.seed, "wall_s": round(wall, 2), "config": str(self.config_path),
                "connector": str(self.out / "ella.safetensors"), **read_metrics(self.out / "metrics.jsonl")}


def train_all(workdir: Path, profile: Any, llm: str, runs: list[ArmRun],
              log: Callable[[str], None] = print, poll_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Trains the runs, `profile.parallel_runs` at a time, each with an equal share of the stage's threads (two
    1-thread trainers on 2 idle cores made 2 x 2.0 steps/s of the long profile's arms, one 2-thread trainer 3.2:
    small convolutions use a second thread poorly). The first run builds the shared feature cache alone; the
    others start once it is complete, so two trainers never build one cache. -> run name -> figures, in `runs`' order."""
    from training.cache import FeatureCache

    width = stage_io.parallel_width(profile, len(runs))
    threads = max(1, torch.get_num_threads() // width)  # of stage_io.set_threads' choice
    cache = _cache_path(workdir, profile, llm, runs[0])
    pending, active, done = list(runs), [], {}
    try:
        while pending or active:
            for training in list(active):
                if training.poll():
                    active.remove(training)
                    done[training.run.name] = record = training.result()
                    log(f"  arm {training.run.name}: {record['wall_s']:.1f} s ({threads} thread(s)), final loss "
                        f"{record['final_loss']}, held-out loss {record['heldout_loss']}")
            limit = width if done or FeatureCache.is_complete(cache) else 1  # one run alone until the cache is built
            while pending and len(active) < limit:
                active.append(Training(workdir, profile, llm, pending.pop(0), threads))
            if active:
                time.sleep(poll_s)
    finally:
        for training in active:
            training.stop()
    return {run.name: done[run.name] for run in runs}


def _cache_path(workdir: Path, profile: Any, llm: str, run: ArmRun) -> Path:
    """The folder training/train.py writes the runs' shared feature cache to."""
    from training.config import config_from_dict

    return trainer_cache_dir(config_from_dict(trainer_config(workdir, profile, llm, run)))


def trainer_cache_dir(config: Any) -> Path:
    """training.cache.cache_dir of an arm's trainer config: the arms train in float32 (`mixed_precision: no`),
    so that is the VAE dtype in the cache's settings hash (the upper bound reads the same folder)."""
    from training.cache import cache_dir

    return cache_dir(config, torch.float32)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # train.threads sets the threads
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def context_width(workdir: Path) -> int:
    """The base UNet's cross_attention_dim: the connector's width (its output is the UNet's whole context)."""
    config = json.loads((workdir / "base" / "model" / "unet" / "config.json").read_text())
    return int(config["cross_attention_dim"])


def build(workdir: Path, profile: Any, llm: str) -> dict[str, Any]:
    """Stage 5: trains every arm run in turn; figures per run: wall time, final and held-out loss, paths."""
    workdir = Path(workdir)
    stage = workdir / "arms"
    own = settings(workdir, profile, llm)
    if (figures := stage_io.cached(stage, own)) is not None:
        return figures
    progress = stage_io.begin(stage, profile)
    write_data(workdir, profile)
    runs = train_all(workdir, profile, llm, arm_runs(profile), progress)
    figures = {"context_dim": context_width(workdir), "runs": runs, "seconds": round(progress.elapsed, 1)}
    return stage_io.finish(stage, own, figures)


def connectors(done: dict[str, Any]) -> dict[str, list[str]]:
    """arm -> the connector files of its runs (one per training seed), from the stage's done.json figures."""
    out: dict[str, list[str]] = {}
    for record in done["runs"].values():
        out.setdefault(record["arm"], []).append(record["connector"])
    return out


def arm_runs_from_done(workdir: Path) -> list[dict[str, Any]]:
    """The stage's run records (config, connector, losses) from `<workdir>/arms/done.json`."""
    path = workdir / "arms" / "done.json"
    if not path.is_file():
        raise RuntimeError(f"{path} does not exist: the arms stage has not finished")
    return list(json.loads(path.read_text())["figures"]["runs"].values())
