"""The token route and queue-time validation on a real ComfyUI server, fed generated and hostile input.

Every answer is checked: counts against the single-threaded ground truth, errors for their status and
for naming what is wrong. Each test prints how many inputs it tried and what they got (for the report).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.nodes.graphs import ella_prompt
from tests.robustness.conftest import BAD_CONNECTORS, CUT_GGUF, SMOLLM2
from tests.robustness.inputs import FAMILIES, family, random_prompts
from devtools import tiny_models as tm
from tests.support.comfy_server import PromptFailed

MODELS = (tm.T5_NAME, SMOLLM2)
STALL_BOUND_S = 1.0  # "a fraction of a second": the event loop answered within this while the route worked


def post(server, body, path="/ella/tokenize", timeout=120) -> tuple[int, dict, float]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r), time.perf_counter() - start
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"{}"), time.perf_counter() - start
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}, time.perf_counter() - start


def expected(truth, text, model, max_length=128, mode="fixed") -> dict:
    count = truth[model].count_tokens(text, max_length=max_length, mode=mode)
    return {"total": count.total, "kept": count.kept, "dropped": count.dropped, "dropped_text": count.dropped_text,
            "max_length": max_length, "mode": mode, "notes": []}  # a truncation limit in both modes


def test_generated_inputs_get_right_counts(rserver, truth_tokenizers):
    """Every family at the 100,000-character limit and 300 random syntax prompts, through both tokenizers."""
    tried = Counter()
    for model in MODELS:
        for name in FAMILIES:
            text = family(name, 100_000)
            status, answer, took = post(rserver, {"text": text, "model_name": model, "max_length": 128})
            assert status == 200, (model, name, answer)
            assert answer == expected(truth_tokenizers, text, model), (model, name)
            tried["long family"] += 1
        for text in random_prompts(150, seed=len(model), max_len=40):
            status, answer, _ = post(rserver, {"text": text, "model_name": model, "max_length": 7})
            assert status == 200 and answer == expected(truth_tokenizers, text, model, 7), (model, text, answer)
            tried["random syntax"] += 1
    print(f"route inputs tried: {dict(tried)}, all 200 with ground-truth counts")


def test_event_loop_answers_while_huge_requests_are_in_flight(rserver):
    """4 clients send the heaviest 100k prompts back to back; /system_stats keeps answering promptly."""
    heavy = ["ideographic_space", "cjk", "newline", "deep_balanced", "group_then_spaces", "open_parens", "emoji"]
    stop, statuses, lock = threading.Event(), Counter(), threading.Lock()

    def client(k):
        i = k
        while not stop.is_set():
            status, _, _ = post(rserver, {"text": family(heavy[i % len(heavy)], 100_000), "model_name": SMOLLM2})
            with lock:
                statuses[status] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # requests are in flight
    latencies = []
    for _ in range(40):
        start = time.perf_counter()
        rserver.get_json("/system_stats", timeout=30)
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    latencies.sort()
    print(f"/system_stats during {sum(statuses.values())} huge requests ({dict(statuses)}): "
          f"median {latencies[len(latencies) // 2] * 1e3:.0f} ms, max {latencies[-1] * 1e3:.0f} ms")
    assert statuses and set(statuses) == {200}
    assert sum(statuses.values()) >= 4, "the huge requests did not overlap the probes"
    assert latencies[-1] < STALL_BOUND_S, f"the event loop stalled {latencies[-1]:.2f}s"


def test_parallel_mixed_requests_match_single_threaded(rserver, truth_tokenizers):
    """384 requests, 32 at a time, mixed model, max_length and mode: every answer equals the ground truth."""
    rng = random.Random(5)
    words = ["fox", "snowy", "(red hat:1.3)", "castle", "\u65e5\u672c", ",", "birch", "<lora:x:1>", "\u3000"]
    jobs = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 120))), "model_name": rng.choice(MODELS),
             "max_length": rng.choice([1, 2, 5, 16, 77, 128, 300]), "token_mode": rng.choice(["fixed", "flexible"])}
            for _ in range(384)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: post(rserver, job), jobs))
    wrong = [job for job, (status, answer, _) in zip(jobs, answers)
             if status != 200 or answer != expected(truth_tokenizers, job["text"], job["model_name"],
                                                     job["max_length"], job["token_mode"])]
    truncated = sum(a[1].get("dropped", 0) > 0 for a in answers)
    print(f"parallel: {len(jobs)} requests, {len(wrong)} wrong, {truncated} truncated")
    assert not wrong, f"{len(wrong)} of {len(jobs)} answers differ from the single-threaded ground truth: {wrong[:2]}"
    assert truncated > 50


DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_REQUESTS = [  # (body, status, text the error must contain)
    (DEEP, 400, "nested too deeply"),
    (b'{"text": ' + DEEP + b', "model_name": "tiny-t5"}', 400, "nested too deeply"),
    (b"x" * (4 << 20), 413, "limit"),
    (b"not json", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": 1.9}, 400, "'max_length' must be a whole number, got 1.9"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": True}, 400, "'max_length' must be an integer, got true"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": False}, 400, "'max_length' must be an integer"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": "5"}, 400, "'max_length' must be an integer, got \"5\""),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": None}, 400, "'max_length' must be an integer, got null"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": [128]}, 400, "'max_length' must be an integer"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": 0}, 400, "between 1 and 8192, got 0"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": -3}, 400, "between 1 and 8192"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": 10**12}, 400, "between 1 and 8192"),
    ({"text": "x", "model_name": tm.T5_NAME, "max_length": 1e300}, 400, "between 1 and 8192"),
    ({"text": "x", "model_name": tm.T5_NAME, "token_mode": "bogus"}, 400, "'token_mode' must be one of"),
    ({"text": "x", "model_name": tm.T5_NAME, "token_mode": None}, 400, "'token_mode' must be one of"),
    ({"text": 5, "model_name": tm.T5_NAME}, 400, "'text' must be a string"),
    ({"text": None, "model_name": tm.T5_NAME}, 400, "'text' must be a string"),
    ({"text": "a" * 100_001, "model_name": tm.T5_NAME}, 400, "at most 100000 characters"),
    ({"text": "x"}, 400, "'model_name' must name a text encoder"),
    ({"text": "x", "model_name": ""}, 400, "'model_name' must name a text encoder"),
    ({"text": "x", "model_name": 5}, 400, "'model_name' must name a text encoder"),
    ({"text": "x", "model_name": "nope"}, 404, "put it in models/text_encoders or models/LLM"),
    ({"text": "x", "model_name": "../../../etc/passwd"}, 404, "not found"),
    (b'{"text": "abc\\ud800def", "model_name": "tiny-t5"}', 400, "lone surrogate U+D800 at character 3"),
    (b'{"text": "\\udfff", "model_name": "tiny-t5"}', 400, "lone surrogate U+DFFF at character 0"),
    ({"text": "x", "model_name": CUT_GGUF}, 500, "cut.gguf is truncated"),
    ({"text": "x", "model_name": CUT_GGUF}, 500, "cut.gguf is truncated"),  # again: still fast
]


def test_bad_requests_get_clear_4xx_answers(rserver):
    outcomes = Counter()
    for body, status, text in BAD_REQUESTS:
        got, answer, took = post(rserver, body)
        assert got == status and text in answer.get("error", ""), (str(body)[:80], got, answer)
        assert str(rserver.base_dir) not in answer["error"] or got == 500  # no server paths for a missing name
        assert took < 5, f"{str(body)[:60]} took {took:.1f}s"
        outcomes[got] += 1
    ok, answer, _ = post(rserver, {"text": "x", "model_name": tm.T5_NAME, "max_length": 128.0})
    assert ok == 200 and answer["max_length"] == 128  # JSON's integral floats are integers
    assert rserver.alive() and rserver.get_json("/system_stats")
    print(f"bad requests tried: {len(BAD_REQUESTS)}, answers by status: {dict(outcomes)}")


def test_count_follows_the_connector_like_prompt_encode(rserver, truth_tokenizers):
    """With ella_name, the connector's recorded length (the tiny one: fixed, 16) replaces the widget's 128."""
    text = "a very long prompt " * 20
    status, answer, _ = post(rserver, {"text": text, "model_name": tm.T5_NAME, "max_length": 128, "ella_name": tm.ELLA_NAME})
    assert status == 200, answer
    assert {**answer, "notes": []} == expected(truth_tokenizers, text, tm.T5_NAME, 16)
    assert "max_length=16" in answer["notes"][0] and "max_length=128" in answer["notes"][0]
    status, answer, _ = post(rserver, {"text": "x", "model_name": tm.T5_NAME, "ella_name": "gone.safetensors"})
    assert status == 404 and "put it in models/ella" in answer["error"]
    status, answer, _ = post(rserver, {"text": "x", "model_name": tm.T5_NAME, "ella_name": 3})
    assert status == 400 and "'ella_name'" in answer["error"]


def _loader_inputs(**changes) -> dict:
    prompt = ella_prompt(out_dir="unused")
    for key, value in changes.items():
        node, name = key.split("__")
        prompt[node]["inputs"][name] = value
    return prompt


QUEUE_FAULTS = [  # (changes to the graph, node id that must be named, text its error must contain)
    ({"ella__ella_name": "missing.safetensors"}, "ella", "ELLA connector 'missing.safetensors' not found: put it in models/ella"),
    ({"llm__model_name": "missing-t5"}, "llm", "ELLA text encoder 'missing-t5' not found: put it in models/text_encoders or models/LLM"),
    ({"llm__model_name": CUT_GGUF}, "llm", "'cut.gguf' is truncated"),
    ({"llm__dtype": "bogus"}, "llm", "dtype 'bogus' is not one of ['default', 'fp16', 'bf16', 'fp32'"),
    ({"llm__device": "tpu"}, "llm", "device 'tpu' is not one of ['auto', 'cpu', 'gpu']"),
    ({"llm__token_mode": "sideways"}, "llm", "token_mode 'sideways' is not one of ['fixed', 'flexible']"),
    ({"llm__max_length": 0}, "llm", "max_length must be between 1 and 4096, got 0"),
    ({"llm__max_length": 5000}, "llm", "max_length must be between 1 and 4096, got 5000"),
    ({"pos__text": "a fox \ud83e"}, "pos", "lone surrogate U+D83E at character 6"),
] + [({"ella__ella_name": name}, "ella", message) for name, (_, message) in BAD_CONNECTORS.items()]


def test_queue_time_validation_names_node_input_and_folder(rserver):
    """POST /prompt refuses each fault with a node error, before anything runs; then a good graph runs."""
    for changes, node, text in QUEUE_FAULTS:
        start = time.perf_counter()
        try:
            rserver.queue(_loader_inputs(**changes))
        except PromptFailed as failure:
            detail = failure.detail
        else:
            pytest.fail(f"POST /prompt accepted a graph with {changes}")
        took = time.perf_counter() - start
        assert isinstance(detail, dict) and node in detail.get("node_errors", {}), (changes, detail)
        messages = " ".join(e.get("details", "") for e in detail["node_errors"][node]["errors"])
        assert text in messages, (changes, messages)
        assert str(rserver.base_dir) not in messages, messages  # relative folders, not the server's paths
        assert took < 5, f"{changes}: validation took {took:.1f}s"
    assert rserver.get_json("/queue")["queue_running"] == []
    print(f"queue-time faults tried: {len(QUEUE_FAULTS)}, all refused at POST /prompt with a node error")
    result = rserver.run(ella_prompt(out_dir=str(rserver.base_dir / "rec"), steps=1))
    assert result.images
