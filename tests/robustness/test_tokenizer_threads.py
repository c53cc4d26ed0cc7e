"""One tokenizer, many threads: counts equal the single-threaded ground truth; truncation equals
transformers' own; TokenizerCache loads each file once and remembers failures until the file changes."""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ella_core.tokenization import TokenizerCache, load_tokenizer
from tests.robustness.inputs import random_prompts
from devtools.tiny_models import t5_tokenizer_dir

LENGTHS = [1, 2, 3, 5, 8, 16, 33, 77, 128, 300]


@pytest.fixture(scope="module", params=["t5", "smollm2"])
def tok(request):
    if request.param == "t5":
        return load_tokenizer(str(t5_tokenizer_dir()))
    gguf = os.environ.get("ELLA_SMOLLM2_GGUF")
    if not gguf or not os.path.isfile(gguf):
        pytest.fail("ELLA_SMOLLM2_GGUF is not set: run eval \"$(bash scripts/setup_env.sh)\"")
    return load_tokenizer(gguf)


def _prompts(n: int) -> list[str]:
    rng = random.Random(3)
    words = ["fox", "snowy", "forest", "(red hat:1.3)", "castle", "\u65e5\u672c", "\U0001f98a", ",", "birch"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 90))) for _ in range(n)]


def test_truncation_equals_transformers(tok):
    """Our truncation of the ids == transformers' truncation=True (single thread, where it is safe)."""
    from ella_core.prompt_text import strip_weight_syntax

    checked = 0
    for prompt in _prompts(40) + random_prompts(40, seed=9):
        text = strip_weight_syntax(prompt)
        special = len(tok.tokenizer(text)["input_ids"]) - len(tok.tokenizer(text, add_special_tokens=False)["input_ids"])
        for length in LENGTHS:
            if length <= special:
                continue  # transformers refuses lengths that leave no room for content
            ids, count = tok.tokenize(prompt, mode="fixed", max_length=length)
            hf = tok.tokenizer(text, truncation=True, max_length=length)["input_ids"] or ids
            assert ids == list(hf), (prompt, length)
            checked += 1
    tok.tokenizer(" ", truncation=False)  # leave the shared tokenizer as we found it
    print(f"truncation compared with transformers: {checked} (prompt, max_length) pairs")
    assert checked > 500


def test_parallel_counts_equal_single_threaded(tok):
    """384 requests with mixed max_length and mode from 16 threads: every count equals the ground truth."""
    rng = random.Random(0)
    jobs = [(p, rng.choice(LENGTHS), rng.choice(["fixed", "flexible"])) for p in _prompts(384)]
    truth = [tok.tokenize(p, mode=m, max_length=n) for p, n, m in jobs]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda job: tok.tokenize(job[0], mode=job[2], max_length=job[1]), jobs))
    wrong = [i for i, (a, b) in enumerate(zip(got, truth)) if a != b]
    assert not wrong, f"{len(wrong)} of {len(jobs)} parallel answers differ from the single-threaded ones"
    assert sum(t[1].dropped > 0 for t in truth) > 50  # truncation really was exercised


def test_cache_loads_once_under_concurrency():
    started = threading.Event()

    def slow_loader(path):
        started.set()
        time.sleep(0.3)
        return object()

    cache = TokenizerCache(loader=slow_loader)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: cache.get(str(t5_tokenizer_dir())), range(24)))
    assert cache.loads == 1 and all(r is results[0] for r in results)


def test_cache_remembers_failures_until_the_file_changes(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 10)
    calls = []

    def loader(path):
        calls.append(path)
        return load_tokenizer(path)

    cache = TokenizerCache(loader=loader)
    messages = []
    for _ in range(20):
        with pytest.raises(Exception) as failure:
            cache.get(str(broken))
        messages.append(str(failure.value))
    assert len(calls) == 1 and len(set(messages)) == 1 and "broken.gguf" in messages[0]
    broken.write_bytes(b"GGUF" + b"\x00" * 30)  # replaced (size and mtime change): tried again
    with pytest.raises(Exception):
        cache.get(str(broken))
    assert len(calls) == 2


def test_parallel_encodes_equal_sequential(tmp_path):
    """The LLM encoder from 8 threads, mixed length and mode: features equal the one-at-a-time ones."""
    import torch

    from ella_core.text_encoder import load_text_encoder
    from devtools import tiny_models as tm

    encoder = load_text_encoder(str(tm.write_tiny_t5(tmp_path / "models")), dtype="fp32", device="cpu")
    rng = random.Random(1)
    jobs = [(p, rng.choice([1, 5, 16, 33]), rng.choice(["fixed", "flexible"])) for p in _prompts(64)]
    run = lambda job: encoder.encode([job[0]], mode=job[2], max_length=job[1]).features  # noqa: E731
    truth = [run(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, jobs))
    wrong = [i for i, (a, b) in enumerate(zip(got, truth)) if a.shape != b.shape or not torch.equal(a, b)]
    assert not wrong, f"{len(wrong)} of {len(jobs)} parallel encodings differ"
