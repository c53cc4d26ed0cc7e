"""Probe a stage-4 variant without touching `<workdir>/base/`: train the base UNet + weak encoder with profile
fields overridden, then print the judge's figures of its samples (base.check) at one or more guidance scales.
Reuses the cached stages 1-3 of `--workdir` (run base.py or run.py with the same profile first).

`python bench/alignment/probe_base.py --workdir W --profile quick --set base_steps=800 base_min_snr_gamma=5
--guidance 1.5 3 --out /tmp/probe` (on a busy machine ALIGNMENT_THREADS=1 is several times faster than 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.alignment import base, stage_io, unet_training, vae as vae_stage, world  # noqa: E402
from bench.alignment.profiles import PROFILES, Profile  # noqa: E402
from bench.alignment.weak_encoder import WeakEncoder, world_vocabulary  # noqa: E402


def override(profile: Profile, pairs: list[str]) -> Profile:
    """FIELD=VALUE strings -> a profile copy, each value parsed as the field's type (tuples comma-separated)."""
    changes = {}
    for pair in pairs:
        field, _, value = pair.partition("=")
        if not hasattr(profile, field):
            raise SystemExit(f"--set {pair}: Profile has no field {field!r}")
        current = getattr(profile, field)
        changes[field] = tuple(int(v) for v in value.split(",")) if isinstance(current, tuple) else type(current)(value)
    return dataclasses.replace(profile, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--guidance", nargs="*", type=float, default=[])
    parser.add_argument("--out", type=Path, required=True, help="folder for the sample grids (samples_<split>.png)")
    args = parser.parse_args()
    profile = override(PROFILES[args.profile], args.set)
    stage_io.set_threads(profile)
    torch.manual_seed(profile.seed)
    vae = vae_stage.load_vae(args.workdir)
    rows = world.load_scenes(args.workdir / "world" / "train")
    latents = vae_stage.encode(vae, vae_stage.load_images([p for p, _, _ in rows]))
    encoder = WeakEncoder(vocabulary=world_vocabulary(), dim=profile.context_dim, length=profile.text_length)
    unet = base.make_unet(profile)
    scheduler = unet_training.make_scheduler(profile.train_timesteps)
    figures = unet_training.train_unet(
        unet, encoder, latents, [c for _, _, c in rows], profile.base_steps, profile.base_batch, profile.base_lr,
        profile.seed, [*unet.parameters(), *encoder.parameters()], scheduler=scheduler,
        caption_dropout=profile.caption_dropout, warmup=profile.base_warmup, ema=profile.base_ema,
        min_snr_gamma=profile.base_min_snr_gamma)
    print(json.dumps({"set": args.set, **figures}))
    work = args.out / "work"  # base.check writes its grids under <workdir>/base/: a scratch workdir of links
    (work / "base").mkdir(parents=True, exist_ok=True)
    for name in ("world", "judge"):
        if not (work / name).exists():
            (work / name).symlink_to((args.workdir / name).resolve())
    for g in args.guidance or [profile.guidance]:
        result = base.check(work, dataclasses.replace(profile, guidance=g), unet, vae, scheduler, encoder)
        for split in ("test_seen", "test_heldout"):
            (work / "base" / f"samples_{split}.png").replace(args.out / f"samples_{split}_g{g:g}.png")
        print(json.dumps({"guidance": g, **result}), flush=True)


if __name__ == "__main__":
    main()
