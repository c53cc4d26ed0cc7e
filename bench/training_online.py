"""Step time with cache.mode full vs latents vs none, and what a full cache costs on disk (docs/training.md).

SD1.5 shapes: the SD1.5 UNet and VAE configs with random weights, the released connector's layout, 128 fixed
tokens. Each step runs the trainer's own `micro_step_loss` (training/loop.py), backward and AdamW; the modes
differ only in where latents and features come from:
  full     both read from a safetensors shard in the cache's layout
  latents  latents read from the shard, the captions through the resident LLM (`training.online.batch_features`)
  none     the PNG decoded and fitted to its bucket, the VAE and the LLM run in the step
LLMs: SmolLM2-135M from $ELLA_SMOLLM2_GGUF, and a T5 encoder of flan-t5-xl's widths with random weights (held in
memory, never written). FLOPs per sample (torch's FlopCounterMode) make the GPU-time ratio of LLM to training
step independent of this machine.

    python bench/bench_training.py --online --batch 1 --steps 2 [--t5-layers 24] [--device cuda]
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CAPTIONS = [
    "A vivid red book with a smooth, matte cover lies next to a glossy yellow vase on a dark wood table",
    "Three small grey kittens asleep in a wicker basket by a window, soft morning light, a blue blanket",
    "An old lighthouse on a rocky cliff at dusk, waves breaking below, a single gull against an orange sky",
    "A bowl of ramen with a halved egg, sliced pork and green onions, steam rising, chopsticks on the left",
]
T5_XL = dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_heads=32, feed_forward_proj="gated-gelu")
TOKENS = 128


def smollm2(device: torch.device) -> Any:
    from ella_core import load_text_encoder

    path = os.environ.get("ELLA_SMOLLM2_GGUF")
    if not path or not Path(path).is_file():
        raise SystemExit("set ELLA_SMOLLM2_GGUF (eval \"$(bash scripts/setup_env.sh)\")")
    return load_text_encoder(path, dtype="fp32", device=device)


def t5_xl_shaped(device: torch.device, layers: int) -> Any:
    """flan-t5-xl's encoder widths, `layers` of its 24 blocks, random weights, ComfyUI's T5 tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from devtools.tiny_models import t5_tokenizer_dir
    from ella_core.text_encoder import LLMTextEncoder
    from ella_core.tokenization import PromptTokenizer

    torch.manual_seed(0)
    config = T5Config(**T5_XL, num_layers=layers, is_encoder_decoder=False, use_cache=False)
    model = T5EncoderModel(config).to(device).requires_grad_(False).eval()
    tokenizer = PromptTokenizer(AutoTokenizer.from_pretrained(str(t5_tokenizer_dir())), "t5")
    return LLMTextEncoder(model, tokenizer, "t5", name=f"T5-XL-shaped ({layers}/24 layers)")


def _flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def paper_shape_flops(unet_config: Any) -> tuple[float, float]:
    """FLOPs per sample, counted on the meta device (nothing computed, no memory): the 24-layer T5-XL encoder
    over 128 tokens, and a training step at 512 px (connector and UNet forward, backward to the connector)."""
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from ella_core import ELLA, ELLAConfig

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XL, num_layers=24, is_encoder_decoder=False, use_cache=False)).eval()
        with torch.no_grad():  # no attention mask: all 128 positions count, as with padding (mask code reads values)
            llm = _flops(lambda: t5(input_ids=torch.zeros(1, TOKENS, dtype=torch.long)))
        unet = UNet2DConditionModel.from_config(unet_config).requires_grad_(False)
        ella = ELLA(ELLAConfig(input_dim=T5_XL["d_model"]))
        latents, t = torch.randn(1, 4, 64, 64), torch.tensor([500.0])

        def step() -> None:
            pred = unet(latents, t, encoder_hidden_states=ella(torch.randn(1, TOKENS, T5_XL["d_model"]), t)).sample
            (pred - latents).pow(2).mean().backward()

        return llm, _flops(step)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def online_lines(unet: Any, vae: Any, scheduler: Any, device: torch.device, *, batch: int = 1, steps: int = 2,
                 resolution: int = 256, t5_layers: int = 24) -> list[str]:
    """Runs the three modes with each LLM; returns the lines to print (paper-shape FLOPs first)."""
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ella_core import ELLA, ELLAConfig
    from training import online
    from training.config import Config
    from training.data import Data, SkipCounter, decode_image, fit_to_bucket
    from training.loop import micro_step_loss
    from training.models import Base, ConnectorStep

    b = batch
    base = Base(unet, vae, scheduler, "sd15", "epsilon")
    config = Config()  # the trainer's defaults: fixed 128 tokens, no dropout, epsilon MSE
    config.llm.max_length = TOKENS
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
    keys = [f"sample{i}" for i in range(b)]
    png = io.BytesIO()
    Image.effect_noise((resolution, resolution), 64).convert("RGB").save(png, format="PNG")
    png_bytes = png.getvalue()
    with torch.no_grad():
        pixels = fit_to_bucket(decode_image(png_bytes), (resolution, resolution)).pixels
        latent = base.encode_pixels(pixels[None].to(device))[0].cpu()  # (4, res/8, res/8)
    llm_flops, step_flops = paper_shape_flops(unet.config)
    lines = [f"\nAt the paper's shapes (FLOPs counted on the meta device): T5-XL encoder forward {llm_flops / 1e9:.0f} "
             f"GFLOP per sample (128 tokens), SD1.5 training step at 512 px {step_flops / 1e9:.0f} GFLOP per sample: "
             f"latents mode adds {100 * llm_flops / step_flops:.0f} % GPU work per sample (at equal efficiency); "
             f"a full cache stores {TOKENS * T5_XL['d_model'] * 2 / 2**10:.0f} KiB of fp16 features per caption "
             f"({34e6 * TOKENS * T5_XL['d_model'] * 2 / 2**40:.1f} TiB for 34 M) against "
             f"{4 * 64 * 64 * 2 / 2**10:.0f} KiB of fp16 latents per image"]
    lines += [f"\ncache.mode full / latents / none: device {device}, threads {torch.get_num_threads()}, batch {b}, "
             f"{resolution}x{resolution} images, {TOKENS} tokens, {steps} timed steps after one warm-up"]

    for name, build in (("SmolLM2-135M (GGUF, fp32)", lambda: smollm2(device)),
                        (f"T5-XL-shaped encoder, {t5_layers} of 24 layers (random, fp32)",
                         lambda: t5_xl_shaped(device, t5_layers))):
        llm = build()
        features = online.batch_features(llm, texts, torch.zeros(TOKENS, llm.hidden_size), config, keys)[0].cpu()
        empty = online.encode_texts(llm, [""], config.llm)[0].float().cpu()
        shard = Path(tempfile.mkdtemp()) / "r0-00000.safetensors"
        save_file({f"{i}.latent": latent.clone() for i in range(b)} |
                  {f"{i}.text.0": features[i].contiguous() for i in range(b)}, str(shard))
        torch.manual_seed(0)
        ella = ELLA(ELLAConfig(input_dim=llm.hidden_size)).to(device).train()
        step_module = ConnectorStep(ella)
        optimizer = torch.optim.AdamW(ella.parameters(), lr=1e-4, weight_decay=0.01)
        data = Data(None, [], empty, llm, SkipCounter(), None)
        common = {"seed": list(range(b)), "key": keys, "original_size": [(resolution, resolution)] * b,
                  "crop_top_left": [(0, 0)] * b}

        def from_shard(with_features: bool) -> dict[str, torch.Tensor]:
            with safe_open(str(shard), framework="pt") as f:
                out = {"latents": torch.stack([f.get_tensor(f"{i}.latent") for i in range(b)]).float()}
                if with_features:
                    out["features"] = torch.stack([f.get_tensor(f"{i}.text.0") for i in range(b)]).float()
            return out

        def decoded() -> dict[str, torch.Tensor]:
            return {"pixels": torch.stack([fit_to_bucket(decode_image(png_bytes), (resolution, resolution)).pixels
                                           for _ in range(b)])}

        batches = {"full": lambda: {**common, **from_shard(True)},
                   "latents": lambda: {**common, **from_shard(False), "text": texts},
                   "none": lambda: {**common, **decoded(), "text": texts}}

        def step(mode: str) -> None:
            loss, _ = micro_step_loss(batches[mode](), base, data, step_module, config, device,
                                      contextlib.nullcontext())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times = {mode: _timed(lambda m=mode: step(m), device, steps) for mode in batches}
        llm_s = _timed(lambda: online.batch_features(llm, texts, empty, config, keys), device, steps) / b
        vae_s = _timed(lambda: base.encode_pixels(decoded()["pixels"].to(device)), device, steps) / b
        llm_flops = _flops(lambda: online.batch_features(llm, texts[:1], empty, config, keys[:1]))
        step_flops = _flops(lambda: step("full")) / b
        feature_bytes = TOKENS * llm.hidden_size
        lines += [f"\n{name}: hidden {llm.hidden_size}",
                  *(f"  {mode:<8} {t:8.3f} s/step  {b / t:6.2f} samples/s  (x{t / times['full']:.2f} of full)"
                    for mode, t in times.items()),
                  f"  LLM forward {llm_s * 1000:.0f} ms/sample, VAE encode {vae_s * 1000:.0f} ms/sample (this machine)",
                  f"  FLOPs per sample: LLM forward {llm_flops / 1e9:.1f} G, training step (UNet + connector fwd/bwd) "
                  f"{step_flops / 1e9:.1f} G: the LLM adds {100 * llm_flops / step_flops:.1f} % GPU work per step "
                  "in latents mode (at equal efficiency)",
                  f"  features per caption ({TOKENS} x {llm.hidden_size}): {feature_bytes * 2 / 2**10:.0f} KiB in "
                  f"fp16/bf16, {feature_bytes * 4 / 2**10:.0f} KiB in fp32; x 34 M captions: "
                  f"{34e6 * feature_bytes * 2 / 2**40:.1f} TiB (fp16); latents per {resolution} px image "
                  f"{latent.numel() * 2 / 2**10:.1f} KiB (fp16)"]
        del llm, data, ella, optimizer, step_module
    return lines
