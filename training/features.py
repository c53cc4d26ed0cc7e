"""LLM features as the trainer stores and batches them: the one policy for their dtype and padding.

- Stored in the dtype the LLM computed in (fp16/bf16 features are upcast copies, so the cast back is exact;
  it is checked, and a tensor that would not survive it, e.g. one recomputed in fp32 after an fp16
  overflow, stays fp32). Read back with `.float()`: bit-identical to the online features.
- Fixed mode: every one of the max_length positions is a real connector input (an LLM's outputs at pad
  positions are not zero and the reference attends to them), so all are stored.
- Flexible mode: each caption keeps its own tokens only. A batch is padded to its longest caption with a
  -inf `text_bias` on the padding, so every sample's context equals its unpadded forward.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .config import LLMConfig
from .errors import TrainingError


def token_lengths(llm: Any, texts: Sequence[str], config: LLMConfig, padded_length: int) -> list[int]:
    """Positions of each text the connector must see: all `padded_length` in fixed mode, the tokens the
    prompt keeps (special tokens included) in flexible mode."""
    if config.token_mode == "fixed":
        return [padded_length] * len(texts)
    lengths = [llm.count_tokens(t, max_length=config.max_length, mode="flexible").kept for t in texts]
    if lengths and max(lengths) != padded_length:
        raise TrainingError(f"the text encoder padded flexible-mode features to {padded_length} tokens but its "
                            f"tokenizer counts at most {max(lengths)}: the encoder and its tokenizer disagree")
    return lengths


def storage_dtype(llm: Any) -> torch.dtype:
    """The dtype the LLM computes in (fp8-stored weights compute in fp16/bf16)."""
    dtype = getattr(llm, "dtype", torch.float32)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def lossless(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype` when that cast is exact, else unchanged (float32)."""
    if dtype == tensor.dtype:
        return tensor
    cast = tensor.to(dtype)
    return cast if torch.equal(cast.float(), tensor.float()) else tensor


def for_storage(llm: Any, texts: Sequence[str], features: torch.Tensor, config: LLMConfig) -> list[torch.Tensor]:
    """features (B, L, D) float32 of `texts` -> B tensors (L_i, D) to store: unpadded, in the LLM's dtype."""
    lengths = token_lengths(llm, texts, config, features.shape[1])
    dtype = storage_dtype(llm)
    return [lossless(f[:n].contiguous().cpu(), dtype) for f, n in zip(features, lengths)]


def padding_bias(lengths: Sequence[int], length: int) -> Optional[torch.Tensor]:
    """(B, length) float32: 0 on each row's first lengths[i] positions, -inf after; None without padding."""
    if all(n == length for n in lengths):
        return None
    positions = torch.arange(length)[None, :]
    bias = torch.zeros(len(lengths), length)
    return bias.masked_fill(positions >= torch.tensor(list(lengths))[:, None], float("-inf"))


def pad_batch(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """B tensors (L_i, D) -> (B, max L_i, D) zero-padded, and the text_bias that hides the padding (None
    when every L_i is equal: the reference computation)."""
    lengths = [f.shape[0] for f in features]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return torch.stack(list(features)), None
    out = features[0].new_zeros((len(features), longest, features[0].shape[-1]))
    for row, f in enumerate(features):
        out[row, :f.shape[0]] = f
    return out, padding_bias(lengths, longest)


def online_bias(llm: Any, texts: Sequence[str], config: LLMConfig, features: torch.Tensor) -> Optional[torch.Tensor]:
    """text_bias of features (B, L, D) just encoded from `texts` (zero-padded in flexible mode)."""
    return padding_bias(token_lengths(llm, texts, config, features.shape[1]), features.shape[1])


def unpadded(llm: Any, texts: Sequence[str], config: LLMConfig, features: torch.Tensor) -> list[torch.Tensor]:
    """features (B, L, D) just encoded from `texts` -> B tensors (L_i, D) (all L in fixed mode)."""
    lengths = token_lengths(llm, texts, config, features.shape[1])
    return [f[:n] for f, n in zip(features, lengths)]
