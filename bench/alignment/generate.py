"""Stage 6 `generate`: images of every method for the same prompts, noise, sampler, steps and guidance.

Methods (METHODS): (a) `base`, the frozen UNet with the weak bag-of-words encoder it was trained with;
(b) `tsc`, (c) `no_time`, (d) `mean_pool`, the connectors of stage 5 in front of the same frozen UNet; (e)
`upper`, the UNet fine-tuned with a trainable per-token projection of the LLM features (stage 7). Each
method is a `Conditioner` giving its UNet and, for a batch of prompts, the context (a tensor, or a function of
the step's t); the benchmark's one sampler (`unet_training.sample`, which the base's own check uses too) is
shared, so the methods differ only in their UNet and context. ELLA arms call the connector at
every step's t; their LLM features come from ella_core's encoder exactly as the trainer encoded its captions
(training.models.load_llm / encode_texts with the arms' LLM settings). The unconditional half of
classifier-free guidance is each method's encoding of the empty prompt (the trainer's caption dropout, and
the base's own).

Prompts: the first caption of the first `profile.gen_prompts` scenes of test_seen and test_heldout; noise:
one seeded draw per (split, prompt, noise seed), the same for every method and independent of batching.
Images are saved per method and split as uint8 arrays in `<workdir>/generate/<method>/<split>.npz`
(`images`: (models, prompts, seeds, H, W, 3), one model per training seed).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from bench.alignment import arms as arms_stage
from bench.alignment import stage_io

METHODS = ("base", "tsc", "no_time", "mean_pool", "upper")
LABELS = {"base": "(a) base + weak encoder", "tsc": "(b) ELLA TSC", "no_time": "(c) TSC without timestep",
          "mean_pool": "(d) mean-pooled LLM", "upper": "(e) upper bound (UNet + LLM fine-tuned)"}
SPLITS = ("test_seen", "test_heldout")
GEN_BATCH = 128  # images sampled together (memory only: the noise of an image does not depend on it)


SETTINGS = ("gen_prompts", "gen_seeds", "sample_steps", "guidance")


# ---------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    split: str
    index: int  # the scene's position in <workdir>/world/<split>/scenes.jsonl
    text: str  # its first caption
    scene: Any  # the ground truth (world.Obj tuple)
    image: Path  # the world's render of the scene


def read_prompts(workdir: Path, split: str, limit: Optional[int]) -> list[Prompt]:
    """The first `limit` scenes of a split's image folder with their first captions (the splits are in a
    seeded random order, so the first ones are a sample)."""
    from bench.alignment import world

    rows = world.load_scenes(workdir / "world" / split)[:limit]
    return [Prompt(split, i, captions[0], scene, image) for i, (image, scene, captions) in enumerate(rows)]


def noise_seed(split: str, prompt: int, seed: int) -> int:
    """The seed of one image's initial noise: the same for every method, whatever the batching."""
    return int.from_bytes(hashlib.sha256(f"alignment/{split}/{prompt}/{seed}".encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------- methods


class Conditioner:
    """A method: its UNet, and for a batch of prompts the conditional and unconditional contexts, each a
    tensor (B or 1, L, D) or a function of the step's t (what unet_training.sample takes)."""

    unet: Any

    def contexts(self, texts: list[str]) -> tuple[Any, Any]:
        raise NotImplementedError


class WeakConditioner(Conditioner):
    """(a): the weak encoder's per-word context, the same at every step."""

    def __init__(self, unet: Any, encoder: Any) -> None:
        self.unet, self.encoder = unet, encoder

    def contexts(self, texts: list[str]) -> tuple[Any, Any]:
        return self.encoder.encode(list(texts)).float(), self.encoder.encode([""]).float()


class LLMFeatures:
    """The LLM features of prompts as the trainer encoded the arms' captions (same encoder, mode, length)."""

    def __init__(self, llm: str, profile: Any) -> None:
        from training.config import LLMConfig
        from training.models import load_llm

        self.config = LLMConfig(source=str(llm), dtype="float32", token_mode="fixed",
                                max_length=int(profile.llm_max_length))
        self.encoder = load_llm(self.config, torch.device("cpu"))
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> (B, L, D_llm) float32 (fixed mode: every prompt has max_length positions)."""
        from training.models import encode_texts

        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, f in zip(missing, encode_texts(self.encoder, missing, self.config).float()):
                self._cache[text] = f
        return torch.stack([self._cache[t] for t in texts])


class ELLAConditioner(Conditioner):
    """(b), (c), (d): the connector called at every step's t (a time_aware=false connector ignores it itself)."""

    def __init__(self, unet: Any, ella: Any, features: LLMFeatures) -> None:
        self.unet, self.ella, self.features = unet, ella, features

    def contexts(self, texts: list[str]) -> tuple[Any, Any]:
        cond, empty = self.features(texts), self.features([""])
        return (lambda t: self.ella(cond, t.float())), (lambda t: self.ella(empty, t.float()))


class ProjectionConditioner(Conditioner):
    """(e): the fine-tuned UNet with its trained per-token projection of the LLM features."""

    def __init__(self, unet: Any, projection: torch.nn.Module, features: LLMFeatures) -> None:
        self.unet, self.projection, self.features = unet, projection, features

    def contexts(self, texts: list[str]) -> tuple[Any, Any]:
        with torch.no_grad():
            return self.projection(self.features(texts)), self.projection(self.features([""]))


# ---------------------------------------------------------------------------------------------- sampling


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def generate_method(conditioner: Conditioner, vae: Any, scheduler: Any, prompts: list[Prompt], profile: Any
                    ) -> np.ndarray:
    """-> (P, seeds, H, W, 3) uint8 images of one model: the benchmark's one sampler (unet_training.sample:
    DDIM, classifier-free guidance against the method's empty prompt), `profile.sample_steps` steps."""
    from bench.alignment import unet_training, vae as vae_stage

    seeds = int(profile.gen_seeds)
    rows = [(p, s) for p in prompts for s in range(seeds)]
    chunks = []
    for start in range(0, len(rows), GEN_BATCH):
        batch = rows[start:start + GEN_BATCH]
        cond, uncond = conditioner.contexts([p.text for p, _ in batch])
        latents = unet_training.sample(conditioner.unet, scheduler, cond, uncond, int(profile.sample_steps),
                                       float(profile.guidance), seed=[noise_seed(p.split, p.index, s) for p, s in batch])
        chunks.append(to_uint8(vae_stage.decode(vae, latents)))
    images = np.concatenate(chunks)
    return images.reshape(len(prompts), seeds, *images.shape[1:])


# ---------------------------------------------------------------------------------------------- the stage


def conditioners(workdir: Path, profile: Any, llm: str, unet: Any, encoder: Any, texts: Sequence[str] = ()
                 ) -> dict[str, list[Callable[[], Conditioner]]]:
    """method -> one factory per model (training seed), so only the models being sampled are in memory. The LLM
    is loaded on first use and encodes `texts` at once (every prompt and ""), so threads only read its cache."""
    import threading

    from ella_core import load_ella

    from bench.alignment import upper

    features: list[LLMFeatures] = []
    lock = threading.Lock()

    def llm_features() -> LLMFeatures:
        with lock:
            if not features:
                features.append(LLMFeatures(llm, profile))
                features[0]([*texts, ""])
        return features[0]

    arm_done = json.loads((workdir / "arms" / "done.json").read_text())["figures"]
    out: dict[str, list[Callable[[], Conditioner]]] = {
        "base": [lambda: WeakConditioner(unet, encoder)]}
    for arm, files in arms_stage.connectors(arm_done).items():
        out[arm] = [lambda f=f: ELLAConditioner(unet, load_ella(f, dtype=torch.float32).eval(), llm_features())
                    for f in files]
    out["upper"] = [lambda: ProjectionConditioner(*upper.load_upper(workdir), llm_features())]
    return {m: out[m] for m in METHODS if m in out}


def sample_models(jobs: list[tuple[str, Callable[[], Conditioner]]], sample: Callable[[Conditioner], Any],
                  width: int) -> list[tuple[Any, float]]:
    """(method, factory) jobs -> (sample(conditioner), seconds) per job, in order, `width` models at a time in
    threads of this process, each with an equal share of torch's threads (the ops release the GIL; two 1-thread
    samplers of the base UNet on 2 cores did 1.7x the work of one 2-thread sampler)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[str, Callable[[], Conditioner]]) -> tuple[Any, float]:
        start = time.perf_counter()
        conditioner = job[1]()
        return sample(conditioner), time.perf_counter() - start

    if width <= 1:
        return [one(job) for job in jobs]
    total = torch.get_num_threads()
    torch.set_num_threads(max(1, total // width))
    try:
        with ThreadPoolExecutor(max_workers=width) as pool:
            return list(pool.map(one, jobs))
    finally:
        torch.set_num_threads(total)


def build(workdir: Path, profile: Any, llm: str) -> dict[str, Any]:
    """Stage 6: every method's images for both splits; figures: prompt counts, models and seconds per method
    (the sum of its models' sampling times, which overlap when `profile.parallel_runs` > 1)."""
    workdir = Path(workdir)
    stage = workdir / "generate"
    own = {"upper": stage_io.settings_of(workdir / "upper"), "llm": str(llm), **profile.settings(*SETTINGS)}
    if (figures := stage_io.cached(stage, own)) is not None:
        return figures
    progress = stage_io.begin(stage, profile)
    from bench.alignment import base as base_stage

    unet, vae, scheduler, encoder = base_stage.load_base(workdir)
    prompts = {split: read_prompts(workdir, split, int(profile.gen_prompts)) for split in SPLITS}
    texts = [p.text for split in SPLITS for p in prompts[split]]
    plan = conditioners(workdir, profile, llm, unet, encoder, texts)
    jobs = [(method, factory) for method, factories in plan.items() for factory in factories]

    def sample(conditioner: Conditioner) -> dict[str, np.ndarray]:
        return {split: generate_method(conditioner, vae, scheduler, prompts[split], profile) for split in SPLITS}

    width = stage_io.parallel_width(profile, len(jobs))
    results = sample_models(jobs, sample, width)
    figures: dict[str, Any] = {"prompts": {s: len(p) for s, p in prompts.items()}, "seconds_per_method": {},
                               "models": {}, "parallel_models": width}
    for method in plan:
        mine = [result for (m, _), result in zip(jobs, results) if m == method]
        (stage / method).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            np.savez_compressed(stage / method / f"{split}.npz", images=np.stack([images[split] for images, _ in mine]),
                                prompts=np.array([p.text for p in prompts[split]]),
                                indices=np.array([p.index for p in prompts[split]]))
        seconds = sum(s for _, s in mine)
        figures["seconds_per_method"][method] = round(seconds, 2)
        figures["models"][method] = len(mine)
        progress(f"{method}: {len(mine)} model(s) x {len(texts)} prompts x {profile.gen_seeds} seeds in {seconds:.1f} s")
    figures["seconds"] = round(progress.elapsed, 1)
    return stage_io.finish(stage, own, figures)


def load_images(workdir: Path, method: str, split: str) -> np.ndarray:
    """(models, prompts, seeds, H, W, 3) uint8 images of a method on a split, as stage 6 saved them."""
    with np.load(workdir / "generate" / method / f"{split}.npz") as data:
        return data["images"]
