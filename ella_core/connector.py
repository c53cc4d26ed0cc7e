"""The Timestep-Aware Semantic Connector (TSC) of ELLA.

A Perceiver-style resampler: `num_latents` learned queries attend to the projected LLM features through
`layers` blocks whose LayerNorms are modulated by the diffusion timestep (AdaLN). Parameter names follow the
reference checkpoint exactly (`time_embedding.*`, `connector.*`), so the released file loads strictly.

Prompt path: features (B, L, input_dim) -> `project_text` (B, L, width), independent of t and therefore
computed once per prompt -> `forward_projected` at each sampling step's t -> context (B, num_latents, width).

Many (prompt, t) pairs at once: `forward_many` stacks projected prompts of one token length and runs the
token side (the big matmuls) once for all rows, while everything that depends only on t (timestep MLP,
AdaLN modulations, time-shifted latents) is computed per distinct t in the shapes of a batch of one. Every
other op is row-independent, so row i equals `forward_projected(projected[i:i+1], t[i:i+1])` bit for bit
wherever the BLAS gives a matrix product's rows independently of the row count. Measured with MKL on
this CPU: always with one thread once every product has at least STACK_MIN_ROWS rows per prompt; with
several threads MKL may split the reduction of the K >= 2048 products (proj_in, c_proj) differently once
there are hundreds of rows; cuBLAS picks kernels by shape, so on a GPU expect last-bit differences.

Ablations (ELLAConfig, same parameters): `time_aware=False` replaces every t by 0 wherever t enters (forward,
forward_projected, forward_many), so the AdaLN modulations and the latents' time offset act as learned
constants. `input_pool="mean"` pools each prompt's projected tokens into one (`pool_tokens`) before the
resampler, which then attends to that token with no bias. proj_in is affine and the pooling weights sum to
one, so pooling after it equals pooling the features before it; done after, `project_text` stays free of t
and of the text bias, and every caller keeps one code path.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import ELLAConfig

Timesteps = Union[int, float, torch.Tensor]
# Fewest rows per prompt for which forward_many stacks prompts into one product: BLAS libraries compute
# smaller matrices with kernels whose rounding depends on the row count (measured with MKL on AVX2: 8 rows
# differ at K = 768, 16 do not). Connectors with fewer latents run their rows one at a time (released: 64).
STACK_MIN_ROWS = 16


def timestep_sinusoid(t: torch.Tensor, channels: int) -> torch.Tensor:
    """SD-UNet style sinusoidal features, float32: (B,) -> (B, channels), cosines first, no frequency shift."""
    half = channels // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(ELLAConfig.MAX_PERIOD) * k / (half - ELLAConfig.FREQ_SHIFT))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def broadcast_timesteps(timesteps: Timesteps, batch: int, device: torch.device) -> torch.Tensor:
    """A number, 0-d, [1] or [B] timestep -> float32 (B,). Fractional values stay fractional."""
    t = torch.as_tensor(timesteps, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"ELLA: got {t.numel()} timesteps for a batch of {batch}; pass one timestep or one per sample")
    return t


def pool_tokens(projected: torch.Tensor, text_bias: torch.Tensor | None) -> torch.Tensor:
    """Each row's tokens averaged with weights softmax(text_bias) (uniform for None): (B, L, W) -> (B, 1, W).

    -inf tokens are left out of the sum rather than weighted by zero, and every row is reduced on its own, so a
    padded row (-inf on its padding) equals the same prompt unpadded bit for bit; log(w) scales a token's share.
    """
    B, L, _ = projected.shape
    rows = []
    for i in range(B):
        x = projected[i]  # (L, W)
        bias = projected.new_zeros(L, dtype=torch.float32) if text_bias is None else text_bias[i].float()
        if torch.isnan(bias).any() or (bias == math.inf).any():
            raise ValueError(f"ELLA: text_bias of row {i} holds NaN or +inf; a token's bias is log(weight) "
                             "with a finite weight >= 0 (-inf leaves it out)")
        keep = bias > -math.inf
        if not keep.any():
            raise ValueError(f"ELLA: text_bias leaves out all {L} tokens of row {i}: nothing to pool")
        if not keep.all():
            x, bias = x[keep], bias[keep]
        rows.append(torch.softmax(bias, dim=0).to(x.dtype) @ x.contiguous())  # (W,)
    return torch.stack(rows).unsqueeze(1)


class TimestepEmbedding(nn.Module):
    """(B, time_channel) sinusoid -> (B, time_embed_dim): Linear, SiLU, Linear."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, scaled and shifted by the timestep embedding: norm(h) * (1 + scale) + shift."""

    def __init__(self, width: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * width)  # rows: [shift, scale]
        nn.init.zeros_(self.linear.weight)  # starts as a plain LayerNorm
        nn.init.zeros_(self.linear.bias)

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, time_embed_dim) -> shift, scale, each (B, 1, width)."""
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return shift, scale

    def forward(self, h: torch.Tensor, temb: torch.Tensor | None, normed: torch.Tensor | None = None,
                modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`normed` lets a caller pass LayerNorm(h) it already holds (the text's norm is timestep-free);
        `modulation` the (shift, scale) it already computed from temb (see ELLA.forward_many)."""
        shift, scale = self.modulation(temb) if modulation is None else modulation
        if normed is None:
            normed = F.layer_norm(h, h.shape[-1:], eps=ELLAConfig.NORM_EPS)
        return normed * (1 + scale) + shift


class PackedAttention(nn.Module):
    """Multi-head attention with the packed q/k/v layout of `torch.nn.MultiheadAttention` (same key names)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, kv: torch.Tensor, text_bias: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, N, W), kv (B, N + L, W) -> (B, N, W). text_bias (B, L): see ELLA.forward."""
        B, N, W = query.shape
        w_q, w_kv = self.in_proj_weight.split([W, 2 * W])
        b_q, b_kv = self.in_proj_bias.split([W, 2 * W])
        q = F.linear(query, w_q, b_q)
        k, v = F.linear(kv, w_kv, b_kv).chunk(2, dim=-1)
        q, k, v = (x.unflatten(-1, (self.heads, W // self.heads)).transpose(1, 2) for x in (q, k, v))  # (B, h, *, W/h)
        mask = None
        if text_bias is not None:  # the latent keys get 0; one bias row for every head and query
            mask = torch.cat([text_bias.new_zeros(B, N), text_bias], dim=1)[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, W))


class SquaredReLUMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(h)).square())


class PerceiverBlock(nn.Module):
    def __init__(self, config: ELLAConfig) -> None:
        super().__init__()
        W, T = config.width, config.time_embed_dim
        self.attn = PackedAttention(W, config.heads)
        self.ln_1 = AdaLayerNorm(W, T)  # latents, before attention
        self.ln_2 = AdaLayerNorm(W, T)  # text, before attention
        self.ln_ff = AdaLayerNorm(W, T)  # latents, before the MLP
        self.mlp = SquaredReLUMLP(W, config.MLP_RATIO * W)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, text_normed: torch.Tensor, temb: torch.Tensor | None,
                modulations: tuple | None = None, text_bias: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, N, W), text and LayerNorm(text) (B, L, W), temb (B, 1, T) -> latents (B, N, W).

        modulations: optional ((shift, scale) of ln_1, ln_2, ln_ff), each (B, 1, W), instead of temb."""
        m1, m2, mff = modulations if modulations is not None else (None, None, None)
        n = self.ln_1(latents, temb, modulation=m1)
        kv = torch.cat([n, self.ln_2(text, temb, normed=text_normed, modulation=m2)], dim=1)  # (B, N + L, W)
        latents = latents + self.attn(n, kv, text_bias)
        return latents + self.mlp(self.ln_ff(latents, temb, modulation=mff))

    def modulations(self, temb: torch.Tensor) -> tuple:
        """temb (B, 1, T) -> the (shift, scale) pairs of ln_1, ln_2, ln_ff: everything here that depends on t only."""
        return self.ln_1.modulation(temb), self.ln_2.modulation(temb), self.ln_ff.modulation(temb)


class PerceiverResampler(nn.Module):
    """Holds the `connector.*` parameters of the reference layout."""

    def __init__(self, config: ELLAConfig) -> None:
        super().__init__()
        W = config.width
        self.latents = nn.Parameter(torch.randn(config.num_latents, W) * W**-0.5)
        self.time_aware_linear = nn.Linear(config.time_embed_dim, W)
        self.proj_in = nn.Linear(config.input_dim, W)
        self.perceiver_blocks = nn.ModuleList(PerceiverBlock(config) for _ in range(config.layers))

    def forward(self, text: torch.Tensor, temb: torch.Tensor, text_bias: torch.Tensor | None = None) -> torch.Tensor:
        """text: projected features (B, L, W); temb (B, 1, T); text_bias (B, L) or None -> (B, N, W)."""
        latents = self.latents.unsqueeze(0) + self.time_aware_linear(F.silu(temb))  # (B, N, W)
        text_normed = F.layer_norm(text, text.shape[-1:], eps=ELLAConfig.NORM_EPS)  # shared by every block's ln_2
        for block in self.perceiver_blocks:
            latents = block(latents, text, text_normed, temb, text_bias=text_bias)
        return latents


class ELLA(nn.Module):
    """The connector: LLM features and a diffusion timestep -> UNet cross-attention context."""

    def __init__(self, config: ELLAConfig | None = None) -> None:
        super().__init__()
        self.config = config or ELLAConfig()
        self.time_embedding = TimestepEmbedding(self.config.time_channel, self.config.time_embed_dim)
        self.connector = PerceiverResampler(self.config)
        if self.config.pooled_dim is not None:
            self.pooled_proj = nn.Linear(self.config.width, self.config.pooled_dim)
            nn.init.zeros_(self.pooled_proj.weight)  # SDXL starts from "no pooled text"
            nn.init.zeros_(self.pooled_proj.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.connector.latents.dtype

    @property
    def device(self) -> torch.device:
        return self.connector.latents.device

    def _check_features(self, features: torch.Tensor, dim: int, what: str) -> None:
        if features.ndim != 3 or features.shape[-1] != dim:
            raise ValueError(
                f"ELLA: {what} must have shape (batch, tokens, {dim}), got {tuple(features.shape)}"
                + (f"; this connector expects LLM width input_dim={dim}" if what == "text_features" else "")
            )

    def project_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """(B, L, input_dim) -> (B, L, width). Independent of the timestep: compute once per prompt."""
        self._check_features(text_features, self.config.input_dim, "text_features")
        return self.connector.proj_in(text_features.to(device=self.device, dtype=self.dtype))

    def _seen_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the resampler sees: t itself, or zeros for a connector that is not time-aware."""
        return t if self.config.time_aware else torch.zeros_like(t)

    def _text_input(self, projected: torch.Tensor,
                    text_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text tokens and bias the resampler attends to: as given, or pooled into one token (no bias)."""
        if self.config.input_pool == "mean":
            return pool_tokens(projected, text_bias), None
        return projected, text_bias

    def time_embed(self, timesteps: Timesteps, batch: int) -> torch.Tensor:
        """-> (B, 1, time_embed_dim) in the module's dtype."""
        t = self._seen_t(broadcast_timesteps(timesteps, batch, self.device))
        sinusoid = timestep_sinusoid(t, self.config.time_channel).to(self.dtype)
        return self.time_embedding(sinusoid).unsqueeze(1)

    def _check_bias(self, text_bias: torch.Tensor | None, projected: torch.Tensor) -> torch.Tensor | None:
        if text_bias is None:
            return None
        if tuple(text_bias.shape) != tuple(projected.shape[:2]):
            raise ValueError(f"ELLA: text_bias must have shape (batch, tokens) = {tuple(projected.shape[:2])}, "
                             f"got {tuple(text_bias.shape)}")
        return text_bias.to(device=self.device, dtype=self.dtype)

    def forward_projected(self, projected: torch.Tensor, timesteps: Timesteps,
                          text_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Projected prompt (B, L, width) at timesteps (number, [1] or [B]) -> context (B, num_latents, width)."""
        self._check_features(projected, self.config.width, "projected text")
        projected = projected.to(device=self.device, dtype=self.dtype)
        text_bias = self._check_bias(text_bias, projected)
        temb = self.time_embed(timesteps, projected.shape[0])
        text, text_bias = self._text_input(projected, text_bias)
        return self.connector(text, temb, text_bias)

    def forward(self, text_features: torch.Tensor, timesteps: Timesteps,
                text_bias: torch.Tensor | None = None) -> torch.Tensor:
        """LLM features (B, L, input_dim) at timesteps (number, [1] or [B]) -> context (B, num_latents, width).

        text_bias (B, L), optional: added to every block's and head's attention logits of the text tokens
        (not the latents' own keys): -inf leaves a token out (padding in a batch of unequal prompts), log(w)
        multiplies its unnormalised attention by w (prompt weights). None is the reference computation."""
        return self.forward_projected(self.project_text(text_features), timesteps, text_bias)

    def time_state(self, timestep: float) -> tuple:
        """Everything that depends only on t, for one t, in the shapes of a batch of one (as forward_projected
        computes it for one prompt): latents + time_aware_linear(temb) (1, N, W), and per block the three
        (shift, scale) pairs, each (1, 1, W)."""
        temb = self.time_embed(timestep, 1)  # (1, 1, T)
        latents = self.connector.latents.unsqueeze(0) + self.connector.time_aware_linear(F.silu(temb))
        return latents, [block.modulations(temb) for block in self.connector.perceiver_blocks]

    def forward_many(self, projected: torch.Tensor, timesteps: torch.Tensor,
                     text_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Projected prompts (R, L, width) at one timestep per row (R,) -> contexts (R, num_latents, width).

        Rows are any mix of prompts (of one token length L) and timesteps; row i is forward_projected of
        row i alone (see the module docstring for where that holds bit for bit). The t-only part runs once
        per distinct t; the token side runs once for all rows.
        """
        self._check_features(projected, self.config.width, "projected text")
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
        if t.numel() != projected.shape[0]:
            raise ValueError(f"ELLA: forward_many got {t.numel()} timesteps for {projected.shape[0]} rows")
        t = self._seen_t(t)  # constant t: one time state for every row (time_state would zero each anyway)
        projected = projected.to(device=self.device, dtype=self.dtype)
        text_bias = self._check_bias(text_bias, projected)
        if self.config.num_latents < STACK_MIN_ROWS and projected.shape[0] > 1:
            return torch.cat([self.forward_many(projected[i:i + 1], t[i:i + 1],
                                                None if text_bias is None else text_bias[i:i + 1])
                              for i in range(len(t))])
        projected, text_bias = self._text_input(projected, text_bias)
        values = t.tolist()
        distinct = list(dict.fromkeys(values))
        states = {v: self.time_state(v) for v in distinct}
        if len(distinct) == 1:  # every row at one t: broadcast instead of copying
            latents, mods = states[distinct[0]]
            latents = latents.expand(len(values), -1, -1)
        else:
            latents = torch.cat([states[v][0] for v in values])  # (R, N, W)
            per_block = zip(*(states[v][1] for v in values))  # per block: R tuples of 3 (shift, scale) pairs
            mods = [tuple(tuple(torch.cat([row[j][k] for row in rows]) for k in range(2)) for j in range(3))
                    for rows in per_block]
        resampler = self.connector
        text_normed = F.layer_norm(projected, projected.shape[-1:], eps=ELLAConfig.NORM_EPS)
        for block, block_mods in zip(resampler.perceiver_blocks, mods):
            latents = block(latents, projected, text_normed, None, modulations=block_mods, text_bias=text_bias)
        return latents

    def pooled(self, context: torch.Tensor) -> torch.Tensor:
        """SDXL's pooled text embedding from this step's context: (B, N, width) -> (B, pooled_dim)."""
        if self.config.pooled_dim is None:
            raise ValueError("ELLA: this connector has no pooled head (pooled_dim is None); it targets SD1.5-style bases")
        return self.pooled_proj(context.mean(dim=1))
