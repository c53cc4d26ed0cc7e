"""`bench/bench_training.py --source` runs end to end on a few images: every row (decode alone, the GPU
stand-in, the tiny VAE) for both formats and each worker count, rates above zero, and the stand-in waits as
long per image as that format's 0-worker decode took (its definition)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_training.py"
RATE = r"0 worker\(s\) +([\d.]+), 1 worker\(s\) +([\d.]+), 2 worker\(s\) +([\d.]+)$"


def test_source_bench_prints_every_row():
    done = subprocess.run([sys.executable, str(BENCH), "--source", "--source-images", "6"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = done.stdout
    assert "6 synthetic images at 512 px buckets" in out, out
    for fmt in ("jpeg", "png"):
        alone = re.search(rf"^  {fmt} +decode \+ resize +images/s: {RATE}", out, re.M)
        stand_in = re.search(rf"^  {fmt} +\+ GPU stand-in \((\d+) ms/img\) +images/s: {RATE}", out, re.M)
        vae = re.search(rf"^  {fmt} +\+ tiny VAE on CPU +images/s: {RATE}", out, re.M)
        assert alone and stand_in and vae, out
        rates = [float(x) for m in (alone, vae) for x in m.groups()] + [float(x) for x in stand_in.groups()[1:]]
        assert all(r > 0 for r in rates), out
        assert abs(int(stand_in.group(1)) - 1000 / float(alone.group(1))) <= 1.0, out
