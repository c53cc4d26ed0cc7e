"""The exact per-step ELLA hook: ComfyUI keyed wrappers that rebuild each ELLA cond's context at every call.

How it works (see docs/nodes.md):
- ELLA Prompt Encode puts an `EllaPrompt` into `options["model_conds"]["ella"]` (an `ELLACond`), which ComfyUI
  carries unchanged into the sampler, next to a placeholder `c_crossattn`.
- A CALC_COND_BATCH wrapper (keyed "ella") runs at every model evaluation, before ComfyUI batches conds
  and before ControlNet. It reads sigma -> t with the model's *current* `model_sampling.timestep`, and
  swaps each ELLA cond's `c_crossattn` for `connector(features, t)` on shallow copies of the cond dicts.
  ComfyUI's own batching, areas, masks, timestep ranges, ControlNet and padding then run unchanged.
- An OUTER_SAMPLE wrapper opens a fresh `ContextCache` for the sampling run (projection once per prompt,
  connector once per (prompt, t)).
Wrappers are added with `add_wrapper_with_key`, so other packs' wrappers keep running; they are plain
module-level functions, so cloning a model never copies tensors.
"""

from __future__ import annotations

import contextvars
import logging

import torch

import comfy.conds
import comfy.patcher_extension as pe

from ..ella_core.conditioning import ContextCache, EllaPrompt, check_context_width

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


def outer_sample_wrapper(executor, *args, **kwargs):
    """Opens a ContextCache for one sampling run and drops it afterwards (no tensors outlive the run)."""
    token = _RUN_CACHE.set(ContextCache())
    try:
        return executor(*args, **kwargs)
    finally:
        _RUN_CACHE.reset(token)


def _skipped_at(cond: dict, sigma: torch.Tensor) -> bool:
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


def ella_conds_for_step(model, conds: list, x_in: torch.Tensor, sigma: torch.Tensor, cache: ContextCache) -> list:
    """conds with every ELLA cond's c_crossattn (and SDXL pooled part of y) computed for this call's sigma.

    sigma: (B,) the per-sample sigmas of this call (ComfyUI passes sigma, not t). t is read from the model's
    model_sampling now, so ModelSamplingDiscrete/LCM/v-prediction patches are honoured.
    """
    t = model.model_sampling.timestep(sigma).float()  # (B,)
    shared = bool((t == t[0]).all())
    t_use = t[:1] if shared else t
    out = []
    for cond_list in conds:
        if cond_list is None:
            out.append(None)
            continue
        new_list = []
        for cond in cond_list:
            model_conds = cond.get("model_conds", {})
            entry = model_conds.get(COND_KEY)
            if entry is None or _skipped_at(cond, sigma[0]):
                new_list.append(cond)
                continue
            prompt: EllaPrompt = entry.cond
            check_context_width(cache.ensure_connector(prompt), _model_context_dim(model), prompt.name)
            context = cache.context(prompt, t_use, x_in.device)  # (Bp or B, N [+ Lc], width)
            model_conds = {k: v for k, v in model_conds.items() if k != COND_KEY}
            model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(context)
            y = model_conds.get("y")
            if y is not None and isinstance(y.cond, torch.Tensor):
                pooled = cache.pooled(prompt, t_use, x_in.device)
                if pooled is not None:  # SDXL: the pooled text vector is the first slot of y
                    y_new = y.cond.clone()
                    batch = max(y_new.shape[0], pooled.shape[0])
                    y_new = y_new[:1].repeat(batch, 1) if y_new.shape[0] != batch else y_new
                    y_new[:, : pooled.shape[1]] = pooled.to(y_new.dtype)
                    model_conds["y"] = type(y)(y_new)
            cond = dict(cond)
            cond["model_conds"] = model_conds
            new_list.append(cond)
        out.append(new_list)
    return out


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: replace ELLA contexts for this evaluation, then let ComfyUI do the rest."""
    if any(c is not None and any(COND_KEY in x.get("model_conds", {}) for x in c) for c in conds):
        cache = current_cache() or ContextCache()  # outside outer_sample (unusual): cache for this call only
        conds = ella_conds_for_step(model, conds, x_in, timestep, cache)
    return executor(model, conds, x_in, timestep, model_options)


def patch_model(model, connector_patcher=None):
    """A clone of `model` (ModelPatcher) with the ELLA hook installed once and the connector attached.

    The connector patcher loads/offloads with the UNet through ComfyUI's additional-models mechanism.
    """
    m = model.clone()
    for wrapper_type, fn in ((pe.WrappersMP.CALC_COND_BATCH, calc_cond_batch_wrapper),
                             (pe.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper)):
        m.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)  # applying the node twice stays one hook
        m.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)
    if connector_patcher is not None:
        m.set_additional_models(ADDITIONAL_MODELS_KEY, [connector_patcher])
    return m
