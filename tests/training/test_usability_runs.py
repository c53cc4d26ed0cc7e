"""The trainer as a script, as users of other trainers expect it: epochs, the held-out validation loss, validation
images with a negative prompt, report_to, a Hugging Face imagefolder and kohya's .caption files, a data set
too small for one batch, file modes under the user's umask, and two gloo processes logging and counting once."""

from __future__ import annotations

import json
import random
import stat
from pathlib import Path

import pytest
import torch
from tests.training.train_helpers import png_bytes, python, read_metrics, run_trainer, synthetic_samples, write_folder


def _common(base: Path, llm: Path, data, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={base}", f"llm.source={llm}", f"data.path={data}", f"output_dir={out}", *extra]


def _imagefolder(root: Path, n: int) -> Path:
    """A Hugging Face imagefolder: images plus metadata.jsonl (file_name, text)."""
    root.mkdir(parents=True)
    rows = []
    for key, image, captions in synthetic_samples(n, seed=11):
        image.save(root / f"{key}.png")
        rows.append(json.dumps({"file_name": f"{key}.png", "text": captions[0]}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def _umask(mask: int) -> list[str]:
    return ["sh", "-c", f'umask {mask:03o} && exec "$0" "$@"', python()]


def _modes(out: Path) -> dict[str, set[str]]:
    files, dirs = set(), set()
    for p in [out, *out.rglob("*")]:
        (dirs if p.is_dir() else files).add(oct(stat.S_IMODE(p.stat().st_mode)))
    return {"files": files, "dirs": dirs}


def _reference_val_loss(base: Path, out: Path, step: int) -> tuple[float, int]:
    """The held-out loss recomputed from scratch: the checkpoint's connector, each listed sample's cached latents
    and first caption, its fixed seed, one sample at a time."""
    from safetensors import safe_open

    from ella_core import load_ella
    from training.config import ModelConfig
    from training.loop import draw_noise
    from training.models import load_base
    from training.cache import FeatureCache
    from training.validation import heldout_seed

    models = load_base(ModelConfig(pretrained=str(base)), torch.device("cpu"), torch.float32)
    connector = load_ella(out / "checkpoints" / f"step-{step:08d}" / "connector.safetensors")
    folder = next((out / "cache").glob("*/index.json")).parent
    cache = FeatureCache(folder)
    entries = {e["key"]: e for e in (cache.entry(i) for i in range(len(cache)))}
    keys = (out / "holdout.txt").read_text().split()
    losses = []
    with torch.no_grad():
        for key in keys:
            e = entries[key]
            with safe_open(str(folder / e["shard"]), framework="pt") as f:
                latents = f.get_tensor(f"{e['slot']}.latent")[None].float()
                features = f.get_tensor(f"{e['slot']}.text.0")[None].float()
            t, noise = draw_noise([heldout_seed(0, key)], tuple(latents.shape[1:]), 1000, 0.0)
            noisy = models.scheduler.add_noise(latents, noise, t)
            pred = models.unet(noisy, t, encoder_hidden_states=connector(features, t.float())).sample
            losses.append(((pred - noise) ** 2).mean().item())
    return sum(losses) / len(losses), len(keys)


def test_epochs_holdout_validation_and_umask_on_an_imagefolder(tiny_sd15, tiny_t5, tmp_path):
    """24 samples, 4 held out, batch 4: an epoch is 5 steps; max_epochs=2 ends the run at step 10 (max_steps is
    larger), the cosine schedule ends there, val/loss every 2 steps equals a from-scratch computation, the
    images use the negative prompt, nothing goes to tensorboard, and every output has the umask 002 modes."""
    data = _imagefolder(tmp_path / "hf", 24)
    out = tmp_path / "run"
    run_trainer(*_common(tiny_sd15, tiny_t5, data, out), "data.caption_columns=[text]", "train.max_steps=50",
                "train.max_epochs=2", "validation.holdout=4", "validation.every=2", "validation.steps=2",
                'validation.prompts=["a plain red picture, flat", "a plain blue picture"]',
                "validation.negative_prompt=a plain black picture", "validation.images_per_prompt=2",
                "train.report_to=none", "train.checkpoint_every=2", launcher=_umask(0o002))
    metrics = read_metrics(out)
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 11))
    assert [m["epoch"] for m in train] == pytest.approx([0.2 * s for s in range(1, 11)])
    assert train[-1]["samples_seen"] == 40  # 2 epochs of the 20 training samples
    # cosine over the resolved 10 steps (2 warm-up): lr(step 9) = 0.5 (1 + cos(pi 7/8)) x 1e-3
    import math

    assert train[-1]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert [m["step"] for m in val] == [2, 4, 6, 8, 10] and all(m["val_samples"] == 4 for m in val)
    held = (out / "holdout.txt").read_text().split()
    assert len(held) == 4 and len(set(held)) == 4
    for step in (2, 10):
        expected, n = _reference_val_loss(tiny_sd15, out, step)
        assert n == 4 and next(m for m in val if m["step"] == step)["val_loss"] == pytest.approx(expected, rel=1e-4)
    names = sorted(p.name for p in (out / "samples" / "step-00000010").iterdir())
    assert names == ["00-0.png", "00-1.png", "01-0.png", "01-1.png"]
    assert not (out / "tensorboard").exists()
    # the negative prompt was encoded into the cache with the prompts
    from safetensors.torch import load_file

    from training.cache import prompt_key

    prompts = load_file(str(next((out / "cache").glob("*/prompts.safetensors"))))
    assert prompt_key("a plain black picture") in prompts and prompt_key("a plain red picture, flat") in prompts
    assert _modes(out) == {"files": {oct(0o664)}, "dirs": {oct(0o775)}}


def test_umask_022_modes_and_the_default_tensorboard(tiny_sd15, tiny_t5, datasets, tmp_path):
    out = tmp_path / "run"
    run_trainer(*_common(tiny_sd15, tiny_t5, datasets["folder"], out), "train.max_steps=2", "train.ema_decay=0.9",
                launcher=_umask(0o022))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("ella.safetensors", "ella_ema.safetensors", "config.yaml", "metrics.jsonl",
                 "checkpoints/step-00000002/connector.safetensors", "checkpoints/step-00000002/ema.safetensors"):
        assert (out / name).is_file(), name
    assert _modes(out) == {"files": {oct(0o644)}, "dirs": {oct(0o755)}}


FAKE_WANDB = '''
"""Test double of wandb (records what the trainer calls; the real one is not installed in the test venv)."""
import json, os

def _write(event):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(event) + "\\n")

class Image:
    def __init__(self, array):
        self.shape = list(array.shape)

class _Run:
    def log(self, values, step=None):
        _write({"log": {k: v if isinstance(v, (int, float)) else [i.shape for i in v] for k, v in values.items()},
                "step": step})

    def finish(self):
        _write({"finish": True})

def init(**kwargs):
    _write({"init": {k: v for k, v in kwargs.items() if k != "config"}, "config": sorted(kwargs.get("config", {})),
            "WANDB_MODE": os.environ.get("WANDB_MODE")})
    return _Run()
'''


def test_report_to_wandb_imports_it_and_leaves_its_mode_to_the_environment(tiny_sd15, tiny_t5, datasets, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb.jsonl"
    out = tmp_path / "run"
    env = {"PYTHONPATH": str(fake), "FAKE_WANDB_LOG": str(log), "WANDB_MODE": "offline"}
    run_trainer(*_common(tiny_sd15, tiny_t5, datasets["folder"], out), "train.max_steps=2", "train.report_to=wandb",
                "train.wandb_project=my-project", "validation.every=2", "validation.prompts=[a plain red picture]",
                "validation.steps=2", "validation.holdout=4", env=env)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    init = events[0]
    assert init["init"]["project"] == "my-project" and "mode" not in init["init"]  # WANDB_MODE decides
    assert init["WANDB_MODE"] == "offline" and init["config"] == ["cache", "connector", "data", "llm", "model",
                                                                   "optim", "output_dir", "seed", "train",
                                                                   "validation"]
    assert init["init"]["id"] == (out / "wandb_run_id").read_text().strip()
    logged = {(e["step"], k) for e in events if "log" in e for k in e["log"]}
    assert {(1, "train/loss"), (2, "train/loss"), (2, "train/epoch"), (2, "val/loss"), (2, "validation")} <= logged
    images = next(e["log"]["validation"] for e in events if "log" in e and "validation" in e["log"])
    assert images == [[32, 32, 3]]
    assert events[-1] == {"finish": True}
    assert not (out / "tensorboard").exists()


def test_too_few_samples_are_refused_before_the_cache_pass(tiny_sd15, tiny_t5, tmp_path):
    data = write_folder(tmp_path / "small", synthetic_samples(6, seed=2))
    (data / "img0000.txt").unlink()  # 5 usable
    for extra, numbers in [(["train.batch_size=8"], "5 usable sample(s), fewer than one global batch of 8"),
                           (["train.batch_size=4", "validation.holdout=2"],
                            "5 usable sample(s), 2 of them held out by validation.holdout=2, fewer than one global "
                            "batch of 4")]:
        out = tmp_path / f"run-{len(extra)}"
        with pytest.raises(AssertionError) as info:
            run_trainer(*_common(tiny_sd15, tiny_t5, data, out), *extra)
        stderr = str(info.value)
        assert "trainer failed (1)" in stderr and numbers in stderr, stderr[-2000:]
        assert "listed before the cache pass; 1 entry not usable" in stderr
        assert "building the feature cache" not in stderr and "Traceback" not in stderr
        assert not list((out / "cache").glob("*/*.safetensors"))


@pytest.mark.parametrize("cache", ["true", "false"])
def test_two_processes_log_once_and_count_each_skip_once(tiny_sd15, tiny_t5, tmp_path, cache):
    """Two gloo ranks over a kohya-style folder (.caption files) with one corrupt image and one image without a
    caption: the log has each info/warning line once, the skip counts are the data set's (not per rank), and
    the held-out split is the one a single process chooses."""
    data = tmp_path / "kohya"
    data.mkdir()
    for key, image, captions in synthetic_samples(20, seed=8):
        image.save(data / f"{key}.png")
        (data / f"{key}.caption").write_text(captions[0] + "\n")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "broken.caption").write_text("a plain red picture\n")
    (data / "img0003.caption").unlink()
    (data / "img0003.txt").write_text("a .txt is not read when data.caption_extension is .caption\n")
    out = tmp_path / "run"
    torchrun = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(random.randint(20000, 40000))]
    proc = run_trainer(*_common(tiny_sd15, tiny_t5, data, out), "train.max_steps=2", "train.batch_size=2",
                       "train.backend=gloo", "data.caption_extension=.caption", f"cache.enabled={cache}",
                       "validation.holdout=3", "validation.every=2", "train.checkpoint_every=2",
                       launcher=torchrun, timeout=400)
    stderr = proc.stderr
    assert stderr.count("skipped 2 unusable samples") == 1, stderr[-3000:]
    assert stderr.count("optimizer steps (train.max_steps=2") == 1 and stderr.count("connector: ELLAConfig") == 1
    assert stderr.count("validation loss on 3 held-out samples") == 1
    from training.data import Skip

    metrics = read_metrics(out)
    assert all(m["skipped"] == 2 for m in metrics if "loss" in m)
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["skipped"]["counts"] == {Skip.UNREADABLE_IMAGE: 1, Skip.NO_CAPTION: 1}
    assert [m["val_samples"] for m in metrics if "val_loss" in m] == [3]
    # the split is the single-process one: a hash of the keys, whatever the number of processes
    from training.split import split_holdout

    keys = [f"img{i:04d}.png" for i in range(20) if i != 3]
    _, held = split_holdout(keys, 3, 0)
    assert sorted((out / "holdout.txt").read_text().split()) == sorted(keys[i] for i in held)
