"""Test-only ComfyUI node pack: records what the UNet receives at every call.

Node `ELLATestRecorder` (MODEL, out_dir -> MODEL) adds a keyed DIFFUSION_MODEL wrapper that writes, for
every UNet forward, `call_NNNN.safetensors` with the UNet's timesteps `t` (B,), its `context` (B, N, C),
the call's `sigma` and, as metadata, `cond_or_uncond`. Tests compare these with the connector computed
directly at `t`.
"""

import json
import os
import threading

import comfy.patcher_extension as pe
from safetensors.torch import save_file

_lock = threading.Lock()


def make_recorder(out_dir):
    os.makedirs(out_dir, exist_ok=True)

    def record(executor, x, timesteps, context, *args, **kwargs):
        topts = args[2] if len(args) > 2 else kwargs.get("transformer_options", {})
        with _lock:
            n = len([f for f in os.listdir(out_dir) if f.startswith("call_")])
            tensors = {"t": timesteps.detach().float().cpu().contiguous(),
                       "context": context.detach().float().cpu().contiguous(),
                       "sigma": topts["sigmas"].detach().float().cpu().contiguous(),
                       "x": x.detach().float().cpu().contiguous()}
            meta = {"cond_or_uncond": json.dumps(topts.get("cond_or_uncond", [])),
                    "has_control": json.dumps(args[1] is not None if len(args) > 1 else False)}
            save_file(tensors, os.path.join(out_dir, f"call_{n:04d}.safetensors"), metadata=meta)
        return executor(x, timesteps, context, *args, **kwargs)

    return record


class ELLATestRecorder:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "out_dir": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, out_dir):
        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "ella_test_recorder", make_recorder(out_dir))
        return (m,)


NODE_CLASS_MAPPINGS = {"ELLATestRecorder": ELLATestRecorder}
