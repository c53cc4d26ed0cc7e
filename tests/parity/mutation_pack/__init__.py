"""Test-only ComfyUI pack: breaks one piece of the ELLA pack inside the running server, on request.

`POST /ella_parity/mutation {"name": ...}` patches the ella-tsc modules already loaded in this server
(found in sys.modules by their file under the ella-tsc checkout) until the next request; "none" restores
them. The parity test uses it to show that its comparison fails when a piece is off:

- `sin_cos`: the connector's timestep sinusoid with the sine half first (ella_core.connector.timestep_sinusoid);
- `no_t5_mask`: the LLM runs without its attention mask (ella_core.text_encoder.LLMTextEncoder._forward);
- `t_plus_1`: the hook converts sigma to t + 1 for the connector (nodes.hook.ella_conds_for_step), while
  the UNet keeps the true t.
While a mutation is on, the hook's runs use no cross-run context store (nodes.hook.shared_store).

No nodes. Never installed outside the tests.
"""

import os
import sys

import torch
from aiohttp import web
from server import PromptServer

REPO = os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", ".."))
_originals: dict = {}


def _pack_module(suffix: str):
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if name.endswith(suffix) and os.path.realpath(path).startswith(REPO + os.sep):
            return module
    raise LookupError(f"no loaded module *{suffix} from {REPO}")


def _patch(module, attr: str, value) -> None:
    _originals.setdefault((module, attr), getattr(module, attr))
    setattr(module, attr, value)


def _restore() -> None:
    for (module, attr), value in _originals.items():
        setattr(module, attr, value)
    _originals.clear()


def _sin_cos():
    connector = _pack_module(".ella_core.connector")
    original = connector.timestep_sinusoid

    def swapped(t, channels):
        cos, sin = original(t, channels).chunk(2, dim=-1)
        return torch.cat([sin, cos], dim=-1)

    _patch(connector, "timestep_sinusoid", swapped)


def _no_t5_mask():
    cls = _pack_module(".ella_core.text_encoder").LLMTextEncoder
    original = cls._forward

    def unmasked(self, input_ids, mask):
        return original(self, input_ids, torch.ones_like(mask))

    _patch(cls, "_forward", unmasked)


class _ShiftedSampling:
    """model_sampling whose timestep() is one step late; everything else is the model's own."""

    def __init__(self, inner):
        self._inner = inner

    def timestep(self, sigma):
        return self._inner.timestep(sigma) + 1

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _ShiftedModel:
    def __init__(self, inner):
        self._inner = inner
        self.model_sampling = _ShiftedSampling(inner.model_sampling)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _t_plus_1():
    hook = _pack_module(".nodes.hook")
    original = hook.ella_conds_for_step

    def late(model, *args, **kwargs):
        return original(_ShiftedModel(model), *args, **kwargs)

    _patch(hook, "ella_conds_for_step", late)


MUTATIONS = {"sin_cos": _sin_cos, "no_t5_mask": _no_t5_mask, "t_plus_1": _t_plus_1}


@PromptServer.instance.routes.post("/ella_parity/mutation")
async def set_mutation(request):
    name = (await request.json()).get("name", "none")
    if name != "none" and name not in MUTATIONS:
        return web.json_response({"error": f"unknown mutation {name!r}; known: {sorted(MUTATIONS)}"}, status=400)
    _restore()
    if name != "none":
        MUTATIONS[name]()
        # A patched function changes results no key of the cross-run context store can see: mutated runs
        # neither read contexts of unmutated ones nor leave theirs behind.
        _patch(_pack_module(".nodes.hook"), "shared_store", lambda: None)
    return web.json_response({"mutation": name})


NODE_CLASS_MAPPINGS = {}
