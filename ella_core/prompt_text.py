"""Prompt clean-up before the LLM: ComfyUI/A1111 weighting syntax means nothing to an LLM.

ELLA has no per-token weighting (the reference pack strips the syntax too). `(red hat:1.3)` becomes
`red hat`; plain parentheses in normal prose, such as "a cat (sleeping)", are left alone because they are
ordinary text to an LLM, and escaped parentheses `\\(` `\\)` become literal ones.
"""

from __future__ import annotations

import re

# A weight suffix inside a group: "(text:1.2)", "[text:0.8]" is not A1111 weighting (it is scheduling) and
# is left as written.
_WEIGHTED_GROUP = re.compile(r"\(([^()]*?):\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*\)")
# Extra-network tags (LoRA, hypernetwork, embedding loaders): `<lora:name:0.8>`.
_NETWORK_TAG = re.compile(r"<(?:lora|lyco|hypernet|embedding):[^<>]*>", re.IGNORECASE)
_ESCAPED_OPEN = "\x00ella_open\x00"
_ESCAPED_CLOSE = "\x00ella_close\x00"


def strip_weight_syntax(text: str) -> str:
    """`(word:1.2)` -> `word` (nested groups too), `<lora:x:1>` removed, `\\(` -> `(`; other text kept."""
    text = text.replace("\\(", _ESCAPED_OPEN).replace("\\)", _ESCAPED_CLOSE)
    text = _NETWORK_TAG.sub(" ", text)
    while True:  # innermost groups first, so "((a:1.1), b:1.2)" unwraps fully
        stripped = _WEIGHTED_GROUP.sub(lambda m: m.group(1).strip(), text)
        if stripped == text:
            break
        text = stripped
    text = text.replace(_ESCAPED_OPEN, "(").replace(_ESCAPED_CLOSE, ")")
    text = re.sub(r"[ \t]{2,}", " ", text)  # tags and unwrapped groups leave double spaces
    text = re.sub(r"\s+([,.])", r"\1", text)
    return text.strip()
