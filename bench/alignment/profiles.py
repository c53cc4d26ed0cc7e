"""Every size and step count of the alignment benchmark, per profile; no other module holds a number like these.

`full` fits the issue's budget (world+VAE+judge+base in 10 min on 2 idle cores, 37 min in all); `long` (75 min),
the run docs/alignment.md quotes, is the same world and base with 4x longer connector and upper-bound
training; `quick` takes a few minutes; `smoke` checks the plumbing in seconds (its models learn nothing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    seed: int = 0
    threads: int = 2  # torch.set_num_threads: the machine the budget is for
    # --- stage 1: world
    image_size: int = 32
    n_train: int = 4000  # rendered training images (each with `captions_per_image` phrasings)
    n_test_seen: int = 48  # test scenes of compositions that occur in training
    n_test_heldout: int = 48  # test scenes holding at least one held-out colour-shape conjunction
    captions_per_image: int = 3
    single_object_fraction: float = 0.25  # of training scenes; the rest hold two objects
    # --- stage 2: VAE (diffusers AutoencoderKL, f=2: 32 px -> 16x16x4)
    vae_channels: tuple[int, ...] = (16, 32)
    vae_latent_channels: int = 4
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_eval_images: int = 256
    # --- stage 3: judge (one small CNN shared by the slots)
    judge_steps: int = 500
    judge_batch: int = 64
    judge_lr: float = 3e-3
    judge_width: int = 32
    judge_vae_fraction: float = 0.3  # of each batch passed through a VAE round trip
    judge_eval_images: int = 512
    # --- stage 4: base (UNet2DConditionModel + WeakEncoder, trained jointly from scratch)
    unet_channels: tuple[int, ...] = (32, 64)
    unet_head_dim: int = 8
    unet_norm_groups: int = 8  # GroupNorm groups; one channel a group (32 on 32 channels) erases a uniform colour offset
    context_dim: int = 64  # the weak encoder's width = the UNet's cross_attention_dim
    text_length: int = 24  # the weak encoder's fixed token count (padded)
    base_steps: int = 1600
    base_batch: int = 16
    base_lr: float = 2e-3
    base_warmup: int = 100
    base_ema: float = 0.995  # EMA decay of the trained UNet/encoder weights (0 = none)
    base_min_snr_gamma: float = 0.0  # min-SNR loss weighting of the base (0 = plain epsilon MSE)
    caption_dropout: float = 0.1  # captions replaced by "" so the base supports CFG
    train_timesteps: int = 1000
    check_images: int = 48  # samples judged at the end of stage 4 (seen + held-out)
    sample_steps: int = 25  # DDIM steps for the checks
    guidance: float = 3.0
    # --- stage 5: arms, one training/train.py run per arm and seed (arms.py)
    arm_images: int = 1000  # training images the arms train on (the first of world/train)
    arm_captions: int = 1  # captions kept per image: SmolLM2 encodes each once (0.1-0.7 s each on this CPU)
    llm_max_length: int = 20  # fixed token length; the world's longest caption is 17 SmolLM2 tokens
    arm_steps: int = 400
    arm_batch: int = 32
    arm_lr: float = 1e-3
    arm_warmup: int = 20
    arm_seeds: int = 2  # training seeds of every arm: the intervals of stage 8 then include training-seed variance
    parallel_runs: int = 2  # trainer runs at once, sharing the threads (arms.train_all); changes no result
    arm_layers: int = 2  # connector: Perceiver blocks, heads, output tokens, timestep features / embedding
    arm_heads: int = 4
    arm_latents: int = 32
    arm_time_channel: int = 64
    arm_time_embed_dim: int = 64
    min_snr_gamma: float = 5.0  # train.min_snr_gamma of every arm
    arm_holdout: int = 100  # validation.holdout: samples kept out for the held-out loss
    arm_val_every: int = 100  # steps between held-out losses (0: at the end only)
    arm_timeout_s: int = 1500  # one train.py run longer than this is an error
    # --- stage 7: upper bound, the base UNet fine-tuned with a projection of the LLM features (upper.py)
    upper_steps: int = 400
    upper_batch: int = 32
    upper_lr: float = 2e-4
    # --- stages 6 and 8: generation, judging, report (generate.py, evaluate.py, report.py)
    gen_prompts: int = 48  # prompts per test split (at most n_test_seen / n_test_heldout)
    gen_seeds: int = 4  # noise seeds per prompt
    boot_samples: int = 2000  # bootstrap resamples of the confidence intervals
    grid_prompts: int = 6  # rows of the picture grid (half seen, half held out)
    # --- stage denoise: epsilon MSE on every test scene's render (denoise.py)
    denoise_timesteps: tuple[int, ...] = (50, 200, 400, 600, 800, 950)  # the fixed grid of t
    denoise_draws: int = 2  # seeded noise draws per scene and t (the same for every method)

    def settings(self, *fields: str) -> dict[str, Any]:
        """The named fields as a JSON-able dict (what a stage's done.json compares)."""
        values = asdict(self)
        return {f: list(values[f]) if isinstance(values[f], tuple) else values[f] for f in fields}


FULL = Profile(name="full")
QUICK = replace(FULL, name="quick", n_train=1500, n_test_seen=32, n_test_heldout=32, vae_steps=300,
                judge_steps=300, judge_eval_images=256, vae_eval_images=128, base_steps=500, check_images=32,
                sample_steps=20)
SMOKE = replace(FULL, name="smoke", n_train=64, n_test_seen=8, n_test_heldout=8, captions_per_image=2,
                vae_channels=(8, 16), vae_steps=10, vae_batch=8, vae_eval_images=16, judge_steps=10,
                judge_batch=16, judge_width=8, judge_eval_images=32, unet_channels=(32, 32), base_steps=10,
                base_batch=4, base_warmup=2, check_images=4, sample_steps=3)
# stages 5-8
QUICK = replace(QUICK, arm_images=400, arm_steps=150, arm_seeds=1, arm_holdout=40, arm_val_every=50, upper_steps=150,
                gen_prompts=16, gen_seeds=2, boot_samples=1000)
SMOKE = replace(SMOKE, arm_images=32, arm_steps=3, arm_batch=4, arm_warmup=1, arm_seeds=1, arm_latents=8, arm_holdout=4,
                arm_val_every=0, upper_steps=3, upper_batch=4, gen_prompts=4, gen_seeds=2, boot_samples=200,
                grid_prompts=4)
SMOKE = replace(SMOKE, denoise_timesteps=(100, 900), denoise_draws=1)
# the full profile's stages 1-4 with 4x longer connector and upper-bound training: the connectors were still
# improving at 400 steps (docs/alignment.md, runs 4-6)
LONG = replace(FULL, name="long", arm_steps=1600, arm_lr=2e-3, upper_steps=1600, arm_timeout_s=3000)

PROFILES = {p.name: p for p in (FULL, QUICK, SMOKE, LONG)}
