"""Prompt handling on generated inputs: same answers as a plain (slow) reference on short prompts, time
linear in the length on long ones (n vs 8n), lone surrogates refused by position. Also through the real
tokenizers and the LLM encoder."""

from __future__ import annotations

import re
import time

import pytest
import torch

from ella_core.prompt_text import MAX_GROUP_DEPTH, PromptTextError, check_prompt_text, strip_weight_syntax
from tests.robustness.inputs import FAMILIES, family, random_prompts, surrogate_prompts

# Linear work grows 8x from n to 8n, quadratic 64x. The bound is generous for a shared 2-core machine.
RATIO_BOUND = 32
N = 25_000


def reference_strip(text: str) -> str:
    """The weighting rules as repeated substitutions (quadratic on some inputs: short prompts only)."""
    text = text.replace("\\(", "\x00o\x00").replace("\\)", "\x00c\x00")
    text = re.sub(r"<(?:lora|lyco|hypernet|embedding):[^<>]*>", " ", text, flags=re.IGNORECASE)
    group = re.compile(r"\(([^()]*?):\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*\)")
    while (stripped := group.sub(lambda m: m.group(1).strip(), text)) != text:
        text = stripped
    text = text.replace("\x00o\x00", "(").replace("\x00c\x00", ")")
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\s+([,.])", r"\1", text).strip()


def best_times(fn, *args, repeats: int = 5) -> list[float]:
    """Fastest of `repeats` runs for each argument, runs interleaved so a burst of load hits all alike."""
    best = [float("inf")] * len(args)
    for _ in range(repeats):
        for i, arg in enumerate(args):
            start = time.perf_counter()
            fn(arg)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def test_same_result_as_reference_on_random_syntax():
    prompts = random_prompts(20_000)
    wrong = [(p, reference_strip(p), strip_weight_syntax(p)) for p in prompts if reference_strip(p) != strip_weight_syntax(p)]
    assert not wrong, f"{len(wrong)} of {len(prompts)} differ, e.g. {wrong[:3]}"


def test_nesting_to_the_depth_limit_unwraps_and_deeper_is_kept():
    inside = "(" * MAX_GROUP_DEPTH + "a:1.1" + ")" * MAX_GROUP_DEPTH
    assert strip_weight_syntax(inside) == reference_strip(inside) == "(" * (MAX_GROUP_DEPTH - 1) + "a" + ")" * (MAX_GROUP_DEPTH - 1)
    weighted = "(" * MAX_GROUP_DEPTH + "a" + ":1.1)" * MAX_GROUP_DEPTH
    assert strip_weight_syntax(weighted) == "a"
    deeper = "(" * (MAX_GROUP_DEPTH + 5) + "a" + ":1.1)" * (MAX_GROUP_DEPTH + 5)
    assert strip_weight_syntax(deeper) == deeper  # kept as written, not half unwrapped


@pytest.mark.parametrize("name", FAMILIES)
def test_time_is_linear_in_length(name):
    small, large = family(name, N), family(name, 8 * N)
    t_small, t_large = best_times(strip_weight_syntax, small, large)
    ratio = t_large / max(t_small, 1e-4)  # below 0.1 ms the clock's noise dominates
    print(f"{name}: {len(small)} chars {t_small * 1e3:.2f} ms, {len(large)} chars {t_large * 1e3:.2f} ms")
    assert ratio < RATIO_BOUND, f"{name}: 8x longer input took {ratio:.1f}x as long (quadratic is 64x)"


def test_lone_surrogates_are_named_by_position():
    cases = surrogate_prompts(500)
    for prompt, position in cases:
        with pytest.raises(PromptTextError, match=f"U\\+D[89A-F][0-9A-F]{{2}} at character {position}\\b"):
            strip_weight_syntax(prompt)
    check_prompt_text("a fox \U0001f98a in snow")  # astral characters are fine


def _tokenizers(t5_dir, smollm2_gguf):
    from ella_core.tokenization import load_tokenizer

    return {"t5": load_tokenizer(str(t5_dir)), "smollm2": load_tokenizer(smollm2_gguf)}


@pytest.fixture(scope="module")
def tokenizers():
    import os

    from devtools.tiny_models import t5_tokenizer_dir

    gguf = os.environ.get("ELLA_SMOLLM2_GGUF")
    if not gguf or not os.path.isfile(gguf):
        pytest.fail("ELLA_SMOLLM2_GGUF is not set: run eval \"$(bash scripts/setup_env.sh)\"")
    return _tokenizers(t5_tokenizer_dir(), gguf)


@pytest.mark.parametrize("which", ["t5", "smollm2"])
def test_tokenizer_counts_on_generated_long_prompts(tokenizers, which):
    """Every family at 100k+ characters: counts are consistent and fixed mode keeps max_length tokens."""
    tok = tokenizers[which]
    for name in FAMILIES:
        text = family(name, 100_001)
        start = time.perf_counter()
        ids, count = tok.tokenize(text, mode="fixed", max_length=128)
        took = time.perf_counter() - start
        assert count.total >= 1 and count.kept == len(ids) == min(count.total, 128), (name, count)
        assert count.kept + count.dropped == count.total
        # Flexible mode does not pad but truncates at max_length too: the same ids and count as fixed mode.
        flexible, fcount = tok.tokenize(text, mode="flexible", max_length=128)
        assert flexible == ids and fcount == count, (name, fcount, count)
        assert took < 10, f"{which} {name}: {took:.1f}s for 100k characters"


def test_encoder_on_long_prompts(tiny_t5_encoder):
    """The LLM encoder gets the same inputs (fixed 16 tokens): finite features of the right shape."""
    for name in FAMILIES:
        encoded = tiny_t5_encoder.encode([family(name, 100_001)], mode="fixed", max_length=16)
        assert encoded.features.shape == (1, 16, tiny_t5_encoder.hidden_size), name
        assert torch.isfinite(encoded.features).all(), name
    with pytest.raises(PromptTextError, match="character 3"):
        tiny_t5_encoder.encode(["abc\udc00"], mode="fixed", max_length=16)


@pytest.fixture(scope="module")
def tiny_t5_encoder(tmp_path_factory):
    from ella_core.text_encoder import load_text_encoder
    from devtools import tiny_models as tm

    folder = tm.write_tiny_t5(tmp_path_factory.mktemp("t5") / "models")
    return load_text_encoder(str(folder), dtype="fp32", device="cpu")
