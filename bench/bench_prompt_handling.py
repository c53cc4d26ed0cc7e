"""Prompt handling time at n and 8n characters per input kind (linear: ~8x; quadratic: ~64x), for the
weight-syntax clean-up alone and for a full token count with a real tokenizer.

    python bench/bench_prompt_handling.py [--n 12500] [--gguf $ELLA_SMOLLM2_GGUF] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ella_core.prompt_text import strip_weight_syntax  # noqa: E402
from ella_core.tokenization import load_tokenizer  # noqa: E402

KINDS = {
    "newlines": lambda n: "\n" * n,
    "spaces then comma": lambda n: " " * (n - 1) + ",",
    "ideographic spaces": lambda n: "\u3000" * n,
    "unclosed '((((a:1.2'": lambda n: ("((((a:1.2" * n)[:n],
    "deep nesting": lambda n: "(" * ((n - 5) // 2) + "a:1.1" + ")" * ((n - 5) // 2),
    "words": lambda n: ("a red fox " * n)[:n],
    "CJK": lambda n: "\u4e00" * n,
}


def best_ms(fn, arg, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=12_500)
    parser.add_argument("--gguf", default=os.environ.get("ELLA_SMOLLM2_GGUF"))
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (e.g. ComfyUI's t5_tokenizer)")
    args = parser.parse_args()
    stages = {"strip": strip_weight_syntax}
    for label, source in (("t5 count", args.tokenizer), ("smollm2 count", args.gguf)):
        if source:
            tok = load_tokenizer(source)
            stages[label] = lambda text, tok=tok: tok.count_tokens(text, max_length=128)
    n, big = args.n, 8 * args.n
    print(f"{'input':<24} | {'stage':<14} | {f'{n} chars ms':>13} | {f'{big} chars ms':>14} | ratio (linear 8)")
    for kind, make in KINDS.items():
        small_text, big_text = make(n), make(big)
        for stage, fn in stages.items():
            t_small, t_big = best_ms(fn, small_text), best_ms(fn, big_text)
            print(f"{kind:<24} | {stage:<14} | {t_small:13.2f} | {t_big:14.2f} | {t_big / max(t_small, 1e-3):.1f}")


if __name__ == "__main__":
    main()
