"""Connector speed at the released SD1.5 shapes (random weights), CPU by default.

Prints milliseconds per call at batch 1 and 2: the full forward (text projection included) against the
projected-prompt path that sampling uses (projection once per prompt, then one call per step), and what a
sampling run of `--steps` steps costs each way. Measurements alternate between the two paths and report
the minimum and the median, so load from other processes hits both alike.
Run: python bench/bench_connector.py [--device cuda] [--dtype bf16] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ella_core import ELLA, ELLAConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the run estimate")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = ELLA(ELLAConfig()).to(device=device, dtype=dtype).eval()
    print(f"connector: released SD1.5 shapes, {sum(p.numel() for p in model.parameters()):,} params, "
          f"{args.dtype} on {device}, {torch.get_num_threads()} threads, {args.tokens} tokens")
    print(f"{'batch':>5} | {'full ms/call':>15} | {'reuse ms/call':>15} | {'project ms':>10} | "
          f"{f'{args.steps}-step run full':>19} | {'reuse':>8} | saving")
    print(f"{'':>5} | {'min   median':>15} | {'min   median':>15} | {'min':>10} | {'ms':>19} | {'ms':>8} |")
    for batch in (1, 2):
        features = torch.randn(batch, args.tokens, 2048, device=device, dtype=dtype)
        projected = model.project_text(features)
        for _ in range(2):  # warm-up of both paths
            model(features, 500.0)
            model.forward_projected(projected, 500.0)
        full, reuse, project = [], [], []
        for i in range(args.repeats):
            t = 999.0 * i / args.repeats
            full.append(timed_ms(lambda: model(features, t), device))
            reuse.append(timed_ms(lambda: model.forward_projected(projected, t), device))
            project.append(timed_ms(lambda: model.project_text(features), device))
        run_full = args.steps * min(full)
        run_reuse = min(project) + args.steps * min(reuse)
        print(f"{batch:>5} | {min(full):6.1f} {statistics.median(full):8.1f} | {min(reuse):6.1f} "
              f"{statistics.median(reuse):8.1f} | {min(project):10.2f} | {run_full:19.0f} | {run_reuse:8.0f} | "
              f"{1 - run_reuse / run_full:6.1%}")


if __name__ == "__main__":
    main()
