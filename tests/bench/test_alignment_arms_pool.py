"""Stage 5's scheduling of trainer runs (bench/alignment/arms.train_all), with a stand-in for training/train.py
that logs when it starts and ends and with how many threads: the first run builds the shared feature cache
alone, then `profile.parallel_runs` runs at a time share the threads, and a failed or overdue run stops the
stage with its name and log, leaving no trainer running."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.alignment import arms
from bench.alignment.profiles import SMOKE

FAKE_TRAIN = textwrap.dedent('''
    import json, os, sys, time
    import yaml
    config = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
    out = config["output_dir"]
    events, cache = os.environ["FAKE_EVENTS"], os.environ["FAKE_CACHE"]
    name = os.path.basename(out)
    def event(kind):
        with open(events, "a") as f:
            f.write(json.dumps({"run": name, "kind": kind, "time": time.time(),
                                "threads": config["train"]["threads"]}) + "\\n")
    event("start")
    if not os.path.exists(os.path.join(cache, "COMPLETE")):  # this run builds the cache
        time.sleep(0.4)
        os.makedirs(cache, exist_ok=True)
        open(os.path.join(cache, "COMPLETE"), "w").close()
        event("cache")
    if name == os.environ.get("FAKE_FAIL"):
        print("a traceback of the failing run"); sys.exit(3)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0.5")))
    open(os.path.join(out, "ella.safetensors"), "wb").close()
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "loss": 0.5}) + "\\n" + json.dumps({"step": 1, "val_loss": 0.25}) + "\\n")
    event("end")
''')


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    events, cache = tmp_path / "events.jsonl", tmp_path / "cache"
    monkeypatch.setattr(arms, "TRAIN_SCRIPT", script)
    monkeypatch.setattr(arms, "_cache_path", lambda *a, **k: cache)
    monkeypatch.setattr(arms, "cache_folder", lambda *a, **k: cache.parent)  # no vae stage here
    monkeypatch.setenv("FAKE_EVENTS", str(events))
    monkeypatch.setenv("FAKE_CACHE", str(cache))
    threads = torch.get_num_threads()
    yield tmp_path / "work", events
    torch.set_num_threads(threads)


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _max_concurrent(events: list[dict]) -> int:
    """The most runs alive at once (a run is alive from its start to its end event)."""
    alive = top = 0
    for e in sorted((e for e in events if e["kind"] in ("start", "end")), key=lambda e: (e["time"], e["kind"] == "start")):
        alive += 1 if e["kind"] == "start" else -1
        top = max(top, alive)
    return top


def _profile(**changes):
    return replace(SMOKE, **{"arm_seeds": 2, "parallel_runs": 2, "arm_timeout_s": 60, **changes})


@pytest.mark.parametrize("threads,parallel,width", [(2, 2, 2), (2, 1, 1), (1, 2, 1), (4, 2, 2), (4, 3, 3)])
def test_runs_share_the_threads_after_the_cache_is_built(fake_trainer, threads, parallel, width):
    workdir, events_file = fake_trainer
    profile = _profile(parallel_runs=parallel)
    runs = arms.arm_runs(profile)
    assert [r.name for r in runs] == ["tsc-s0", "tsc-s1", "no_time-s0", "no_time-s1", "mean_pool-s0", "mean_pool-s1"]
    torch.set_num_threads(threads)
    lines: list[str] = []
    figures = arms.train_all(workdir, profile, "llm", runs, lines.append, poll_s=0.05)
    events = _events(events_file)

    assert list(figures) == [r.name for r in runs]  # in the runs' order, whatever order they ended in
    for run in runs:
        record = figures[run.name]
        assert (record["arm"], record["seed"]) == (run.arm, run.seed)
        assert Path(record["connector"]).is_file() and record["final_loss"] == 0.5 and record["heldout_loss"] == 0.25
        assert Path(record["config"]).is_file()
    starts = {e["run"]: e for e in events if e["kind"] == "start"}
    assert set(starts) == {r.name for r in runs}
    assert {e["threads"] for e in starts.values()} == {max(1, threads // width)}
    built = [e for e in events if e["kind"] == "cache"]
    assert [e["run"] for e in built] == ["tsc-s0"]  # one build, by the first run
    later = [e["time"] for name, e in starts.items() if name != "tsc-s0"]
    assert min(later) >= built[0]["time"]  # nobody started before the cache was complete
    assert _max_concurrent(events) == width
    assert len(lines) == len(runs) and all("thread" in line for line in lines)


def test_a_failed_run_stops_the_stage_and_names_its_log(fake_trainer, monkeypatch):
    workdir, events_file = fake_trainer
    monkeypatch.setenv("FAKE_FAIL", "tsc-s1")
    monkeypatch.setenv("FAKE_SLEEP", "3")
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError) as error:
        arms.train_all(workdir, _profile(), "llm", arms.arm_runs(_profile()), lambda _: None, poll_s=0.05)
    message = str(error.value)
    assert "tsc-s1" in message and "exited with 3" in message and "a traceback of the failing run" in message
    assert str(workdir / "arms" / "tsc-s1" / "train.stdout.log") in message
    _assert_no_trainer_left(events_file)


def test_a_run_past_its_timeout_is_killed(fake_trainer, monkeypatch):
    workdir, events_file = fake_trainer
    monkeypatch.setenv("FAKE_SLEEP", "30")
    torch.set_num_threads(2)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"arm tsc-s0: train.py ran past 2 s"):
        arms.train_all(workdir, _profile(arm_timeout_s=2), "llm", arms.arm_runs(_profile()), lambda _: None, poll_s=0.05)
    assert time.perf_counter() - start < 20
    _assert_no_trainer_left(events_file)


def _assert_no_trainer_left(events_file: Path) -> None:
    """No run logs anything after train_all has returned: every started run ended or was killed."""
    before = len(_events(events_file))
    time.sleep(1.0)
    assert len(_events(events_file)) == before
    if sys.platform.startswith("linux"):
        mine = [p for p in os.listdir("/proc") if p.isdigit()]
        for pid in mine:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert b"fake_train.py" not in cmdline, f"process {pid} is still running"


def test_wall_time_is_taken_when_the_run_exits_not_when_a_poll_notices(fake_trainer):
    """With a poll interval far longer than the runs, each run's wall_s still ends at its own exit: at most
    its start-to-end span (from its own log) plus the interpreter's start and exit, never a poll interval."""
    workdir, events_file = fake_trainer
    torch.set_num_threads(1)
    profile = _profile(arm_seeds=1, parallel_runs=1)
    runs = arms.arm_runs(profile)[:2]
    poll_s = 6.0
    figures = arms.train_all(workdir, profile, "llm", runs, lambda _: None, poll_s=poll_s)
    events = _events(events_file)
    for run in runs:
        span = [e["time"] for e in events if e["run"] == run.name and e["kind"] in ("start", "end")]
        assert len(span) == 2
        wall = figures[run.name]["wall_s"]
        assert span[1] - span[0] <= wall < span[1] - span[0] + poll_s / 2, (run.name, wall, span)
