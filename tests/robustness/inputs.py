"""Generated prompts for the robustness suite: long runs of every whitespace kind, weighting syntax that is
nested, unbalanced or escaped, unicode classes, and lone surrogates. One place, so every suite (prompt
text, tokenizer, route, encoder) feeds the same families and the report can count them."""

from __future__ import annotations

import random

# Whitespace kinds: ASCII, Unicode spaces (Zs), line/paragraph separators, and zero-width characters that
# are not whitespace to Python but are to some tokenizers.
WHITESPACE = {
    "newline": "\n", "space": " ", "tab": "\t", "crlf": "\r\n", "nbsp": "\u00a0", "em_space": "\u2003",
    "ideographic_space": "\u3000", "line_separator": "\u2028", "paragraph_separator": "\u2029",
    "zero_width_space": "\u200b", "narrow_nbsp": "\u202f", "mixed": " \n\t\u00a0\u3000",
}
# Repeated units: each family is `unit * n` (plus the tail, if any).
SYNTAX = {
    "open_weighted": "((((a:1.2", "open_parens": "(", "close_parens": ")", "colons_in_group": "(a:",
    "deep_balanced": None,  # "(" * n + "a:1.1" + ")" * n, built below
    "escaped": "\\(", "backslashes": "\\", "lora_tags": "<lora:", "weights_spaces": "(a: 1.5   ",
    "group_then_spaces": "(x:1) ,", "comma_spaces": " ,",
}
UNICODE = {
    "cjk": "\u4e00\u4e8c", "emoji": "\U0001f98a\U0001f332", "combining": "e\u0301", "rtl": "\u05e9\u05dc",
    "arabic": "\u0645\u0631\u062d\u0628\u0627 ", "devanagari": "\u0928\u092e\u0938\u094d\u0924\u0947 ",
    "math_bold": "\U0001d400", "control": "\x01\x7f", "fullwidth_parens": "\uff08a:1.2\uff09",
}


def family(name: str, n: int) -> str:
    """The `name` input of about n characters."""
    if name == "deep_balanced":
        depth = (n - 5) // 2
        return "(" * depth + "a:1.1" + ")" * depth
    unit = WHITESPACE.get(name) or SYNTAX.get(name) or UNICODE[name]
    return (unit * (n // len(unit) + 1))[:n]


FAMILIES = list(WHITESPACE) + list(SYNTAX) + list(UNICODE)


def random_prompts(count: int, seed: int = 0, max_len: int = 14) -> list[str]:
    """Short prompts drawn from syntax fragments: small enough to compare with a slow reference."""
    pieces = ["(", ")", ":", "1", ".5", "\\", " ", "a", ",", "<lora:", ">", "\n", "\t", "b c", ": ", "\u3000",
              "-", "+2", "[", "]", "\u00a0", "."]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, max_len))) for _ in range(count)]


def surrogate_prompts(count: int, seed: int = 1) -> list[tuple[str, int]]:
    """(prompt with one lone surrogate, its position) over the whole surrogate range."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        head = "".join(rng.choice("abc (x:1.2) \U0001f98a") for _ in range(rng.randint(0, 30)))
        out.append((head + chr(rng.randint(0xD800, 0xDFFF)) + "tail", len(head)))
    return out
