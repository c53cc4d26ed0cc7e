"""Stage 4, the frozen base: a small `UNet2DConditionModel` (cross-attention at every resolution) trained from
scratch jointly with the bag-of-words `WeakEncoder` on the world's training scenes, saved as the diffusers
folder `<workdir>/base/model/` (unet/, vae/, scheduler/) that `training/train.py` loads as `model.pretrained`,
plus `<workdir>/base/weak_encoder.safetensors`. Stage 2 (the VAE) lives in vae.py; `build_vae` is its alias.

Run stages 1-4 alone: `python bench/alignment/base.py [--profile quick] [--workdir DIR]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.alignment import judge as judge_stage  # noqa: E402
from bench.alignment import stage_io, unet_training, vae as vae_stage, world  # noqa: E402
from bench.alignment.weak_encoder import WeakEncoder, world_vocabulary  # noqa: E402

SETTINGS = ("unet_channels", "unet_head_dim", "unet_norm_groups", "context_dim", "text_length", "base_steps", "base_batch", "base_lr",
            "base_warmup", "base_ema", "base_min_snr_gamma", "caption_dropout", "train_timesteps", "check_images",
            "sample_steps", "guidance")
build_vae = vae_stage.build


def make_unet(profile: Any) -> Any:
    from diffusers import UNet2DConditionModel

    channels = tuple(profile.unet_channels)
    return UNet2DConditionModel(
        sample_size=profile.image_size // 2, in_channels=profile.vae_latent_channels,
        out_channels=profile.vae_latent_channels, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels), up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        cross_attention_dim=profile.context_dim, attention_head_dim=profile.unet_head_dim,
        norm_num_groups=profile.unet_norm_groups)


def load_base(workdir: Path) -> tuple[Any, Any, Any, WeakEncoder]:
    """(unet, vae, scheduler, weak encoder) of a finished stage 4, frozen, in eval mode."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    root = Path(workdir) / "base"
    unet = UNet2DConditionModel.from_pretrained(root / "model" / "unet").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(root / "model" / "vae").eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(root / "model" / "scheduler")
    return unet, vae, scheduler, WeakEncoder.load(root / "weak_encoder.safetensors")


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """(N, 3, H, W) in [0, 1] -> one PNG, `columns` images a row (the prompts are in the split's scenes.jsonl)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.zeros(3, rows * (h + 2), columns * (w + 2))
    for i, x in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = x
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)


def check(workdir: Path, profile: Any, unet: Any, vae: Any, scheduler: Any, encoder: WeakEncoder) -> dict[str, Any]:
    """The judge on a few base samples per test split (the drawing check: objects, colours, shapes), and the
    proof that the base cannot bind: a caption and its binding-swapped twin give the same UNet output."""
    figures: dict[str, Any] = {}
    judge = judge_stage.load_judge(workdir)
    uncond = encoder.encode([""])
    n = max(1, profile.check_images // 2)
    for split in ("test_seen", "test_heldout"):
        rows = world.load_scenes(Path(workdir) / "world" / split)[:n]
        captions = [c[0] for _, _, c in rows]
        latents = unet_training.sample(unet, scheduler, encoder.encode(captions), uncond, profile.sample_steps,
                                       profile.guidance, seed=[profile.seed * 1000 + i for i in range(len(rows))])
        images = vae_stage.decode(vae, latents)
        save_grid(images, Path(workdir) / "base" / f"samples_{split}.png")
        scores = [judge_stage.score(p, sc) for p, (_, sc, _) in zip(judge.predict(images), rows)]
        figures[split] = {k: sum(float(s[k]) for s in scores) / len(scores)
                          for k in ("binding", "objects_correct", "count_ok", "colour_ok", "shape_ok")}
    a, b = "a red circle on the left and a blue square on the right", "a blue circle on the left and a red square on the right"
    x = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                    generator=torch.Generator().manual_seed(profile.seed))
    with torch.no_grad():
        out = [unet(x, torch.tensor([500]), encoder_hidden_states=encoder.encode([c])).sample for c in (a, b)]
    figures["swapped_caption_max_abs_diff"] = float((out[0] - out[1]).abs().max())
    figures["text_effect"] = text_effect(unet, encoder, [c for _, _, cs in rows for c in cs[:1]], profile.seed)
    return figures


@torch.no_grad()
def text_effect(unet: Any, encoder: WeakEncoder, captions: list[str], seed: int, t: int = 500) -> float:
    """mean |eps(caption) - eps("")| / mean |eps("")| on noise at timestep t: how much the prompt moves the
    prediction at all (near 0: the UNet ignores its context, and every prompt draws the same picture)."""
    x = torch.randn(len(captions), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                    generator=torch.Generator().manual_seed(seed))
    ts = torch.full((len(captions),), t)
    cond = unet(x, ts, encoder_hidden_states=encoder.encode(captions)).sample
    uncond = unet(x, ts, encoder_hidden_states=encoder.encode([""]).expand(len(captions), -1, -1)).sample
    return float((cond - uncond).abs().mean() / uncond.abs().mean())


def build(workdir: Path, profile: Any) -> dict[str, Any]:
    """Stage 4: train the UNet and the weak encoder on the VAE latents of `<workdir>/world/train`, save the
    diffusers folder and the encoder, and check the samples with the judge."""
    from diffusers import AutoencoderKL

    workdir = Path(workdir)
    stage = workdir / "base"
    settings = {"judge": stage_io.settings_of(workdir / "judge"), **profile.settings(*SETTINGS)}
    if (figures := stage_io.cached(stage, settings)) is not None:
        return figures
    progress = stage_io.begin(stage, profile, seed=True)
    vae = vae_stage.load_vae(workdir)
    rows = world.load_scenes(workdir / "world" / "train")
    latents = vae_stage.encode(vae, vae_stage.load_images([p for p, _, _ in rows]))
    progress(f"{len(rows)} training latents {tuple(latents.shape[1:])}, std {latents.std():.3f}")
    encoder = WeakEncoder(vocabulary=world_vocabulary(), dim=profile.context_dim, length=profile.text_length)
    unet = make_unet(profile)
    scheduler = unet_training.make_scheduler(profile.train_timesteps)
    progress(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, vocabulary {len(encoder.vocabulary)}")
    figures = unet_training.train_unet(
        unet, encoder, latents, [c for _, _, c in rows], profile.base_steps, profile.base_batch, profile.base_lr,
        profile.seed, [*unet.parameters(), *encoder.parameters()], scheduler=scheduler,
        caption_dropout=profile.caption_dropout, warmup=profile.base_warmup, ema=profile.base_ema,
        min_snr_gamma=profile.base_min_snr_gamma, progress=progress)
    unet.eval().requires_grad_(False)
    encoder.eval().requires_grad_(False)
    model = stage / "model"
    unet.save_pretrained(model / "unet", safe_serialization=True)
    shutil.copytree(workdir / "vae" / "vae", model / "vae")
    scheduler.save_pretrained(model / "scheduler")
    encoder.save(stage / "weak_encoder.safetensors")
    figures.update(check(workdir, profile, unet, AutoencoderKL.from_pretrained(model / "vae"), scheduler, encoder))
    figures["seconds"] = round(progress.elapsed, 1)
    progress("samples judged: " + ", ".join(f"{s} binding {figures[s]['binding']:.2f} objects "
                                            f"{figures[s]['objects_correct']:.2f}/2" for s in ("test_seen", "test_heldout")))
    return stage_io.finish(stage, settings, figures)


build_base = build


def stages_1_4(workdir: Path, profile: Any) -> dict[str, Any]:
    """world, vae, judge, base in order (each cached); their figures by stage name."""
    return {"world": world.build(workdir, profile), "vae": vae_stage.build(workdir, profile),
            "judge": judge_stage.build(workdir, profile), "base": build(workdir, profile)}


def main() -> None:
    from bench.alignment.profiles import PROFILES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", choices=sorted(PROFILES))
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    args = parser.parse_args()
    import json

    print(json.dumps(stages_1_4(args.workdir, PROFILES[args.profile]), indent=1))


if __name__ == "__main__":
    main()
