"""Two real gloo processes building the feature cache cannot hang: a rank that raises or crashes between
the barriers (in rank 0's merge, or while encoding), or a cache.dir that is not shared (each rank given its
own), ends every rank promptly with an error naming the cause. Each test is bounded by subprocess
timeouts and kills what is left, so it never hangs itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
from tests.training.train_helpers import ROOT, TINY_CONFIG, python

from tests.training.test_signals import ENTRY

from training.cache import FeatureCache

BOUND_S = 240  # the whole test; the collectives' own timeout is set far above what a detection takes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], env: dict[str, str]) -> list[tuple[int, str, float]]:
    """Two ranks as plain processes (no torchrun, which would kill the survivor itself); returns
    (exit status, stderr, seconds) per rank. Whatever still runs at the bound is killed."""
    port = str(_free_port())
    procs = []
    started = time.time()
    for rank in range(2):
        procs.append(subprocess.Popen(
            [python(), str(ENTRY), "--config", str(TINY_CONFIG), *args], cwd=str(ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **env, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                 "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}))
    results: list = [None, None]

    def wait(rank: int) -> None:
        try:
            _, stderr = procs[rank].communicate(timeout=BOUND_S)
            results[rank] = (procs[rank].returncode, stderr, time.time() - started)
        except subprocess.TimeoutExpired:
            procs[rank].kill()

    threads = [threading.Thread(target=wait, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND_S + 30)
    if None in results:
        for p in procs:
            p.kill()
        raise AssertionError(f"a rank was still running after {BOUND_S} s: it hangs")
    return results


def _args(base, llm, data, out, *extra) -> list[str]:
    return [f"model.pretrained={base}", f"llm.source={llm}", f"data.path={data}", f"output_dir={out}",
            "train.backend=gloo", "train.max_steps=1", "cache.shard_size=4", "train.collective_timeout_s=900",
            *extra]


FAULTS = [  # (fault, the failing rank, what the other rank must say)
    ("merge:raise@0", 0, "rank 0 failed: RuntimeError: injected fault on rank 0"),
    ("merge:exit@0", 0, "lost contact with the other processes"),
    ("encode:raise@1", 1, "rank 1 failed: RuntimeError: injected fault on rank 1"),
    ("encode:exit@1", 1, "lost contact with the other processes"),
    ("encode:raise@0", 0, "rank 0 failed: RuntimeError: injected fault on rank 0"),
]


@pytest.mark.parametrize("fault, failing, message", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_failing_rank_ends_every_rank(tiny_sd15, tiny_t5, datasets, tmp_path, fault, failing, message):
    results = _launch(_args(tiny_sd15, tiny_t5, datasets["folder"], tmp_path / "run"), {"ELLA_TEST_FAULT": fault})
    (code_f, err_f, t_f), (code_o, err_o, t_o) = results[failing], results[1 - failing]
    assert code_f == (3 if fault.endswith(f"exit@{failing}") else 1), err_f[-3000:]
    assert code_o == 1 and "error: cache build in" in err_o and message in err_o, err_o[-3000:]
    assert "Traceback" not in err_o  # a clear error, not a crash dump
    assert not list((tmp_path / "run").glob("cache/*/COMPLETE"))
    print(f"{fault}: the other rank exited {t_o - t_f:+.1f} s after the failing one")


def test_cache_dir_not_shared_is_an_error_on_every_rank(tiny_sd15, tiny_t5, datasets, tmp_path):
    env = {f"ELLA_TEST_ARGS_{r}": f"cache.dir={tmp_path / f'node{r}'}" for r in range(2)}  # like two machines
    results = _launch(_args(tiny_sd15, tiny_t5, datasets["folder"], tmp_path / "run"), env)
    for rank, (code, stderr, _) in enumerate(results):
        assert code == 1 and "cache.dir is not shared between the processes" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr
    assert f"rank 0 on {socket.gethostname()} does not see the files of rank(s) [1]" in results[0][1]
    assert f"rank 1 on {socket.gethostname()} does not see the files of rank(s) [0]" in results[1][1]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_to_one_rank_stops_both_and_the_rerun_resumes(tiny_sd15, tiny_t5, tmp_path, workers):
    """SIGTERM to rank 0 only, mid cache build: rank 1 learns it at the next status exchange, both keep their
    finished shards and exit with 143; two fresh ranks then finish the cache without redoing those shards."""
    import signal

    from tests.training.train_helpers import synthetic_samples, write_folder

    data = write_folder(tmp_path / "data", synthetic_samples(200, seed=9))  # 100 a rank: exchanges at 0 and 64
    args = _args(tiny_sd15, tiny_t5, data, tmp_path / "run", f"data.num_workers={workers}")
    port = str(_free_port())
    procs = [subprocess.Popen(
        [python(), str(ENTRY), "--config", str(TINY_CONFIG), *args], cwd=str(ROOT),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ELLA_TEST_SLOW_ENCODE_S": "0.3", "RANK": str(r),
             "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        for r in range(2)]
    try:
        deadline = time.time() + BOUND_S
        shards = lambda r: sorted((tmp_path / "run" / "cache").glob(f"*/r{r}-*.safetensors"))  # noqa: E731
        while time.time() < deadline and not (shards(0) and shards(1)):
            assert all(p.poll() is None for p in procs), "a rank ended early"
            time.sleep(0.1)
        procs[0].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=BOUND_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (_, stderr)) in enumerate(zip(procs, results)):
        assert p.returncode == 128 + signal.SIGTERM, (rank, stderr[-3000:])
        assert "stopped: during the cache build" in stderr and f"of rank {rank} kept" in stderr, stderr[-3000:]
    kept = {path: path.stat().st_mtime_ns for r in range(2) for path in shards(r)}
    folder = next(iter(kept)).parent
    assert not (folder / "COMPLETE").exists() and len(kept) < 50  # 200 samples / 4 per shard: it stopped early
    results = _launch(args, {})  # the rerun, two ranks, no slowdown
    assert all(code == 0 for code, _, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    assert "cache: resuming rank 0 after" in results[0][1]
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items())  # finished shards untouched
    cache = FeatureCache(folder)
    assert [cache.entry(i)["key"] for i in range(len(cache))] == [f"img{i:04d}.png" for i in range(200)]
