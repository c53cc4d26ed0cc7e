#!/usr/bin/env python3
"""Run an example workflow end to end in a real ComfyUI and print the saved image's path.

Called by scripts/run_example.sh after the environment is set up. Steps: pick the base directory (a private one
next to the offline ComfyUI copy, or the user's own ComfyUI), link the pack into its custom_nodes, find the real
weights or build offline stand-ins (and say so), start the server, convert the UI workflow to an API prompt,
queue it over HTTP, wait, stop the server.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from workflow_to_prompt import fetch_object_info, set_model_files, workflow_to_prompt  # noqa: E402

PACK_LINK_NAME = "ella-tsc"
REAL_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
REAL_ELLA = "ella-sd1.5-tsc-t5xl.safetensors"
REAL_T5 = "flan-t5-xl-encoder-fp16.safetensors"  # what the examples select (single file, fp16 encoder)
REAL_T5_FOLDER = "flan-t5-xl"  # the same encoder as a Hugging Face folder, also accepted
DEFAULT_WORKFLOW = "ELLA text to image (SD1.5).json"
OFFLINE_CKPT = "ella-offline-tiny-sd15.safetensors"
OFFLINE_ELLA = "ella-offline-random-smollm2.safetensors"
BANNER = "=" * 78


def log(msg: str) -> None:
    print(f"[run_example] {msg}", flush=True)


def loud(lines: list[str]) -> None:
    print("\n".join([BANNER] + [f"!! {line}" for line in lines] + [BANNER]), flush=True)


# ---- where things live --------------------------------------------------------------------------------------
def is_ella_tsc_checkout(path: Path) -> bool:
    """True when `path` is a copy of this pack (any clone): its pyproject.toml's [project] name is ella-tsc."""
    try:
        project = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return project.get("name") == PACK_LINK_NAME


def link_pack(custom_nodes: Path) -> Path:
    """Make custom_nodes/ella-tsc a symlink to this checkout; returns the entry ComfyUI will load.

    Re-runs and other clones are normal: a symlink named ella-tsc that dangles (its clone was deleted) or points
    at another clone of this pack is replaced. Anything else under that name (a real folder, a link to some
    other project) is the user's and is never touched; neither is any other entry, such as the reference pack
    at custom_nodes/comfyui-ella.
    """
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink():
        target = Path(os.path.realpath(link))
        if target == ROOT:
            return link
        if target.exists() and not is_ella_tsc_checkout(target):
            raise SystemExit(f"{link} links to {target}, which is not a copy of this pack; move it away or link "
                             f"the pack ({ROOT}) yourself")
        link.unlink()
        log(f"replaced {link} (it pointed at {'another clone, ' if target.exists() else 'a deleted clone, '}"
            f"{target})")
    elif link.exists():
        if link.resolve() == ROOT:
            return link
        raise SystemExit(f"{link} exists and is not a link to this checkout ({ROOT}); move it away or link the "
                         f"pack yourself")
    for entry in custom_nodes.iterdir():  # installed under another name already: loading it twice would clash
        if entry.resolve() == ROOT:
            return entry
    link.symlink_to(ROOT, target_is_directory=True)
    log(f"linked the pack into {link}")
    return link


def find_real_weights(models: Path, ckpt: str) -> dict[str, str | None]:
    """Names of the real weights found in `models` (None where missing)."""
    t5 = None
    for folder in ("text_encoders", "LLM"):
        if (models / folder / REAL_T5).is_file():
            t5 = REAL_T5
        elif t5 is None and (models / folder / REAL_T5_FOLDER / "config.json").is_file():
            t5 = REAL_T5_FOLDER
    return {
        "ckpt": ckpt if (models / "checkpoints" / ckpt).is_file() else None,
        "ella": REAL_ELLA if (models / "ella" / REAL_ELLA).is_file() else None,
        "text_encoder": t5,
    }


def build_offline_models(models: Path, need_ckpt: bool, need_ella: bool) -> dict[str, str]:
    """Write offline stand-ins into `models`: tiny random SD1.5 UNet + TAESD, SmolLM2 + random connector."""
    import torch

    names = {}
    torch.manual_seed(0)
    if need_ckpt:
        sys.path.insert(0, str(ROOT))
        from devtools.tiny_models import write_tiny_sd15_checkpoint  # the builder the tests use too

        if not (models / "checkpoints" / OFFLINE_CKPT).is_file():
            write_tiny_sd15_checkpoint(models, name=OFFLINE_CKPT)
        names["ckpt"] = OFFLINE_CKPT
    if need_ella:
        sys.path.insert(0, str(ROOT))
        from ella_core import ELLA, ELLAConfig, save_ella

        gguf = os.environ.get("ELLA_SMOLLM2_GGUF", "")
        if not Path(gguf).is_file():
            raise SystemExit("ELLA_SMOLLM2_GGUF does not point at the SmolLM2 GGUF; run scripts/setup_env.sh")
        llm_dir = models / "LLM"
        llm_dir.mkdir(parents=True, exist_ok=True)
        llm_link = llm_dir / Path(gguf).name
        if not llm_link.exists():
            llm_link.symlink_to(gguf)
        path = models / "ella" / OFFLINE_ELLA
        if not path.is_file():
            save_ella(ELLA(ELLAConfig(input_dim=576)), path, {
                "base_model": "sd15", "llm": "SmolLM2-135M-Instruct", "token_length": 128, "token_mode": "fixed",
                "extra": {"note": "randomly initialised offline stand-in: not a trained connector"}})
        names["ella"] = OFFLINE_ELLA
        names["text_encoder"] = llm_link.name
    return names


# ---- the server -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 30.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        raise SystemExit(f"{url} answered HTTP {e.code}: {body[:4000]}") from None


def start_server(comfy: Path, port: int, base: Path | None, log_path: Path) -> subprocess.Popen:
    import torch

    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch"]
    if not torch.cuda.is_available():
        cmd.append("--cpu")
    if base is not None:
        cmd += ["--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    log(f"starting ComfyUI: {' '.join(cmd[1:])} (log: {log_path})")
    logf = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=comfy, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 300.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"ComfyUI exited with {proc.returncode}; last log lines:\n" + tail(log_path))
        try:
            urllib.request.urlopen(url + "/system_stats", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"ComfyUI did not answer within {timeout:.0f} s; log:\n" + tail(log_path))


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def queue_and_wait(url: str, prompt: dict, timeout: float) -> dict:
    """POST /prompt, poll /history until done; returns the history entry. Exits with the server's error."""
    client_id = uuid.uuid4().hex
    answer = http_json(url + "/prompt", {"prompt": prompt, "client_id": client_id})
    prompt_id = answer["prompt_id"]
    log(f"queued prompt {prompt_id}")
    end = time.time() + timeout
    while time.time() < end:
        hist = http_json(f"{url}/history/{prompt_id}")
        if prompt_id in hist:
            entry = hist[prompt_id]
            status = entry.get("status", {})
            if status.get("status_str") == "error" or not status.get("completed", True):
                msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                raise SystemExit("the workflow failed: " + json.dumps(msgs, indent=1)[:4000])
            return entry
        time.sleep(0.5)
    raise SystemExit(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


# ---- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default=str(ROOT / "example_workflows" / DEFAULT_WORKFLOW))
    ap.add_argument("--user-comfyui", help="the user's own ComfyUI: link the pack into its custom_nodes")
    ap.add_argument("--base-directory", help="private ComfyUI base directory (default: $ELLA_ENV/demo)")
    ap.add_argument("--ckpt", default=REAL_CKPT, help="SD1.5 checkpoint in models/checkpoints")
    ap.add_argument("--prompt", help="replace the positive prompt")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the workflow's; 8 offline)")
    ap.add_argument("--size", type=int, help="image width and height (default: the workflow's; 128 offline)")
    ap.add_argument("--seed", type=int, help="sampling seed (default: the workflow's)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the image")
    args = ap.parse_args(argv)

    comfy = Path(args.user_comfyui or os.environ.get("COMFYUI_PATH", "")).expanduser()
    if not (comfy / "main.py").is_file():
        raise SystemExit(f"no ComfyUI at '{comfy}' (main.py missing); run via scripts/run_example.sh")
    if args.user_comfyui:
        base, models, output = None, comfy / "models", comfy / "output"
    else:
        env = Path(os.environ.get("ELLA_ENV", Path.home() / ".cache" / "comfyui-ella"))
        base = Path(args.base_directory or env / "demo").resolve()
        models, output = base / "models", base / "output"
        for sub in ("checkpoints", "ella", "text_encoders", "LLM", "vae", "loras", "controlnet"):
            (models / sub).mkdir(parents=True, exist_ok=True)
        (base / "input").mkdir(parents=True, exist_ok=True)
        if (comfy / "input" / "example.png").is_file() and not (base / "input" / "example.png").exists():
            shutil.copy(comfy / "input" / "example.png", base / "input" / "example.png")

    found = find_real_weights(models, args.ckpt)
    need_ckpt = found["ckpt"] is None
    need_ella = found["ella"] is None or found["text_encoder"] is None
    names = {k: v for k, v in found.items() if v}
    if need_ckpt or need_ella:
        if args.user_comfyui:
            raise SystemExit(
                "real weights missing in " + str(models) + ": "
                + ", ".join(k for k in ("ckpt", "ella", "text_encoder") if found[k] is None)
                + ". Offline stand-ins are only written into the private base directory: run without "
                  "COMFYUI_PATH, or download the weights (docs/workflows.md).")
        offline = build_offline_models(models, need_ckpt, need_ella)
        names.update(offline)
        lines = ["OFFLINE DEMO: real weights not found, using stand-ins. The image will be NOISE, not a picture."]
        if need_ckpt:
            lines.append(f"checkpoint: models/checkpoints/{args.ckpt} missing -> tiny random SD1.5 UNet + TAESD")
        if need_ella:
            lines.append(f"ELLA: models/ella/{REAL_ELLA} or models/text_encoders/{REAL_T5} missing ->")
            lines.append("      SmolLM2-135M-Instruct (real LLM, GGUF) + RANDOM connector (input_dim=576)")
        lines.append("Get the real weights: docs/workflows.md. Models folder: " + str(models))
        loud(lines)
        args.steps = args.steps or 8
        args.size = args.size or 128
    else:
        log(f"real weights: {names}")
    link_pack(comfy / "custom_nodes" if args.user_comfyui else base / "custom_nodes")

    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = base if base is not None else Path(os.environ.get("ELLA_ENV", "/tmp")) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "comfyui-run_example.log"
    proc = start_server(comfy, port, base, log_path)
    try:
        wait_ready(url, proc, log_path)
        info = fetch_object_info(url)
        if "EllaTSCEncode" not in info:
            raise SystemExit("the server did not load the ELLA nodes; log:\n" + tail(log_path, 80))
        prompt = workflow_to_prompt(workflow, info)
        set_model_files(prompt, names)
        for node in prompt.values():
            inputs, ctype = node["inputs"], node["class_type"]
            if ctype == "EmptyLatentImage" and args.size:
                inputs["width"] = inputs["height"] = args.size
            elif ctype == "KSampler":
                inputs["steps"] = args.steps or inputs["steps"]
                inputs["seed"] = args.seed if args.seed is not None else inputs["seed"]
            elif ctype == "EllaTSCEncode" and args.prompt and inputs.get("text"):
                inputs["text"] = args.prompt
        if args.prompt:
            log(f"prompt: {args.prompt}")
        t0 = time.time()
        entry = queue_and_wait(url, prompt, args.timeout)
        images = [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])
                  if img.get("type") == "output"]
        if not images:
            raise SystemExit("the workflow finished but saved no image")
        for img in images:
            path = output / img.get("subfolder", "") / img["filename"]
            if not path.is_file():
                raise SystemExit(f"the server reported {path} but it is not there")
        log(f"done in {time.time() - t0:.1f} s")
        for img in images:
            print(output / img.get("subfolder", "") / img["filename"], flush=True)
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
