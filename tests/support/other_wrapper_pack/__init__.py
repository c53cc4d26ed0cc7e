"""Test-only ComfyUI node pack standing for "another pack": keyed APPLY_MODEL and CALC_COND_BATCH wrappers.

Node `OtherPackWrapper` (MODEL, out_dir -> MODEL) appends one line per call to `apply_model.log` and
`calc_cond_batch.log` in out_dir and changes nothing, so a test can prove both packs' wrappers ran.
"""

import os

import comfy.patcher_extension as pe


def _logger(path, name):
    def wrapper(executor, *args, **kwargs):
        with open(path, "a") as f:
            f.write(name + "\n")
        return executor(*args, **kwargs)
    return wrapper


class OtherPackWrapper:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "out_dir": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "other_pack",
                               _logger(os.path.join(out_dir, "apply_model.log"), "apply_model"))
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "other_pack",
                               _logger(os.path.join(out_dir, "calc_cond_batch.log"), "calc_cond_batch"))
        return (m,)


NODE_CLASS_MAPPINGS = {"OtherPackWrapper": OtherPackWrapper}
