"""The real ComfyUI frontend, in headless Debian chromium, with this pack loaded by a real server.

- every example workflow loads with all node types registered and every link intact, its widgets serialise
  back unchanged, and the frontend's own UI -> API conversion equals scripts/workflow_to_prompt.py's;
- the web extension shows a live token count on ELLA Prompt Encode, equal to the tokenizer's own count, and the
  over-limit warning (with the truncated words) for a long prompt;
- the /ella/tokenize route answers bad requests with 4xx and a message, never a server error.

The browser is driven by check_workflows.mjs (playwright-core from $ELLA_NODE_MODULES, executablePath
/usr/bin/chromium); it never downloads a browser. The screenshot lands in the test's tmp folder (path printed).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.support.comfy_server import ComfyServer
from devtools.tiny_models import t5_tokenizer_dir, write_all, write_tiny_ella
from tests.workflows.examples import example_files, write_input_image  # puts scripts/ on sys.path

from workflow_to_prompt import workflow_to_prompt  # noqa: E402  (scripts/)

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
SHORT_PROMPT = "a red fox sitting in a snowy birch forest"
LONG_PROMPT = " ".join(f"word{i} in a very long prompt about a castle" for i in range(40)) + " FINAL_TAIL_WORDS"
MAX_LENGTH = 128  # the examples' Load ELLA Text Encoder max_length


def _need_browser() -> str:
    modules = os.environ.get("ELLA_NODE_MODULES", "")
    if not (Path(modules) / "playwright-core").is_dir():
        pytest.fail("ELLA_NODE_MODULES has no playwright-core: run eval \"$(bash scripts/setup_env.sh)\"")
    if not Path(CHROMIUM).is_file() or shutil.which("node") is None:
        pytest.fail(f"{CHROMIUM} and node are needed for the frontend test (scripts/setup_env.sh installs them)")
    return modules


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-frontend")
    tiny = write_all(base / "models")
    # A connector's recorded token length wins over the loader's widget (the counter sends ella_name): record
    # the examples' max_length, so the counts below are against MAX_LENGTH.
    write_tiny_ella(base / "models", token_length=MAX_LENGTH)
    write_input_image(base / "input" / "example.png")
    # First-run and missing-model dialogs would cover the canvas in the screenshot.
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True,
                                    "Comfy.Workflow.ShowMissingModelsWarning": False}))
    srv = ComfyServer(base)
    srv.start()
    srv.tiny = tiny
    try:
        yield srv
    finally:
        srv.stop()


def _post(server: ComfyServer, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"{}")
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}


def reference_count(text: str) -> int:
    """Tokens of the tiny T5 folder's tokenizer (ComfyUI's T5 sentencepiece), EOS included."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(t5_tokenizer_dir()))(text)["input_ids"])


def test_tokenize_route(server):
    name = server.tiny.text_encoder
    status, short = _post(server, "/ella/tokenize", {"text": SHORT_PROMPT, "model_name": name, "max_length": 128})
    assert status != 405, "POST /ella/tokenize is not registered: the pack's __init__ must call register_routes()"
    assert status == 200, short
    assert short["total"] == reference_count(SHORT_PROMPT) and short["dropped"] == 0 and short["dropped_text"] == ""
    status, long = _post(server, "/api/ella/tokenize", {"text": LONG_PROMPT, "model_name": name, "max_length": 128})
    assert status == 200, long
    assert long["total"] == reference_count(LONG_PROMPT) > 128
    assert long["kept"] == 128 and long["dropped"] == long["total"] - 128
    assert long["dropped_text"].endswith("FINAL_TAIL_WORDS") and len(long["dropped_text"]) < len(LONG_PROMPT)
    status, flex = _post(server, "/ella/tokenize", {"text": LONG_PROMPT, "model_name": name, "max_length": 128,
                                                    "token_mode": "flexible"})
    # flexible mode truncates at max_length too (it only skips the padding)
    assert status == 200 and {k: flex[k] for k in ("total", "kept", "dropped", "dropped_text")} == {
        k: long[k] for k in ("total", "kept", "dropped", "dropped_text")}, flex
    # Weighting syntax is stripped before counting, as ELLA Prompt Encode does.
    _, weighted = _post(server, "/ella/tokenize", {"text": "(a red fox:1.3) sitting", "model_name": name})
    assert weighted["total"] == reference_count("a red fox sitting")
    # Bad requests: clear 4xx answers, and the server keeps serving.
    assert _post(server, "/ella/tokenize", {"text": "x", "model_name": "nope"})[0] == 404
    status, err = _post(server, "/ella/tokenize", {"text": "x", "model_name": name, "max_length": "many"})
    assert status == 400 and "max_length" in err["error"]
    assert _post(server, "/ella/tokenize", b"not json")[0] == 400
    assert _post(server, "/ella/tokenize", {"text": "x", "model_name": "../../../etc"})[0] == 404
    assert server.get_json("/system_stats")


def test_template_browser_lists_examples(server):
    """ComfyUI serves example_workflows/ to the template browser, each example once."""
    pack = next((server.base_dir / "custom_nodes").iterdir()).name
    listed = server.get_json("/workflow_templates")[pack]
    assert sorted(listed) == sorted(p.stem for p in example_files()), listed
    for name in listed:
        served = server.get_json(f"/api/workflow_templates/{pack}/{urllib.parse.quote(name)}.json")
        assert served == json.loads((example_files()[0].parent / f"{name}.json").read_text())


def test_examples_and_token_count_in_browser(server, tmp_path):
    modules = _need_browser()
    workflows = {p.stem: str(p) for p in example_files()}
    config = {
        "server": server.url, "workflows": workflows, "token_workflow": "ELLA text to image (SD1.5)",
        "user_data_dir": str(tmp_path / "chromium-profile"), "screenshot": str(tmp_path / "ella_encode.png"),
        "text_encoder_name": server.tiny.text_encoder, "connector_name": server.tiny.ella, "short_prompt": SHORT_PROMPT, "long_prompt": LONG_PROMPT,
        "out": str(tmp_path / "report.json"),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = dict(os.environ, ELLA_NODE_MODULES=modules)
    proc = subprocess.run(["node", str(HERE / "check_workflows.mjs"), str(tmp_path / "config.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert Path(config["out"]).is_file(), f"node script wrote no report:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(Path(config["out"]).read_text())
    assert "fatal" not in report, report.get("fatal")
    print(f"screenshot: {config['screenshot']}")
    assert "ELLA.TokenCount" in report["extensions"], report["extensions"]
    assert not report["page_errors"], report["page_errors"]
    ours = [e for e in report["http_errors"] if "/ella/" in e or "/extensions/" in e or "example.png" in e]
    assert not ours, ours

    object_info = server.object_info()
    for name, path in workflows.items():
        wf = json.loads(Path(path).read_text())
        seen = report["workflows"][name]
        assert seen["problems"] == [], f"{name}: {seen['problems']}"
        assert seen["node_count"] == len(wf["nodes"]) and seen["link_count"] == len(wf["links"]), name
        # Saved back by the frontend, every node is what the file says: the files are in 1.32.9's own format.
        saved = {n["id"]: n for n in seen["nodes"]}
        for node in wf["nodes"]:
            for key in ("type", "mode", "inputs", "outputs", "widgets_values", "properties", "title"):
                assert saved[node["id"]].get(key) == node.get(key), (
                    f"{name}: node {node['id']} ({node['type']}) '{key}' changed when the frontend saved it:\n"
                    f"file:     {node.get(key)}\nfrontend: {saved[node['id']].get(key)}")
        assert seen["extra"]["frontendVersion"] == wf["extra"]["frontendVersion"]
        assert sorted(map(tuple, seen["links"])) == sorted(map(tuple, wf["links"])), name
        ours = workflow_to_prompt(wf, object_info)
        theirs = seen["api_prompt"]
        assert set(ours) == set(theirs), f"{name}: node sets differ"
        for node_id, entry in ours.items():
            assert entry["class_type"] == theirs[node_id]["class_type"]
            assert entry["inputs"] == theirs[node_id]["inputs"], (
                f"{name}: node {node_id} ({entry['class_type']}): ours {entry['inputs']} vs frontend's "
                f"{theirs[node_id]['inputs']}")

    # While the first tokenizer loads (answers held back 1.5 s), every counter says so; none ever claims that no
    # text encoder is connected, and each ends on the count.
    states = report["tokens"]["first_load"]
    counters = sorted({s["el"] for s in states})
    assert len(counters) == 2, states  # positive and negative prompt
    for i in counters:
        seq = [s for s in states if s["el"] == i]
        kinds = [s["state"] for s in seq]
        assert "unconnected" not in kinds and "error" not in kinds, seq
        assert kinds[-1] == "ok" and "pending" in kinds[:-1], seq
        assert any(f"loading the tokenizer of {server.tiny.text_encoder}" in s["text"] for s in seq
                   if s["state"] == "pending"), seq

    # Each count names the connector wired into the node, so its recorded token settings apply (nodes/routes.py).
    bodies = report["tokens"]["request_bodies"]
    assert bodies and all(b.get("ella_name") == server.tiny.ella for b in bodies), bodies

    short, long = report["tokens"]["short"], report["tokens"]["long"]
    assert short["info"]["total"] == reference_count(SHORT_PROMPT) and short["over"] == "0", short
    assert f"{short['info']['total']} / {MAX_LENGTH} tokens" in short["dom_text"] and short["visible"], short
    assert long["info"]["total"] == reference_count(LONG_PROMPT) and long["info"]["dropped"] > 0, long
    assert long["over"] == "1" and "over the limit" in long["dom_text"], long
    assert f"{long['info']['dropped']} tokens truncated" in long["dom_text"]
    assert "FINAL_TAIL_WORDS" in long["info"]["dropped_text"]
    # The warning wraps and the node grows: its text fits its box, and the box fits in the node.
    assert long["state"] == "over" and long["client_height"] > 22, long
    assert long["scroll_height"] <= long["client_height"] + 1, long
    assert long["widget_bottom"] <= long["node_height"] + 1, long
    # The display widget is never saved: ELLA Prompt Encode serialises [text, clip_weight, weighting].
    assert report["tokens"]["serialized"] == [LONG_PROMPT, 1.0, "strip"], report["tokens"]["serialized"]
    assert Path(config["screenshot"]).stat().st_size > 10_000


# ---- what a new user sees: template browser, Missing Models dialog, node search ------------------------------
PACK_DIR = "ella-tsc"  # the folder name a registry or git install gives the pack (the template browser's label)
# Every file the examples' loaders select, as "<folder> / <file>" (the Missing Models dialog's labels).
MAIN_FILES = {"checkpoints / v1-5-pruned-emaonly-fp16.safetensors", "ella / ella-sd1.5-tsc-t5xl.safetensors",
              "text_encoders / flan-t5-xl-encoder-fp16.safetensors"}
CONTROLNET_FILE = "controlnet / control_v11p_sd15_canny_fp16.safetensors"


class InstalledPackServer(ComfyServer):
    """A real server with the pack installed as custom_nodes/ella-tsc (the name users get), nothing else."""

    def _install_packs(self) -> None:
        custom = self.base_dir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        (custom / PACK_DIR).symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)


@pytest.fixture(scope="module")
def empty_models_server(tmp_path_factory):
    """No model files at all, default settings (Missing Models warning on) but the first-run tutorial done."""
    base = tmp_path_factory.mktemp("comfy-new-user")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    srv = InstalledPackServer(base)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_template_browser_missing_models_and_search(empty_models_server, tmp_path):
    modules = _need_browser()
    workflows = {p.stem: str(p) for p in example_files()}
    first = "ELLA text to image (SD1.5)"
    config = {
        "server": empty_models_server.url, "pack": PACK_DIR, "workflows": workflows, "first": first,
        "searches": ["T5", "LLM"], "user_data_dir": str(tmp_path / "chromium-profile"),
        "templates_png": str(tmp_path / "template_browser.png"), "missing_png": str(tmp_path / "missing_models.png"),
        "out": str(tmp_path / "report.json"),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(["node", str(HERE / "check_templates.mjs"), str(tmp_path / "config.json")],
                          env=dict(os.environ, ELLA_NODE_MODULES=modules), capture_output=True, text=True,
                          timeout=400)
    assert Path(config["out"]).is_file(), f"node script wrote no report:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(Path(config["out"]).read_text())
    assert "fatal" not in report, report.get("fatal")
    print(f"screenshots: {config['templates_png']} {config['missing_png']}")
    keep = os.environ.get("ELLA_SCREENSHOT_DIR")  # e.g. docs/img, to refresh the pictures in docs/workflows.md
    if keep:
        for key in ("templates_png", "missing_png"):
            shutil.copy(config[key], Path(keep) / Path(config[key]).name)
    assert not report["page_errors"], report["page_errors"]

    # Template browser: one card per example, titled by its (readable) name, its thumbnail served and shown.
    cards = {c["id"]: c for c in report["cards"]}
    assert set(cards) == set(workflows), sorted(cards)
    for name, card in cards.items():
        assert card["lines"][0] == name and " " in name and "_" not in name and name.startswith("ELLA"), card
        assert report["thumbnails"].get(name) == {"status": 200, "type": "image/jpeg"}, (name, report["thumbnails"])
        with Image.open(Path(workflows[name]).with_suffix(".jpg")) as img:
            assert img.format == "JPEG" and img.size[0] == img.size[1] >= 256, (name, img.size)
            width = img.size[0]
        # The card shows it (the frontend loads it into a blob: URL), not its 224-pixel placeholder.
        assert [i["width"] for i in card["images"]] == [width], card
        assert not any("default-template" in i["src"] for i in card["images"]), card

    # Missing Models: every example offers every file its loaders select, each with an enabled Download.
    assert set(report["missing"]) == set(workflows)
    for name, rows in report["missing"].items():
        labels = {r["label"] for r in rows}
        expected = MAIN_FILES | ({CONTROLNET_FILE} if "ControlNet" in name else set())
        assert labels == expected, (name, rows)
        assert all(r["error"] is None and r["download_enabled"] for r in rows), (name, rows)

    # Search: "T5" and "LLM" both list the loader, and picking it adds an EllaTSCTextEncoderLoader.
    for query, seen in report["search"].items():
        assert any("Load ELLA Text Encoder (T5 / LLM)" in o for o in seen["options"]), (query, seen)
        assert seen["added"] == ["EllaTSCTextEncoderLoader"], (query, seen)
