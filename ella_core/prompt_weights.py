"""Prompt weights that act where ELLA reads the prompt: `(word:1.3)` scales that word's attention inside the
connector (docs/prompt_weights.md).

Three steps, each linear in the prompt's length:
1. `parse_weights`: ComfyUI's `(text:w)` grammar, segment for segment as ComfyUI's own parser
   (comfy/sd1_clip.py) reads it: `(a)` x1.1 and nesting multiplies, `(a:1.3)` sets 1.3 (it does not multiply),
   `\\(` `\\)` are literal, unbalanced parentheses as ComfyUI treats them, `[a]` is plain text. ComfyUI
   re-scans every group's content at every depth (quadratic, and a RecursionError past ~1000 levels); here a
   precomputed matching of the parentheses and sorted position lists let each parenthesis be read once.
2. `weigh_prompt`: the text the LLM reads (segments joined; `<lora:...>` tags and `embedding:name` words
   dropped; spaces tidied as `strip_weight_syntax` does) with one weight per character.
3. `token_weights` / `text_bias`: per LLM token (the tokenizer's character offsets), the bias log(w) that
   `ELLA.forward(..., text_bias=)` adds to that token's attention logits; special and padding tokens 0.

A prompt whose weights are all 1.0 gets no bias at all (None): the connector's reference computation.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from .prompt_text import _NETWORK_TAG, _SPACE_BEFORE_PUNCT, _SPACE_RUN, check_prompt_text

STRIP, ATTENTION = "strip", "connector attention"
MODES = (STRIP, ATTENTION)  # ELLA Prompt Encode's `weighting` widget
DEFAULT_MODE = STRIP  # saved workflows render as before; the released connector never saw biased attention
GROUP_FACTOR = 1.1  # ComfyUI's weight of a plain `(text)` group, per level
# ComfyUI's escapes: `\)` and `\(` become these two-character stand-ins before parsing and are turned back into
# literal parentheses in each segment afterwards (so a prompt holding the stand-ins reads the same way).
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))
_PAREN = re.compile(r"[()]")
_COLON = re.compile(r":")
# A textual-inversion embedding as ComfyUI's CLIP tokenizer finds one: at a segment's start or after a space or
# newline, "embedding:" and the name up to the next whitespace (trailing commas are text). An LLM has no such
# vectors, so the word is dropped rather than read as text.
_EMBEDDING = re.compile(r"(?:^|(?<=[ \n]))embedding:\s*+\S*+")
_SPACE = re.compile(r"\s")


class PromptWeightError(ValueError):
    """A weight the connector cannot apply (negative, inf, NaN), named with the text it belongs to."""


def _escape(text: str) -> str:
    for literal, stand_in in _ESCAPES:
        text = text.replace(literal, stand_in)
    return text


def _unescape(text: str) -> str:
    for literal, stand_in in _ESCAPES:
        text = text.replace(stand_in, literal[1])
    return text


def _matching(text: str, parens: list[int]) -> dict[int, int]:
    """Position of each "(" -> the ")" that closes it (the first one that returns to its level)."""
    close: dict[int, int] = {}
    open_stack: list[int] = []
    for p in parens:
        if text[p] == "(":
            open_stack.append(p)
        elif open_stack:
            close[open_stack.pop()] = p
    return close


def _items(text: str, parens: list[int]) -> list[tuple[int, int]]:
    """Top-level items [a, b) as ComfyUI splits a prompt: a group starts at a "(" on level 0 and ends where the
    level is 0 again; a ")" below level 0 sends the level negative, and text runs on (unsplit) until a "("
    brings it back. Whatever is open at the end is one last item."""
    items, level, start = [], 0, 0
    for p in parens:
        if text[p] == "(":
            if level == 0:
                if p > start:
                    items.append((start, p))
                start = p
            level += 1
        else:
            level -= 1
            if level == 0:
                items.append((start, p + 1))
                start = p + 1
    if start < len(text):
        items.append((start, len(text)))
    return items


class _Parser:
    """One prompt (escaped) and the sorted positions that make every group O(log n) to read."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.parens = [m.start() for m in _PAREN.finditer(text)]
        self.colons = [m.start() for m in _COLON.finditer(text)]
        self.close = _matching(text, self.parens)
        self.out: list[tuple[str, float]] = []

    def _is_group(self, a: int, b: int) -> bool:
        return b - a >= 2 and self.text[a] == "(" and self.text[b - 1] == ")"

    def _group(self, a: int, b: int, weight: float) -> tuple[int, int, float]:
        """A group item [a, b) -> its content range and weight: x1.1, or the number after its last colon
        (if that colon is not the content's first character and Python's float() reads what follows)."""
        start, end = a + 1, b - 1
        weight *= GROUP_FACTOR
        i = bisect_left(self.colons, end) - 1
        if i >= 0 and self.colons[i] > start:
            colon = self.colons[i]
            # float() fails on any parenthesis; checking for one first keeps nested groups from re-reading the
            # same long tail at every level (tails free of parentheses are disjoint, so float() reads each once)
            j = bisect_left(self.parens, colon)
            if j == len(self.parens) or self.parens[j] >= end:
                try:
                    weight, end = float(self.text[colon + 1:end]), colon
                except ValueError:
                    pass
        return start, end, weight

    def _emit(self, a: int, b: int, weight: float) -> None:
        self.out.append((_unescape(self.text[a:b]), weight))

    def parse(self) -> list[tuple[str, float]]:
        # Frames [position, end, weight, whole]: ranges whose parentheses never go below their starting level;
        # whole: an item to classify first (a group, or text as it stands), as ComfyUI classifies its items.
        frames: list[list] = []
        for a, b in reversed(_items(self.text, self.parens)):
            frames.append([a, b, 1.0, True])  # True: a top-level item, read as a whole
        while frames:
            frame = frames[-1]
            pos, end, weight, whole = frame
            if whole:
                frames.pop()
                if self._is_group(pos, end):
                    frames.append([*self._group(pos, end, weight), False])
                else:
                    self._emit(pos, end, weight)
                continue
            if pos >= end:
                frames.pop()
                continue
            k = bisect_left(self.parens, pos)
            p = self.parens[k] if k < len(self.parens) and self.parens[k] < end else end
            if p > pos:  # text up to the next "(" (a ")" cannot come first at this level)
                self._emit(pos, p, weight)
            if p == end:
                frames.pop()
                continue
            close = self.close.get(p)
            if close is not None and close < end:
                frame[0] = close + 1
                frames.append([*self._group(p, close + 1, weight), False])
            else:  # open to the end of this range: ComfyUI's last item, a group if it ends with ")"
                frames.pop()
                frames.append([p, end, weight, True])
        return self.out


def parse_weights(text: str) -> list[tuple[str, float]]:
    """A prompt -> [(text, weight)] segments, exactly as ComfyUI's parser splits and weighs it.

    Weights are whatever ComfyUI reads (float() of the text after a group's last colon: negative, inf and nan
    included); `weigh_prompt` refuses the ones the connector cannot apply.
    """
    check_prompt_text(text)
    return _Parser(_escape(text)).parse()


@dataclass
class WeightedPrompt:
    """The text the LLM reads and one weight per character of it."""

    text: str
    weights: list = field(repr=False)  # len(text) floats
    notes: list = field(default_factory=list)  # what was dropped (embeddings), for the log

    @property
    def weighted(self) -> bool:
        """Whether any character has a weight other than 1.0 (else the connector runs unbiased)."""
        return any(w != 1.0 for w in self.weights)

    def encoder_text(self) -> str:
        """`text` written so that the encoder's `strip_weight_syntax` gives `text` back unchanged: every
        parenthesis escaped (tags and space runs are already gone), so the encoder tokenises exactly `text`."""
        return self.text.replace("(", "\\(").replace(")", "\\)")


def _check_weight(text: str, weight: float) -> None:
    if not (math.isfinite(weight) and weight >= 0):
        raise PromptWeightError(
            f"prompt weight {weight!r} on {text[:60]!r}: weights must be finite and >= 0 (0 leaves the words out, "
            "1 is unweighted); check the number after the colon in that group")


def _substitute(text: str, weights: list, pattern: re.Pattern, repl: str) -> tuple[str, list]:
    """pattern.sub(repl) that keeps the per-character weights (a replacement takes its match's first weight)."""
    parts, kept, pos = [], [], 0
    for m in pattern.finditer(text):
        parts.append(text[pos:m.start()])
        kept.extend(weights[pos:m.start()])
        if repl:
            parts.append(repl)
            kept.extend([weights[m.start()]] * len(repl))
        pos = m.end()
    if pos == 0:
        return text, weights
    parts.append(text[pos:])
    kept.extend(weights[pos:])
    return "".join(parts), kept


def _embedding_leftover(match: re.Match) -> str:
    """What ComfyUI reads on as text after an embedding's name: its trailing commas."""
    word = match.group()
    return word[len(word.rstrip(",")):]


def weigh_prompt(prompt: str) -> WeightedPrompt:
    """A prompt in ComfyUI's syntax -> the LLM's text with per-character weights.

    The text is the segments joined, then cleaned as `strip_weight_syntax` cleans (network tags, runs of spaces,
    spaces before "," and ".", ends), so a prompt without weight syntax reads the same in both modes.
    """
    texts, weights, notes = [], [], []
    for segment, weight in parse_weights(prompt):
        if "embedding:" in segment:
            for m in _EMBEDDING.finditer(segment):
                notes.append(f"{m.group().rstrip(',')!r} is a textual-inversion embedding, which an LLM cannot "
                             "read: dropped")
            segment = _EMBEDDING.sub(_embedding_leftover, segment)
        if segment:
            if weight != 1.0:
                _check_weight(segment, weight)
            texts.append(segment)
            weights.extend([weight] * len(segment))
    text = "".join(texts)
    for pattern, repl in ((_NETWORK_TAG, " "), (_SPACE_RUN, " "), (_SPACE_BEFORE_PUNCT, "")):
        text, weights = _substitute(text, weights, pattern, repl)
    start = len(text) - len(text.lstrip())
    end = len(text.rstrip())
    return WeightedPrompt(text[start:end], weights[start:end], notes)


def _span_log_weight(text: str, weights: list, start: int, end: int) -> float:
    """A token's log-weight: the mean log-weight of its characters, spaces left out unless it is all spaces
    (a geometric mean: a token straddling "(red:1.5)dish" gets a weight between; 0 anywhere leaves it out)."""
    chars = [w for c, w in zip(text[start:end], weights[start:end]) if not _SPACE.match(c)] or weights[start:end]
    if not chars:
        return 0.0
    if any(w == 0.0 for w in chars):
        return -math.inf
    if all(w == chars[0] for w in chars):
        return math.log(chars[0])  # exactly log(w) (a mean of equal logs may round)
    return sum(math.log(w) for w in chars) / len(chars)


def _offsets(tokenizer, text: str):
    """(content ids, character offsets) from a fast tokenizer, None where it gives no offsets."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), list(encoded["offset_mapping"])
    except (NotImplementedError, ValueError, KeyError, TypeError):
        return None


def _segment_log_weights(tokenizer, prompt: WeightedPrompt, count: int, limit: int) -> list[float]:
    """Without offsets: the tokens of each run of equal weight are those the text up to the run's end adds
    (its prefix tokenised alone, without trailing spaces). Exact where a prefix tokenises as the start of the
    whole text (at spaces);
    where the tokenizer merges characters across a run's edge ("(red:1.5)dish") a token may take its
    neighbour's weight. Only the first `limit` tokens are placed (the rest are truncated anyway)."""
    out: list[float] = []
    start = 0
    text, weights = prompt.text, prompt.weights
    for end in range(1, len(text) + 1):
        if len(out) >= min(count, limit):
            break
        if end == len(text) or weights[end] != weights[start]:
            prefix = text[:end] if end == len(text) else text[:end].rstrip()  # a space joins the next word's token
            n = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) - len(out)
            out.extend([_span_log_weight(text, weights, start, end)] * max(n, 0))
            start = end
    return (out + [0.0] * count)[:count]


def token_log_weights(tokenizer, prompt: WeightedPrompt, *, mode: str = "fixed", max_length: int = 128) -> list[float]:
    """Per token the LLM gets for `prompt.encoder_text()` (special tokens included, unpadded): log(weight).

    tokenizer: an ella_core PromptTokenizer; its `tokenize` gives the ids (truncation included) and these
    logs follow them one for one: special tokens 0, content tokens from their characters' weights.
    """
    ids, count = tokenizer.tokenize(prompt.encoder_text(), mode=mode, max_length=max_length)
    hf = tokenizer.tokenizer
    found = _offsets(hf, prompt.text)
    if found is not None:
        content, offsets = found
        logs = [_span_log_weight(prompt.text, prompt.weights, s, e) for s, e in offsets]
    else:
        content = list(hf(prompt.text, add_special_tokens=False)["input_ids"])
        logs = _segment_log_weights(hf, prompt, len(content), max_length)
    full = list(hf(prompt.text, add_special_tokens=True)["input_ids"]) or ids
    if not count.dropped and full != ids:
        raise ValueError(f"prompt weights: the encoder's tokens of {prompt.text[:60]!r} are not the tokenizer's; "
                         "cannot place the weights")
    prefix, suffix = _special_split(full, content)
    room = max(max_length - prefix - suffix, 0) if count.dropped else len(content)
    aligned = ([0.0] * prefix + logs[:room] + [0.0] * suffix)[:max_length]
    if len(aligned) != len(ids):
        if not content:  # "" -> one special token
            return [0.0] * len(ids)
        raise ValueError(f"prompt weights: {len(aligned)} weighted tokens for {len(ids)} encoder tokens of "
                         f"{prompt.text[:60]!r}; the tokenizer's offsets do not follow its ids")
    return aligned


def _special_split(ids: list[int], content: list[int]) -> tuple[int, int]:
    """How many special tokens come before and after `content` within `ids`."""
    extra = len(ids) - len(content)
    for start in range(max(extra, 0) + 1):
        if ids[start:start + len(content)] == content:
            return start, extra - start
    raise ValueError("prompt weights: the tokenizer's ids with special tokens do not contain its ids without them")


def text_bias(log_weights: list[float], length: int) -> torch.Tensor | None:
    """(1, length) float32 bias for ELLA's `text_bias` (padding positions 0), or None if every weight is 1.0."""
    if all(v == 0.0 for v in log_weights):
        return None
    if len(log_weights) > length:
        raise ValueError(f"prompt weights: {len(log_weights)} tokens for features of {length} positions")
    bias = torch.zeros(1, length, dtype=torch.float32)
    bias[0, :len(log_weights)] = torch.tensor(log_weights, dtype=torch.float32)
    return bias


def check_mode(mode: str) -> str:
    """The weighting mode, `DEFAULT_MODE` for None (workflows saved before the option existed)."""
    mode = DEFAULT_MODE if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"prompt weighting must be one of {list(MODES)}, got {mode!r}")
    return mode


def prepare(prompt: str, mode: str | None) -> tuple[str, WeightedPrompt | None]:
    """(the text to hand the encoder, the weighted prompt or None): strip mode passes the prompt as it is (the
    encoder strips the syntax); connector attention passes the weighted prompt's text, to be read verbatim."""
    if check_mode(mode) == STRIP:
        return prompt, None
    weighted = weigh_prompt(prompt)
    return weighted.encoder_text(), weighted


def bias_for(weighted: WeightedPrompt | None, tokenizer, length: int, *, mode: str = "fixed",
             max_length: int = 128) -> torch.Tensor | None:
    """The (1, length) text_bias of a prepared prompt for features of `length` positions; None without weights."""
    if weighted is None or not weighted.weighted:
        return None
    return text_bias(token_log_weights(tokenizer, weighted, mode=mode, max_length=max_length), length)
