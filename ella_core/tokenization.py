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

import os
from dataclasses import dataclass
from typing import Any

import torch

from .llm_loading import TextEncoderError, family_of, load_hf_tokenizer, read_config_json, tokenizer_location
from .prompt_text import strip_weight_syntax

MODES = ("fixed", "flexible")


@dataclass(frozen=True)
class TokenCount:
    total: int  # tokens the prompt needs, special tokens included
    kept: int  # tokens that reach the LLM (== total unless fixed mode truncated)
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
        """One prompt -> (ids actually passed on, unpadded; its TokenCount)."""
        check_mode(mode, max_length)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        text = strip_weight_syntax(prompt)
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:
            ids = [self._fallback_id()]
        total = len(ids)
        if total <= max_length:  # both modes truncate to max_length; only fixed mode pads
            return ids, TokenCount(total, total, 0, "")
        kept = list(self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
        return kept, TokenCount(total, len(kept), total - len(kept), self._dropped_text(text, total, len(kept)))

    def _dropped_text(self, text: str, total: int, kept: int) -> str:
        """The text of the content tokens truncation removed (character offsets where the tokenizer gives them)."""
        try:
            content = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = content["offset_mapping"]
        except (NotImplementedError, ValueError, KeyError, TypeError):
            content, offsets = self.tokenizer(text, add_special_tokens=False), None
        n_special = total - len(content["input_ids"])
        kept_content = max(kept - n_special, 0)
        if kept_content >= len(content["input_ids"]):
            return ""
        if offsets is not None:
            return text[offsets[kept_content][0] :].strip()
        return self.tokenizer.decode(content["input_ids"][kept_content:], skip_special_tokens=True).strip()

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


def load_tokenizer(source: str, *, tokenizer: str | None = None, trust_remote_code: bool = False) -> PromptTokenizer:
    """Tokenizer only (cheap: no weights), e.g. for the web UI's live token count. Same sources as the encoder."""
    source = os.fspath(source)
    if not os.path.exists(source) and tokenizer is None:
        tok_path, gguf = source, None  # hub id
    else:
        tok_path, gguf = tokenizer_location(source, tokenizer)
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
