"""bench/alignment/run.py's own logic: profile overrides (`--set`), and which stages a run redoes (cached,
changed settings, `--force`), over stand-in stages that cache through stage_io like the real ones."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from bench.alignment import run, stage_io
from bench.alignment.profiles import PROFILES


@pytest.mark.parametrize("pair, field, value", [
    ("base_steps=900", "base_steps", 900),
    ("arm_lr=3e-4", "arm_lr", 3e-4),
    ("unet_channels=16,32", "unet_channels", (16, 32)),
    ("min_snr_gamma=1.5", "min_snr_gamma", 1.5),
    ("gen_seeds=1", "gen_seeds", 1),
])
def test_set_overrides_one_field_with_its_type(pair, field, value):
    profile = run.with_overrides(PROFILES["quick"], [pair], argparse.ArgumentParser())
    assert getattr(profile, field) == value and type(getattr(profile, field)) is type(value)
    others = {f.name for f in dataclasses.fields(profile)} - {field}
    assert all(getattr(profile, f) == getattr(PROFILES["quick"], f) for f in others)


@pytest.mark.parametrize("pair", ["base_stepz=3", "base_steps", "name=full", "base_steps=many", "unet_channels=a,b"])
def test_bad_overrides_are_refused_naming_them(pair, capsys):
    with pytest.raises(SystemExit):
        run.with_overrides(PROFILES["quick"], [pair], argparse.ArgumentParser())
    assert pair.split("=")[0] in capsys.readouterr().err


def _fake_stages(calls: list[str]):
    """Three stages in a chain: each one's settings hold the previous one's, as the real stages' do."""
    def make(name: str, field: str, before: str | None):
        def build(workdir: Path, profile) -> dict:
            stage = workdir / name
            own = {"before": stage_io.settings_of(workdir / before) if before else None, field: getattr(profile, field)}
            if (figures := stage_io.cached(stage, own)) is not None:
                return figures
            calls.append(name)
            stage_io.start(stage)
            return stage_io.finish(stage, own, {"n": len(calls)})
        return build

    return lambda profile_name, llm: [("a", make("a", "vae_steps", None)), ("b", make("b", "base_steps", "a")),
                                      ("c", make("c", "gen_seeds", "b"))]


@pytest.mark.parametrize("change, force, redone", [
    ({}, None, []),
    ({"base_steps": 7}, None, ["b", "c"]),
    ({"vae_steps": 7}, None, ["a", "b", "c"]),
    ({"gen_seeds": 9}, None, ["c"]),
    ({}, "b", ["b", "c"]),
    ({}, "a", ["a", "b", "c"]),
])
def test_a_rerun_redoes_exactly_the_changed_or_forced_stage_and_those_after(tmp_path, monkeypatch, change, force, redone):
    calls: list[str] = []
    monkeypatch.setattr(run, "stages", _fake_stages(calls))
    profile = PROFILES["smoke"]
    first = run.run_all(tmp_path, profile, "smoke", "llm")
    assert calls == ["a", "b", "c"] and not any(r["cached"] for r in first)
    calls.clear()
    rows = run.run_all(tmp_path, dataclasses.replace(profile, **change), "smoke", "llm", force=force)
    assert calls == redone
    assert [r["stage"] for r in rows if not r["cached"]] == redone
    for name in "abc":
        assert json.loads((tmp_path / name / "done.json").read_text())["figures"]["n"] >= 1


def test_force_of_an_unknown_stage_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "stages", _fake_stages([]))
    with pytest.raises(SystemExit, match="no such stage"):
        run.run_all(tmp_path, PROFILES["smoke"], "smoke", "llm", force="judge")
