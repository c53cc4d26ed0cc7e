"""Where the connector's latents look: the softmax probabilities of every block's attention, recomputed from
the inputs each block really received (forward hooks), for tests, benches and the prompt-weights picture."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from ella_core.connector import ELLA, PackedAttention


def attention_probabilities(attn: PackedAttention, query: torch.Tensor, kv: torch.Tensor,
                            text_bias: torch.Tensor | None) -> torch.Tensor:
    """query (B, N, W), kv (B, N + L, W) -> probabilities (B, heads, N, N + L), written out (no fused kernel)."""
    B, N, W = query.shape
    heads = attn.heads
    w_q, w_k, _ = attn.in_proj_weight.split([W, W, W])
    b_q, b_k, _ = attn.in_proj_bias.split([W, W, W])
    q = torch.nn.functional.linear(query, w_q, b_q).unflatten(-1, (heads, W // heads)).transpose(1, 2)
    k = torch.nn.functional.linear(kv, w_k, b_k).unflatten(-1, (heads, W // heads)).transpose(1, 2)
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(W // heads)  # (B, h, N, N + L)
    if text_bias is not None:
        logits[..., N:] += text_bias.double()[:, None, None, :]
    return logits.softmax(dim=-1)


@contextmanager
def record_attention(ella: ELLA) -> Iterator[list]:
    """Within the block: every attention call appends (block index, probabilities (B, h, N, N + L))."""
    seen: list = []
    handles = []
    for index, block in enumerate(ella.connector.perceiver_blocks):
        def hook(module, args, kwargs, output, index=index):
            query, kv = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("text_bias")
            seen.append((index, attention_probabilities(module, query, kv, bias)))
        handles.append(block.attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def text_attention_mass(ella: ELLA, projected: torch.Tensor, t: float, text_bias: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """(1, L, width) projected prompt -> (blocks, L): each text token's attention probability summed over heads
    and queries, per block, in one forward at timestep t."""
    with torch.no_grad(), record_attention(ella) as seen:
        ella.forward_projected(projected, t, text_bias=text_bias)
    N = ella.config.num_latents
    return torch.stack([probs[0, :, :, N:].sum(dim=(0, 1)) for _, probs in seen])
