"""The denoise stage's figures against their definition, on a tiny random UNet: each loss is the epsilon MSE
of the seeded noise draw at its timestep (recomputed here by hand), the same whatever the batching and for
every method, and the share of the text gap is (uncond - row) / (uncond - base)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.alignment import denoise, unet_training
from bench.alignment.profiles import PROFILES

CAPTIONS = ["a red circle on the left", "a blue square on the right", "a green triangle on the left",
            "a yellow circle on the right and a red square on the left"]
TIMESTEPS = (0, 250, 999)


@pytest.fixture(scope="module")
def tiny():
    from bench.alignment.base import make_unet
    from bench.alignment.weak_encoder import WeakEncoder, world_vocabulary

    profile = PROFILES["smoke"]
    torch.manual_seed(0)
    unet = make_unet(profile).eval().requires_grad_(False)
    encoder = WeakEncoder(vocabulary=world_vocabulary(), dim=profile.context_dim, length=profile.text_length).eval()
    scheduler = unet_training.make_scheduler(profile.train_timesteps)
    latents = torch.randn(len(CAPTIONS), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                          generator=torch.Generator().manual_seed(1))
    noise = denoise.draw_noise("test_seen", len(CAPTIONS), TIMESTEPS, 2, latents.shape[1:])
    return unet, encoder, scheduler, latents, noise


def _weak(encoder):
    return lambda texts, t: encoder.encode(list(texts)).float()


@pytest.mark.parametrize("batch", [1, 5, 7, 256])
def test_each_loss_is_the_mse_of_its_own_seeded_draw_whatever_the_batching(tiny, batch):
    unet, encoder, scheduler, latents, noise = tiny
    got = denoise.losses(unet, scheduler, _weak(encoder), latents, CAPTIONS, TIMESTEPS, noise, batch=batch)
    assert got.shape == (len(CAPTIONS), len(TIMESTEPS), 2)
    alphas = scheduler.alphas_cumprod.double()
    with torch.no_grad():
        for i, j, d in [(0, 0, 0), (3, 2, 1), (1, 1, 0), (2, 2, 1)]:
            t = TIMESTEPS[j]
            eps = torch.randn(tuple(latents.shape[1:]), generator=torch.Generator().manual_seed(
                denoise.noise_seed("test_seen", i, t, d)))
            a = alphas[t]
            x = (a.sqrt() * latents[i].double() + (1 - a).sqrt() * eps.double()).float()[None]
            pred = unet(x, torch.tensor([t]), encoder_hidden_states=encoder.encode([CAPTIONS[i]])).sample[0]
            assert got[i, j, d] == pytest.approx(float(((pred - eps) ** 2).mean()), rel=1e-4), (i, j, d, batch)


def test_noise_is_seeded_per_split_scene_timestep_and_draw(tiny):
    *_, latents, noise = tiny
    again = denoise.draw_noise("test_seen", len(CAPTIONS), TIMESTEPS, 2, latents.shape[1:])
    assert torch.equal(noise, again)  # the same for every method (each draws it from the seeds)
    other = denoise.draw_noise("test_heldout", len(CAPTIONS), TIMESTEPS, 2, latents.shape[1:])
    flat = torch.cat([noise, other]).flatten(0, 3)
    assert len({tuple(x.flatten()[:4].tolist()) for x in flat}) == len(flat)  # no two draws alike


def test_a_method_with_the_base_context_gets_the_base_losses_and_a_share_of_one(tiny):
    unet, encoder, scheduler, latents, noise = tiny
    empty = encoder.encode([""]).float()

    def run(context_at, texts=CAPTIONS):
        return denoise.losses(unet, scheduler, context_at, latents, texts, TIMESTEPS, noise)[None]

    per_row = {"uncond": run(lambda texts, t: empty.expand(len(texts), -1, -1)), "base": run(_weak(encoder)),
               "copy": run(_weak(encoder), list(CAPTIONS)),
               "shuffled": run(_weak(encoder), denoise.shuffled_texts(CAPTIONS))}
    assert np.array_equal(per_row["copy"], per_row["base"])
    assert not np.array_equal(per_row["uncond"], per_row["base"])
    rows = denoise.summary(per_row, TIMESTEPS)
    assert rows["base"]["share"] == 1.0 and rows["copy"]["share"] == 1.0 and rows["uncond"]["share"] == 0.0
    gap = rows["uncond"]["mean"] - rows["base"]["mean"]
    assert rows["shuffled"]["share"] == pytest.approx((rows["uncond"]["mean"] - rows["shuffled"]["mean"]) / gap)
    for k, t in enumerate(TIMESTEPS):
        assert rows["base"]["per_t"][str(t)] == pytest.approx(per_row["base"][:, :, k].mean())


@pytest.mark.parametrize("seed", range(6))
def test_summary_obeys_its_definition_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    shapes = {"uncond": 1, "shuffled": 1, "base": 1, "tsc": 2, "upper": 1}
    per_row = {row: rng.uniform(0.01, 0.05, size=(m, 5, 3, 2)) for row, m in shapes.items()}
    rows = denoise.summary(per_row, (10, 500, 900))
    u, b = per_row["uncond"].mean(), per_row["base"].mean()
    for row, losses in per_row.items():
        assert rows[row]["mean"] == pytest.approx(losses.mean())
        assert rows[row]["share"] == pytest.approx((u - losses.mean()) / (u - b))
        assert rows[row]["per_model"] == pytest.approx([m.mean() for m in losses])
        assert np.mean(list(rows[row]["per_t"].values())) == pytest.approx(losses.mean())
    same = denoise.summary({"uncond": per_row["base"], "base": per_row["base"]}, (10, 500, 900))
    assert same["base"]["share"] is None  # no gap: no share (not a NaN)


@pytest.mark.parametrize("seed", range(8))
def test_shuffled_captions_are_another_scenes_never_its_own(seed):
    rng = np.random.default_rng(seed)
    texts = [CAPTIONS[k] for k in rng.integers(0, 3, size=int(rng.integers(2, 12)))]
    shuffled = denoise.shuffled_texts(texts)
    assert len(shuffled) == len(texts) and set(shuffled) <= set(texts)
    for own, other in zip(texts, shuffled):
        assert other != own or len(set(texts)) == 1


@pytest.mark.parametrize("timesteps, draws, message", [
    ((50, 1000), 2, "1000"), ((-1,), 2, "-1"), ((), 2, "denoise_timesteps"), ((50,), 0, "denoise_draws"),
])
def test_bad_settings_are_refused_naming_them(timesteps, draws, message):
    with pytest.raises(ValueError, match=message):
        denoise.check_timesteps(timesteps, 1000, draws)


def test_report_table_has_a_row_per_method_and_reference_with_its_share():
    from bench.alignment import generate, report

    rng = np.random.default_rng(0)
    rows = {row: rng.uniform(0.01, 0.05, size=(2 if row == "tsc" else 1, 4, 2, 1)) for row in denoise.ROWS}
    results = {"timesteps": [10, 900], "draws": 1, "scenes": {s: 4 for s in generate.SPLITS},
               "splits": {s: denoise.summary(rows, (10, 900)) for s in generate.SPLITS}}
    text = report.denoise_tables(results)
    for split in generate.SPLITS:
        part = text.split(f"({split},")[1].split("\n\n")[1]  # that split's table
        lines = part.splitlines()[2:]
        assert len(lines) == len(denoise.ROWS)
        for row, line in zip(denoise.ROWS, lines):
            r = results["splits"][split][row]
            assert line.startswith(f"| {denoise.LABELS[row]}") and f"| {r['mean']:.5f} | {r['share']:.2f} |" in line
            assert f"| {r['per_t']['900']:.5f} |" in line
    assert "(2 training seeds)" in text and "(uncond - method) / (uncond - base)" in text
