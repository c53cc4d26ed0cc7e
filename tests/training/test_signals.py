"""SIGTERM/SIGINT in every phase, on the real script: during start-up (model loading) the process exits at
once; during the feature-cache build it exits promptly keeping its finished shards, and the next run
resumes the cache without encoding them again; the exit status is 128 + the signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from tests.training.train_helpers import ROOT, TINY_CONFIG, python, run_trainer, synthetic_samples, write_folder

from training.cache import FeatureCache

ENTRY = Path(__file__).with_name("trainer_entry.py")


class Trainer:
    """The trainer in a subprocess whose stderr is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([python(), str(ENTRY), "--config", str(TINY_CONFIG), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait_for(self, condition, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                self.reader.join(5)
                raise AssertionError(f"trainer ended early ({self.proc.returncode}):\n{''.join(self.lines)[-4000:]}")
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError("condition not reached:\n" + "".join(self.lines)[-4000:])

    def stop(self, sig: int, timeout: float = 60) -> tuple[int, float, str]:
        """Sends `sig`; returns (exit status, seconds until exit, stderr)."""
        sent = time.time()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"no exit {timeout} s after {sig}:\n{''.join(self.lines)[-4000:]}") from None
        elapsed = time.time() - sent
        self.reader.join(10)
        return code, elapsed, "".join(self.lines)


def _common(base, llm, data, out) -> list[str]:
    return [f"model.pretrained={base}", f"llm.source={llm}", f"data.path={data}", f"output_dir={out}"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_start_up_exits_at_once(tiny_sd15, tiny_t5, datasets, tmp_path, sig):
    trainer = Trainer(_common(tiny_sd15, tiny_t5, datasets["folder"], tmp_path / "run"),
                      {"ELLA_TEST_SLOW_STARTUP_S": "300"})  # a model load that would take 5 minutes
    trainer.wait_for(lambda: any("slow start-up begins" in line for line in trainer.lines))
    code, elapsed, stderr = trainer.stop(sig, timeout=30)
    assert code == 128 + sig, stderr[-3000:]
    assert f"stopped: {signal.Signals(sig).name} during start-up" in stderr and "Traceback" not in stderr
    assert elapsed < 60, elapsed  # not a speed figure: the model load it interrupted would take 300 s
    print(f"exit {elapsed:.2f} s after {signal.Signals(sig).name} during start-up")


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_during_the_cache_build_keeps_shards_and_the_rerun_resumes(tiny_sd15, tiny_t5, tmp_path, workers):
    data = write_folder(tmp_path / "data", synthetic_samples(40, seed=8))
    args = _common(tiny_sd15, tiny_t5, data, tmp_path / "run") + ["cache.shard_size=4", "train.max_steps=1",
                                                                   f"data.num_workers={workers}"]
    cache_root = tmp_path / "run" / "cache"
    shards = lambda: sorted(cache_root.glob("*/r0-*.safetensors"))  # noqa: E731
    trainer = Trainer(args, {"ELLA_TEST_SLOW_ENCODE_S": "0.4"})  # 10 chunks: at least 4 s of encoding
    trainer.wait_for(lambda: len(shards()) >= 2)
    code, elapsed, stderr = trainer.stop(signal.SIGTERM, timeout=30)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped: during the cache build" in stderr and "Traceback" not in stderr, stderr[-3000:]
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards()}
    folder = shards()[0].parent
    assert 2 <= len(kept) < 10 and not (folder / "COMPLETE").exists()  # it stopped, well before the end
    print(f"exit {elapsed:.2f} s after SIGTERM in the cache build, {len(kept)} shard(s) kept")

    proc = run_trainer(*args)  # the rerun: no slowdown, no signal
    assert f"cache: resuming rank 0 after {len(kept)} finished shard(s) ({4 * len(kept)} samples" in proc.stderr
    assert all(p.stat().st_ino == ino and p.stat().st_mtime_ns == mt for p, (ino, mt) in kept.items())
    index = json.loads((folder / "index.json").read_text())
    cache = FeatureCache(folder)
    assert [cache.entry(i)["key"] for i in range(len(cache))] == [f"img{i:04d}.png" for i in range(40)]
    assert index["skipped"]["total"] == 0 and (tmp_path / "run" / "ella.safetensors").is_file()


@pytest.fixture()
def stop_handlers():
    """A Stop installed in this process, the previous handlers restored afterwards."""
    from training.stopping import Stop

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield Stop().install()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_deferred_phases_note_signals_and_a_second_ctrl_c_stops_now(stop_handlers):
    from training.stopping import StopRequested

    stop = stop_handlers
    with stop.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's and torchrun's: still a clean stop
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(StopRequested, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest


def test_outside_deferred_phases_a_signal_stops_at_once_naming_the_phase(stop_handlers):
    from training.stopping import StopRequested

    stop_handlers.phase = "loading the models"
    with pytest.raises(StopRequested) as info:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert str(info.value) == "SIGTERM during loading the models" and info.value.exit_code == 143
