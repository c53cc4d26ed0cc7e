"""Stage 6 samples `profile.parallel_runs` models at a time in threads of one process (generate.sample_models):
the images must be exactly those of one model after another with the same threads per model, even where the
threads share one UNet (the ELLA arms all run the base's)."""

from __future__ import annotations

import threading

import pytest
import torch

from bench.alignment import generate, unet_training


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    return unet.eval().requires_grad_(False)


class _Fixed(generate.Conditioner):
    """A method whose context is a fixed tensor (cond) and a function of t (uncond), like the ELLA arms'."""

    def __init__(self, unet, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.unet, self.cond = unet, torch.randn(6, 5, 16, generator=g)
        self.scale = torch.randn(1, 5, 16, generator=g)

    def contexts(self, texts):
        return self.cond, (lambda t: self.scale * (t.float() / 1000))


def _jobs(unet, n):
    return [(f"m{i % 3}", (lambda i=i: _Fixed(unet, i))) for i in range(n)]


def _sample(conditioner):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    cond, uncond = conditioner.contexts([])
    return unet_training.sample(conditioner.unet, scheduler, cond, uncond, 4, 3.0, seed=list(range(6)))


@pytest.mark.parametrize("models", [1, 2, 5])
def test_models_sampled_in_threads_equal_models_sampled_in_turn(tiny_unet, models):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = generate.sample_models(_jobs(tiny_unet, models), _sample, 1)
        torch.set_num_threads(2)
        together = generate.sample_models(_jobs(tiny_unet, models), _sample, 2)
        assert torch.get_num_threads() == 2  # the stage's threads are restored
    finally:
        torch.set_num_threads(before)
    assert len(alone) == len(together) == models
    for (a, _), (b, seconds) in zip(alone, together):
        assert torch.equal(a, b) and seconds > 0
    if models > 1:  # different models give different images (the comparison can fail)
        assert not torch.equal(alone[0][0], alone[1][0])


def test_each_thread_gets_its_share_of_the_threads_and_errors_reach_the_caller():
    seen: list[tuple[int, int]] = []
    barrier = threading.Barrier(2, timeout=10)

    def sample(conditioner):
        barrier.wait()  # both models are being sampled at once
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return conditioner

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        out = generate.sample_models([("a", lambda: "x"), ("b", lambda: "y")], sample, 2)
        assert [r for r, _ in out] == ["x", "y"]
        assert len({ident for ident, _ in seen}) == 2 and {n for _, n in seen} == {2}

        def failing(conditioner):
            raise ValueError(f"bad model {conditioner}")

        with pytest.raises(ValueError, match="bad model y"):
            generate.sample_models([("a", lambda: "x"), ("b", lambda: "y")],
                                   lambda c: c if c == "x" else failing(c), 2)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
