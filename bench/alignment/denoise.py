"""Stage `denoise`: a judge-free, sampler-free figure: how much of the prompt's information each method gets
into the UNet, measured as the epsilon-prediction MSE on the test scenes' own renders.

Every scene of test_seen and test_heldout is VAE-encoded with the base's VAE (stage 2's, with its shift and
scaling: `vae.encode`, exactly as the base's training latents), noised at each timestep of
`profile.denoise_timesteps` with `profile.denoise_draws` seeded noise draws (one seed per split, scene,
timestep and draw: the same noise for every method, whatever the batching), and each method's UNet predicts
the noise from the scene's first caption (the prompt of stage 6), with the method's context at that t (ELLA
arms call their connector at it). Methods are generate.py's (`generate.conditioners`, one model per training
seed), plus two references on the base UNet: `uncond`, the empty prompt (no text at all), and `shuffled`,
another scene's caption (text, but the wrong one).

Figures per split and row: the mean loss (over scenes, timesteps, draws and training seeds), per timestep,
per model, and the share of the base's text gap (uncond - row) / (uncond - base): 0 = no better than no
text, 1 = as informative as the weak encoder, > 1 = more. `<workdir>/denoise/results.json` holds them,
`losses.npz` every loss (models, scenes, timesteps, draws).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench.alignment import generate, stage_io, unet_training

REFERENCES = ("uncond", "shuffled")  # on the base UNet: the empty prompt, another scene's caption
ROWS = (*REFERENCES, *generate.METHODS)
LABELS = {"uncond": "base, empty prompt (no text)", "shuffled": "base, another scene's caption",
          **generate.LABELS}
BATCH = 256  # UNet rows evaluated together (memory only: a row's noise and loss do not depend on it)
SETTINGS = ("denoise_timesteps", "denoise_draws")

ContextAt = Callable[[list[str], torch.Tensor], torch.Tensor]  # (texts, t (B,)) -> context (B, L, D)


# ---------------------------------------------------------------------------------------------- the figure


def noise_seed(split: str, scene: int, t: int, draw: int) -> int:
    """The seed of one noise draw: the same for every method, whatever the batching."""
    key = f"alignment/denoise/{split}/{scene}/{t}/{draw}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def draw_noise(split: str, scenes: int, timesteps: Sequence[int], draws: int, shape: Sequence[int]) -> torch.Tensor:
    """-> (scenes, T, draws, *shape) float32 standard normal noise, one seeded draw per entry."""
    return torch.stack([torch.stack([torch.stack([
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(noise_seed(split, p, int(t), d)))
        for d in range(draws)]) for t in timesteps]) for p in range(scenes)])


def shuffled_texts(texts: Sequence[str]) -> list[str]:
    """Each scene gets the caption of the next scene (cyclically) whose caption differs from its own: text
    about the world, but not this scene (its own only if every caption is the same)."""
    n = len(texts)
    out = []
    for i, text in enumerate(texts):
        others = [texts[(i + k) % n] for k in range(1, n) if texts[(i + k) % n] != text]
        out.append(others[0] if others else text)
    return out


@torch.no_grad()
def losses(unet: Any, scheduler: Any, context_at: ContextAt, latents: torch.Tensor, texts: Sequence[str],
           timesteps: Sequence[int], noise: torch.Tensor, batch: int = BATCH) -> np.ndarray:
    """Epsilon MSE of `unet` on latents (P, C, h, w) captioned `texts`, noised at each timestep with `noise`
    (P, T, D, C, h, w) -> (P, T, D) float64 (each the mean over C, h, w)."""
    p, n_t, draws = noise.shape[:3]
    if len(texts) != p or len(latents) != p or len(timesteps) != n_t:
        raise ValueError(f"denoise: {len(latents)} latents, {len(texts)} texts, {len(timesteps)} timesteps for "
                         f"noise of shape {tuple(noise.shape)}")
    rows = [(i, j, d) for i in range(p) for j in range(n_t) for d in range(draws)]
    grid = torch.tensor([int(t) for t in timesteps])
    out = np.zeros((p, n_t, draws))
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        i, j, d = (torch.tensor(c) for c in zip(*chunk))
        t = grid[j]
        eps = noise[i, j, d]
        noisy = unet_training.noised(scheduler, latents[i].float(), eps, t)
        context = context_at([texts[k] for k in i.tolist()], t)
        pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype)).sample.float()
        out[i.numpy(), j.numpy(), d.numpy()] = ((pred - eps) ** 2).mean(dim=(1, 2, 3)).double().numpy()
    return out


def conditional(conditioner: generate.Conditioner) -> ContextAt:
    """A method's conditional context for texts at per-row timesteps (its context function called at t)."""
    def at(texts: list[str], t: torch.Tensor) -> torch.Tensor:
        cond, _ = conditioner.contexts(texts)
        return cond(t) if callable(cond) else cond
    return at


def empty_prompt(conditioner: generate.Conditioner) -> ContextAt:
    """A method's encoding of the empty prompt for every row (what CFG's unconditional half uses)."""
    def at(texts: list[str], t: torch.Tensor) -> torch.Tensor:
        _, uncond = conditioner.contexts(texts[:1])
        return (uncond(t) if callable(uncond) else uncond).expand(len(texts), -1, -1)
    return at


def summary(per_row: dict[str, np.ndarray], timesteps: Sequence[int]) -> dict[str, Any]:
    """row -> (models, P, T, D) losses -> per row: mean, per_t, per_model, share of the base's text gap
    (uncond - row) / (uncond - base) (None where uncond and base are equal)."""
    means = {row: float(v.mean()) for row, v in per_row.items()}
    gap = means["uncond"] - means["base"]
    return {row: {"mean": means[row], "per_t": {str(int(t)): float(v[:, :, k].mean()) for k, t in enumerate(timesteps)},
                  "per_model": [float(m.mean()) for m in v],
                  "share": (means["uncond"] - means[row]) / gap if gap != 0 else None}
            for row, v in per_row.items()}


# ---------------------------------------------------------------------------------------------- the stage


def check_timesteps(timesteps: Sequence[int], train_timesteps: int, draws: int) -> None:
    bad = [t for t in timesteps if not 0 <= int(t) < train_timesteps]
    if not timesteps or bad:
        raise ValueError(f"denoise_timesteps {tuple(timesteps)}: each must be in [0, {train_timesteps}) (the base's "
                         f"train_timesteps){'; out of range: ' + str(bad) if bad else ''}")
    if draws < 1:
        raise ValueError(f"denoise_draws {draws}: need at least 1 noise draw")


def build(workdir: Path, profile: Any, llm: str) -> dict[str, Any]:
    """Stage denoise: every method's and reference's loss on both test splits; `<workdir>/denoise/results.json`;
    figures: per split and row the mean loss and the share of the base's text gap."""
    import time

    from bench.alignment import base as base_stage
    from bench.alignment import vae as vae_stage

    workdir = Path(workdir)
    stage = workdir / "denoise"
    own = {"upper": stage_io.settings_of(workdir / "upper"), "llm": str(llm), **profile.settings(*SETTINGS)}
    if (figures := stage_io.cached(stage, own)) is not None:
        return figures
    timesteps, draws = [int(t) for t in profile.denoise_timesteps], int(profile.denoise_draws)
    unet, vae, scheduler, encoder = base_stage.load_base(workdir)
    check_timesteps(timesteps, int(scheduler.config.num_train_timesteps), draws)
    progress = stage_io.begin(stage, profile)
    scenes = {split: generate.read_prompts(workdir, split, None) for split in generate.SPLITS}
    latents = {s: vae_stage.encode(vae, vae_stage.load_images([p.image for p in ps])) for s, ps in scenes.items()}
    noise = {s: draw_noise(s, len(ps), timesteps, draws, latents[s].shape[1:]) for s, ps in scenes.items()}
    texts = {s: [p.text for p in ps] for s, ps in scenes.items()}
    arrays: dict[str, dict[str, list[np.ndarray]]] = {s: {} for s in generate.SPLITS}
    seconds: dict[str, float] = {}

    def run_row(row: str, model_unet: Any, context_at: ContextAt, split_texts: Callable[[str], list[str]]) -> None:
        for split in generate.SPLITS:
            arrays[split].setdefault(row, []).append(
                losses(model_unet, scheduler, context_at, latents[split], split_texts(split), timesteps, noise[split]))

    factories = generate.conditioners(workdir, profile, llm, unet, encoder)
    base = factories["base"][0]()
    start = time.perf_counter()
    run_row("uncond", unet, empty_prompt(base), lambda s: texts[s])
    run_row("shuffled", unet, conditional(base), lambda s: shuffled_texts(texts[s]))
    seconds["references"] = round(time.perf_counter() - start, 2)
    for method, makers in factories.items():
        start = time.perf_counter()
        for make in makers:
            conditioner = make()
            run_row(method, conditioner.unet, conditional(conditioner), lambda s: texts[s])
            del conditioner
        seconds[method] = round(time.perf_counter() - start, 2)
        progress(f"{method}: {len(makers)} model(s), {seconds[method]:.1f} s")
    stacked = {s: {row: np.stack(v) for row, v in per.items()} for s, per in arrays.items()}
    results = {"timesteps": timesteps, "draws": draws, "scenes": {s: len(ps) for s, ps in scenes.items()},
               "rows": list(stacked[generate.SPLITS[0]]),
               "splits": {s: summary(per, timesteps) for s, per in stacked.items()}}
    np.savez_compressed(stage / "losses.npz",
                        **{f"{row}/{s}": v for s, per in stacked.items() for row, v in per.items()})
    _atomic_json(stage / "results.json", results)
    rows = sum(v.size for per in stacked.values() for v in per.values())
    progress(f"{rows} UNet rows ({sum(results['scenes'].values())} scenes x {len(timesteps)} timesteps x {draws} "
             f"draws per model) in {progress.elapsed:.1f} s")
    figures = {"results": str(stage / "results.json"), "unet_rows": rows, "seconds": round(progress.elapsed, 1),
               "seconds_per_method": seconds,
               "loss": {s: {row: round(r["mean"], 5) for row, r in per.items()}
                        for s, per in results["splits"].items()},
               "share": {s: {row: (round(r["share"], 3) if r["share"] is not None else None) for row, r in per.items()}
                         for s, per in results["splits"].items()}}
    return stage_io.finish(stage, own, figures)


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
