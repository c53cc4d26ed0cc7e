"""HTTP route for the web extension's live token count (web/js/ella_token_count.js).

POST /ella/tokenize  {"text", "model_name", "max_length", "token_mode", optional "ella_name"}
  -> {"total", "kept", "dropped", "dropped_text", "max_length", "mode", "notes"}
  With "ella_name" (a connector in models/ella), the connector's recorded token mode and length replace the
  given ones, as ELLA Prompt Encode does (ella_core.encoding_settings); "notes" then says what changed.
  -> 400/404/413 {"error": "..."} for bad input or an unknown encoder (never an exception out of the server)

The route must never stall ComfyUI (its event loop serves every other request, /prompt included):
- the body is size-capped and parsed defensively (deep nesting is a 400, not a RecursionError 500);
- tokenisation runs in this route's own small thread pool, so a burst of requests queues there instead of
  filling the loop's default executor; prompt handling is linear (ella_core.prompt_text) and the Rust
  tokenizer releases the GIL, so the loop keeps answering while a 100k-character prompt is counted;
- tokenizers load once per file however many requests arrive together, and a file that failed to load
  fails again immediately until it changes (ella_core.tokenization.TokenizerCache).
"""
from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import folder_paths
from aiohttp import web

from ..ella_core.checkpoint import read_ella_metadata
from ..ella_core.encoding_settings import EncodingSettings, settings_for_connector
from ..ella_core.prompt_text import PromptTextError, check_prompt_text
from ..ella_core.tokenization import MODES, TokenizerCache
from .folders import ELLA_FOLDER, resolve_text_encoder, where_to_put

log = logging.getLogger(__name__)
MAX_TEXT_CHARS = 100_000
MAX_BODY_BYTES = 2 << 20  # 100k characters as JSON escapes: at most 12 bytes each (an escaped surrogate pair)
MAX_LENGTH_LIMIT = 8192
_cache = TokenizerCache(size=4)
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ella-tokenize")


def cached_tokenizer(path: str):
    """The tokenizer of the encoder at `path`, loaded once (LRU of a few encoders, failures remembered)."""
    return _cache.get(path)


def _strict_int(value: object, name: str) -> int:
    """An integer, or an integral float (JSON has one number type); never a bool or 1.9 silently cut to 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{name}' must be an integer, got {json.dumps(value)[:40]}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"'{name}' must be a whole number, got {value}")
    return int(value)


def parse_request(body: object) -> tuple[str, str, int, str]:
    """(text, model_name, max_length, mode) from the JSON body; ValueError says what is wrong.
    (The optional "ella_name" is read by `connector_name`.)"""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    text, model_name = body.get("text", ""), body.get("model_name")
    mode = body.get("token_mode", "fixed")
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"'text' must be a string of at most {MAX_TEXT_CHARS} characters")
    check_prompt_text(text, "'text'")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("'model_name' must name a text encoder (the Load ELLA Text Encoder node's model_name)")
    if mode not in MODES:
        raise ValueError(f"'token_mode' must be one of {list(MODES)}, got {json.dumps(mode)[:40]}")
    max_length = _strict_int(body.get("max_length", 128), "max_length")
    if not 1 <= max_length <= MAX_LENGTH_LIMIT:
        raise ValueError(f"'max_length' must be between 1 and {MAX_LENGTH_LIMIT}, got {max_length}")
    return text, model_name, max_length, mode


def connector_name(body: dict) -> str | None:
    name = body.get("ella_name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError("'ella_name' must name a connector (the Load ELLA Connector node's ella_name)")
    return name


def parse_body(raw: bytes) -> object:
    """JSON of the request body; ValueError (never RecursionError) for anything that is not."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON body is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the body is not valid JSON: {e}") from None


def tokenize(text: str, model_name: str, max_length: int, mode: str, ella_name: str | None = None) -> dict:
    """Token count of `text` as ELLA Prompt Encode would see it (weight syntax stripped, special tokens included)."""
    notes: list[str] = []
    if ella_name is not None:
        path = folder_paths.get_full_path(ELLA_FOLDER, ella_name)
        if path is None:
            raise FileNotFoundError(f"ELLA connector '{ella_name}' not found: put it in {where_to_put(ELLA_FOLDER)}")
        settings, notes = settings_for_connector(read_ella_metadata(path), EncodingSettings(mode, max_length),
                                                 f"ELLA connector '{ella_name}'", f"text encoder '{model_name}'")
        mode, max_length = settings.mode, settings.max_length
    count = cached_tokenizer(resolve_text_encoder(model_name)).count_tokens(text, max_length=max_length, mode=mode)
    return {"total": count.total, "kept": count.kept, "dropped": count.dropped,
            "dropped_text": count.dropped_text, "max_length": max_length,  # a limit in both modes
            "mode": mode, "notes": notes}


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def tokenize_handler(request: web.Request) -> web.Response:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return _error(f"request body of {request.content_length} bytes is over the {MAX_BODY_BYTES}-byte limit", 413)
    chunks, size = [], 0
    while chunk := await request.content.read(1 << 16):  # chunked bodies carry no Content-Length
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return _error(f"request body is over the {MAX_BODY_BYTES}-byte limit", 413)
        chunks.append(chunk)
    try:
        body = parse_body(b"".join(chunks))
        text, model_name, max_length, mode = parse_request(body)
        ella_name = connector_name(body)
    except (ValueError, PromptTextError) as e:
        return _error(str(e), 400)
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(_pool, tokenize, text, model_name, max_length, mode, ella_name)
    except FileNotFoundError as e:
        return _error(str(e), 404)
    except Exception as e:  # a broken tokenizer file must not take the server down
        log.warning("ELLA tokenize failed for %s: %s", model_name, e)
        return _error(f"could not tokenize with '{model_name}': {e}", 500)
    return web.json_response(result)


def register_routes() -> None:
    """Add the route to ComfyUI's server; called from the pack's __init__ (no-op outside a server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    instance.routes.post("/ella/tokenize")(tokenize_handler)
