"""ella_core.prompt_weights reads ComfyUI's `(text:w)` grammar exactly as ComfyUI's own parser does
(comfy/sd1_clip.py: escape, token_weights, unescape), segment for segment, and in linear time."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import textwrap

import pytest

from devtools.comfy_env import REPO_ROOT, import_comfy
from ella_core.prompt_text import strip_weight_syntax
from ella_core.prompt_weights import PromptWeightError, parse_weights, weigh_prompt

import_comfy()
from comfy import sd1_clip  # noqa: E402


def comfy_segments(text: str) -> list[tuple[str, float]]:
    """ComfyUI's reading: the steps of SDTokenizer.tokenize_with_weights before its tokenizer runs."""
    segments = sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0)
    return [(sd1_clip.unescape_important(t), w) for t, w in segments]


def same(a: list, b: list) -> bool:
    """Equal segments, weights bit for bit (nan equals nan: float() reads "nan" as ComfyUI does)."""
    return len(a) == len(b) and all(
        x == y and (v == u or (math.isnan(v) and math.isnan(u))) for (x, v), (y, u) in zip(a, b))


TABLE = [
    "", "a", "(a)", "((a))", "(((a)))", "(a:1.3)", "((a:1.3))", "((a):1.3)", "(a (b) c:0.5)", "a (b) c",
    "(a:1.3) (b:0.7), (c)", "((a:1.2) b:0.8)", "(a:1.2(b))", "((a:1.5)", "((a)", "(((a)", "(a", "a)", ")a(b)",
    "a) (b) (c", "))((a))", "(a))(b", "()", "(())", "(:1.5)", "(a:)", "(a:b)", "(a:1.5:2)", "(a: 1.5 )",
    "(a:1_0)", "(a:nan)", "(a:-1)", "(a:inf)", "(a:1e400)", "(a:.5)", "(a:5.)", "(a:+2)", "(a:١)",
    r"\(a\)", r"\(a:1.5\)", r"(a\):1.5)", r"(a:1.5\))", r"\\(a)", r"(\(a\):1.2)", r"a\b(c)", "a\\", "\\",
    "\0\1(a)\0\2", "(a\0\1:1.5)", "[a]", "[(a:1.5)]", "(a) [b:0.5]", "embedding:x (embedding:y:1.2)",
    "a (red hat:1.3) on a cat", "((masterpiece:1.2), best quality:1.1), cat", "time 3:30 (approx)",
    "<lora:style:0.8> (a:1.2)", "(a:1.2)(b:0.8)", "(a\n:1.3)", "(\n)", "((a:1.1):1.1)", "((((a:0))))",
]


@pytest.mark.parametrize("text", TABLE)
def test_table_matches_comfyui(text):
    assert same(parse_weights(text), comfy_segments(text)), (parse_weights(text), comfy_segments(text))


@pytest.mark.parametrize("text, expected", [
    ("(a)", [("a", 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),  # nesting multiplies...
    ("((a:1.3))", [("a", 1.3)]),  # ...but an explicit weight replaces, as in ComfyUI
    ("(a (b:0.5) c:2)", [("a ", 2.0), ("b", 0.5), (" c", 2.0)]),
    (r"\(a\) (b:1.5)", [("(a) ", 1.0), ("b", 1.5)]),
    ("[a] (b", [("[a] ", 1.0), ("(b", 1.0)]),
])
def test_known_readings(text, expected):
    """Anchors that do not depend on ComfyUI being importable the same way: the grammar's meaning."""
    assert same(parse_weights(text), expected)


def _random_text(rng: random.Random) -> str:
    pieces = ["(", ")", "(", ")", ":", "\\", "a", "bc", " ", "1", ".", "5", "-", ",", "[", "]", "\0", "\1", "\2",
              "e", "nan", "inf", "_", "\n", ":1.5", ":0", ":0.3", "\\(", "\\)", "embedding:", "<lora:x:1>"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))


def _nested_text(rng: random.Random, depth: int = 0) -> str:
    """Mostly well-formed prompts: words, groups with and without weights, nested, sometimes left open."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.4 or depth > 5:
            parts.append(rng.choice(["red", "a cat", "blue sky", ",", r"\(x\)", "3:30", " ", "big dog."]))
        else:
            inner = _nested_text(rng, depth + 1)
            weight = rng.choice(["", "", ":1.2", ":0.5", ":1", ":0", ": 2 ", ":x", ":1.2)"])
            close = ")" if rng.random() < 0.9 else ""
            parts.append(f"({inner}{weight}{close}")
    return " ".join(parts) if rng.random() < 0.5 else "".join(parts)


@pytest.mark.parametrize("generator", [_random_text, _nested_text])
def test_fuzz_matches_comfyui(generator):
    """Thousands of generated prompts: the same segments and weights as ComfyUI's parser."""
    rng = random.Random(generator.__name__)
    compared = 0
    for _ in range(4000):
        text = generator(rng)
        expected = comfy_segments(text)
        got = parse_weights(text)
        assert same(got, expected), (text, got, expected)
        compared += 1
    assert compared == 4000


@pytest.mark.parametrize("seed", range(3))
def test_encoder_text_reads_back_through_the_strip_path(seed):
    """The encoder strips weight syntax from what it gets; encoder_text() survives that unchanged, so the LLM
    tokenises exactly the weighted prompt's text (the offsets the weights are placed with)."""
    rng = random.Random(seed)
    checked = 0
    for _ in range(1500):
        text = _random_text(rng) if rng.random() < 0.5 else _nested_text(rng)
        try:
            weighted = weigh_prompt(text)
        except PromptWeightError:
            continue
        assert strip_weight_syntax(weighted.encoder_text()) == weighted.text, text
        assert len(weighted.weights) == len(weighted.text)
        checked += 1
    assert checked > 1000


def test_text_and_weights_per_character():
    w = weigh_prompt("a (red:1.5) hat , (cat:0) <lora:x:1> embedding:neg, \\(sign\\)")
    assert w.text == "a red hat, cat, (sign)"
    by_char = dict(zip(range(len(w.text)), w.weights))
    assert [by_char[i] for i in range(2, 5)] == [1.5] * 3 and by_char[0] == 1.0
    assert [by_char[i] for i in range(11, 14)] == [0.0] * 3
    assert any("embedding:neg" in n for n in w.notes)


def test_prompts_without_weight_syntax_read_as_the_strip_path():
    """Prompts with no parentheses get the very text the strip mode gives them (and no weights)."""
    for text in ["a red cube on a blue sphere", "  two  cats , one dog .", "<lora:a:1> photo\nof a\tcat", ""]:
        w = weigh_prompt(text)
        assert w.text == strip_weight_syntax(text) and not w.weighted


@pytest.mark.parametrize("text, value", [("(a:-1)", "-1.0"), ("(a:nan)", "nan"), ("(a:inf)", "inf"),
                                         ("(" * 8000 + "a" + ")" * 8000, "inf")])
def test_weights_the_connector_cannot_apply_are_named(text, value):
    with pytest.raises(PromptWeightError, match=rf"weight {value} on 'a'"):
        weigh_prompt(text)


def test_nesting_beyond_comfyuis_recursion_limit():
    """ComfyUI recurses once per level (a RecursionError near 1000); this parser is iterative."""
    depth = 3000
    expected = 1.0
    for _ in range(depth):
        expected *= 1.1
    assert parse_weights("(" * depth + "a" + ")" * depth) == [("a", expected)]
    assert parse_weights("(" * depth + "a:0.5" + ")" * depth) == [("a", 0.5)]


LINEAR_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from ella_core.prompt_weights import parse_weights, weigh_prompt
    n = 500_000  # 1 MB prompts (2 characters per unit)
    cases = {
        "deep": "(" * n + "a:1.5" + ")" * (n - 1),
        "deep closed": "(" * (n // 2) + "a" + ")" * (n // 2) + "(b:0.5) " * (n // 8),
        "escapes": "\\\\(" * n,
        "open groups": "(x" * n,
        "long tails": "(" * (n // 4) + "a:" + "1" * n + ")" * (n // 4),
        "negative level": ")" * n + "(a:1.2)" * (n // 7),
        "flat groups": "(a) " * (n // 2),
        "colons": "(a:" * n,
    }
    for name, text in cases.items():
        start = time.process_time()
        parse_weights(text)
        try:
            weigh_prompt(text)
        except ValueError:
            pass  # weights such as 1.1 ** 250000 = inf are refused, after parsing
        print(name, len(text), round(time.process_time() - start, 2), flush=True)
""")


def test_one_megabyte_adversarial_prompts_parse_in_linear_time():
    """Each 1 MB adversarial prompt finishes in a subprocess with a generous limit (quadratic work on any of
    them would take hours: 10^12 character visits)."""
    result = subprocess.run([sys.executable, "-c", LINEAR_SCRIPT, str(REPO_ROOT)], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 8, result.stdout
