"""Prompt -> token ids the way ELLA's connector expects them, with truncation reported, not hidden.

Modes:
- "fixed": truncate and pad to `max_length` (default 128), as the released connector was trained; the
  attention mask goes to the LLM and every position (padding included) goes on to the connector.
- "flexible": no padding; truncated to `max_length` like fixed mode (so no prompt grows the LLM's input
  without bound), but a shorter prompt keeps its own length.
Special tokens are the tokenizer's own: T5 appends EOS (no BOS), decoders add BOS where their tokenizer does.
Every prompt yields at least one token (T5 "" -> EOS; a decoder's "" -> its BOS, else EOS), so the
reference negative prompt "" encodes like the reference.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .gguf_check import check_gguf_file
from .llm_loading import TextEncoderError, family_of, load_hf_tokenizer, read_config_json, tokenizer_location
from .prompt_text import strip_weight_syntax

MODES = ("fixed", "flexible")


@dataclass(frozen=True)
class TokenCount:
    total: int  # tokens the prompt needs, special tokens included
    kept: int  # tokens that reach the LLM (== total unless truncated at max_length, in either mode)
    dropped: int  # total - kept
    dropped_text: str  # the end of the (weight-syntax-stripped) prompt that was cut off, "" if none


def check_mode(mode: str, max_length: int) -> None:
    if mode not in MODES:
        raise ValueError(f"token mode must be one of {MODES}, got {mode!r}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")


class PromptTokenizer:
    """A transformers tokenizer plus ELLA's rules: weight-syntax stripping, at least one token, padding."""

    def __init__(self, tokenizer: Any, family: str) -> None:
        self.tokenizer = tokenizer
        self.family = family
        # Our own truncation reporting replaces transformers' "sequence longer than model_max_length" warning.
        tokenizer.model_max_length = int(1e9)
        if tokenizer.pad_token_id is None:  # decoder LLMs often have none; T5's is id 0
            if tokenizer.eos_token is None:
                raise TextEncoderError("the tokenizer has neither a pad nor an EOS token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self.pad_id: int = tokenizer.pad_token_id

    def _fallback_id(self) -> int:
        for token_id in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.pad_id):
            if token_id is not None:
                return token_id
        raise TextEncoderError("the tokenizer has no BOS, EOS or pad token to encode an empty prompt with")

    def tokenize(self, prompt: str, *, mode: str = "fixed", max_length: int = 128) -> tuple[list[int], TokenCount]:
        """One prompt -> (ids actually passed on, unpadded; its TokenCount).

        Safe to call from many threads on one tokenizer: truncation is done here on the ids, never through
        transformers' `truncation=` option, which reconfigures the shared fast tokenizer on every call (a
        concurrent call with another max_length would then see the wrong setting).
        """
        check_mode(mode, max_length)
        text = strip_weight_syntax(prompt)
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:
            ids = [self._fallback_id()]
        total = len(ids)
        if total <= max_length:  # both modes truncate to max_length; only fixed mode pads
            return ids, TokenCount(total, total, 0, "")
        content, offsets = self._content(text)
        prefix, suffix = _special_parts(ids, content)
        room = max(max_length - len(prefix) - len(suffix), 0)
        kept = (prefix + content[:room] + suffix)[:max_length]
        if room >= len(content):
            dropped_text = ""
        elif offsets is not None:
            dropped_text = text[offsets[room][0]:].strip()
        else:
            dropped_text = self.tokenizer.decode(content[room:], skip_special_tokens=True).strip()
        return kept, TokenCount(total, len(kept), total - len(kept), dropped_text)

    def _content(self, text: str) -> tuple[list[int], list | None]:
        """Content ids (no special tokens) and their character offsets where the tokenizer gives them."""
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoded["input_ids"]), list(encoded["offset_mapping"])
        except (NotImplementedError, ValueError, KeyError, TypeError):
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None

    def count_tokens(self, prompt: str, max_length: int = 128, mode: str = "fixed") -> TokenCount:
        return self.tokenize(prompt, mode=mode, max_length=max_length)[1]

    def pad(self, ids: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to `length` -> input_ids (B, length) long, attention_mask (B, length) long."""
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return input_ids, mask


def _special_parts(ids: list[int], content: list[int]) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special tokens around `content` in `ids` (T5: [], [EOS]; Llama: [BOS], [])."""
    extra = len(ids) - len(content)
    for start in range(max(extra, 0) + 1):
        if ids[start:start + len(content)] == content:
            return ids[:start], ids[start + len(content):]
    raise TextEncoderError(
        f"the tokenizer's ids with special tokens ({extra} more) do not contain its ids without them; "
        "cannot truncate this prompt reliably")


def load_tokenizer(source: str, *, tokenizer: str | None = None, trust_remote_code: bool = False) -> PromptTokenizer:
    """Tokenizer only (cheap: no weights), e.g. for the web UI's live token count. Same sources as the encoder."""
    source = os.fspath(source)
    if not os.path.exists(source) and tokenizer is None:
        tok_path, gguf = source, None  # hub id
    else:
        tok_path, gguf = tokenizer_location(source, tokenizer)
    if gguf is not None:
        check_gguf_file(gguf)  # milliseconds, where transformers needs seconds to fail on a truncated file
    hf = load_hf_tokenizer(tok_path, gguf_file=gguf, trust_remote_code=trust_remote_code, name=source)
    config = None
    for folder in (source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)), tok_path):
        if os.path.isdir(folder):
            config = config or read_config_json(folder)
    if config and "model_type" in config:
        family = family_of(config["model_type"])
    else:  # T5, UMT5 and MT5 tokenizers are all named T5Tokenizer*
        family = "t5" if "T5" in type(hf).__name__ else "decoder"
    return PromptTokenizer(hf, family)


class TokenizerCache:
    """Tokenizers by file, for servers: each loads once however many requests ask at the same time, and a
    file that failed to load fails again at once (with the same error) until it changes on disk.

    Entries are keyed by (path, size, mtime), so replacing a broken file is picked up without a restart.
    """

    def __init__(self, size: int = 4, loader: Callable[[str], PromptTokenizer] = load_tokenizer,
                 failures: int = 64) -> None:
        self.size, self.failures_kept, self.loader = size, failures, loader
        self._loaded: "OrderedDict[tuple, PromptTokenizer]" = OrderedDict()
        self._failed: "OrderedDict[tuple, BaseException]" = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()
        self.loads = 0  # loader calls made (tests check that concurrent requests share one)

    @staticmethod
    def _key(path: str) -> tuple:
        try:
            stat = os.stat(path)
        except OSError:
            return (path, None, None)
        if os.path.isdir(path):  # a HF folder: its newest file says whether it changed
            stamps = [os.stat(os.path.join(path, f)) for f in os.listdir(path)]
            return (path, len(stamps), max((s.st_mtime_ns for s in stamps), default=stat.st_mtime_ns))
        return (path, stat.st_size, stat.st_mtime_ns)

    def get(self, path: str) -> PromptTokenizer:
        key = self._key(path)
        with self._lock:
            hit = self._lookup(key)
            if hit is not None:
                return hit
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per file; the others wait for it and read its result
            with self._lock:
                hit = self._lookup(key)
                if hit is not None:
                    return hit
            try:
                self.loads += 1
                tokenizer = self.loader(path)
            except Exception as error:
                with self._lock:
                    self._failed[key] = error
                    while len(self._failed) > self.failures_kept:
                        self._failed.popitem(last=False)
                    self._loading.pop(key, None)
                raise
            with self._lock:
                self._loaded[key] = tokenizer
                while len(self._loaded) > self.size:
                    self._loaded.popitem(last=False)
                self._loading.pop(key, None)
            return tokenizer

    def _lookup(self, key: tuple) -> PromptTokenizer | None:
        """Caller holds self._lock. A remembered failure is raised again."""
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        if key in self._failed:  # a fresh copy: threads must not share (and grow) one traceback
            raise copy.copy(self._failed[key]).with_traceback(None)
        return None
