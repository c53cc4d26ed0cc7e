"""What an ELLA prompt carries into the sampler, and how it becomes a cross-attention context at one step.

Sampler-agnostic by design: an `EllaPrompt` keeps the LLM features (never padded or repeated), the
connector that reads them and optional CLIP tokens; `ContextCache.context(prompt, t)` turns them into the
UNet context for the timestep the model is evaluated at. A cache lives for one sampling run, so the text
projection is computed once per prompt and the connector once per (prompt, timestep).
ComfyUI-free: the node pack's sampler hook (nodes/hook.py) does the ComfyUI plumbing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .connector import ELLA


class ELLAShapeError(ValueError):
    """An ELLA prompt/connector/model combination whose widths do not fit together."""


def check_context_width(connector: ELLA, model_context_dim: Optional[int], connector_name: str = "the connector",
                        model_name: str = "the diffusion model") -> None:
    """The connector's output width must equal the UNet's cross-attention width (SD1.5 768, SDXL 2048)."""
    if model_context_dim is not None and connector.config.width != model_context_dim:
        raise ELLAShapeError(
            f"{connector_name} outputs context width {connector.config.width}, but {model_name} expects "
            f"cross-attention width {model_context_dim} (SD1.5 768, SDXL 2048). Use a connector made for this "
            "base model.")


def repeat_to_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(b, ...) -> (batch, ...) by tiling whole samples (ComfyUI's rule for conditioning batches)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] > batch:
        return x[:batch]
    reps = -(-batch // x.shape[0])
    return x.repeat((reps,) + (1,) * (x.ndim - 1))[:batch]


@dataclass(eq=False)
class EllaPrompt:
    """One encoded prompt: LLM features plus what is needed to turn them into a context at any timestep.

    features: (B, L, D_llm) on CPU, exactly as the encoder produced them (no padding by repetition).
    connector: returns the ELLA module (a callable so a model manager can move/load it first).
    clip_tokens: optional (B, Lc, width) CLIP conditioning appended after the ELLA tokens, scaled by clip_weight.
    clip_pooled: optional (B, P) CLIP pooled output (SDXL), used when the connector has no pooled head.
    Identity (not value) equality: cache keys use the object itself.
    """

    features: torch.Tensor
    connector: Callable[[], ELLA]
    text: str = ""
    clip_tokens: Optional[torch.Tensor] = None
    clip_weight: float = 1.0
    clip_pooled: Optional[torch.Tensor] = None
    name: str = "ELLA prompt"

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    def __deepcopy__(self, memo):  # read-only after creation: copies of a conditioning share it
        return self


def _t_key(t: torch.Tensor) -> tuple:
    return tuple(float(v) for v in t.reshape(-1).tolist())


@dataclass
class CacheStats:
    projections: int = 0  # project_text calls
    connector_calls: int = 0  # forward_projected calls


@dataclass
class ContextCache:
    """Per-sampling-run cache: projection once per prompt, connector output once per (prompt, timestep).

    Contexts are kept in an LRU of `max_contexts` entries: samplers revisit a timestep only at neighbouring
    evaluations (heun/dpm_2 corrector, cond and uncond), so a long schedule need not keep every step's output.
    """

    max_contexts: int = 64
    projected: dict = field(default_factory=dict)
    contexts: OrderedDict = field(default_factory=OrderedDict)
    stats: CacheStats = field(default_factory=CacheStats)

    def _projected(self, prompt: EllaPrompt, ella: ELLA) -> torch.Tensor:
        key = (prompt, ella.device, ella.dtype)
        if key not in self.projected:
            self.projected[key] = ella.project_text(prompt.features)  # (B, L, width)
            self.stats.projections += 1
        return self.projected[key]

    def connector_output(self, prompt: EllaPrompt, t: torch.Tensor) -> torch.Tensor:
        """Connector output at model timesteps t ((1,) shared, or (N,) one per sample) -> (B or N, latents, width).

        With one shared timestep the prompt's own batch is kept (the caller repeats it to the latent batch);
        with several, the features are tiled to len(t) and each sample gets its own timestep.
        """
        ella = self.ensure_connector(prompt)
        t = t.reshape(-1).float()
        key = (prompt, ella.device, ella.dtype, _t_key(t))
        if key not in self.contexts:
            with torch.no_grad():
                projected = self._projected(prompt, ella)
                if t.numel() > 1:
                    projected = repeat_to_batch(projected, t.numel())
                self.contexts[key] = ella.forward_projected(projected, t.to(ella.device))
            self.stats.connector_calls += 1
            while len(self.contexts) > self.max_contexts:
                self.contexts.popitem(last=False)
        else:
            self.contexts.move_to_end(key)
        return self.contexts[key]

    @staticmethod
    def ensure_connector(prompt: EllaPrompt) -> ELLA:
        return prompt.connector()

    def context(self, prompt: EllaPrompt, t: torch.Tensor, device: torch.device,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The UNet context for `prompt` at model timesteps t: ELLA tokens, then weighted CLIP tokens.

        -> (B', N [+ Lc], width) on `device`; B' is the prompt batch (shared t) or len(t).
        """
        ctx = self.connector_output(prompt, t).to(device=device, dtype=dtype or torch.float32)
        if prompt.clip_tokens is not None:
            clip = prompt.clip_tokens.to(device=device, dtype=ctx.dtype) * prompt.clip_weight
            batch = max(ctx.shape[0], clip.shape[0])
            ctx = torch.cat([repeat_to_batch(ctx, batch), repeat_to_batch(clip, batch)], dim=1)
        return ctx

    def pooled(self, prompt: EllaPrompt, t: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        """SDXL pooled vector for this step: the connector's pooled head on its output, else CLIP's pooled."""
        ella = self.ensure_connector(prompt)
        if ella.config.pooled_dim is not None:
            with torch.no_grad():
                return ella.pooled(self.connector_output(prompt, t)).to(device=device, dtype=torch.float32)
        if prompt.clip_pooled is not None:
            return prompt.clip_pooled.to(device=device, dtype=torch.float32)
        return None
