"""Training step time at SD1.5 shapes, split into data, connector and UNet, with and without the feature cache.

Real SD1.5 UNet and VAE configs with random weights (no downloads), the released connector's config (6 blocks,
64 latents, width 768), 128 fixed tokens, 256x256 images (32x32 latents). Without the cache every step
decodes the images, runs the VAE encoder and the LLM (the real SmolLM2-135M from $ELLA_SMOLLM2_GGUF, or a
random flan-t5-xl-shaped encoder with --llm t5xl); with the cache it reads latents and features from a
safetensors shard. The connector's backward is timed apart from the UNet's by splitting the graph at the
context (same maths as one backward).

    python bench/bench_training.py --batch 1 --steps 3 [--device cuda] [--llm smollm2|t5xl]
    python bench/bench_training.py --cache-storage     # cache bytes per sample, index memory (training_cache.py)
    python bench/bench_training.py --online ...   # cache.mode full vs latents vs none (bench/training_online.py)
    python bench/bench_training.py --source   # cache-pass images/s with 0, 1, 2 loader workers (training_source.py)
    python bench/bench_training.py --step-only --resolution 512 --step-rounds 3   # the connector's step share
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ella_core import ELLA, ELLAConfig, load_text_encoder  # noqa: E402
from training.config import OptimConfig  # noqa: E402
from training.optim import make_optimizer  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device, self.totals = device, {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                sync(timer.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                sync(timer.device)
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()


def build_llm(kind: str, device: torch.device):
    if kind == "smollm2":
        path = os.environ.get("ELLA_SMOLLM2_GGUF")
        if not path:
            sys.exit("set ELLA_SMOLLM2_GGUF (scripts/setup_env.sh) or use --llm t5xl")
        return load_text_encoder(path, dtype="fp32", device=device)
    from transformers import T5Config, T5EncoderModel

    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        sys.exit("set COMFYUI_PATH for the T5 tokenizer")
    folder = Path(tempfile.mkdtemp()) / "t5xl"
    config = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    T5EncoderModel(config).save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(Path(comfy) / "comfy/text_encoders/t5_tokenizer").save_pretrained(folder)
    return load_text_encoder(str(folder), dtype="fp32", device=device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llm", choices=("smollm2", "t5xl"), default="smollm2")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--cache-storage", action="store_true",
                        help="print the feature cache's bytes per sample and index memory (bench/training_cache.py)")
    parser.add_argument("--online", action="store_true", help="cache.mode full vs latents vs none, both LLMs "
                        "(bench/training_online.py) instead of the split below")
    parser.add_argument("--t5-layers", type=int, default=24, help="--online: layers of the T5-XL-shaped encoder")
    parser.add_argument("--split", action="store_true", help="only the held-out split and pre-cache listing costs")
    parser.add_argument("--source", action="store_true", help="only the cache pass's source side (training_source)")
    parser.add_argument("--source-images", type=int, default=96)
    parser.add_argument("--step-rounds", type=int, default=3, help="rounds of bench/training_step.py (0: skip)")
    parser.add_argument("--step-only", action="store_true", help="only the step share (training_step.py)")
    args = parser.parse_args()
    if args.source:
        from training_source import source_lines

        print("\n".join(source_lines(args.source_images)))
        return
    if args.split:
        from bench.training_split import measure

        print("\n".join(measure()))
        return
    if args.cache_storage:
        from training_cache import report

        print("\n".join(report()))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device).requires_grad_(False).eval()
    vae = AutoencoderKL(**SD15_VAE).to(device).requires_grad_(False).eval()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if args.online:
        from training_online import online_lines

        print("\n".join(online_lines(unet, vae, scheduler, device, batch=args.batch, steps=args.steps,
                                     resolution=args.resolution, t5_layers=args.t5_layers)))
        return
    if args.step_only:
        from training_step import step_lines

        print("\n".join(step_lines(unet, device, args.batch, args.resolution // 8, args.step_rounds)))
        return
    llm = build_llm(args.llm, device)
    ella = ELLA(ELLAConfig(input_dim=llm.hidden_size)).to(device).train()
    optimizer = make_optimizer(ella.parameters(), OptimConfig(), device)  # the trainer's AdamW
    b, res, latent = args.batch, args.resolution, args.resolution // 8
    prompts = ["A vivid red book with a smooth, matte cover lies next to a glossy yellow vase on a dark wood table"]
    png = io.BytesIO()
    Image.effect_noise((res, res), 64).convert("RGB").save(png, format="PNG")
    png_bytes = png.getvalue()

    # the cache shard: what the cache pass writes once
    shard = Path(tempfile.mkdtemp()) / "r0-00000.safetensors"
    with torch.no_grad():
        feats = llm.encode(prompts * b, mode="fixed", max_length=128).features.cpu()
    save_file({f"{i}.latent": torch.randn(4, latent, latent) for i in range(b)} |
              {f"{i}.text.0": feats[i].contiguous() for i in range(b)}, str(shard))
    print(f"device {device}, threads {torch.get_num_threads()}, batch {b}, {res}x{res} -> {latent}x{latent} latents, "
          f"LLM {args.llm} (hidden {llm.hidden_size}), connector {sum(p.numel() for p in ella.parameters()) / 1e6:.1f} M "
          f"params, UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params")

    def data_cached(timer: Timer):
        with timer("data"):
            with safe_open(str(shard), framework="pt") as f:
                lat = torch.stack([f.get_tensor(f"{i}.latent") for i in range(b)]).to(device)
                text = torch.stack([f.get_tensor(f"{i}.text.0") for i in range(b)]).to(device)
        return lat, text

    def data_online(timer: Timer):
        with timer("data"), torch.no_grad():
            pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(
                Image.open(io.BytesIO(png_bytes)).convert("RGB"), dtype="float32")).permute(2, 0, 1) / 127.5 - 1
                                  for _ in range(b)]).to(device)
            lat = vae.encode(pixels).latent_dist.mode() * 0.18215
            text = llm.encode(prompts * b, mode="fixed", max_length=128).features.to(device)
        return lat, text

    for label, get_data in (("with feature cache", data_cached), ("without cache (VAE + LLM every step)", data_online)):
        for warm in (True, False):
            timer = Timer(device)
            for _ in range(1 if warm else args.steps):
                lat, text = get_data(timer)
                t = torch.randint(0, 1000, (b,), device=device)
                noise = torch.randn_like(lat)
                noisy = scheduler.add_noise(lat, noise, t)
                with timer("connector fwd"):
                    context = ella(text, t.float())
                split = context.detach().requires_grad_(True)
                with timer("UNet fwd"):
                    pred = unet(noisy, t, encoder_hidden_states=split).sample
                    loss = torch.nn.functional.mse_loss(pred, noise)
                with timer("UNet bwd"):
                    loss.backward()
                with timer("connector bwd"):
                    context.backward(split.grad)
                with timer("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        per_step = {k: v / args.steps for k, v in timer.totals.items()}
        total = sum(per_step.values())
        connector = per_step["connector fwd"] + per_step["connector bwd"] + per_step["optimizer"]
        print(f"\n{label}: {total:.3f} s/step, {b / total:.2f} samples/s")
        for k, v in per_step.items():
            print(f"  {k:<14} {v * 1000:9.1f} ms  {100 * v / total:5.1f} %")
        print(f"  connector share (fwd + bwd + AdamW): {100 * connector / total:.1f} % of the step")
    if args.step_rounds:
        from training_step import step_lines

        print("\n" + "\n".join(step_lines(unet, device, args.batch, latent, args.step_rounds)))


if __name__ == "__main__":
    main()
