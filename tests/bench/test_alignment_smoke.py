"""The alignment benchmark's plumbing, end to end: `bench/alignment/run.py --profile smoke` in a fresh workdir
(the real script, the real trainer runs, a tiny T5 as the LLM through `--llm`), then a rerun of it made to look
like a workdir from before the denoise stage (only denoise and report may run), then `--force report`, where
every other stage must be reused.

This checks the plumbing, not the result: the smoke profile trains for a few steps only. The full profile's
SmolLM2 path is the same code with another `--llm` (ella_core.load_text_encoder loads both)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "alignment" / "run.py"


def _run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ALIGNMENT_THREADS="1", PYTHONPATH=str(ROOT))  # 1: the test shares its machine
    llm = workdir.parent / "models" / "text_encoders" / "tiny-t5"
    return subprocess.run([sys.executable, str(RUN), "--profile", "smoke", "--workdir", str(workdir), "--llm", str(llm),
                           *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _finite_figures(node, where: str) -> int:
    """Counts the numbers under `node`, failing on any that is not finite."""
    if isinstance(node, dict):
        return sum(_finite_figures(v, f"{where}.{k}") for k, v in node.items())
    if isinstance(node, list):
        return sum(_finite_figures(v, f"{where}[{i}]") for i, v in enumerate(node))
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        assert math.isfinite(node), f"{where} is {node}"
        return 1
    return 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from devtools.tiny_models import write_tiny_t5

    root = tmp_path_factory.mktemp("alignment")
    write_tiny_t5(root / "models")  # the plumbing with a tiny T5: SmolLM2 alone takes ~50 s to load here
    workdir = root / "work"
    first = _run(workdir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return workdir, first


def test_results_cover_every_method_and_split(smoke_run):
    from bench.alignment import denoise, evaluate, generate, run

    workdir, first = smoke_run
    results = json.loads((workdir / "evaluate" / "results.json").read_text())
    assert set(results["methods"]) == {evaluate.REFERENCE, *generate.METHODS}
    for method, per_split in results["methods"].items():
        assert set(per_split) == set(generate.SPLITS), method
        for split, per_metric in per_split.items():
            assert set(per_metric) == set(evaluate.METRICS), (method, split)
            for metric, stats in per_metric.items():
                lo, hi = stats["ci"]
                eps = 1e-9  # the point estimate and the replicates are summed in different orders
                assert -eps <= lo <= stats["mean"] + eps and stats["mean"] - eps <= hi <= 1.0 + eps, \
                    (method, split, metric, stats)
    assert set(results["differences"]) == {f"{x}-{y}" for x, y in evaluate.PAIRS}
    assert _finite_figures(results, "results") > 0
    for stage in run.STAGE_NAMES:
        assert (workdir / stage / "done.json").is_file(), stage
    arms = json.loads((workdir / "arms" / "done.json").read_text())["figures"]["runs"]
    assert {r["arm"] for r in arms.values()} == {"tsc", "no_time", "mean_pool"}
    for name, record in arms.items():  # each arm is a real trainer run with its own connector file
        assert Path(record["connector"]).is_file(), name
        assert math.isfinite(record["final_loss"]) and math.isfinite(record["heldout_loss"]), record
    for method in generate.METHODS:  # images of every method, the same shape
        for split in generate.SPLITS:
            images = generate.load_images(workdir, method, split)
            assert images.shape[1:3] == (results["prompts"][split], _profile().gen_seeds), (method, split)
    assert (workdir / "report.md").read_text().count("|") > 20
    assert "Denoising loss" in (workdir / "report.md").read_text() and "share of the text gap" in first.stdout
    noised = json.loads((workdir / "denoise" / "results.json").read_text())
    assert noised["rows"] == [*denoise.REFERENCES, *generate.METHODS]
    assert noised["scenes"] == {"test_seen": _profile().n_test_seen, "test_heldout": _profile().n_test_heldout}
    for split, rows in noised["splits"].items():  # every test scene, every method and reference
        assert rows["base"]["share"] == 1.0 and rows["uncond"]["share"] == 0.0, split
        for row, r in rows.items():
            assert r["mean"] > 0 and len(r["per_t"]) == len(_profile().denoise_timesteps), (split, row)
        assert len(rows["tsc"]["per_model"]) == _profile().arm_seeds
    assert _finite_figures(noised, "denoise") > 0
    assert (workdir / "report" / "alignment_grid.png").is_file()
    assert "| binding" in first.stdout or "binding |" in first.stdout  # the final table is printed


def test_a_workdir_from_before_denoise_reruns_only_it_then_every_stage_is_reused(smoke_run):
    """Two reruns (each run.py process costs ~10 s of imports): first a workdir finished before the denoise stage
    existed, where only denoise and report may run; then `--force report`, where every other stage, denoise
    included, must be reused as it is (run.py's --force of a middle stage: tests/bench/test_alignment_run.py)."""
    from bench.alignment import run

    workdir, _ = smoke_run
    before = {s: (workdir / s / "done.json").read_text() for s in run.STAGE_NAMES}
    shutil.rmtree(workdir / "denoise")
    report = json.loads((workdir / "report" / "done.json").read_text())
    del report["settings"]["denoise"]  # the report's settings as the code before the stage wrote them
    (workdir / "report" / "done.json").write_text(json.dumps(report))
    older = _run(workdir)
    assert older.returncode == 0, older.stdout[-3000:] + older.stderr[-3000:]
    for stage in run.STAGE_NAMES:
        redone = stage in ("denoise", "report")
        assert (f"[{stage}] cached" in older.stdout) is not redone, (stage, older.stdout[-2000:])
        if not redone:
            assert (workdir / stage / "done.json").read_text() == before[stage], stage
    assert (json.loads((workdir / "denoise" / "done.json").read_text())["figures"]["loss"]
            == json.loads(before["denoise"])["figures"]["loss"])  # the same noise: the same figures
    after = {s: (workdir / s / "done.json").read_text() for s in run.STAGE_NAMES}
    forced = _run(workdir, "--force", "report")
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    for stage in run.STAGE_NAMES:
        redone = stage == "report"
        assert (f"[{stage}] cached" in forced.stdout) is not redone, (stage, forced.stdout[-2000:])
        if not redone:
            assert (workdir / stage / "done.json").read_text() == after[stage], stage


def _profile():
    from bench.alignment.profiles import PROFILES

    return PROFILES["smoke"]
