"""Stage 8a `evaluate`: the frozen judge of stage 3 scores every generated image; bootstrap statistics.

Per method and split, for each metric of `judge.score` (binding, objects correct as a fraction of the scene's
objects, count, colour set, shape set): the mean over prompts, noise seeds and training seeds, with a 95 %
bootstrap interval that resamples prompts (the noise seeds of a prompt stay together: they are not
independent draws of the prompt population) and, where a method has several training seeds, the trained
models too, so the interval includes training-seed variance. Paired differences (b - a, b - c, b - d, and
e - b) resample the same prompts for both methods. The row `render` is the judge on the world's own
renders of the same test scenes: its accuracy on images it can read, the ceiling of every method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.alignment import generate, stage_io

METRICS = ("binding", "objects_correct", "count_ok", "colour_ok", "shape_ok")
PAIRS = (("tsc", "base"), ("tsc", "no_time"), ("tsc", "mean_pool"), ("upper", "tsc"))  # (x, y): x - y
REFERENCE = "render"  # the judge on the renderer's images of the test scenes


SETTINGS = ("boot_samples",)


# ---------------------------------------------------------------------------------------------- scoring


def judge_images(judge: Any, images: np.ndarray, batch: int = 256) -> list[dict]:
    """(N, H, W, 3) uint8 -> the judge's N predictions."""
    predictions: list[dict] = []
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            predictions.extend(judge.predict(chunk))
    return predictions


def score_array(judge: Any, images: np.ndarray, scenes: list[Any]) -> dict[str, np.ndarray]:
    """images (M, P, S, H, W, 3) of P scenes -> metric -> (M, P, S) float scores."""
    from bench.alignment import judge as judge_module

    m, p, s = images.shape[:3]
    predictions = judge_images(judge, images.reshape(m * p * s, *images.shape[3:]))
    out = {k: np.zeros((m, p, s)) for k in METRICS}
    for flat, prediction in enumerate(predictions):
        i, j, k = np.unravel_index(flat, (m, p, s))
        scene = scenes[j]
        result = judge_module.score(prediction, scene)
        for metric in METRICS:
            value = float(result[metric])
            if metric == "objects_correct":
                value /= max(1, len(scene))  # a fraction, comparable across 1-3 object scenes
            out[metric][i, j, k] = value
    return out


def render_images(workdir: Path, prompts: list[generate.Prompt]) -> np.ndarray:
    """The world's renders of the prompts' scenes as (1, P, 1, H, W, 3) uint8."""
    from PIL import Image

    images = [np.asarray(Image.open(p.image).convert("RGB")) for p in prompts]
    return np.stack(images)[None, :, None]


# ---------------------------------------------------------------------------------------------- statistics


def bootstrap_weights(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    """(draws, n): how often each of n units is drawn, over n, in each of `draws` resamples with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=draws) / n


def per_prompt(scores: np.ndarray) -> np.ndarray:
    """(M, P, S) -> (M, P): each model's mean over the noise seeds of a prompt."""
    return scores.mean(axis=2)


def summary(point: float, replicates: np.ndarray) -> dict[str, Any]:
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return {"mean": float(point), "ci": [float(lo), float(hi)]}


def method_stats(scores: np.ndarray, prompt_w: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """scores (M, P, S), prompt weights (B, P) -> (summary with per-model means, the B replicates)."""
    q = per_prompt(scores)
    model_w = bootstrap_weights(rng, q.shape[0], prompt_w.shape[0])  # (B, M)
    replicates = np.einsum("bm,mp,bp->b", model_w, q, prompt_w)
    return summary(q.mean(), replicates) | {"per_model": [float(v) for v in q.mean(axis=1)]}, replicates


def statistics(scores: dict[str, dict[str, dict[str, np.ndarray]]], draws: int, seed: int = 0) -> dict[str, Any]:
    """scores[method][split][metric] (M, P, S) -> methods' summaries and paired differences (results.json)."""
    rng = np.random.default_rng(seed)
    methods: dict[str, Any] = {m: {} for m in scores}
    differences: dict[str, Any] = {f"{x}-{y}": {} for x, y in PAIRS if x in scores and y in scores}
    splits = next(iter(scores.values())).keys()
    for split in splits:
        n_prompts = next(iter(scores.values()))[split][METRICS[0]].shape[1]
        prompt_w = bootstrap_weights(rng, n_prompts, draws)  # shared by every method: paired differences
        for metric in METRICS:
            replicates = {}
            for method in scores:
                stats, replicates[method] = method_stats(scores[method][split][metric], prompt_w, rng)
                methods[method].setdefault(split, {})[metric] = stats
            for x, y in PAIRS:
                if x in scores and y in scores:
                    point = methods[x][split][metric]["mean"] - methods[y][split][metric]["mean"]
                    differences[f"{x}-{y}"].setdefault(split, {})[metric] = summary(point, replicates[x] - replicates[y])
    return {"methods": methods, "differences": differences}


# ---------------------------------------------------------------------------------------------- the stage


def build(workdir: Path, profile: Any) -> dict[str, Any]:
    """Stage 8a: scores every method's images and the renders; `<workdir>/evaluate/results.json` (and the
    per-image scores, scores.npz); figures: each method's binding accuracy per split."""
    from bench.alignment import judge as judge_module

    workdir = Path(workdir)
    stage = workdir / "evaluate"
    own = {"generate": stage_io.settings_of(workdir / "generate"), "judge": stage_io.settings_of(workdir / "judge"),
           **profile.settings(*SETTINGS)}
    if (figures := stage_io.cached(stage, own)) is not None:
        return figures
    progress = stage_io.begin(stage, profile)
    judge = judge_module.load_judge(workdir)
    prompts = {split: generate.read_prompts(workdir, split, int(profile.gen_prompts)) for split in generate.SPLITS}
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for method in (REFERENCE, *generate.METHODS):
        scores[method] = {}
        for split in generate.SPLITS:
            images = (render_images(workdir, prompts[split]) if method == REFERENCE
                      else generate.load_images(workdir, method, split))
            scores[method][split] = score_array(judge, images, [p.scene for p in prompts[split]])
    results = statistics(scores, int(profile.boot_samples))
    results["prompts"] = {s: len(p) for s, p in prompts.items()}
    results["metrics"] = list(METRICS)
    np.savez_compressed(stage / "scores.npz", **{f"{m}/{s}/{k}": v for m, per in scores.items()
                                                 for s, ks in per.items() for k, v in ks.items()})
    _atomic_json(stage / "results.json", results)
    images = sum(v[s][METRICS[0]].size for v in scores.values() for s in generate.SPLITS)
    progress(f"scored {images} images")
    figures = {"results": str(stage / "results.json"), "images": images, "seconds": round(progress.elapsed, 1),
               "binding": {m: {s: round(results["methods"][m][s]["binding"]["mean"], 4) for s in generate.SPLITS}
                           for m in scores}}
    return stage_io.finish(stage, own, figures)


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
