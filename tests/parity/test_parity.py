"""A whole ComfyUI graph gives what the ELLA authors' diffusers pipeline gives (issue 11; docs/parity.md).

Both worlds get the same random weights: one tiny SD1.5 UNet (ComfyUI file, converted to diffusers with
ComfyUI's key map), one tiny T5 encoder with ComfyUI's bundled T5 tokenizer, one connector in the released
layout. The reference side (tests/parity/reference_ella.py) never imports our code; our side is a real
ComfyUI server running UNETLoader -> ELLA Timestep Conditioning -> KSampler with ELLA Prompt Encode
positive and empty negative -> SaveLatent, queued over HTTP.

For each case we assert, in this order: the sigma schedules are equal; the UNet gets the same timesteps;
at every UNet call the same input latent and, for cond and uncond, the same context; the final latents are
equal, to REL_TOL (1e-4 of each tensor's scale, from float32 arithmetic: tests/parity/harness.py). Then the
same comparison with one piece of our side broken on purpose must fail by a wide margin.
"""

from __future__ import annotations

import pytest
import torch

from devtools import tiny_models as tm
from tests.parity.diffusers_unet import PARITY_UNET
from tests.parity.harness import (CASES, MUTATIONS, PROMPT, REL_TOL, assert_same_schedule, parity_errors, post_mutation,
                                  reference_run, rel, run_ours)


def test_the_two_unets_agree_on_one_call(worlds):
    """Before anything else: ComfyUI's UNet (UNETLoader's loader) and the converted diffusers UNet, one call."""
    tm.import_comfy()
    import comfy.sd

    ours = comfy.sd.load_diffusion_model(str(worlds.base / "models" / "diffusion_models" / PARITY_UNET))
    assert type(ours.model.model_config).__name__ == "SD15"
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 16, 768, generator=gen)
    t = torch.tensor([999.0, 249.0])
    with torch.no_grad():
        mine = ours.model.diffusion_model(x, t, context=context)
        theirs = worlds.reference["unet"](x, t, encoder_hidden_states=context).sample
        other = ours.model.diffusion_model(x, t, context=context * 1.1)
    assert rel(mine, theirs) <= REL_TOL
    assert rel(other, mine) > 100 * REL_TOL  # the output really depends on the context


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_graph_matches_reference_pipeline(worlds, case):
    ref = reference_run(worlds, case, PROMPT)
    ours = run_ours(worlds, case, PROMPT, case.name)
    assert_same_schedule(ours, ref)
    errors = parity_errors(ours, ref)
    print(f"\n[parity] {case.name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(v <= REL_TOL for v in errors.values()), f"{case.name}: relative errors {errors} > {REL_TOL}"
    assert ref.latent.abs().max() > 0.1 and rel(ref.latent, ref.calls[0].x) > 0.1  # the run did something


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_parity_fails_when_one_piece_is_off(worlds, mutation):
    """Each mutation on our side alone: the same comparison must now miss its tolerance by >= 10x."""
    case = CASES[0]
    prompt = f"{PROMPT}, case {mutation}"  # a new prompt: no cached encoding or node output is reused
    post_mutation(worlds.server, mutation)
    try:
        ours = run_ours(worlds, case, prompt, f"mut-{mutation}", reuse=False)
    finally:
        post_mutation(worlds.server, "none")
    errors = parity_errors(ours, reference_run(worlds, case, prompt))
    print(f"\n[parity] mutation {mutation}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["context"] > 10 * REL_TOL and errors["latent"] > 10 * REL_TOL, errors
