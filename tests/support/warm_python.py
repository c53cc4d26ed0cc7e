"""A warm Python for the tests' trainer subprocesses: `python train.py ...` without ~8 s of imports each.

Most of a tiny trainer run is importing torch, diffusers and transformers. `interpreter()` returns the path
of a small executable that stands in for `sys.executable`: it hands its argv, environment, working
directory, umask and open file descriptors to a long-lived "zygote" process that has imported those third-party
libraries once (never this repository's modules), which forks a child that runs the script or `-m`
module from scratch (its own `__main__`, sys.argv, sys.path[0], stdio on the caller's descriptors, the
project's modules imported afresh). The stand-in relays signals to that child and exits with its status
(-N when a signal N ended it), so `subprocess.run`, `Popen.send_signal` and torchrun work as on a real
interpreter; the child sees the stand-in as `sys.executable`, so torchrun's workers are warm too.

A request runs cold (the stand-in execs the real interpreter) when it cannot be reproduced faithfully:
an environment that differs from the zygote's in a variable a library may read at import time (only
ELLA_*, PYTEST_*, torchrun's rank variables and TOKENIZERS_PARALLELISM may differ), an interpreter flag
other than -u/-m (`-c` included), or no zygote answering. Two zygotes alternate, so consecutive processes (the ranks of
one job, a run and its resume) never share a string-hash seed, as fresh interpreters would not; numpy's
global generator is reseeded in each child (Python's `random` reseeds itself on fork).
Import-time warnings of the preloaded libraries are printed once by the zygote, not by each child.
ELLA_TEST_COLD_PYTHON=1 makes `interpreter()` return sys.executable (every launch cold).
This module imports only the standard library at the top: the stand-in runs it with `python -S`.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile

# what the zygotes import once: the libraries the trainer and its tests' scripts use
PRELOAD = ("torch", "torch.nn.functional", "torch.distributed", "torch.distributed.run", "torch.utils.data",
           "torch.utils.tensorboard", "torch.nn.parallel", "numpy", "PIL.Image", "PIL.PngImagePlugin", "yaml",
           "tqdm", "safetensors.torch", "tokenizers", "sentencepiece", "gguf", "transformers",
           "transformers.modeling_utils", "diffusers")
PRELOAD_ATTRS = {"transformers": ("AutoConfig", "AutoModel", "AutoTokenizer", "T5Config", "UMT5Config",
                                  "T5EncoderModel"),
                 "diffusers": ("AutoencoderKL", "DDPMScheduler", "DDIMScheduler", "UNet2DConditionModel")}
RUNTIME_PREFIXES = ("ELLA_", "PYTEST_", "TORCHELASTIC_")  # read when used, by code the child imports afresh
RUNTIME_NAMES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TOKENIZERS_PARALLELISM",
                 "PWD", "OLDPWD", "SHLVL", "_"}  # the last four: a shell's bookkeeping (`sh -c 'umask ...; exec'`)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
ZYGOTES = 2
_ENCODING = (sys.stdout or sys.__stdout__).encoding if (sys.stdout or sys.__stdout__) else "utf-8"  # the locale's


# ---------------------------------------------------------------- framing: 4-byte length + JSON
def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)


def _recv(sock: socket.socket, with_fds: bool = False):
    """(message or None at EOF, received descriptors)."""
    if with_fds:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 64)
    else:
        data, fds = sock.recv(1 << 16), []
    if not data:
        return None, fds
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        more = sock.recv(1 << 16)
        if not more:
            return None, fds
        data += more
    return json.loads(data[4:4 + struct.unpack("!I", data[:4])[0]]), fds


def env_difference(request: dict, zygote: dict) -> list[str]:
    """Variables, other than the runtime-read ones, in which the request's environment differs."""
    def runtime(name: str) -> bool:
        return name in RUNTIME_NAMES or name.startswith(RUNTIME_PREFIXES)

    return sorted(k for k in set(request) | set(zygote) if not runtime(k) and request.get(k) != zygote.get(k))


def parse_python_argv(args: list[str]):
    """Python's own command line -> (unbuffered, kind, target, rest) for the forms the zygote runs, or None."""
    unbuffered, i = False, 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        flag = args[i]
        if flag == "-u":
            unbuffered = True
        elif flag == "-m" and i + 1 < len(args):
            return unbuffered, "m", args[i + 1], args[i + 2:]
        else:
            return None
        i += 1
    if i >= len(args) or args[i] == "-":
        return None
    return unbuffered, "script", args[i], args[i + 1:]


# ---------------------------------------------------------------- the zygote
def serve(sock_path: str) -> None:
    """Bind first (callers queue on the socket while the libraries load), preload, then fork per request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(64)
    import importlib

    base_env = dict(os.environ)  # what requests are compared with: the environment before any import
    for name in PRELOAD:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            print(f"warm_python: not preloaded: {name} ({e})", flush=True)
            continue
        for attr in PRELOAD_ATTRS.get(name, ()):
            getattr(module, attr, None)
    set_by_imports = {k: v for k, v in os.environ.items() if k not in base_env}  # e.g. TORCHINDUCTOR_CACHE_DIR
    print(f"warm_python: ready, pid {os.getpid()}, {len(sys.modules)} modules", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
        while True:  # reap finished supervisors
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            return  # the test session ended (or died): so does the zygote
        if listener in ready:
            conn, _ = listener.accept()
            try:
                _handle(listener, conn, base_env, set_by_imports)
            except Exception as e:  # noqa: BLE001 - a bad request must not end the zygote
                print(f"warm_python: request failed: {e!r}", flush=True)


def _handle(listener: socket.socket, conn: socket.socket, base_env: dict, set_by_imports: dict) -> None:
    request, fds = _recv(conn, with_fds=True)
    try:
        if request is None:
            return
        difference = env_difference(request["env"], base_env)
        if difference:
            print(f"warm_python: cold {request['argv'][:3]}: environment differs in {difference[:5]}", flush=True)
            _send(conn, {"cold": f"environment differs in {difference[:5]}"})
            return
        request["env"] = {**set_by_imports, **request["env"]}  # as the imports would have set them in the child
        if os.fork() == 0:
            listener.close()
            _supervise(conn, request, fds)  # never returns
        print(f"warm_python: warm {request['argv'][:3]}", flush=True)
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _supervise(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Forks the child, tells the stand-in its pid, reports its exit status; kills it if the stand-in dies."""
    try:
        pid = os.fork()
        if pid == 0:
            _child(conn, request, fds)
        for fd in fds:
            os.close(fd)
        _send(conn, {"pid": pid})
        watch = os.pidfd_open(pid)
        while True:
            ready, _, _ = select.select([watch, conn], [], [])
            if watch in ready:
                _, status = os.waitpid(pid, 0)
                _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                break
            if not conn.recv(64):  # the stand-in is gone (e.g. SIGKILL): its child must not outlive it
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
    finally:
        os._exit(0)


def _stdio(fd: int, write: bool, unbuffered: bool, errors: str):
    import io

    try:
        os.fstat(fd)
    except OSError:
        return None
    if not write:
        return io.open(fd, "r", encoding=_ENCODING, closefd=False)
    raw = io.open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
    return io.TextIOWrapper(raw, encoding=_ENCODING, errors=errors, line_buffering=fd == 2 or os.isatty(fd),
                            write_through=unbuffered)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Becomes `python [-u] <script | -m module> args` as the stand-in was asked to."""
    code = 1
    try:
        conn.close()
        targets = request["fds"]
        staged = [os.dup(fd) for fd in fds]  # out of the way of the target numbers first
        for fd in fds:
            os.close(fd)
        for src, dst in zip(staged, targets):
            os.dup2(src, dst)
        for src in staged:
            if src not in targets:
                os.close(src)
        for fd in (0, 1, 2):  # the zygote's own stdin and log are no business of the child
            if fd not in targets:
                os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        try:
            os.setpgid(0, request["pgid"])  # the caller's process group, where its session allows
        except OSError:
            pass
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        unbuffered, kind, target, rest = parse_python_argv(request["argv"])
        sys.stdin = sys.__stdin__ = _stdio(0, False, unbuffered, "strict")
        sys.stdout = sys.__stdout__ = _stdio(1, True, unbuffered, "strict")
        sys.stderr = sys.__stderr__ = _stdio(2, True, unbuffered, "backslashreplace")
        sys.executable = request["executable"]  # what the child starts (torchrun's workers) is warm too
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # a fresh interpreter's global generator is seeded anew
        code = _run(kind, target, rest)
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote's loop
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _run(kind: str, target: str, rest: list[str]) -> int:
    """Runs the program in a new __main__, then finishes as the interpreter does: threads, atexit."""
    import atexit as child_atexit
    import runpy
    import threading
    import types

    sys.modules["__main__"] = types.ModuleType("__main__")  # an empty __main__, as at start-up
    code = 0
    try:
        if kind == "script":
            sys.argv = [target, *rest]
            sys.path[0] = os.path.dirname(os.path.realpath(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")  # runs it as the __main__ module
        else:
            sys.argv = ["-m", *rest]
            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(target, alter_argv=True)  # what `python -m` itself calls
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback, status 1, like python
        kind_, value, tb = sys.exc_info()
        tb = tb.tb_next
        while kind == "script" and tb is not None and tb.tb_frame.f_code.co_filename != target:
            tb = tb.tb_next  # runpy's frames: python's traceback starts at the script's
        sys.excepthook(kind_, value.with_traceback(tb), tb)
        code = 1
    threading._shutdown()
    child_atexit._run_exitfuncs()
    if code == -signal.SIGINT:  # python ends itself with SIGINT after an uncaught KeyboardInterrupt
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


# ---------------------------------------------------------------- the stand-in
def stand_in(socket_dir: str, executable: str, args: list[str]) -> None:
    """Runs `args` (a python command line) in a zygote's child, or execs the real interpreter."""
    def cold() -> None:
        os.execv(sys.executable, [sys.executable, *args])

    if parse_python_argv(args) is None:
        cold()
    pending: list[int] = []
    child = [0]

    def forward(sig, _frame):
        if child[0]:
            os.kill(child[0], sig)
        else:
            pending.append(sig)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(socket_dir, f"z{_next_zygote(socket_dir)}.sock"))
    except OSError:
        sock.close()
        cold()
    mine = sock.fileno()
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd != mine:
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                pass  # the listing's own descriptor, closed by now
    umask = os.umask(0)
    os.umask(umask)
    _send(sock, {"argv": args, "env": dict(os.environ), "cwd": os.getcwd(), "fds": fds, "pgid": os.getpgrp(),
                 "umask": umask, "executable": executable}, fds)
    answer, _ = _recv(sock)
    if answer is None or "cold" in answer:
        sock.close()
        cold()
    child[0] = answer["pid"]
    for sig in pending:
        os.kill(child[0], sig)
    for fd in fds:  # the child holds the caller's pipes now; keep none open here (EOF must reach readers)
        if fd > 2:
            os.close(fd)
    answer, _ = _recv(sock)
    status = 1 if answer is None else answer["exit"]
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status)


def _next_zygote(socket_dir: str) -> int:
    """Round robin over the zygotes (a counter file under a lock): consecutive launches alternate."""
    import fcntl

    with open(os.path.join(socket_dir, "counter"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0)
        f.seek(0)
        f.truncate()
        f.write(str(n + 1))
    return n % ZYGOTES


# ---------------------------------------------------------------- the tests' side
class _Zygotes:
    def __init__(self, env: dict) -> None:
        import subprocess

        self.dir = tempfile.mkdtemp(prefix="ella-warm-")
        self.log = open(os.path.join(self.dir, "zygotes.log"), "ab")
        self.procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve",
                                        os.path.join(self.dir, f"z{i}.sock")], stdin=subprocess.PIPE,
                                       stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
                      for i in range(ZYGOTES)]
        self.executable = os.path.join(self.dir, "python")
        with open(self.executable, "w") as f:
            f.write(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                    f"import warm_python\nwarm_python.stand_in({self.dir!r}, __file__, sys.argv[1:])\n")
        os.chmod(self.executable, 0o755)
        atexit.register(self.stop)

    def stop(self) -> None:
        import shutil

        for proc in self.procs:
            if proc.poll() is None:
                proc.stdin.close()  # EOF: the zygote returns from its loop
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                proc.kill()
        self.log.close()
        keep = os.environ.get("ELLA_TEST_WARM_LOG")  # where to append the zygotes' log (warm/cold per launch)
        if keep:
            with open(os.path.join(self.dir, "zygotes.log"), "rb") as src, open(keep, "ab") as dst:
                dst.write(src.read())
        shutil.rmtree(self.dir, ignore_errors=True)


_zygotes: _Zygotes | None = None


def interpreter(env: dict | None = None) -> str:
    """The warm stand-in for sys.executable (the zygotes start on the first call, with `env` or
    os.environ plus OMP_NUM_THREADS=1), or sys.executable itself when ELLA_TEST_COLD_PYTHON=1."""
    global _zygotes
    if os.environ.get("ELLA_TEST_COLD_PYTHON") == "1":
        return sys.executable
    if _zygotes is None:
        _zygotes = _Zygotes(env or {**os.environ, "OMP_NUM_THREADS": "1"})
    return _zygotes.executable


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])
