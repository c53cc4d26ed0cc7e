"""Seconds per sampling step with ELLA vs the same graph with plain conditioning of the same shape.

Runs ComfyUI in-process on the CPU with the real SD1.5 UNet architecture (random weights, 860 M parameters)
and the released connector's architecture (random weights, 67 M parameters, T5-XL-sized 2048-wide features
of 128 tokens). Both graphs: KSampler-equivalent, positive + negative, cfg > 1, same sampler and steps; the
plain graph's conditioning is a (1, 64, 768) tensor, the shape of ELLA's context. Prints both timings and
the ratio. Small latents (default 8x8, i.e. 64x64 pixels) make the connector's share look as large as it
can get; at 512x512 (--latent 64) the UNet dominates.

    python bench/bench_sampling.py [--steps 8] [--repeats 3] [--latent 8] [--threads 1] [--sampler euler]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import tiny_models as tm  # noqa: E402  (ComfyUI import helpers and random init)

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=False,
                 context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)


def build_sd15():
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(SD15_UNET))
    model = config.get_model({})
    gen = torch.Generator().manual_seed(0)
    state = {k: tm._random_like(k, v.shape, gen) for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(state)
    params = sum(v.numel() for v in state.values())
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), params


def build_ella_conds(pack_nodes, hook, managed):
    from ella_pack_under_test.ella_core import ELLA, ELLAConfig
    from ella_pack_under_test.ella_core.conditioning import EllaPrompt

    torch.manual_seed(0)
    module = ELLA(ELLAConfig()).eval().requires_grad_(False)  # the released SD1.5 layout
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    connector = managed.ManagedConnector.create(module, None, "bench")

    def cond(seed):
        g = torch.Generator().manual_seed(seed)
        prompt = EllaPrompt(features=torch.randn(1, 128, 2048, generator=g), connector=connector, name="bench")
        return [[torch.zeros(1, 64, 768), {"model_conds": {hook.COND_KEY: hook.ELLACond(prompt)},
                                          "additional_models": [connector.patcher]}]]

    return connector, cond(1), cond(2), sum(p.numel() for p in module.parameters())


def time_run(model, pos, neg, args) -> float:
    import comfy.sample

    latent = torch.zeros(1, 4, args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)
    start = time.perf_counter()
    comfy.sample.sample(model, noise, args.steps, 5.0, args.sampler, "normal", pos, neg, latent, seed=0,
                        disable_pbar=True)
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=8, help="latent side (pixels / 8)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sampler", default="euler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(ROOT / "tests" / "nodes"))
    tm.import_comfy()
    from tests.nodes.inprocess import load_pack

    load_pack()
    import ella_pack_under_test.nodes.ella_nodes as pack_nodes
    import ella_pack_under_test.nodes.hook as hook
    import ella_pack_under_test.nodes.managed as managed

    unet, unet_params = build_sd15()
    connector, ella_pos, ella_neg, ella_params = build_ella_conds(pack_nodes, hook, managed)
    ella_model = pack_nodes.EllaTSCTimestepConditioning.execute(unet, connector).result[0]
    g = torch.Generator().manual_seed(3)
    plain_pos = [[torch.randn(1, 64, 768, generator=g), {}]]
    plain_neg = [[torch.randn(1, 64, 768, generator=g), {}]]

    time_run(unet, plain_pos, plain_neg, args)  # warm-up (allocations, first-call overheads)
    time_run(ella_model, ella_pos, ella_neg, args)
    plain, ella = [], []
    for _ in range(args.repeats):  # interleaved so drifts in machine load hit both alike
        plain.append(time_run(unet, plain_pos, plain_neg, args))
        ella.append(time_run(ella_model, ella_pos, ella_neg, args))
    p, e = statistics.median(plain), statistics.median(ella)
    module = connector.module  # the connector alone: what the hook adds per step (two prompts, one t each)
    feats = [c[0][1]["model_conds"][hook.COND_KEY].cond.features for c in (ella_pos, ella_neg)]
    with torch.no_grad():
        projected = [module.project_text(f) for f in feats]
        conn = []
        for i in range(5 * args.repeats):
            start = time.perf_counter()
            for x in projected:
                module.forward_projected(x, torch.tensor([float(999 - 37 * i)]))
            conn.append(time.perf_counter() - start)
    c = statistics.median(conn)
    print(f"SD1.5 UNet {unet_params / 1e6:.0f}M params (random), connector {ella_params / 1e6:.1f}M params (random)")
    print(f"latent {args.latent}x{args.latent}, batch 1, cfg 5 (cond+uncond), sampler {args.sampler}, "
          f"{args.steps} steps, {args.threads} thread(s), median of {args.repeats}")
    print(f"plain conditioning: {p:.4f} s/step   runs: {' '.join(f'{x:.4f}' for x in plain)}")
    print(f"ELLA per-step hook: {e:.4f} s/step   runs: {' '.join(f'{x:.4f}' for x in ella)}")
    print(f"ratio ELLA / plain: {e / p:.3f}")
    print(f"connector alone (2 prompts, one step): {c:.4f} s = {100 * c / p:.1f}% of a plain step")


if __name__ == "__main__":
    main()
