"""HTTP route for the web extension's live token count (web/js/ella_token_count.js).

POST /ella/tokenize  {"text", "model_name", "max_length", "token_mode"}
  -> {"total", "kept", "dropped", "dropped_text", "max_length", "mode"}
  -> 400/404 {"error": "..."} for bad input or an unknown encoder (never an exception out of the server)

Only the tokenizer is loaded (not the model), in a worker thread, and kept in a small cache: typing in the
prompt box costs one tokenisation per debounced request.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict

from aiohttp import web

from ..ella_core.tokenization import load_tokenizer
from .folders import resolve_text_encoder

log = logging.getLogger(__name__)
MAX_TEXT_CHARS = 100_000
MAX_LENGTH_LIMIT = 8192
_CACHE_SIZE = 4
_cache: "OrderedDict[str, object]" = OrderedDict()
_cache_lock = threading.Lock()


def cached_tokenizer(path: str):
    """The tokenizer of the encoder at `path`, loaded once (LRU of a few encoders)."""
    with _cache_lock:
        if path in _cache:
            _cache.move_to_end(path)
            return _cache[path]
    tokenizer = load_tokenizer(path)
    with _cache_lock:
        _cache[path] = tokenizer
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return tokenizer


def parse_request(body: object) -> tuple[str, str, int, str]:
    """(text, model_name, max_length, mode) from the JSON body; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    text, model_name = body.get("text", ""), body.get("model_name")
    mode = body.get("token_mode", "fixed")
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"'text' must be a string of at most {MAX_TEXT_CHARS} characters")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("'model_name' must name a text encoder (the Load ELLA Text Encoder node's model_name)")
    if mode not in ("fixed", "flexible"):
        raise ValueError(f"'token_mode' must be 'fixed' or 'flexible', got {mode!r}")
    try:
        max_length = int(body.get("max_length", 128))
    except (TypeError, ValueError):
        raise ValueError(f"'max_length' must be an integer, got {body.get('max_length')!r}") from None
    if not 1 <= max_length <= MAX_LENGTH_LIMIT:
        raise ValueError(f"'max_length' must be between 1 and {MAX_LENGTH_LIMIT}, got {max_length}")
    return text, model_name, max_length, mode


def tokenize(text: str, model_name: str, max_length: int, mode: str) -> dict:
    """Token count of `text` as ELLA Prompt Encode would see it (weight syntax stripped, special tokens included)."""
    count = cached_tokenizer(resolve_text_encoder(model_name)).count_tokens(text, max_length=max_length, mode=mode)
    return {"total": count.total, "kept": count.kept, "dropped": count.dropped,
            "dropped_text": count.dropped_text, "max_length": max_length,  # a limit in both modes
            "mode": mode}


async def tokenize_handler(request: web.Request) -> web.Response:
    try:
        text, model_name, max_length, mode = parse_request(await request.json())
    except ValueError as e:  # includes JSON decode errors
        return web.json_response({"error": str(e)}, status=400)
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(None, tokenize, text, model_name, max_length, mode)
    except FileNotFoundError as e:
        return web.json_response({"error": str(e)}, status=404)
    except Exception as e:  # a broken tokenizer file must not take the server down
        log.warning("ELLA tokenize failed for %s: %s", model_name, e)
        return web.json_response({"error": f"could not tokenize with '{model_name}': {e}"}, status=500)
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
