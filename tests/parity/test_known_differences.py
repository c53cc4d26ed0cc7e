"""Where a user's ComfyUI run and the reference's diffusers run legitimately differ, measured (docs/parity.md).

Both are conventions of the samplers, not of ELLA: the same graph reproduces the reference once they are
lined up (test_parity.py). Each test shows that the difference is exactly the documented one and nothing else.
"""

from __future__ import annotations

import math

from tests.parity.harness import (CASES, PROMPT, REL_TOL, Case, ddim_sd15_shipped, parity_errors, reference_run, rel,
                                  run_ours)


def test_diffusers_euler_starts_at_sigma_max_instead_of_its_sqrt_plus_one(worlds):
    """diffusers' Euler with "trailing"/"linspace" spacing scales the initial noise by sigma_max, ComfyUI (and
    diffusers' own "leading" spacing) by sqrt(sigma_max^2 + 1): the first UNet input is 0.23 % smaller."""
    case = next(c for c in CASES if c.sampler == "euler" and c.token_mode == "fixed")
    ours = run_ours(worlds, case, PROMPT, case.name)
    shipped = reference_run(worlds, case, PROMPT, comfy_start=False)
    sigma_max = float(shipped.sigmas[0])
    factor = math.sqrt(sigma_max ** 2 + 1) / sigma_max
    assert rel(ours.calls[0]["x"][:1], shipped.calls[0].x[:1] * factor) <= REL_TOL  # that factor, nothing else
    errors = parity_errors(ours, shipped)
    print(f"\n[parity] diffusers' Euler start (x{factor:.6f}): " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["latent"] > 10 * REL_TOL


def test_sd15_shipped_ddim_vs_comfy_ddim_uniform(worlds):
    """SD1.5's shipped DDIM config and ComfyUI's ddim_uniform visit the same timesteps (751, 501, 251, 1 for
    4 steps) but (a) ComfyUI starts from noise * sigma(751) (not the top of the schedule, so no
    sqrt(sigma^2 + 1)) where DDIM starts from the unit noise itself, and (b) DDIM's last step lands on
    alphas_cumprod[0] (sigma 0.029) where ComfyUI lands on sigma 0."""
    case = Case("ddim_uniform_vs_shipped", "ddim", "ddim_uniform", ddim_sd15_shipped, steps=4, cfg=4.0,
                token_mode="fixed")
    ours = run_ours(worlds, case, PROMPT, case.name)
    ref = reference_run(worlds, case, PROMPT)
    assert ref.timesteps.tolist() == [751, 501, 251, 1]
    assert [float(c["t"][0]) for c in ours.calls] == [751.0, 501.0, 251.0, 1.0]
    sigma0 = float(ref.sigmas[0])
    factor = sigma0 / math.sqrt(sigma0 ** 2 + 1)
    assert rel(ours.calls[0]["x"][:1], ref.calls[0].x[:1] * factor) <= REL_TOL  # (a): that factor, nothing else
    assert 0.02 < float(ref.sigmas[-1]) < 0.04  # (b)
    errors = parity_errors(ours, ref)
    print(f"\n[parity] shipped DDIM vs ddim_uniform (start x{factor:.6f}, last sigma {float(ref.sigmas[-1]):.4f}): "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["context"] <= REL_TOL  # the connector still gets the same timesteps and prompts
    assert errors["latent"] > 10 * REL_TOL

