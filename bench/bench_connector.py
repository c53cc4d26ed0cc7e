"""Connector speed at the released SD1.5 shapes (random weights), CPU by default.

Prints milliseconds per call at batch 1 and 2: the full forward (projection included) against the
projected-prompt path that sampling uses (projection once per prompt, then one call per step).
Run: python bench/bench_connector.py [--device cuda] [--dtype bf16] [--steps 30]
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


def time_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps simulated per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = ELLA(ELLAConfig()).to(device=device, dtype=dtype).eval()
    print(f"connector: released SD1.5 shapes, {sum(p.numel() for p in model.parameters()):,} params, "
          f"{args.dtype} on {device}, {torch.get_num_threads()} threads, {args.tokens} tokens, {args.steps} steps")
    print(f"{'batch':>5} {'full ms/call':>13} {'reuse ms/call':>14} {'project ms':>11} {'steps full ms':>14} {'steps reuse ms':>15} {'saving':>7}")
    timesteps = torch.linspace(999, 0, args.steps)
    for batch in (1, 2):
        features = torch.randn(batch, args.tokens, 2048, device=device, dtype=dtype)
        projected = model.project_text(features)
        full = time_ms(lambda: model(features, 500.0), args.repeats, device)
        reuse = time_ms(lambda: model.forward_projected(projected, 500.0), args.repeats, device)
        project = time_ms(lambda: model.project_text(features), args.repeats, device)

        def run_full():
            for t in timesteps:
                model(features, t)

        def run_reuse():
            p = model.project_text(features)
            for t in timesteps:
                model.forward_projected(p, t)

        steps_full = time_ms(run_full, max(1, args.repeats // 2), device)
        steps_reuse = time_ms(run_reuse, max(1, args.repeats // 2), device)
        print(f"{batch:>5} {full:>13.2f} {reuse:>14.2f} {project:>11.2f} {steps_full:>14.1f} {steps_reuse:>15.1f} "
              f"{1 - steps_reuse / steps_full:>6.1%}")


if __name__ == "__main__":
    main()
