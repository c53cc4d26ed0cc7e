"""Start a REAL ComfyUI server with this pack installed, queue prompts over HTTP, read results.

    with ComfyServer(base_dir, extra_packs=[...]) as server:   # base_dir/models filled by tiny_models
        result = server.run(prompt)          # POST /prompt, wait for /history; raises PromptFailed on error
        png = server.view(result.images[0])

The server is `python $COMFYUI_PATH/main.py --cpu --listen 127.0.0.1 --port <free> --base-directory <base>
--database-url sqlite:///:memory: --disable-auto-launch --disable-api-nodes`, with this repository symlinked
into `<base>/custom_nodes/<repo folder name>` (the folder name is whatever the checkout is called) and any
`extra_packs` (test-only node packs) symlinked beside it. Its log goes to `<base>/comfyui.log`; errors
raised here quote the log's tail so a failing test shows why.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from devtools.tiny_models import comfyui_path

REPO_ROOT = Path(__file__).resolve().parents[2]


class PromptFailed(RuntimeError):
    """A prompt was rejected by validation or failed during execution; `.detail` holds ComfyUI's answer."""

    def __init__(self, message: str, detail: Any) -> None:
        super().__init__(message)
        self.detail = detail


@dataclass
class PromptResult:
    prompt_id: str
    history: dict  # the /history/<id> entry: outputs, status, meta
    images: list[dict] = field(default_factory=list)  # {"filename", "subfolder", "type"} of every image output

    def outputs(self, node_id: str) -> dict:
        return self.history.get("outputs", {}).get(str(node_id), {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI subprocess bound to a free local port, with this pack (and optional test packs) installed."""

    def __init__(self, base_dir: Path, *, extra_packs: Iterable[Path] = (), port: Optional[int] = None,
                 extra_args: Iterable[str] = (), env: Optional[dict] = None, python: Optional[str] = None,
                 startup_timeout: float = 120.0) -> None:
        self.base_dir = Path(base_dir)
        self.extra_packs = [Path(p) for p in extra_packs]
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.python = python or os.environ.get("ELLA_PYTHON") or sys.executable
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life cycle ---------------------------------------------------------------------------------------
    def _install_packs(self) -> None:
        custom = self.base_dir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        for pack in [REPO_ROOT, *self.extra_packs]:
            link = custom / pack.name
            if link.is_symlink() or link.exists():
                if link.resolve() == pack.resolve():
                    continue
                link.unlink()
            link.symlink_to(pack.resolve(), target_is_directory=True)

    def start(self) -> "ComfyServer":
        for sub in ("models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        self._install_packs()
        cmd = [self.python, str(comfyui_path() / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes",
               *self.extra_args]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # the test machines are small and shared
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(self.base_dir), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during start-up\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout}s\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- HTTP ---------------------------------------------------------------------------------------------
    def _request(self, path: str, data: Optional[dict] = None, timeout: float = 30) -> bytes:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str, timeout: float = 30) -> Any:
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, data: dict, timeout: float = 30) -> Any:
        return json.loads(self._request(path, data, timeout=timeout))

    def object_info(self, node_class: Optional[str] = None) -> dict:
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise PromptFailed with ComfyUI's answer."""
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)
            except ValueError:
                pass
            raise PromptFailed(f"prompt rejected (HTTP {e.code}): {json.dumps(detail)[:3000]}", detail) from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history until the prompt finished; returns its history entry (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}")
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s\n{self.log_tail()}")

    @staticmethod
    def execution_error(entry: dict) -> Optional[dict]:
        """The `execution_error` message of a failed history entry (node_type, exception_message, ...)."""
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                return data
        return None

    def run(self, prompt: dict, timeout: float = 300, expect_error: bool = False) -> PromptResult:
        """Queue and wait. Raises PromptFailed when it fails (unless expect_error, which returns it)."""
        prompt_id = self.queue(prompt)
        entry = self.wait(prompt_id, timeout)
        failed = entry["status"].get("status_str") != "success"
        if failed and not expect_error:
            err = self.execution_error(entry) or {}
            raise PromptFailed(f"prompt failed in {err.get('node_type')}: {err.get('exception_message')}\n"
                               f"{''.join(err.get('traceback', []))[-3000:]}", entry)
        images = [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]
        return PromptResult(prompt_id, entry, images)

    def view(self, image: dict) -> bytes:
        """Bytes of an output image (an item of PromptResult.images) via /view."""
        return self._request("/view?" + urllib.parse.urlencode(image))
