"""Prompt clean-up before the LLM: ComfyUI/A1111 weighting syntax means nothing to an LLM.

ELLA has no per-token weighting (the reference pack strips the syntax too). `(red hat:1.3)` becomes
`red hat`; plain parentheses in normal prose, such as "a cat (sleeping)", are left alone because they are
ordinary text to an LLM, and escaped parentheses `\\(` `\\)` become literal ones.

Everything here is linear in the prompt's length: the route and ELLA Prompt Encode run it on whatever a
user (or a script) sends, and a regular expression that backtracks holds the GIL, which stalls the whole
ComfyUI server. Groups are matched with one pass and a stack instead of repeated substitutions, and the
remaining expressions cannot backtrack over a run (possessive quantifiers, a look-behind anchor).
"""

from __future__ import annotations

import re

# Extra-network tags (LoRA, hypernetwork, embedding loaders): `<lora:name:0.8>`. `[^<>]*` stops at the next
# `<`, so each candidate scans only up to there: linear overall.
_NETWORK_TAG = re.compile(r"<(?:lora|lyco|hypernet|embedding):[^<>]*>", re.IGNORECASE)
# A group's weight suffix: what follows its last colon. "[text:0.8]" is scheduling, not weighting: kept.
_WEIGHT = re.compile(r"\s*+[+-]?(?:\d++(?:\.\d*+)?|\.\d++)\s*+")
# Pieces of the scan: an escaped parenthesis, a structural one, or a run of anything else.
_PIECE = re.compile(r"\\[()]|[()]|[^\\()]++|\\")
_SPACE_RUN = re.compile(r"[ \t]{2,}+")  # tags and unwrapped groups leave double spaces
_SPACE_BEFORE_PUNCT = re.compile(r"(?<!\s)\s++(?=[,.])")  # anchored at a run's start: no quadratic retry
MAX_GROUP_DEPTH = 32  # deeper nesting is kept as text (no prompt means 33 levels of weights)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class PromptTextError(ValueError):
    """A prompt that is not valid text (e.g. a lone UTF-16 surrogate from a broken client)."""


def check_prompt_text(text: str, where: str = "prompt") -> None:
    """Raise PromptTextError naming the position of a lone surrogate (it cannot be encoded as UTF-8)."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a string, got {type(text).__name__}")
    bad = _SURROGATE.search(text)
    if bad:
        raise PromptTextError(
            f"{where} contains a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}: that is not "
            "valid Unicode text (a client split an emoji or sent raw UTF-16); remove or retype that character")


def _unwrap(content: str) -> str | None:
    """The text of a weighted group's content ("red hat:1.3" -> "red hat"), None if it carries no weight."""
    colon = content.rfind(":")
    if colon < 0 or not _WEIGHT.fullmatch(content, colon + 1):
        return None
    return content[:colon].strip()


def strip_weight_syntax(text: str) -> str:
    """`(word:1.2)` -> `word` (nested groups too), `<lora:x:1>` removed, `\\(` -> `(`; other text kept.

    Groups nested deeper than MAX_GROUP_DEPTH are kept as written: every character is then joined at most
    MAX_GROUP_DEPTH times, so the work stays linear in the prompt's length whatever its structure.
    """
    check_prompt_text(text)
    text = _NETWORK_TAG.sub(" ", text)
    # One frame per open group: [pieces so far, whether it holds a group kept as written]. A group that
    # holds one is kept too (its weight would be ambiguous), as are groups beyond the depth limit.
    stack: list[list] = [[[], False]]
    too_deep = 0  # open parentheses beyond MAX_GROUP_DEPTH: plain text
    for match in _PIECE.finditer(text):
        piece = match.group()
        if piece == "(" and (too_deep or len(stack) > MAX_GROUP_DEPTH):
            too_deep += 1
            stack[-1][0].append(piece)
            stack[-1][1] = True
        elif piece == "(":
            stack.append([[], False])
        elif piece == ")" and too_deep:
            too_deep -= 1
            stack[-1][0].append(piece)
        elif piece == ")" and len(stack) > 1:
            pieces, nested = stack.pop()
            content = "".join(pieces)
            unwrapped = None if nested else _unwrap(content)
            stack[-1][0].append(f"({content})" if unwrapped is None else unwrapped)
            stack[-1][1] = stack[-1][1] or unwrapped is None
        else:  # text, an unmatched ")", a lone backslash, or an escaped parenthesis (its literal character)
            stack[-1][0].append(piece[1] if len(piece) == 2 and piece[0] == "\\" else piece)
    text = "(".join("".join(pieces) for pieces, _ in stack)  # unclosed groups stay as written
    text = _SPACE_RUN.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub("", text)
    return text.strip()
