"""The warm interpreter the trainer's tests run under (tests/support/warm_python.py) behaves as `python`
does: every case runs the same probe on the real interpreter and on the warm one and compares what a
caller can observe (stdout, stderr, exit status, files, the signal that ended it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support import warm_python
from tests.training.train_helpers import python

PROBE = r'''
import json, os, sys
mode = sys.argv[1]
if mode == "state":
    if len(sys.argv) > 2:  # a descriptor the caller passed (pass_fds)
        with os.fdopen(int(sys.argv[2]), "w") as passed:
            passed.write("through a passed descriptor")
    open("made-here", "w").close()
    print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "x": os.environ.get("ELLA_X"),
                      "rank": os.environ.get("RANK"), "stdin": sys.stdin.read(), "umask": os.umask(0),
                      "main": __name__, "file": __file__, "mode": oct(os.stat("made-here").st_mode & 0o777)}))
    sys.stderr.write("err line\n")
elif mode == "exit":
    sys.exit(int(sys.argv[2]))
elif mode == "message":
    sys.exit("a message")
elif mode == "raise":
    raise ValueError("boom")
elif mode == "atexit":
    import atexit, threading, time
    atexit.register(lambda: print("atexit ran", flush=True))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined", flush=True))).start()
elif mode == "wait":
    import signal, time
    if sys.argv[2] == "handler":
        signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    print("ready", os.getpid(), flush=True)
    time.sleep(60)
elif mode == "numpy":
    import numpy
    print(numpy.random.randint(0, 2**31), hash("a string"))
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return path


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _both(argv: list[str], **kwargs) -> list[subprocess.CompletedProcess]:
    return [subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120, **kwargs)
            for exe in (sys.executable, python())]


@pytest.mark.parametrize("mode, args", [("exit", ["0"]), ("exit", ["3"]), ("exit", ["255"]), ("message", []),
                                        ("raise", []), ("atexit", [])])
def test_exit_status_and_output_are_the_interpreters(probe, mode, args):
    cold, warm = _both([str(probe), mode, *args], env=_env())
    assert (warm.returncode, warm.stdout) == (cold.returncode, cold.stdout)
    assert warm.stderr.replace(sys.executable, "") == cold.stderr.replace(sys.executable, "")  # tracebacks too


def test_argv_path_cwd_env_stdin_umask_and_descriptors(probe, tmp_path):
    results = []
    for i, exe in enumerate((sys.executable, python())):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        read, write = os.pipe()
        proc = subprocess.run(["sh", "-c", 'umask 027 && exec "$0" "$@"', exe, str(probe), "state", str(write)],
                              input="from stdin", capture_output=True, text=True, timeout=120, cwd=cwd,
                              env=_env(ELLA_X="x", RANK="1"), pass_fds=(write,))
        os.close(write)
        with os.fdopen(read) as f:
            through = f.read()
        state = json.loads(proc.stdout)
        state["cwd"] = state["cwd"].replace(str(cwd), "<cwd>")
        results.append((state, proc.stderr, through, proc.returncode))
    assert results[1] == results[0]
    assert results[0][0]["umask"] == 0o027 and results[0][2] == "through a passed descriptor"


def test_a_changed_import_time_variable_runs_cold(probe, tmp_path):
    python()
    log = Path(warm_python._zygotes.dir) / "zygotes.log"
    cold, warm = _both([str(probe), "state"], env=_env(PYTHONWARNINGS="ignore"), input="", cwd=tmp_path)
    assert warm.stdout == cold.stdout and warm.returncode == cold.returncode == 0
    assert "cold" in log.read_text().splitlines()[-1] and "PYTHONWARNINGS" in log.read_text().splitlines()[-1]


@pytest.mark.parametrize("handler, sig, status", [("none", signal.SIGTERM, -signal.SIGTERM),
                                                  ("handler", signal.SIGTERM, 128 + signal.SIGTERM),
                                                  ("none", signal.SIGINT, -signal.SIGINT),
                                                  ("none", signal.SIGKILL, -signal.SIGKILL)])
def test_signals_reach_the_program_and_its_status_comes_back(probe, handler, sig, status):
    for exe in (sys.executable, python()):
        proc = subprocess.Popen([exe, str(probe), "wait", handler], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env())
        assert proc.stdout.readline().startswith("ready")
        time.sleep(0.2)
        proc.send_signal(sig)
        assert proc.wait(30) == status, (exe, proc.stderr.read()[-2000:])


def test_a_killed_stand_in_leaves_no_program_running(probe):
    proc = subprocess.Popen([python(), str(probe), "wait", "none"], stdout=subprocess.PIPE, text=True, env=_env())
    pid = int(proc.stdout.readline().split()[1])
    assert pid != proc.pid and _running(pid)  # the program runs in the zygote's child, not in the stand-in
    proc.kill()
    proc.wait(30)
    deadline = time.time() + 10
    while time.time() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_consecutive_launches_get_fresh_numpy_seeds_and_other_hash_seeds(probe):
    runs = [subprocess.run([python(), str(probe), "numpy"], capture_output=True, text=True, timeout=120,
                           env=_env()).stdout.split() for _ in range(4)]
    assert len({r[0] for r in runs}) == 4  # numpy's global generator: seeded anew in each child
    assert all(a[1] != b[1] for a, b in zip(runs, runs[1:]))  # neighbours never share a string-hash seed
