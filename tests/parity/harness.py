"""The two worlds of the parity tests side by side: the cases (ComfyUI sampler/scheduler and the
diffusers scheduler with the same sigmas), the users' graph, one run in each world, and the comparison.

Tolerance: everything runs in float32 on the CPU, but the two worlds compute the same maths with
different kernels and orders (nn.MultiheadAttention vs SDPA, CFG on eps vs on x0, DDIM's alpha form vs
ComfyUI's Euler-in-sigma form), so each value may differ by a few float32 ulps per op; REL_TOL = 1e-4 of
the tensor's own scale (max |value|) is ~800 ulps and leaves room for that but nothing else: the mutation
cases (one piece of our side broken on purpose) miss it by orders of magnitude (docs/parity.md).
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from devtools import tiny_models as tm
from tests.nodes.graphs import chunks, read_calls
from tests.parity.conftest import PARITY_ELLA, Worlds
from tests.parity.diffusers_unet import PARITY_UNET
from tests.parity.reference_ella import RefRun, run_reference

REL_TOL = 1e-4  # max |ours - reference| / max |reference|, per compared tensor (see the module docstring)
SIGMA_RTOL = 1e-5  # ComfyUI builds its sigma table in float64, diffusers in float32 (cumprod of 1000 terms)
SD15_LATENT_SCALE = 0.18215  # ComfyUI's LATENT outputs are divided by it; diffusers keeps the scaled latent
PROMPT = "a red fox sitting in fresh snow under a pale winter sky, two pine trees behind it"
SEED = 42
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1)


def euler_trailing():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SD15_SCHEDULER, timestep_spacing="trailing")


def ddim_trailing():
    from diffusers import DDIMScheduler

    # set_alpha_to_one: the last step lands on the clean latent (sigma 0), as ComfyUI's schedule does
    return DDIMScheduler(**SD15_SCHEDULER, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)


def ddim_sd15_shipped():
    """DDIM as SD1.5's scheduler_config.json ships it: "leading" spacing from t = 1, final alpha alphas_cumprod[0]."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD15_SCHEDULER, timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)


def dpmpp_2m_trailing():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SD15_SCHEDULER, timestep_spacing="trailing", algorithm_type="dpmsolver++",
                                       solver_order=2, final_sigmas_type="zero", lower_order_final=True)


@dataclass(frozen=True)
class Case:
    name: str
    sampler: str  # ComfyUI sampler_name
    scheduler: str  # ComfyUI scheduler
    reference_scheduler: Callable
    steps: int
    cfg: float
    token_mode: str  # "fixed" (128 tokens, as trained) or "flexible"

    @property
    def max_length(self) -> Optional[int]:
        return 128 if self.token_mode == "fixed" else None


# diffusers' "trailing" spacing gives the integer timesteps 999, 999 - 1000/n, ...; ComfyUI's "simple"
# scheduler picks the same entries of the same sigma table when n divides 1000.
CASES = [
    Case("euler_cfg7.5_fixed", "euler", "simple", euler_trailing, steps=5, cfg=7.5, token_mode="fixed"),
    Case("ddim_cfg4_fixed", "ddim", "simple", ddim_trailing, steps=4, cfg=4.0, token_mode="fixed"),
    Case("euler_cfg5_flexible", "euler", "simple", euler_trailing, steps=4, cfg=5.0, token_mode="flexible"),
    Case("dpmpp_2m_cfg6_fixed", "dpmpp_2m", "simple", dpmpp_2m_trailing, steps=5, cfg=6.0, token_mode="fixed"),
]
MUTATIONS = ("sin_cos", "no_t5_mask", "t_plus_1")


def comfy_graph(case: Case, *, prompt: str, rec_dir: str, prefix: str) -> dict:
    """The users' graph, API format: UNETLoader, Load ELLA (x2), ELLA Encode (+ empty negative), KSampler."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": PARITY_UNET, "weight_dtype": "default"}},
        "ella": {"class_type": "EllaTSCConnectorLoader", "inputs": {"ella_name": PARITY_ELLA}},
        "llm": {"class_type": "EllaTSCTextEncoderLoader",
                "inputs": {"model_name": tm.T5_NAME, "dtype": "fp32", "device": "cpu", "token_mode": case.token_mode,
                           "max_length": 128}},
        "pos": {"class_type": "EllaTSCEncode",
                "inputs": {"text_encoder": ["llm", 0], "ella": ["ella", 0], "text": prompt}},
        "neg": {"class_type": "EllaTSCEncode",  # the reference's negative: the empty string, encoded the same way
                "inputs": {"text_encoder": ["llm", 0], "ella": ["ella", 0], "text": ""}},
        "hook": {"class_type": "EllaTSCTimestepConditioning", "inputs": {"model": ["unet", 0], "ella": ["ella", 0]}},
        "rec": {"class_type": "ELLATestRecorder", "inputs": {"model": ["hook", 0], "out_dir": rec_dir}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["rec", 0], "seed": SEED, "steps": case.steps, "cfg": case.cfg, "sampler_name": case.sampler,
            "scheduler": case.scheduler, "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }


@dataclass
class OurRun:
    latent: torch.Tensor  # in diffusers' (scaled) latent units
    calls: list[dict]  # recorder files: t, sigma, x, context, cond_or_uncond


def run_ours(worlds: Worlds, case: Case, prompt: str, tag: str, *, reuse: bool = True) -> OurRun:
    """Queue the graph on the server; read the saved latent and the recorder's UNet calls back.

    reuse: a run of the same case and prompt earlier in the session is returned instead (the mutation
    checks pass False: the server is not in its normal state then)."""
    key = (case, prompt)
    if reuse and key in worlds.runs:
        return worlds.runs[key]
    rec = worlds.base / "recordings" / tag
    result = worlds.server.run(comfy_graph(case, prompt=prompt, rec_dir=str(rec), prefix=f"parity/{tag}"))
    (saved,) = result.outputs("save")["latents"]
    path = worlds.base / "output" / saved["subfolder"] / saved["filename"]
    run = OurRun(load_file(str(path))["latent_tensor"].float() * SD15_LATENT_SCALE, read_calls(rec))
    if reuse:
        worlds.runs[key] = run
    return run


def reference_run(worlds: Worlds, case: Case, prompt: str, comfy_start: bool = True) -> RefRun:
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED))  # comfy.sample.prepare_noise
    return run_reference(**worlds.reference, scheduler=case.reference_scheduler(), prompt=prompt, noise=noise,
                         steps=case.steps, guidance_scale=case.cfg, max_length=case.max_length, comfy_start=comfy_start)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to b's scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def parity_errors(ours: OurRun, ref: RefRun) -> dict:
    """Per-piece relative errors (context: worst call, cond and uncond; x: worst call input; latent: final)."""
    assert len(ours.calls) == len(ref.calls), f"{len(ours.calls)} UNet calls here, {len(ref.calls)} in the reference"
    errors = {"context": 0.0, "x": 0.0}
    for n, (mine, theirs) in enumerate(zip(ours.calls, ref.calls)):
        half = theirs.context.shape[0] // 2  # diffusers' CFG batch: uncond rows, then cond rows
        rows = {1: slice(0, half), 0: slice(half, None)}
        for which, t, context in chunks(mine):
            assert torch.equal(t, theirs.t.expand_as(t)), f"call {n}: UNet timestep {t.tolist()} vs {theirs.t.tolist()}"
            errors["context"] = max(errors["context"], rel(context, theirs.context[rows[which]]))
        assert mine["x"].shape == theirs.x.shape, f"call {n}: UNet input {mine['x'].shape} vs {theirs.x.shape}"
        errors["x"] = max(errors["x"], rel(mine["x"], theirs.x))  # under CFG both halves hold the same latent
    errors["latent"] = rel(ours.latent, ref.latent)
    return errors


def assert_same_schedule(ours: OurRun, ref: RefRun) -> None:
    """The sigmas ComfyUI sampled at (one per UNet call) are the reference scheduler's, which ends at 0."""
    planned = ref.sigmas
    assert planned[-1] == 0, f"reference schedule does not end at sigma 0: {planned.tolist()}"
    used = torch.stack([c["sigma"].reshape(-1)[0] for c in ours.calls])
    assert used.shape == planned[:-1].shape, f"ComfyUI sigmas {used.tolist()} vs reference {planned.tolist()}"
    torch.testing.assert_close(used, planned[:-1], rtol=SIGMA_RTOL, atol=0)


def post_mutation(server, name: str) -> None:
    req = urllib.request.Request(server.url + "/ella_parity/mutation", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["mutation"] == name
