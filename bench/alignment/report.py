"""Stage 8b `report`: the markdown tables (printed and written to `<workdir>/report.md`) and the picture grid
(prompts x methods, `<workdir>/report/alignment_grid.png`, copied to docs/img/alignment_grid_<profile>.png by a run of the full or long profile).

Everything here reads what the stages before wrote (the results.json of evaluate and denoise, the images, the
stages' done.json): no figure is computed twice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bench.alignment import denoise, evaluate, generate, stage_io

ROOT = Path(__file__).resolve().parents[2]
DOCS_IMG = ROOT / "docs" / "img"
METRIC_NAMES = {"binding": "binding", "objects_correct": "objects", "count_ok": "count", "colour_ok": "colours",
                "shape_ok": "shapes"}
SPLIT_NAMES = {"test_seen": "seen compositions", "test_heldout": "held-out compositions"}


SETTINGS = ("grid_prompts",)


def cell(stats: dict[str, Any], percent: bool = True, signed: bool = False) -> str:
    """'62.5 [55.0, 70.1]' (percent points)."""
    k = 100.0 if percent else 1.0
    fmt = "{:+.1f}" if signed else "{:.1f}"
    lo, hi = stats["ci"]
    return f"{fmt.format(stats['mean'] * k)} [{fmt.format(lo * k)}, {fmt.format(hi * k)}]"


def tables(results: dict[str, Any]) -> str:
    """The methods' table and the paired differences' table per split, as markdown."""
    metrics = results["metrics"]
    lines: list[str] = []
    for split in generate.SPLITS:
        n = results["prompts"][split]
        lines += [f"**{SPLIT_NAMES.get(split, split)}** ({split}, {n} prompts; % with 95 % bootstrap CI)", "",
                  "| method | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
                  "| --- |" + " --- |" * len(metrics)]
        for method, per_split in results["methods"].items():
            label = "judge on the renders" if method == evaluate.REFERENCE else generate.LABELS.get(method, method)
            models = len(per_split[split][metrics[0]]["per_model"])
            label += f" ({models} training seeds)" if models > 1 else ""
            lines.append(f"| {label} | " + " | ".join(cell(per_split[split][m]) for m in metrics) + " |")
        lines += ["", "| difference (points) | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
                  "| --- |" + " --- |" * len(metrics)]
        for pair, per_split_diff in results["differences"].items():
            x, y = pair.split("-")
            lines.append(f"| {x} - {y} | " + " | ".join(cell(per_split_diff[split][m], signed=True) for m in metrics)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def denoise_tables(results: dict[str, Any]) -> str:
    """The denoising loss per split (stage denoise's results.json): one row per method and reference."""
    timesteps = [str(t) for t in results["timesteps"]]
    lines = ["Denoising loss: the frozen UNet's epsilon MSE on the VAE latents of the test scenes' renders, captioned "
             "with their prompt, at fixed timesteps and noise (the same for every method; lower = more of the prompt "
             "reaches the UNet); share of the base's text gap = (uncond - method) / (uncond - base): 0 = no better "
             "than no text, 1 = as informative as the weak encoder, > 1 = more.", ""]
    for split in generate.SPLITS:
        rows = results["splits"][split]
        lines += [f"**{SPLIT_NAMES.get(split, split)}** ({split}, {results['scenes'][split]} scenes x "
                  f"{len(timesteps)} timesteps x {results['draws']} noise draws)", "",
                  "| method | loss | share of the text gap | " + " | ".join(f"t={t}" for t in timesteps) + " |",
                  "| --- | --- | --- |" + " --- |" * len(timesteps)]
        for row, r in rows.items():
            label = denoise.LABELS.get(row, row)
            label += f" ({len(r['per_model'])} training seeds)" if len(r["per_model"]) > 1 else ""
            share = f"{r['share']:.2f}" if r["share"] is not None else "-"
            per_t = " | ".join(f"{r['per_t'][t]:.5f}" for t in timesteps)
            lines.append(f"| {label} | {r['mean']:.5f} | {share} | {per_t} |")
        lines.append("")
    return "\n".join(lines)


def stage_table(done: dict[str, dict[str, Any]]) -> str:
    """Seconds per stage and its scalar figures, from the stages' done.json."""
    lines = ["| stage | seconds | figures |", "| --- | --- | --- |"]
    for stage, record in done.items():
        figures = {k: v for k, v in (record.get("figures") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds"}
        text = ", ".join(f"{k} {_short(v)}" for k, v in figures.items())
        seconds = (record.get("figures") or {}).get("seconds")
        lines.append(f"| {stage} | {_short(seconds) if seconds is not None else '-'} | {text} |")
    return "\n".join(lines)


def arms_table(arms_figures: dict[str, Any]) -> str:
    lines = ["| run | wall s | final train loss | held-out loss |", "| --- | --- | --- | --- |"]
    for name, r in arms_figures.get("runs", {}).items():
        lines.append(f"| {name} | {r['wall_s']:.0f} | {_short(r['final_loss'])} | {_short(r['heldout_loss'])} |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------- the grid


def grid_rows(workdir: Path, count: int) -> list[generate.Prompt]:
    """About `count` prompts, half from each split (the first ones: the splits are in random order)."""
    half = max(1, count // 2)
    return [p for split in generate.SPLITS for p in generate.read_prompts(workdir, split, half)]


def grid(workdir: Path, prompts: list[generate.Prompt], methods: list[str], scale: int = 3) -> Any:
    """PIL image: one row per prompt (its caption above it), columns: the render, then each method
    (first training seed, first noise seed)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    columns = ["render", *methods]
    images: dict[tuple[str, str], np.ndarray] = {}
    for method in methods:
        for split in generate.SPLITS:
            images[(method, split)] = generate.load_images(workdir, method, split)
    first = images[(methods[0], prompts[0].split)]
    side = first.shape[-2] * scale
    pad, caption_h, header_h = 6, 14, 28
    width = pad + len(columns) * (side + pad)
    height = header_h + len(prompts) * (caption_h + side + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        label = "render" if name == "render" else generate.LABELS.get(name, name).split(" ", 1)[0] + " " + name
        draw.text((pad + c * (side + pad), 8), label, fill="black", font=font)
    for r, prompt in enumerate(prompts):
        y = header_h + r * (caption_h + side + pad)
        tag = "seen" if prompt.split == "test_seen" else "held-out"
        draw.text((pad, y), f"[{tag}] {prompt.text}"[: width // 6], fill="black", font=font)
        render = Image.open(prompt.image).convert("RGB")
        # stage 6 generated the first gen_prompts scenes of each split: a prompt's position is its index
        tiles = [np.asarray(render)] + [images[(m, prompt.split)][0, prompt.index, 0] for m in methods]
        for c, tile in enumerate(tiles):
            picture = Image.fromarray(tile).resize((side, side), Image.NEAREST)
            canvas.paste(picture, (pad + c * (side + pad), y + caption_h))
    return canvas


# ---------------------------------------------------------------------------------------------- the stage


def read_done(workdir: Path, stages: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for stage in stages:
        path = workdir / stage / "done.json"
        if path.is_file():
            out[stage] = json.loads(path.read_text())
    return out


def judge_table(figures: dict[str, Any]) -> str:
    """The judge's own accuracy (stage 3) on images whose scenes are known: fresh renders, augmented renders,
    the test folders' renders and their VAE round trips."""
    lines = ["| images | binding | slot | count |", "| --- | --- | --- | --- |"]
    for name, value in figures.items():
        if isinstance(value, dict) and {"binding", "slot", "count"} <= set(value):
            lines.append(f"| {name} | {value['binding'] * 100:.1f} | {value['slot'] * 100:.1f} | {value['count'] * 100:.1f} |")
    return "\n".join(lines)


def base_table(figures: dict[str, Any]) -> str:
    """Stage 4's own check of the base (its sampler, a few prompts per split) and the binding-blindness proof."""
    lines = ["| split | " + " | ".join(METRIC_NAMES[m] for m in evaluate.METRICS) + " |",
             "| --- |" + " --- |" * len(evaluate.METRICS)]
    for split in generate.SPLITS:
        if isinstance(figures.get(split), dict):
            row = figures[split]
            lines.append(f"| {split} | " + " | ".join(f"{row[m] * (50 if m == 'objects_correct' else 100):.1f}"
                                                       for m in evaluate.METRICS) + " |")
    if "swapped_caption_max_abs_diff" in figures:
        lines.append("")
        lines.append(f"Largest difference of the base UNet's output between a caption and its binding-swapped twin: "
                     f"{figures['swapped_caption_max_abs_diff']:.3g} (a bag of words cannot tell them apart).")
    return "\n".join(lines)


def markdown(workdir: Path, results: dict[str, Any], done: dict[str, dict[str, Any]],
             denoise_results: dict[str, Any]) -> str:
    figures = {stage: (record.get("figures") or {}) for stage, record in done.items()}
    parts = ["# Alignment benchmark", "", tables(results),
             "## Denoising loss (stage denoise, no judge, no sampler)", "", denoise_tables(denoise_results),
             "## Arms (training/train.py runs)", "", arms_table(figures.get("arms", {})), "",
             "## Judge (stage 3, frozen before any method ran): accuracy %", "", judge_table(figures.get("judge", {})), "",
             "## Base (stage 4) checked by its own stage: %", "", base_table(figures.get("base", {})), "",
             "## Stages", "", stage_table(done), ""]
    return "\n".join(parts)


def build(workdir: Path, profile: Any, stages: list[str], docs_grid: Optional[str] = None) -> dict[str, Any]:
    """Stage 8b: report.md and the grid; the grid is copied to docs/img/<docs_grid> when given (the runs
    docs/alignment.md quotes: the full and long profiles, each its own file)."""
    workdir = Path(workdir)
    stage = workdir / "report"
    own = {"evaluate": stage_io.settings_of(workdir / "evaluate"), "denoise": stage_io.settings_of(workdir / "denoise"),
           "docs_grid": docs_grid,
           **profile.settings(*SETTINGS)}
    if (figures := stage_io.cached(stage, own)) is not None:
        return figures
    stage_io.start(stage)
    results = json.loads((workdir / "evaluate" / "results.json").read_text())
    text = markdown(workdir, results, read_done(workdir, [s for s in stages if s != "report"]),
                    json.loads((workdir / "denoise" / "results.json").read_text()))
    (workdir / "report.md").write_text(text)
    methods = [m for m in generate.METHODS if (workdir / "generate" / m).is_dir()]
    picture = grid(workdir, grid_rows(workdir, int(profile.grid_prompts)), methods)
    picture.save(stage / "alignment_grid.png")
    if docs_grid:
        shutil.copyfile(stage / "alignment_grid.png", DOCS_IMG / docs_grid)
    (stage / "report.md").write_text(text)
    return stage_io.finish(stage, own, {"report": str(workdir / "report.md"), "grid": str(stage / "alignment_grid.png")})
