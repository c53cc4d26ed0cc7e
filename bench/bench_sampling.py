"""Seconds per sampling step with ELLA's exact per-step conditioning vs the same graph with static conditioning.

Runs ComfyUI in-process with the real SD1.5 UNet architecture (random weights, 860 M parameters) and the
released connector's architecture (random weights, 67 M parameters, T5-XL-sized 2048-wide features of 128
tokens). Both graphs: KSampler-equivalent, positive + negative, cfg 5, same sampler, steps and seed; the
static graph's conditioning is a (1, 64, 768) tensor, the shape of ELLA's context. For each configuration
(latent side x batch x sampler) the two graphs run alternately `--repeats` times after one warm-up each;
printed: min and median seconds per step (wall clock, and CPU time of this process, which is steadier on a
shared machine), the ratios ELLA / static, the in-run ratio (an ELLA run's CPU time over the same run without
the connector's own CPU time, immune to load changes between runs), the connector's work per run (contexts
computed, forward passes, of which precomputed from the schedule), and the arithmetic floor: the connector's
FLOPs per context over the UNet's per row, and the throughput floor: the connector's FLOPs per run at the
best rate this device reaches on the connector's own matrix products, over the static run's time, i.e. the
least ratio any method that computes the connector's own arithmetic can reach here. Small latents (8x8) make
the connector's share as large as it gets; at 64x64 (512 px) the UNet dominates. These cold runs have the
cross-run context store off. Then the repeat-run figure: the same ELLA graph queued again with a new seed
(the store on, filled by one run), alternated with static runs: its seconds per step, ratios to static and
the connector work it still did (0 forwards when every context came from the store).

    python bench/bench_sampling.py [--latent 8 64] [--batch 1 4] [--sampler euler heun] [--steps 4]
                                   [--repeats 3] [--threads 1] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_run(model, pos, neg, latent_side: int, batch: int, steps: int, sampler: str,
             seed: int = 0) -> tuple[float, float]:
    """One sampling run -> (wall s/step, CPU s/step)."""
    import comfy.sample

    latent = torch.zeros(batch, 4, latent_side, latent_side)
    noise = comfy.sample.prepare_noise(latent, seed)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    comfy.sample.sample(model, noise, steps, 5.0, sampler, "normal", pos, neg, latent, seed=0, disable_pbar=True)
    sync()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def connector_step_seconds(connector, prompts, repeats: int) -> float:
    """The connector alone for one step's rows (all prompts at one t, one forward), median seconds."""
    ella = connector()
    cond = h.pack_module("ella_core.conditioning")
    times = []
    for i in range(repeats):
        cache = cond.ContextCache(connector=connector)
        rows = [r for p in prompts for r in cache.rows(p, torch.tensor([float(999 - 37 * i)]))]
        for p in prompts:
            cache._projected(p, ella)  # projection is once per prompt and run: not part of a step
        sync()
        start = time.perf_counter()
        cache.fetch(rows)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def context_flops(connector, prompt) -> tuple[float, float]:
    """GFLOP of one context (one prompt at one t, projection excluded) and of one prompt's projection."""
    from torch.utils.flop_counter import FlopCounterMode

    ella = connector()
    cond = h.pack_module("ella_core.conditioning")
    with torch.no_grad():
        with FlopCounterMode(display=False) as counted:
            projected = cond.ContextCache(connector=connector)._projected(prompt, ella)
        proj = counted.get_total_flops()
        with FlopCounterMode(display=False) as counted:
            ella.forward_projected(projected, torch.tensor([500.0]))
        ctx = counted.get_total_flops()
    return ctx / 1e9, proj / 1e9


def unet_row_flops(unet, connector, latent: int) -> float:
    """GFLOP of one UNet row (one latent, one call) at this latent side."""
    from torch.utils.flop_counter import FlopCounterMode

    config = connector().config
    diffusion = unet.model.diffusion_model
    x = torch.zeros(1, 4, latent, latent, dtype=diffusion.dtype)
    context = torch.zeros(1, config.num_latents, config.width, dtype=diffusion.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        diffusion(x, torch.tensor([500.0]), context)
    return counted.get_total_flops() / 1e9


def matmul_ceiling(connector, tokens: int, rows: int, repeats: int = 5) -> float:
    """GFLOP/s: the best rate this device reaches on the connector's own matrix products (key/value, query,
    MLP and output projections of `rows` contexts at once, in its dtype, at this thread count). They are
    nearly all of a context's FLOPs, so a run's contexts take at least their FLOPs over this rate, whatever
    the method, as long as each context is the connector's own arithmetic."""
    ella = connector()
    c = ella.config
    n, w = c.num_latents, c.width
    shapes = [(rows * (n + tokens), w, 2 * w), (rows * n, w, w), (rows * n, w, c.MLP_RATIO * w),
              (rows * n, c.MLP_RATIO * w, w)]
    best = 0.0
    for m, k, out in shapes:
        x = torch.randn(m, k, device=ella.device, dtype=ella.dtype)
        weight = torch.randn(out, k, device=ella.device, dtype=ella.dtype)
        torch.nn.functional.linear(x, weight)  # warm-up
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            sync()
            best = max(best, 2 * m * k * out / (time.perf_counter() - start) / 1e9)
    return best


def run_config(unet, ella_model, hook, conds, latent: int, batch: int, sampler: str, args) -> dict:
    (ella_pos, ella_neg), (plain_pos, plain_neg) = conds
    go = lambda m, p, n: time_run(m, p, n, latent, batch, args.steps, sampler)  # noqa: E731
    go(unet, plain_pos, plain_neg)  # warm-up: allocations, first-call overheads
    go(ella_model, ella_pos, ella_neg)
    plain, ella, implied = [], [], []
    for _ in range(args.repeats):  # alternated so drifts in machine load hit both alike
        plain.append(go(unet, plain_pos, plain_neg))
        ella.append(go(ella_model, ella_pos, ella_neg))
        connector_cpu = hook.installed_hook(ella_model).last_stats.cpu_seconds / args.steps
        implied.append(ella[-1][1] / (ella[-1][1] - connector_cpu))  # same run: load drifts cancel
    stats = hook.installed_hook(ella_model).last_stats
    return {"plain": plain, "ella": ella, "stats": stats, "implied": implied}


def repeat_config(unet, ella_model, hook, conds, latent: int, batch: int, sampler: str, args) -> dict:
    """The ELLA graph re-queued with a new seed each time (store on, filled by one run first), alternated
    with static runs."""
    (ella_pos, ella_neg), (plain_pos, plain_neg) = conds
    go = lambda m, p, n, seed: time_run(m, p, n, latent, batch, args.steps, sampler, seed)  # noqa: E731
    plain, again = [], []
    with h.context_store(""):
        go(ella_model, ella_pos, ella_neg, 0)  # the run whose contexts the repeats find
        for i in range(args.repeats):
            plain.append(go(unet, plain_pos, plain_neg, 0))
            again.append(go(ella_model, ella_pos, ella_neg, 1 + i))
    return {"plain": plain, "ella": again, "stats": hook.installed_hook(ella_model).last_stats}


def summary(runs: list, which: int) -> tuple[float, float]:
    values = [r[which] for r in runs]
    return min(values), statistics.median(values)


def ratio_columns(r: dict) -> str:
    """Static and ELLA s/step (wall, min and median), their ratios and the CPU-time ratios, as printed."""
    (pw, pwm), (ew, ewm) = summary(r["plain"], 0), summary(r["ella"], 0)
    (pc, pcm), (ec, ecm) = summary(r["plain"], 1), summary(r["ella"], 1)
    return (f"{pw:9.4f} {pwm:9.4f} | {ew:9.4f} {ewm:9.4f} | {ew / pw:.3f} {ewm / pwm:.3f} | "
            f"{ec / pc:9.3f} {ecm / pcm:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, nargs="+", default=[8], help="latent sides (pixels / 8)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--sampler", nargs="+", default=["euler"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="UNet weights (GPU: fp16/bf16)")
    parser.add_argument("--tiny", action="store_true", help="one-level UNet, for a quick check that it runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    h.import_comfy(cpu=args.device == "cpu")
    h.load_pack()
    nodes, hook = h.pack_module("nodes.ella_nodes"), h.pack_module("nodes.hook")
    unet, unet_params = h.build_unet(h.TINY_UNET if args.tiny else h.SD15_UNET, DTYPES[args.dtype])
    connector = h.build_connector()
    ella_pos, ella_neg = h.ella_conditioning(connector, 1, 128), h.ella_conditioning(connector, 2, 128)
    ella_model = nodes.EllaTSCTimestepConditioning.execute(unet, connector).result[0]
    running = hook.installed_hook(ella_model).connector
    conds = ((ella_pos, ella_neg), (h.static_conditioning(3, 64, 768), h.static_conditioning(4, 64, 768)))
    prompts = [c[0][1]["model_conds"][hook.COND_KEY].cond for c in (ella_pos, ella_neg)]
    ella_params = sum(p.numel() for p in connector.module.parameters())
    print(f"UNet {unet_params / 1e6:.0f}M params ({args.dtype}, random), connector {ella_params / 1e6:.1f}M params "
          f"(runs in {running.module.dtype}), device {args.device}, {args.threads} thread(s), cfg 5, "
          f"{args.steps} steps, {args.repeats} alternated repeats after a warm-up", flush=True)
    print("config                | static s/step min  med | ELLA s/step min  med | ratio min  med "
          "| CPU ratio min  med | in-run min med | contexts forwards precomputed per run", flush=True)
    print("(ratio: wall clock; CPU ratio: this process's CPU time; in-run: ELLA run CPU / (same run minus the "
          "connector's CPU time), which no load drift between runs can skew)", flush=True)
    ctx_gflop, proj_gflop = context_flops(running, prompts[0])
    repeats, ceilings, floor_rows = [], {}, []
    for latent, batch, sampler in itertools.product(args.latent, args.batch, args.sampler):
        with h.context_store("0"):  # cold: every run computes its own contexts
            r = run_config(unet, ella_model, hook, conds, latent, batch, sampler, args)
        repeats.append(((latent, batch, sampler), repeat_config(unet, ella_model, hook, conds, latent, batch,
                                                                sampler, args)))
        s = r["stats"]
        print(f"{latent:>2}x{latent:<2} batch {batch} {sampler:<6}| {ratio_columns(r)} | {min(r['implied']):8.3f} "
              f"{statistics.median(r['implied']):.3f} | {s.connector_calls:8d} {s.forwards:8d} {s.precomputed:11d}",
              flush=True)
        rows = max(1, s.connector_calls // max(1, s.forwards))
        if rows not in ceilings:
            ceilings[rows] = matmul_ceiling(running, prompts[0].features.shape[1], rows)
        work = s.connector_calls * ctx_gflop + s.projections * proj_gflop
        static_cpu = summary(r["plain"], 1)[0] * args.steps
        floor_rows.append((latent, batch, sampler, work, work / s.cpu_seconds, ceilings[rows],
                           1 + work / ceilings[rows] / static_cpu))
    print("repeat run (same graph, new seed) | static s/step min med | ELLA s/step min med | ratio min med "
          "| CPU ratio min med | contexts forwards reused per run", flush=True)
    for (latent, batch, sampler), r in repeats:
        s = r["stats"]
        print(f"{latent:>2}x{latent:<2} batch {batch} {sampler:<6}            | {ratio_columns(r)} | "
              f"{s.connector_calls:8d} {s.forwards:8d} {s.reused:6d}", flush=True)
    for latent in args.latent:
        row = unet_row_flops(unet, running, latent)
        print(f"FLOPs at {latent}x{latent}: one context {ctx_gflop:.2f} GFLOP, one UNet row {row:.2f} GFLOP: exact "
              f"conditioning adds at least {ctx_gflop / row:.3f} FLOP per UNet FLOP at batch 1, "
              f"{ctx_gflop / (4 * row):.3f} at batch 4 (each call's cond and uncond need their own context at its "
              "t; a batch's rows share them); time ratios below 1 + that mean the connector's batched products run "
              "faster per FLOP than the UNet", flush=True)
    print("throughput floor | connector GFLOP per run (projections included) | its rate GFLOP/s | this device's "
          "best rate on its matrix products GFLOP/s | least ratio to static any exact method reaches here",
          flush=True)
    print("(least ratio: 1 + the run's connector FLOPs at the best matrix-product rate, over the static run's "
          "minimum CPU time; a target below it cannot be met on this device without changing the arithmetic)",
          flush=True)
    for latent, batch, sampler, work, rate, ceiling, least in floor_rows:
        print(f"{latent:>2}x{latent:<2} batch {batch} {sampler:<6}| {work:8.1f} | {rate:7.1f} "
              f"({100 * rate / ceiling:.0f} % of the best) | {ceiling:7.1f} | {least:.3f}", flush=True)
    c = connector_step_seconds(running, prompts, 3 * args.repeats)
    print(f"connector alone, one step's 2 contexts in one forward: {c:.4f} s", flush=True)


if __name__ == "__main__":
    main()
