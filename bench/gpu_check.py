"""One GPU check of ELLA's exact per-step conditioning: connector vs UNet milliseconds per sampling step,
ELLA / static ratio, peak VRAM with the LLM resident and offloaded, then the training bench. Writes every
figure to one file (--out) as it goes, so a run cut short still leaves what it measured.

Real shapes: SD1.5 UNet (random weights) in fp16 and bf16, the released connector's layout (it runs in the
UNet's compute dtype, as in ComfyUI), a random flan-t5-xl-shaped encoder as the LLM for the VRAM figures.
--smoke runs the same code on the CPU with tiny shapes in well under a minute (checks it does not crash).

    bash bench/gpu_check.sh                     # on a CUDA machine, about 5 minutes
    bash bench/gpu_check.sh --smoke --out /tmp/gpu_check_smoke.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Report:
    """Prints each line and appends it to the output file at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sample_seconds(model, pos, neg, side: int, batch: int, steps: int, sampler: str, device) -> float:
    """Wall seconds per step of one KSampler-equivalent run (cfg 5)."""
    import comfy.sample

    latent = torch.zeros(batch, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, 0)
    sync(device)
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 5.0, sampler, "normal", pos, neg, latent, seed=0, disable_pbar=True)
    sync(device)
    return (time.perf_counter() - start) / steps


def connector_ms(connector, prompts, device, repeats: int, compiled: bool) -> float:
    """Median ms of the connector for one step's contexts (all prompts at one t, one forward)."""
    cond = h.pack_module("ella_core.conditioning")
    os.environ[cond.COMPILE_ENV] = "1" if compiled else "0"
    ella, times = connector(), []
    try:
        for i in range(repeats + 2):  # two warm-ups (compilation, allocator)
            cache = cond.ContextCache(connector=connector)
            for p in prompts:
                cache._projected(p, ella)
            rows = [r for p in prompts for r in cache.rows(p, torch.tensor([float(999 - 31 * i)]))]
            sync(device)
            start = time.perf_counter()
            cache.fetch(rows)
            sync(device)
            times.append(time.perf_counter() - start)
    finally:
        os.environ.pop(cond.COMPILE_ENV, None)
    return 1000 * statistics.median(times[2:])


def random_llm(smoke: bool, dtype: torch.dtype, device: torch.device):
    """A flan-t5-xl-shaped T5 encoder (random) standing in for the LLM the user keeps loaded or offloads."""
    from transformers import T5Config, T5EncoderModel

    if smoke:
        config = T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=512)
    else:
        config = T5Config(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64, vocab_size=32128,
                          feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device(device):
        model = T5EncoderModel(config).to(dtype).eval().requires_grad_(False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: only checks that it runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "gpu_check_results.txt"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (smoke: 1)")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    os.environ[h.STORE_ENV] = "0"  # cold runs: repeats must not reuse the first run's contexts
    out = Report(Path(args.out))
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --smoke for a CPU run with tiny shapes")

    h.import_comfy(cpu=args.smoke)
    h.load_pack()
    nodes, hook = h.pack_module("nodes.ella_nodes"), h.pack_module("nodes.hook")
    ella_core = h.pack_module("ella_core")
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    steps = args.steps or (2 if args.smoke else 10)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    unet_config = h.TINY_UNET if args.smoke else h.SD15_UNET
    ella_config = (ella_core.ELLAConfig(input_dim=64, layers=1, num_latents=16, time_channel=32, time_embed_dim=64)
                   if args.smoke else ella_core.ELLAConfig())
    tokens = 16 if args.smoke else 128
    dtypes = [torch.float32] if args.smoke else [torch.float16, torch.bfloat16]
    sides, batches = ([8], [1]) if args.smoke else ([64, 96], [1, 4])
    samplers = ["euler", "heun"]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (smoke run, tiny shapes)"
    out(f"# ella-tsc gpu_check  {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  {name}")
    out(f"# {steps} steps, cfg 5, {args.repeats} alternated repeats after a warm-up; median per-step ms")
    connector = h.build_connector(ella_config)
    for dtype in dtypes:
        unet, params = h.build_unet(unet_config, dtype)
        ella_model = nodes.EllaTSCTimestepConditioning.execute(unet, connector).result[0]
        running = hook.installed_hook(ella_model).connector
        pos, neg = h.ella_conditioning(connector, 1, tokens), h.ella_conditioning(connector, 2, tokens)
        width = ella_config.width
        plain = (h.static_conditioning(3, ella_config.num_latents, width),
                 h.static_conditioning(4, ella_config.num_latents, width))
        prompts = [c[0][1]["model_conds"][hook.COND_KEY].cond for c in (pos, neg)]
        out(f"\n## UNet {params / 1e6:.0f}M params in {dtype}, connector runs in {running.module.dtype}")
        import comfy.model_management as mm

        mm.load_models_gpu([ella_model, running.patcher])  # on the device for the connector-alone timing
        for compiled in (False,) if args.smoke else (False, True):  # compiling on a CPU takes minutes
            try:
                ms = connector_ms(running, prompts, device, 5, compiled)
                out(f"connector alone, one step (2 contexts, one forward){' torch.compile' if compiled else ''}: "
                    f"{ms:.2f} ms")
            except Exception as exc:  # compile needs a working toolchain: report, don't stop the check
                out(f"connector alone{' torch.compile' if compiled else ''}: failed: {type(exc).__name__}: {exc}")
        out("latent  batch sampler | UNet (static) ms/step | ELLA ms/step | connector ms/step | ratio min med "
            "| contexts forwards precomputed")
        for side in sides:
            for batch in batches:
                for sampler in samplers:
                    go = lambda m, p, n: sample_seconds(m, p, n, side, batch, steps, sampler, device)  # noqa: E731
                    go(unet, *plain)
                    go(ella_model, pos, neg)
                    static, ella = [], []
                    for _ in range(args.repeats):
                        static.append(go(unet, *plain))
                        ella.append(go(ella_model, pos, neg))
                    s, e = statistics.median(static), statistics.median(ella)
                    st = hook.installed_hook(ella_model).last_stats
                    out(f"{side:>3}x{side:<3} {batch:>5} {sampler:<7} | {1000 * s:21.2f} | {1000 * e:12.2f} | "
                        f"{1000 * (e - s):17.2f} | {min(ella) / min(static):.3f} {e / s:.3f} | "
                        f"{st.connector_calls:8d} {st.forwards:8d} {st.precomputed:11d}")
        llm = random_llm(args.smoke, dtype, device)
        for where in ("resident", "offloaded"):
            llm.to(device if where == "resident" else "cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sample_seconds(ella_model, pos, neg, sides[0], batches[-1], 2, "euler", device)
            peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda"
                    else "n/a on the CPU")
            out(f"peak VRAM, sampling {sides[0]}x{sides[0]} batch {batches[-1]}, LLM "
                f"({sum(p.numel() for p in llm.parameters()) / 1e6:.0f}M params) {where}: {peak}")
        del llm, unet, ella_model
        if device.type == "cuda":
            mm.unload_all_models()
            torch.cuda.empty_cache()

    if args.smoke or args.skip_training:
        out("\n## training bench: skipped" + (" (smoke run)" if args.smoke else ""))
        return
    out("\n## training bench (bench/bench_training.py --device cuda --batch 1 --steps 3 --llm t5xl)")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_training.py"), "--device", "cuda", "--batch", "1",
           "--steps", "3", "--llm", "t5xl"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
        for line in (done.stdout + (done.stderr[-2000:] if done.returncode else "")).splitlines():
            out(line)
    except subprocess.TimeoutExpired:
        out("training bench: timed out after 150 s")


if __name__ == "__main__":
    main()
