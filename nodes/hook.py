"""The exact per-step ELLA hook: ComfyUI keyed wrappers that rebuild each ELLA cond's context at every call.

How it works (see docs/nodes.md):
- ELLA Prompt Encode puts an `EllaPrompt` (LLM features) into `options["model_conds"]["ella"]` (an
  `ELLACond`), which ComfyUI carries unchanged into the sampler, next to a placeholder `c_crossattn`.
- ELLA Timestep Conditioning installs an `EllaHook` holding *its* connector: the one source of truth for
  which connector runs (a prompt encoded for another connector is refused with both names).
- Its CALC_COND_BATCH wrapper runs at every model evaluation, before ComfyUI batches conds and before
  ControlNet. It reads sigma -> t with the model's *current* `model_sampling.timestep`, and swaps each ELLA
  cond's `c_crossattn` for `connector(features, t)` on shallow copies of the cond dicts. All ELLA prompts of
  the call (cond, uncond, regional, batch rows) come from one batched connector forward; on the first call
  (and whenever it runs out) the contexts of the sampler's whole planned schedule
  (`transformer_options["sample_sigmas"]`) are computed ahead in a few large forwards, so only off-schedule
  evaluations (heun/dpm_2 midpoints, custom samplers) run the connector during sampling. ComfyUI's own
  batching, areas, masks, timestep ranges, ControlNet and padding then run unchanged.
- Its OUTER_SAMPLE wrapper opens a fresh `ContextCache` for the sampling run, backed by the process's
  `ContextStore` (ella_core/context_store.py): a re-queued graph (new seed, same prompts, connector and
  schedule) takes every context from there and runs no connector forward; a changed schedule computes only
  its new timesteps. The run's counters are logged at DEBUG level and kept in `EllaHook.last_stats`.
Wrappers are added with `add_wrapper_with_key`, so other packs' wrappers keep running; the hook object is
shared by clones (never deep-copied), so cloning a model never copies tensors.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Callable, Optional

import torch

import comfy.conds
import comfy.patcher_extension as pe

from ..ella_core.conditioning import CacheStats, ContextCache, EllaPrompt, check_same_connector
from ..ella_core.context_store import shared_store

WRAPPER_KEY = "ella"  # our key among ComfyUI's keyed wrappers
COND_KEY = "ella"  # our entry in a cond's model_conds
ADDITIONAL_MODELS_KEY = "ella_connector"

_RUN_CACHE: contextvars.ContextVar[ContextCache | None] = contextvars.ContextVar("ella_run_cache", default=None)
log = logging.getLogger("ella-tsc")

MISSING_HOOK = ("ELLA conditioning reached the model without the ELLA per-step hook: pass the MODEL through "
                "'ELLA Timestep Conditioning' before the sampler.")


class ELLACond(comfy.conds.CONDRegular):
    """Carries an EllaPrompt through ComfyUI's cond plumbing to the CALC_COND_BATCH wrapper.

    The wrapper removes it from the conds it hands on; if it is still there when ComfyUI batches conds, the
    model was not patched, and `concat` fails with a message saying which node is missing.
    """

    def __init__(self, cond: EllaPrompt):
        self.cond = cond

    def process_cond(self, batch_size, **kwargs):
        return self

    def can_concat(self, other):
        return True

    def concat(self, others):
        raise RuntimeError(MISSING_HOOK)

    def size(self):
        return [1, 1, 1]


def current_cache() -> ContextCache | None:
    """The cache of the sampling run in progress on this thread (None outside a run)."""
    return _RUN_CACHE.get()


def connector_dtype(model) -> torch.dtype:
    """The dtype the connector runs in beside `model` (a ModelPatcher): fp32 on CPU, else the UNet's compute
    dtype (its manual-cast dtype when weights are stored in another one)."""
    if model.load_device.type == "cpu":
        return torch.float32
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


def _skipped_at(cond: dict, sigma) -> bool:
    """Mirror of ComfyUI's timestep-range gate (samplers.get_area_and_mult): no context needed then."""
    sigma = float(sigma)
    if "timestep_start" in cond and sigma > cond["timestep_start"]:
        return True
    if "timestep_end" in cond and sigma < cond["timestep_end"]:
        return True
    return False


def _model_context_dim(model) -> int | None:
    unet_config = getattr(getattr(model, "model_config", None), "unet_config", {}) or {}
    return unet_config.get("context_dim")


def _ella_entries(conds: list):
    """(list index, cond index, cond dict, EllaPrompt) of every ELLA cond."""
    for a, cond_list in enumerate(conds):
        for b, cond in enumerate(cond_list or []):
            entry = cond.get("model_conds", {}).get(COND_KEY)
            if entry is not None:
                yield a, b, cond, entry.cond


def _planned_rows(model, entries: list, sigma_now: torch.Tensor, schedule: torch.Tensor) -> list:
    """Rows (prompt, row, t) of every ELLA cond at every planned sigma from this call on (within its range)."""
    planned = schedule.detach().reshape(-1).to(sigma_now.device, sigma_now.dtype)
    planned = planned[(planned > 0) & (planned <= sigma_now)]
    if planned.numel() == 0:
        return []
    ts = model.model_sampling.timestep(planned).float()
    rows = []
    for sigma, t in zip(planned.tolist(), ts.cpu().tolist()):
        for _, _, cond, prompt in entries:
            if not _skipped_at(cond, sigma):
                rows.extend(ContextCache.rows(prompt, torch.tensor([t])))
    return rows


def ella_conds_for_step(model, conds: list, x_in: torch.Tensor, sigma: torch.Tensor, cache: ContextCache,
                        schedule: Optional[torch.Tensor] = None) -> list:
    """conds with every ELLA cond's c_crossattn (and SDXL pooled part of y) computed for this call's sigma.

    sigma: (B,) the per-sample sigmas of this call (ComfyUI passes sigma, not t). t is read from the model's
    model_sampling now, so ModelSamplingDiscrete/LCM/v-prediction patches are honoured. schedule: the run's
    planned sigmas, if known; their contexts are precomputed (same values as on demand, only earlier).
    """
    t = model.model_sampling.timestep(sigma).float()  # (B,)
    shared = bool((t == t[0]).all())
    t_use = t[:1] if shared else t
    entries = list(_ella_entries(conds))
    for _, _, _, prompt in entries:
        if prompt not in cache.checked:
            check_same_connector(prompt, cache.connector)
            cache.checked.add(prompt)
    active = [e for e in entries if not _skipped_at(e[2], sigma[0])]
    rows_per = [ContextCache.rows(e[3], t_use) for e in active]
    all_rows = [r for rows in rows_per for r in rows]
    if schedule is not None and shared and all_rows and not cache.holds(all_rows):
        cache.precompute(_planned_rows(model, entries, sigma[0], schedule))
    fetched = cache.fetch(all_rows)  # everything still missing: one forward per token length
    replaced = {}
    start = 0
    for (a, b, cond, prompt), rows in zip(active, rows_per):
        output = torch.stack(fetched[start:start + len(rows)])  # (B' , N, W)
        start += len(rows)
        model_conds = {k: v for k, v in cond["model_conds"].items() if k != COND_KEY}
        model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(cache.context(prompt, t_use, x_in.device, output=output))
        y = model_conds.get("y")
        if y is not None and isinstance(y.cond, torch.Tensor):
            pooled = cache.pooled(prompt, t_use, x_in.device, output=output)
            if pooled is not None:  # SDXL: the pooled text vector is the first slot of y
                y_new = y.cond.clone()
                batch = max(y_new.shape[0], pooled.shape[0])
                y_new = y_new[:1].repeat(batch, 1) if y_new.shape[0] != batch else y_new
                y_new[:, : pooled.shape[1]] = pooled.to(y_new.dtype)
                model_conds["y"] = type(y)(y_new)
        new_cond = dict(cond)
        new_cond["model_conds"] = model_conds
        replaced[(a, b)] = new_cond
    if not entries:
        return conds
    return [None if cond_list is None else [replaced.get((a, b), cond) for b, cond in enumerate(cond_list)]
            for a, cond_list in enumerate(conds)]


class EllaHook:
    """The wrappers of one ELLA Timestep Conditioning node, holding the connector that runs (its `ella` input).

    `last_stats` keeps the cache counters of the latest finished run (for the bench and tests).
    """

    def __init__(self, connector: Callable) -> None:
        self.connector = connector
        self.last_stats: Optional[CacheStats] = None

    def outer_sample(self, executor, *args, **kwargs):
        """Opens a ContextCache for one sampling run and drops it afterwards: only what the bounded, weakly
        keyed ContextStore keeps outlives the run."""
        cache = ContextCache(connector=self.connector, store=shared_store())
        token = _RUN_CACHE.set(cache)
        try:
            return executor(*args, **kwargs)
        finally:
            _RUN_CACHE.reset(token)
            self.last_stats = s = cache.stats
            log.debug("ELLA run: %d contexts computed in %d connector forwards (%d precomputed), %d reused from "
                      "the context store", s.connector_calls, s.forwards, s.precomputed, s.reused)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        """CALC_COND_BATCH wrapper: replace ELLA contexts for this evaluation, then let ComfyUI do the rest."""
        if any(c is not None and any(COND_KEY in x.get("model_conds", {}) for x in c) for c in conds):
            cache = current_cache()
            if cache is None or cache.connector is not self.connector:  # outside outer_sample: this call only
                cache = ContextCache(connector=self.connector, store=shared_store())
            schedule = model_options.get("transformer_options", {}).get("sample_sigmas")
            conds = ella_conds_for_step(model, conds, x_in, timestep, cache, schedule)
        return executor(model, conds, x_in, timestep, model_options)

    def __deepcopy__(self, memo):  # clones share the hook (and its connector): nothing is copied
        return self


def installed_hook(model) -> Optional[EllaHook]:
    """The EllaHook on a ModelPatcher, if ELLA Timestep Conditioning was applied."""
    for fn in model.get_wrappers(pe.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY):
        if isinstance(getattr(fn, "__self__", None), EllaHook):
            return fn.__self__
    return None


def patch_model(model, connector_patcher=None, connector: Optional[Callable] = None):
    """A clone of `model` (ModelPatcher) with the ELLA hook installed once, running `connector`.

    The connector patcher loads/offloads with the UNet through ComfyUI's additional-models mechanism.
    """
    m = model.clone()
    hook = EllaHook(connector)
    for wrapper_type, fn in ((pe.WrappersMP.CALC_COND_BATCH, hook.calc_cond_batch),
                             (pe.WrappersMP.OUTER_SAMPLE, hook.outer_sample)):
        m.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)  # applying the node twice stays one hook
        m.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)
    if connector_patcher is not None:
        m.set_additional_models(ADDITIONAL_MODELS_KEY, [connector_patcher])
    return m
