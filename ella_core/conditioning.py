"""What an ELLA prompt carries into the sampler, and how it becomes a cross-attention context at one step.

Sampler-agnostic by design: an `EllaPrompt` keeps the LLM features (never padded or repeated), the
connector that reads them and optional CLIP tokens; `ContextCache.context(prompt, t)` turns them into the
UNet context for the timestep the model is evaluated at. A cache lives for one sampling run, so the text
projection is computed once per prompt and the connector once per (prompt, timestep), batched: one forward
for all prompts of a model call, a few for a whole planned schedule (`ContextCache.precompute`). Given a
`ContextStore` (ella_core/context_store.py), a run first looks there for contexts earlier runs computed.
ComfyUI-free: the node pack's sampler hook (nodes/hook.py) does the ComfyUI plumbing.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .connector import ELLA
from .context_store import ContextStore, tensor_version, weights_signature


COMPILE_ENV = "ELLA_TSC_COMPILE"  # "1": run the connector's forward through torch.compile (off by default)
_COMPILED: "weakref.WeakKeyDictionary[ELLA, Callable]" = weakref.WeakKeyDictionary()


def connector_forward(ella: ELLA) -> Callable:
    """ella.forward_many, compiled when $ELLA_TSC_COMPILE is "1". Off by default: on CPU the connector is
    bound by its matrix products, which compiling does not speed up; bench/gpu_check.py measures a GPU."""
    if os.environ.get(COMPILE_ENV) != "1":
        return ella.forward_many
    if ella not in _COMPILED:
        _COMPILED[ella] = torch.compile(ella.forward_many, dynamic=True)
    return _COMPILED[ella]


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


class ELLAConnectorMismatch(ValueError):
    """A prompt encoded for one connector reached a sampler hook that runs another."""


def _connector_label(connector) -> str:
    name = getattr(connector, "name", None)
    return f"'{name}'" if name else repr(connector)


def _connector_config(connector):
    module = getattr(connector, "module", None)
    return getattr(module, "config", None)


def check_same_connector(prompt: "EllaPrompt", connector) -> None:
    """The connector that runs (the hook's) must be the one the prompt was encoded for: the same object, or
    the same file (name) with the same config (two loaders of one file, or a dtype copy of it)."""
    if connector is None or prompt.connector is connector:
        return
    same_name = getattr(prompt.connector, "name", None) == getattr(connector, "name", None) is not None
    if same_name and _connector_config(prompt.connector) == _connector_config(connector):
        return
    raise ELLAConnectorMismatch(
        f"ELLA: the prompt {prompt.text[:60]!r} was encoded by ELLA Prompt Encode for connector "
        f"{_connector_label(prompt.connector)}, but ELLA Timestep Conditioning runs connector "
        f"{_connector_label(connector)}. The connector wired into ELLA Timestep Conditioning is the one that runs: "
        "connect the same Load ELLA Connector to both nodes.")


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
    text_bias: optional (B, L) float32 added to the text tokens' attention logits in the connector (log prompt
    weights, ella_core.prompt_weights); None (a prompt without weights) runs the reference computation.
    Identity (not value) equality: cache keys use the object itself.
    """

    features: torch.Tensor
    connector: Callable[[], ELLA]
    text: str = ""
    clip_tokens: Optional[torch.Tensor] = None
    clip_weight: float = 1.0
    clip_pooled: Optional[torch.Tensor] = None
    name: str = "ELLA prompt"
    text_bias: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.text_bias is not None and tuple(self.text_bias.shape) != tuple(self.features.shape[:2]):
            raise ELLAShapeError(f"ELLA: the prompt's text_bias has shape {tuple(self.text_bias.shape)}, its features "
                                 f"{tuple(self.features.shape)}: one bias per (prompt row, token) is needed")

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    def __deepcopy__(self, memo):  # read-only after creation: copies of a conditioning share it
        return self


Row = tuple  # (prompt, row of its feature batch, model timestep as a float): one context of N tokens


@dataclass
class CacheStats:
    projections: int = 0  # project_text calls (once per prompt and connector placement)
    connector_calls: int = 0  # contexts computed, one per (prompt row, timestep)
    forwards: int = 0  # connector forward passes (forward_many calls) that computed them
    precomputed: int = 0  # of connector_calls, computed ahead from the sampler's planned schedule
    cpu_seconds: float = 0.0  # this thread's CPU time in the connector (projection included; the bench's figure)
    reused: int = 0  # contexts taken from the cross-run ContextStore instead of computed


@dataclass
class ContextCache:
    """Per-sampling-run cache: projection once per prompt, connector output once per (prompt row, timestep).

    All contexts one model call needs (cond, uncond, regional prompts, batch rows) come from one
    `ELLA.forward_many` per token length; `precompute` fills the planned schedule in a few such forwards of at
    most `max_rows_per_forward` rows (bounded activations), keeping at most `precompute_budget_bytes` of
    contexts ahead. A context's value never depends on which path computed it (see ELLA.forward_many).
    On-demand contexts (off-schedule t: heun/dpm_2 midpoints, custom samplers) are kept in an LRU of
    `max_contexts` entries: samplers revisit a timestep only at neighbouring evaluations.

    connector: the run's connector (the sampler hook's); None uses each prompt's own (`EllaPrompt.connector`).
    store: contexts of earlier runs (looked up before computing; what this run computes is added); None: none.
    """

    connector: Optional[Callable[[], ELLA]] = None
    max_contexts: int = 64
    max_rows_per_forward: int = 32
    precompute_budget_bytes: int = 256 * 2**20
    projected: dict = field(default_factory=dict)
    contexts: OrderedDict = field(default_factory=OrderedDict)  # on demand, LRU
    planned: dict = field(default_factory=dict)  # precomputed for the schedule, kept for the run
    stats: CacheStats = field(default_factory=CacheStats)
    checked: set = field(default_factory=set)  # prompts whose connector was checked against this run's
    store: Optional[ContextStore] = None
    from_store: dict = field(default_factory=dict)  # taken from the store, kept for the run (shared tensors)
    signatures: dict = field(default_factory=dict)  # id(module) -> its weights at this run's first store access

    def holds(self, rows: list) -> bool:
        """Whether every row's context is cached already."""
        ella = self.ensure_connector(rows[0][0])
        return all(self._lookup(self._key(r, ella), ella) is not None for r in rows)

    def ensure_connector(self, prompt: EllaPrompt) -> ELLA:
        """The module that runs, wherever model management put it."""
        return (self.connector or prompt.connector)()

    def _projected(self, prompt: EllaPrompt, ella: ELLA) -> torch.Tensor:
        key = (prompt, ella.device, ella.dtype)
        if key not in self.projected:
            with torch.no_grad():
                self.projected[key] = ella.project_text(prompt.features)  # (B, L, width)
            self.stats.projections += 1
        return self.projected[key]

    @staticmethod
    def _key(row: Row, ella: ELLA) -> tuple:
        prompt, i, t = row
        return prompt, i, t, ella.device, ella.dtype

    def _lookup(self, key: tuple, ella: Optional[ELLA] = None) -> Optional[torch.Tensor]:
        if key in self.planned:
            return self.planned[key]
        if key in self.contexts:
            self.contexts.move_to_end(key)
            return self.contexts[key]
        if key in self.from_store:
            return self.from_store[key]
        if self.store is not None and ella is not None:
            value = self.store.get(*self._store_key(key, ella))
            if value is not None:
                self.from_store[key] = value
                self.stats.reused += 1
            return value
        return None

    def _store_key(self, key: tuple, ella: ELLA) -> tuple:
        """(owners, key) in the store: everything a context is a function of. The prompt (features, text bias)
        and the module by identity; their tensors' version counters, the module's weights signature, row, t,
        device, dtype and the compiled path by value."""
        prompt, i, t, device, dtype = key
        if id(ella) not in self.signatures:
            self.signatures[id(ella)] = (weights_signature(ella), os.environ.get(COMPILE_ENV) == "1")
        bias = prompt.text_bias
        versions = (tensor_version(prompt.features), None if bias is None else tensor_version(bias))
        return (prompt, ella), (i, t, device, dtype, versions, self.signatures[id(ella)])

    def _keep(self, key: tuple, value: torch.Tensor, ella: ELLA) -> torch.Tensor:
        """Offer a computed context to the store; returns the tensor to use (the stored one, when kept)."""
        if self.store is None:
            return value
        return self.store.put(*self._store_key(key, ella), value)

    def _compute(self, rows: list, ella: ELLA) -> list:
        """Contexts (N, W) of `rows`, stacked into forwards per token length, at most max_rows_per_forward each."""
        start = time.thread_time()
        try:
            return self._compute_rows(rows, ella)
        finally:
            self.stats.cpu_seconds += time.thread_time() - start

    def _compute_rows(self, rows: list, ella: ELLA) -> list:
        # Rows with a text bias (prompt weights) never share a forward with rows without one: a zero bias would
        # send those through the masked attention kernel, which need not round like the unmasked one.
        by_length: dict = {}
        for n, row in enumerate(rows):
            by_length.setdefault((row[0].features.shape[1], row[0].text_bias is not None), []).append(n)
        out: list = [None] * len(rows)
        with torch.no_grad():
            for (_, biased), members in by_length.items():
                for start in range(0, len(members), self.max_rows_per_forward):
                    chunk = members[start:start + self.max_rows_per_forward]
                    projected = torch.cat([self._projected(rows[n][0], ella)[rows[n][1]:rows[n][1] + 1] for n in chunk])
                    t = torch.tensor([rows[n][2] for n in chunk], dtype=torch.float32)
                    if biased:
                        bias = torch.cat([rows[n][0].text_bias[rows[n][1]:rows[n][1] + 1] for n in chunk])
                        result = connector_forward(ella)(projected, t, bias)  # (R, N, W)
                    else:
                        result = connector_forward(ella)(projected, t)  # (R, N, W)
                    self.stats.forwards += 1
                    for j, n in enumerate(chunk):
                        out[n] = result[j]
        self.stats.connector_calls += len(rows)
        return out

    def fetch(self, rows: list) -> list:
        """Contexts (N, W) for every row, computing all missing ones together (one forward per token length)."""
        if not rows:
            return []
        ella = self.ensure_connector(rows[0][0])
        keys = [self._key(r, ella) for r in rows]
        found = [self._lookup(k, ella) for k in keys]
        missing = list(dict.fromkeys(k for k, v in zip(keys, found) if v is None))
        if missing:
            computed = [self._keep(k, v, ella) for k, v in zip(missing, self._compute([k[:3] for k in missing], ella))]
            for k, v in zip(missing, computed):
                self.contexts[k] = v
            while len(self.contexts) > max(self.max_contexts, len(missing)):
                self.contexts.popitem(last=False)
            new = dict(zip(missing, computed))
            found = [v if v is not None else new[k] for k, v in zip(keys, found)]
        return found

    def precompute(self, rows: list) -> int:
        """Compute ahead the planned rows not held yet, in schedule order, up to the memory budget.

        Returns how many were computed. Rows beyond the budget are left for a later call (or on demand);
        planned contexts of earlier calls are dropped first, as samplers move forward through a schedule.
        """
        if not rows:
            return 0
        ella = self.ensure_connector(rows[0][0])
        todo = [r for r in dict.fromkeys(rows) if self._lookup(self._key(r, ella), ella) is None]
        if not todo:
            return 0
        per_context = ella.config.num_latents * ella.config.width * torch.finfo(ella.dtype).bits // 8
        limit = max(1, self.precompute_budget_bytes // per_context)
        if len(self.planned) + len(todo) > limit:
            self.planned.clear()
        todo = todo[:limit]
        for row, value in zip(todo, self._compute(todo, ella)):
            key = self._key(row, ella)
            self.planned[key] = self._keep(key, value, ella)
        self.stats.precomputed += len(todo)
        return len(todo)

    def connector_output(self, prompt: EllaPrompt, t: torch.Tensor) -> torch.Tensor:
        """Connector output at model timesteps t ((1,) shared, or (n,) one per sample) -> (B or n, latents, width).

        With one shared timestep the prompt's own batch is kept (the caller repeats it to the latent batch);
        with several, sample j gets prompt row j % B (whole samples tiled, as ComfyUI batches) at t[j].
        """
        return torch.stack(self.fetch(self.rows(prompt, t)))

    @staticmethod
    def rows(prompt: EllaPrompt, t: torch.Tensor) -> list:
        """The rows whose contexts make up prompt's context at model timesteps t (see connector_output)."""
        values = [float(v) for v in t.reshape(-1).float().tolist()]
        if len(values) == 1:
            return [(prompt, i, values[0]) for i in range(prompt.batch)]
        return [(prompt, j % prompt.batch, v) for j, v in enumerate(values)]

    def context(self, prompt: EllaPrompt, t: torch.Tensor, device: torch.device,
                dtype: Optional[torch.dtype] = None, output: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The UNet context for `prompt` at model timesteps t: ELLA tokens, then weighted CLIP tokens.

        -> (B', N [+ Lc], width) on `device`; B' is the prompt batch (shared t) or len(t).
        output: the connector_output already fetched for these t (saves a lookup).
        """
        out = self.connector_output(prompt, t) if output is None else output
        ctx = out.to(device=device, dtype=dtype or torch.float32)
        if prompt.clip_tokens is not None:
            clip = prompt.clip_tokens.to(device=device, dtype=ctx.dtype) * prompt.clip_weight
            batch = max(ctx.shape[0], clip.shape[0])
            ctx = torch.cat([repeat_to_batch(ctx, batch), repeat_to_batch(clip, batch)], dim=1)
        return ctx

    def pooled(self, prompt: EllaPrompt, t: torch.Tensor, device: torch.device,
               output: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """SDXL pooled vector for this step: the connector's pooled head on its output, else CLIP's pooled."""
        ella = self.ensure_connector(prompt)
        if ella.config.pooled_dim is not None:
            out = self.connector_output(prompt, t) if output is None else output
            with torch.no_grad():
                return ella.pooled(out).to(device=device, dtype=torch.float32)
        if prompt.clip_pooled is not None:
            return prompt.clip_pooled.to(device=device, dtype=torch.float32)
        return None
