"""`bench/bench_sampling.py --tiny` runs end to end, and its throughput floor is consistent with its own figures:
the connector's work per run is its contexts' and projections' FLOPs, the least ratio is above 1, and the
connector's measured rate does not exceed the device's best matrix-product rate by more than timing noise
(it would if the FLOPs were undercounted, and then the floor would be too low to argue from)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_sampling.py"


def test_tiny_run_prints_a_consistent_throughput_floor():
    done = subprocess.run([sys.executable, str(BENCH), "--tiny", "--steps", "2", "--repeats", "1"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = done.stdout
    cold = re.search(r"^ 8x8  batch 1 euler \|.*\| +(\d+) +(\d+) +(\d+)$", out, re.M)
    assert cold, out
    contexts, forwards, precomputed = map(int, cold.groups())
    assert (contexts, forwards, precomputed) == (4, 1, 4)  # 2 steps x (cond, uncond), one forward, all planned
    ctx = float(re.search(r"one context ([\d.]+) GFLOP", out).group(1))
    floor = re.search(r"^ 8x8  batch 1 euler \| +([\d.]+) \| +([\d.]+) \(\d+ % of the best\) \| +([\d.]+) \| ([\d.]+)$",
                      out, re.M)
    assert floor, out
    work, rate, ceiling, least = map(float, floor.groups())
    # 4 contexts plus two projections of 128 x 2048 -> 768 (2 * 128 * 2048 * 768 FLOP each)
    assert abs(work - (contexts * ctx + 2 * 2 * 128 * 2048 * 768 / 1e9)) < 0.15, (work, ctx)
    assert least > 1.0
    assert 0 < rate < 1.5 * ceiling, (rate, ceiling)
