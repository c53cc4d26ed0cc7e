"""Draw docs/img/prompt_weights_attention.png: the connector's attention mass per prompt token for the weights
0.5 / 1.0 / 1.5 on one word, measured by hooking every block's attention (devtools/attention_probe.py).

A random connector of the released SD1.5 shapes (6 blocks, width 768, 8 heads, 64 latents, LLM width 2048)
reads random features at the positions of the real T5 tokenisation (ComfyUI's T5 tokenizer): the picture
shows the mechanism (log(w) on the word's logits), not what a trained connector attends to.

    python scripts/plot_prompt_weights.py [--out docs/img/prompt_weights_attention.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools import tiny_models as tm  # noqa: E402
from devtools.attention_probe import text_attention_mass  # noqa: E402
from ella_core import ELLA, ELLAConfig  # noqa: E402
from ella_core.prompt_weights import bias_for, prepare  # noqa: E402
from ella_core.tokenization import load_tokenizer  # noqa: E402

PROMPT = "a red fox sleeping in the ({word}:{w}) under tall pine trees"
WORD = "snow"
WEIGHTS = (0.5, 1.0, 1.5)
COLOURS = ((86, 140, 200), (150, 150, 150), (220, 110, 60))
T = 500.0


def masses(seed: int = 0) -> tuple[list[str], dict[float, torch.Tensor], list[bool]]:
    """Token labels, per weight the mean attention probability per token (over blocks, heads, queries), and
    which tokens carry the weight."""
    tokenizer = load_tokenizer(str(tm.t5_tokenizer_dir()))
    torch.manual_seed(seed)
    ella = ELLA(ELLAConfig()).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ella.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.02))
    out, labels, weighted = {}, [], []
    for w in WEIGHTS:
        encoder_text, prompt = prepare(PROMPT.format(word=WORD, w=w), "connector attention")
        ids, _ = tokenizer.tokenize(encoder_text, mode="flexible", max_length=128)
        bias = bias_for(prompt, tokenizer, len(ids), mode="flexible", max_length=128)
        features = torch.randn(1, len(ids), ella.config.input_dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            mass = text_attention_mass(ella, ella.project_text(features), T, bias)  # (blocks, L)
        scale = ella.config.layers * ella.config.heads * ella.config.num_latents
        out[w] = mass.sum(0) / scale
        labels = [tokenizer.tokenizer.convert_ids_to_tokens(i).replace("\u2581", "_") for i in ids]
        if bias is not None:
            weighted = (bias[0] != 0).tolist()
    return labels, out, weighted


def draw(labels: list[str], out: dict, weighted: list[bool], path: Path) -> None:
    width, height, left, bottom, top = 1100, 460, 70, 90, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    peak = max(float(v.max()) for v in out.values()) * 1.1
    plot_w, plot_h = width - left - 20, height - top - bottom
    group = plot_w / len(labels)
    bar = group * 0.8 / len(WEIGHTS)
    d.text((left, 15), f"ELLA connector: attention mass per token, weight on '{WORD}' (random released-shape "
                       f"connector, T5 tokens, t = {T:g})", fill="black", font=font)
    for k, (w, colour) in enumerate(zip(WEIGHTS, COLOURS)):
        d.rectangle([left + 10 + k * 150, 35, left + 22 + k * 150, 47], fill=colour)
        d.text((left + 28 + k * 150, 35), f"({WORD}:{w})", fill="black", font=font)
    base = top + plot_h
    d.line([left, base, left + plot_w, base], fill="black")
    d.line([left, top, left, base], fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = base - frac * plot_h
        d.text((5, y - 6), f"{frac * peak:.3f}", fill="black", font=font)
    for i, label in enumerate(labels):
        x0 = left + i * group + group * 0.1
        if weighted and weighted[i]:
            d.rectangle([left + i * group, top, left + (i + 1) * group, base], fill=(255, 244, 214))
        for k, (w, colour) in enumerate(zip(WEIGHTS, COLOURS)):
            h = float(out[w][i]) / peak * plot_h
            d.rectangle([x0 + k * bar, base - h, x0 + (k + 1) * bar - 1, base], fill=colour)
        d.text((left + i * group + 2, base + 6 + (i % 2) * 14), label[:10], fill="black", font=font)
    d.text((left, height - 40), "mean softmax probability a latent gives the token (blocks, heads, queries); "
                                "shaded: the weighted tokens. log(w) on their logits moves mass to or from them.",
           fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "prompt_weights_attention.png")
    args = parser.parse_args()
    labels, out, weighted = masses()
    draw(labels, out, weighted, args.out)
    on = [i for i, x in enumerate(weighted) if x]
    for w in WEIGHTS:
        print(f"weight {w}: mass on {WORD!r} tokens {float(out[w][on].sum()):.4f}, all text "
              f"{float(out[w].sum()):.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
