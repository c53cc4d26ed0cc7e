"""Segment weights placed on the LLM's tokens (T5 with ComfyUI's sentencepiece tokenizer, SmolLM2's GGUF
byte-level BPE): the weighted words' tokens get log(w), special and padding tokens 0, in fixed and flexible
mode and across truncation at max_length; tokenizers without offsets place them run by run."""

from __future__ import annotations

import math
import os
import random

import pytest

from devtools import tiny_models as tm
from ella_core.prompt_weights import bias_for, prepare, token_log_weights, weigh_prompt
from ella_core.tokenization import load_tokenizer

WORDS = "a photo of a red fox sleeping in deep white snow , under tall pine trees at dusk .".split()


@pytest.fixture(scope="module", params=["t5", "smollm2"])
def tokenizer(request):
    if request.param == "t5":
        return load_tokenizer(str(tm.t5_tokenizer_dir()))
    path = os.environ.get("ELLA_SMOLLM2_GGUF")
    if not path or not os.path.isfile(path):
        pytest.skip("ELLA_SMOLLM2_GGUF is not set (scripts/setup_env.sh exports it)")
    return load_tokenizer(path)


class NoOffsets:
    """A tokenizer that cannot give character offsets (as slow tokenizers cannot)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets")
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _cases(n: int):
    rng = random.Random(0)
    for _ in range(n):
        i = rng.randrange(len(WORDS) - 1)
        span = rng.choice([1, 2, 3])
        phrase = " ".join(w for w in WORDS[i:i + span] if w not in ",.")
        if not phrase:
            continue
        w = rng.choice([0.5, 0.8, 1.2, 1.5, 2.0])
        rest = [w_ for w_ in WORDS[i + span:]]
        yield " ".join(WORDS[:i] + [f"({phrase}:{w})"] + rest), phrase, w


def test_weighted_words_get_their_weight_and_nothing_else(tokenizer):
    checked = 0
    for text, phrase, w in _cases(60):
        prompt = weigh_prompt(text)
        ids, _ = tokenizer.tokenize(prompt.encoder_text(), mode="fixed", max_length=128)
        logs = token_log_weights(tokenizer, prompt, mode="fixed", max_length=128)
        assert len(logs) == len(ids)
        hit = [i for i, v in zip(ids, logs) if v != 0.0]
        assert all(v in (0.0, math.log(w)) for v in logs), (text, logs)
        assert tokenizer.tokenizer.decode(hit).strip() == phrase, (text, tokenizer.tokenizer.decode(hit))
        specials = set(tokenizer.tokenizer.all_special_ids)
        assert all(v == 0.0 for i, v in zip(ids, logs) if i in specials)
        checked += 1
    assert checked > 40


def test_without_offsets_the_runs_give_the_same_weights(tokenizer):
    plain = tokenizer.tokenizer
    checked = 0
    for text, _, _ in _cases(30):
        prompt = weigh_prompt(text)
        with_offsets = token_log_weights(tokenizer, prompt, mode="flexible", max_length=128)
        tokenizer.tokenizer = NoOffsets(plain)
        try:
            by_runs = token_log_weights(tokenizer, prompt, mode="flexible", max_length=128)
        finally:
            tokenizer.tokenizer = plain
        assert by_runs == with_offsets, text
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("mode", ["fixed", "flexible"])
@pytest.mark.parametrize("max_length", [4, 7, 12, 64])
def test_modes_and_truncation(tokenizer, mode, max_length):
    """The bias has the features' length (fixed: max_length, padding 0; flexible: the kept tokens); weights
    past max_length are cut with their tokens, and the end-of-text token kept by truncation stays 0."""
    text = "a photo of a red fox (sleeping:1.5) in deep white snow under (tall pine:0.5) trees"
    encoder_text, prompt = prepare(text, "connector attention")
    ids, count = tokenizer.tokenize(encoder_text, mode=mode, max_length=max_length)
    length = max_length if mode == "fixed" else len(ids)
    logs = token_log_weights(tokenizer, prompt, mode=mode, max_length=max_length)
    assert len(logs) == len(ids) <= max_length
    bias = bias_for(prompt, tokenizer, length, mode=mode, max_length=max_length)
    full = token_log_weights(tokenizer, prompt, mode=mode, max_length=4096)
    if any(logs):
        assert bias.shape == (1, length) and bias[0, len(ids):].abs().sum() == 0
        assert bias[0, :len(ids)].tolist() == pytest.approx(logs)
    else:
        assert bias is None
    eos = tokenizer.tokenizer.eos_token_id
    if count.dropped and ids[-1] == eos:
        assert logs[-1] == 0.0
    # the kept content tokens carry the weights they have untruncated
    kept_content = [v for i, v in zip(ids, logs) if i not in tokenizer.tokenizer.all_special_ids]
    assert kept_content == [v for i, v in zip(tokenizer.tokenize(encoder_text, mode=mode, max_length=4096)[0], full)
                            if i not in tokenizer.tokenizer.all_special_ids][:len(kept_content)]


def test_strip_mode_and_unit_weights_give_no_bias(tokenizer):
    for text in ["a red fox", "(a red fox:1.0)", "a (red:1) fox", ""]:
        encoder_text, prompt = prepare(text, "strip")
        assert encoder_text == text and prompt is None and bias_for(prompt, tokenizer, 16) is None
        _, prompt = prepare(text, "connector attention")
        assert bias_for(prompt, tokenizer, 16) is None
    with pytest.raises(ValueError, match="weighting must be one of"):
        prepare("a", "emphasis")
