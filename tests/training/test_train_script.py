"""training/train.py run as a real script on tiny real models: every data format, resume, SIGTERM, two
processes with gloo, SDXL, bad samples, init_from, and the connector learning to use the captions."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.training.train_helpers import (ROOT, TINY_CONFIG, TRAIN_SCRIPT, png_bytes, python, read_metrics, run_trainer, synthetic_samples,
                      write_folder)
from safetensors.torch import load_file

from ella_core import ELLA, load_ella, load_ella_with_metadata
from training import cache as feature_cache
from training.data import Skip


def _common(base: Path, llm: Path, data, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={base}", f"llm.source={llm}", f"data.path={data}", f"output_dir={out}", *extra]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _check_output(out: Path, steps: int, llm: Path, base_model: str = "sd15") -> ELLA:
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["loss"] > 0 for m in metrics)
    ella, meta = load_ella_with_metadata(out / "ella.safetensors")
    assert meta.base_model == base_model and meta.llm == str(llm) and meta.token_length == 16
    assert meta.token_mode == "fixed" and meta.extra["trained_steps"] == str(steps)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # it trained: the weights moved away from the seeded initialisation
    torch.manual_seed(0)
    initial = ELLA(ella.config)
    moved = [k for k, v in initial.state_dict().items() if not torch.equal(v, ella.state_dict()[k])]
    assert len(moved) > len(initial.state_dict()) // 2
    return ella


# ---------------------------------------------------------------- every data format, end to end
def test_folder_with_validation_images_and_ema(tiny_sd15, tiny_t5, datasets, tmp_path):
    out = tmp_path / "run"
    run_trainer(*_common(tiny_sd15, tiny_t5, datasets["folder"], out), "train.max_steps=3", "train.ema_decay=0.9",
                "validation.every=3", "validation.prompts=[a plain red picture, a plain blue picture]",
                "validation.steps=3")
    _check_output(out, 3, tiny_t5)
    images = sorted((out / "samples" / "step-00000003").glob("*.png"))
    assert len(images) == 2
    from PIL import Image

    assert Image.open(images[0]).size == (32, 32)
    ema = _tensors(out / "ella_ema.safetensors")
    raw = _tensors(out / "ella.safetensors")
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in raw)
    ckpt = out / "checkpoints" / "step-00000002"
    assert {p.name for p in ckpt.iterdir()} == {"connector.safetensors", "ema.safetensors", "optimizer.pt",
                                                "rng.pt", "trainer_state.json", "checksums.json"}
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # no pickled code needed
    assert not list((out / "checkpoints").glob(".tmp*"))


def test_jsonl_with_the_real_smollm2(tiny_sd15, smollm2, datasets, tmp_path):
    out = tmp_path / "run"
    run_trainer(*_common(tiny_sd15, smollm2, datasets["jsonl"], out), "train.max_steps=2",
                "data.caption_columns=[caption, dense]", "data.caption_rule=longest", "llm.dtype=float32")
    ella = _check_output(out, 2, smollm2)
    assert ella.config.input_dim == 576  # SmolLM2-135M's hidden size
    cache = feature_cache.FeatureCache(next((out / "cache").glob("*/index.json")).parent)
    assert len(cache) == 24 and all(len(cache.entry(i)["captions"]) == 2 for i in range(len(cache)))


def test_csv_online_without_cache_matches_the_cached_run(tiny_sd15, tiny_t5, datasets, tmp_path):
    common = _common(tiny_sd15, tiny_t5, datasets["csv"], None)[:3] + [
        "train.max_steps=2", "train.grad_accum=2", "train.batch_size=2", "data.caption_columns=[caption, dense]",
        "data.caption_dropout=0.3"]
    online, cached = tmp_path / "online", tmp_path / "cached"
    run_trainer(*common, f"output_dir={online}", "cache.enabled=false", "data.num_workers=1")
    _check_output(online, 2, tiny_t5)
    assert not (online / "cache").exists()
    assert read_metrics(online)[-1]["samples_seen"] == 8  # 2 steps x 2 micro-batches x 2 samples
    # the cache holds exactly what the online path computes: same captions, dropout, latents, losses
    run_trainer(*common, f"output_dir={cached}")
    assert [m["loss"] for m in read_metrics(cached)] == pytest.approx([m["loss"] for m in read_metrics(online)],
                                                                        rel=1e-5)


def test_webdataset_tars(tiny_sd15, tiny_t5, datasets, tmp_path):
    out = tmp_path / "run"
    run_trainer(*_common(tiny_sd15, tiny_t5, datasets["webdataset"], out), "train.max_steps=2", "data.num_workers=1")
    _check_output(out, 2, tiny_t5)


# ---------------------------------------------------------------- bad samples
def test_bad_samples_are_skipped_and_counted_in_a_run(tiny_sd15, tiny_t5, tmp_path):
    folder = write_folder(tmp_path / "data", synthetic_samples(12, seed=3))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt, with a caption
    (folder / "broken.txt").write_text("a plain red picture\n")
    good = png_bytes(synthetic_samples(1, seed=4)[0][1])
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut off
    (folder / "truncated.txt").write_text("a plain red picture\n")
    (folder / "img0000.txt").unlink()  # an image without a caption
    for mode in ("true", "false"):
        out = tmp_path / f"run-{mode}"
        proc = run_trainer(*_common(tiny_sd15, tiny_t5, folder, out), "train.max_steps=3", "train.batch_size=2",
                           f"cache.enabled={mode}", "train.checkpoint_every=3")
        assert "skipped" in proc.stderr
        state = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
        counts = state["skipped"]["counts"]
        assert counts.get(Skip.NO_CAPTION) == 1
        assert set(counts) <= {Skip.NO_CAPTION, Skip.UNREADABLE_IMAGE}, counts  # one stable key per fault
        unreadable = counts.get(Skip.UNREADABLE_IMAGE, 0)
        if mode == "true":  # the cache pass decodes every image once
            assert unreadable == 2
        else:  # the size scan catches the corrupt header; the truncated one fails when (if) it is drawn
            assert unreadable >= 1
        assert (out / "ella.safetensors").is_file()


def _bad_utf8_manifest(root: Path, kind: str) -> Path:
    from tests.training.train_helpers import write_csv, write_jsonl

    path = (write_jsonl if kind == "jsonl" else write_csv)(root, synthetic_samples(12, seed=6))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"plain", b"pl\xe4in")  # one invalid UTF-8 byte in a caption
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "webdataset"])
def test_malformed_sources_are_counted_in_a_run(tiny_sd15, tiny_t5, tmp_path, kind):
    """One invalid UTF-8 byte in a manifest, one tar shard cut short: the run trains and every log says so."""
    if kind == "webdataset":
        from tests.training.train_helpers import write_tars

        tars = write_tars(tmp_path / "tars", synthetic_samples(24, seed=6), per_shard=8)
        tars[1].write_bytes(tars[1].read_bytes()[:5000])  # cut in the image of its third sample: the first one
        # is read; the second, not known to be complete until the third's first member is whole, is lost
        data, reason, kept = f"{tmp_path / 'tars'}/shard-{{0000..0002}}.tar", Skip.TRUNCATED_SHARD, 17
    else:
        data, reason, kept = _bad_utf8_manifest(tmp_path / "m", kind), Skip.INVALID_UTF8, 11
    out = tmp_path / "run"
    proc = run_trainer(*_common(tiny_sd15, tiny_t5, data, out), "train.max_steps=1")
    assert f"skipped 1 unusable samples: {{'{reason}': 1}}" in proc.stderr
    index = json.loads(next((out / "cache").glob("*/index.json")).read_text())
    assert index["samples"] == kept and index["skipped"]["counts"] == {reason: 1}
    assert read_metrics(out)[-1]["skipped"] == 1 and (out / "ella.safetensors").is_file()


# ---------------------------------------------------------------- resume, SIGTERM, several processes
def test_resume_gives_the_uninterrupted_loss_sequence(tiny_sd15, tiny_t5, datasets, tmp_path):
    """Also: the newest checkpoint damaged (resume falls back to the one before), an orphan folder of a killed
    save, metrics logged after the last intact checkpoint: the resumed run still equals the uninterrupted one,
    metrics.jsonl has each step once, the orphan is gone."""
    common = _common(tiny_sd15, tiny_t5, datasets["folder"], None)[:3] + [
        f"cache.dir={tmp_path / 'cache'}", "train.ema_decay=0.8", "train.grad_accum=2", "train.batch_size=3",
        "optim.schedule_steps=6", "train.checkpoint_every=3", "data.caption_dropout=0.3"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_trainer(*common, f"output_dir={full}", "train.max_steps=6")
    run_trainer(*common, f"output_dir={part}", "train.max_steps=4")  # checkpoints at 3 and 4 (the end)
    connector = part / "checkpoints" / "step-00000004" / "connector.safetensors"
    connector.write_bytes(connector.read_bytes()[:-100])  # the newest checkpoint is damaged
    orphan = part / "checkpoints" / ".tmp-step-00000005-999"
    orphan.mkdir()
    (part / "ella.safetensors").unlink()
    proc = run_trainer(*common, f"output_dir={part}", "train.max_steps=6", "resume=latest")
    assert "step-00000004 is damaged (connector.safetensors does not match its checksum" in proc.stderr
    assert "resumed from" in proc.stderr and "step-00000003 at step 3" in proc.stderr
    assert "reusing the feature cache" in proc.stderr and not orphan.exists()
    assert "differ from" not in proc.stderr  # max_steps does not move the schedule (schedule_steps is set)
    losses_full = [m["loss"] for m in read_metrics(full)]
    assert [m["step"] for m in read_metrics(part)] == list(range(1, 7))  # each step once
    losses_part = [m["loss"] for m in read_metrics(part)]
    assert len(losses_full) == 6 and losses_part == losses_full  # exactly equal on CPU
    for name in ("ella.safetensors", "ella_ema.safetensors"):
        a, b = _tensors(full / name), _tensors(part / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # another per-process batch continues at the same sample of the epoch (tests/training/test_resume_layouts.py),
    # after reporting the differences that change the result
    proc = run_trainer(*common, f"output_dir={part}", "train.max_steps=7", "resume=latest", "train.batch_size=2",
                       "optim.lr=2e-3")
    assert "global micro-batch 3 (train.batch_size x processes) -> 2 (2 x 1)" in proc.stderr
    assert "train.batch_size: 3 -> 2" in proc.stderr and "optim.lr: 0.001 -> 0.002" in proc.stderr
    assert "building the feature cache" not in proc.stderr and [m["step"] for m in read_metrics(part)][-1] == 7


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_sd15, tiny_t5, datasets, tmp_path):
    out = tmp_path / "run"
    cmd = [python(), str(TRAIN_SCRIPT), "--config", str(TINY_CONFIG),
           *_common(tiny_sd15, tiny_t5, datasets["folder"], out), "train.max_steps=100000",
           "train.checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # stopped, not finished
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and "stopped: at step" in stderr
    assert "--resume latest" in stderr
    assert "Traceback" not in stderr
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] >= 2 and ckpts[0].name == f"step-{state['step']:08d}"
    load_ella(ckpts[0] / "connector.safetensors")
    assert not (out / "ella.safetensors").exists()  # unfinished runs leave checkpoints, not a final file


def test_two_gloo_processes_match_one_process(tiny_sd15, tiny_t5, datasets, tmp_path):
    """Two processes (batch 2 each) train 2 steps, then one process (batch 4) resumes for the third: the same
    global micro-batch, so the sample sequence continues, and the result matches one process throughout."""
    # lr 1e-4, the paper's. Attention key biases have an exactly zero gradient (softmax ignores a constant
    # shift), so theirs is pure rounding noise that Adam normalises into steps of up to lr: checked apart.
    common = _common(tiny_sd15, tiny_t5, datasets["folder"], None)[:3] + [
        "train.max_steps=3", "data.caption_dropout=0.2", "optim.lr=1e-4", "optim.schedule_steps=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_trainer(*common, f"output_dir={one}", "train.batch_size=4")
    torchrun = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(random.randint(20000, 40000))]
    run_trainer(*common, f"output_dir={two}", "train.batch_size=2", "train.backend=gloo", "train.max_steps=2",
                launcher=torchrun, timeout=400)
    rng = torch.load(two / "checkpoints" / "step-00000002" / "rng.pt", weights_only=True)
    assert rng["world"] == 2 and len(rng["ranks"]) == 2  # every rank's RNG state
    proc = run_trainer(*common, f"output_dir={two}", "train.batch_size=4", "resume=latest")
    assert "written by 2 processes, now 1" in proc.stderr and "continues exactly" in proc.stderr
    assert "differ from" not in proc.stderr  # batch 2 x 2 processes = 4 x 1: nothing that changes the result
    a, b = _tensors(one / "ella.safetensors"), _tensors(two / "ella.safetensors")
    width = a["connector.latents"].shape[1]
    key_bias = {k: (a[k][width:2 * width] - b[k][width:2 * width]).abs().max().item() for k in a
                if k.endswith("in_proj_bias")}
    for k in key_bias:
        a[k], b[k] = a[k].clone(), b[k].clone()
        a[k][width:2 * width] = b[k][width:2 * width] = 0
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, worst
    assert max(key_bias.values()) < 1e-5, key_bias
    la, lb = [m["loss"] for m in read_metrics(one)], [m["loss"] for m in read_metrics(two)]
    assert la == pytest.approx(lb, rel=1e-5) and [m["step"] for m in read_metrics(two)] == [1, 2, 3]


# ---------------------------------------------------------------- SDXL, init_from
def test_sdxl_v_prediction_bf16_min_snr(tiny_sdxl, tiny_t5, datasets, tmp_path):
    out = tmp_path / "run"
    run_trainer(*_common(tiny_sdxl, tiny_t5, datasets["folder"], out), "train.max_steps=2",
                "train.mixed_precision=bf16", "train.min_snr_gamma=5", "train.noise_offset=0.05",
                "validation.every=2", "validation.prompts=[a plain green picture]", "validation.steps=2")
    ella = _check_output(out, 2, tiny_t5, base_model="sdxl")
    assert ella.config.width == 48 and ella.config.pooled_dim == 16  # the tiny SDXL UNet's context and pooled
    assert ella.state_dict()["pooled_proj.weight"].abs().sum() > 0  # the pooled head trained too
    assert len(list((out / "samples" / "step-00000002").glob("*.png"))) == 1


def test_init_from_an_existing_connector(tiny_sd15, tiny_sdxl, tiny_t5, datasets, tmp_path):
    first = tmp_path / "first"
    run_trainer(*_common(tiny_sd15, tiny_t5, datasets["folder"], first), "train.max_steps=1")
    again = tmp_path / "again"  # lr 0: the output must be the starting connector, bit for bit
    run_trainer(*_common(tiny_sd15, tiny_t5, datasets["folder"], again), "train.max_steps=1", "optim.lr=0",
                f"connector.init_from={first / 'ella.safetensors'}", "optim.warmup_steps=0")
    a, b = _tensors(first / "ella.safetensors"), _tensors(again / "ella.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(AssertionError, match="does not fit.*output width is 32, the UNet's context is 48"):
        run_trainer(*_common(tiny_sdxl, tiny_t5, datasets["folder"], tmp_path / "bad"), "train.max_steps=1",
                    f"connector.init_from={first / 'ella.safetensors'}")


# ---------------------------------------------------------------- it learns the text; ComfyUI loads it
def heldout_losses(base: Path, t5: Path, connector: ELLA, captions_shuffled: bool) -> torch.Tensor:
    """Per-sample noise-prediction loss on new images, same noise and timesteps for both caption orders."""
    from ella_core import load_text_encoder
    from training.config import ModelConfig
    from training.data import fit_to_bucket
    from training.models import load_base

    base_models = load_base(ModelConfig(pretrained=str(base)), torch.device("cpu"), torch.float32)
    samples = synthetic_samples(96, seed=999)
    captions = [c[0] for _, _, c in samples]
    if captions_shuffled:
        random.Random(1).shuffle(captions)
    encoder = load_text_encoder(str(t5), dtype="fp32")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = base_models.encode_pixels(torch.stack([fit_to_bucket(im, (32, 32)).pixels for _, im, _ in samples]))
        features = encoder.encode(captions, max_length=16).features
        total = torch.zeros(len(samples))
        for _ in range(4):
            t = torch.randint(0, 1000, (len(samples),), generator=g)
            noise = torch.randn(latents.shape, generator=g)
            noisy = base_models.scheduler.add_noise(latents, noise, t)
            pred = base_models.unet(noisy, t, encoder_hidden_states=connector(features, t.float())).sample
            total += ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    return total / 4


def test_connector_learns_to_use_the_captions(text_reliant_sd15, tiny_t5, tmp_path):
    data = write_folder(tmp_path / "data", synthetic_samples(96, seed=5))
    out = tmp_path / "run"
    run_trainer(*_common(text_reliant_sd15, tiny_t5, data, out), "train.max_steps=60", "train.batch_size=8",
                "optim.lr=3e-3", "data.caption_dropout=0", "data.caption_rule=first", "train.checkpoint_every=1000")
    trained = load_ella(out / "ella.safetensors")
    torch.manual_seed(0)
    untrained = ELLA(trained.config).eval()

    def gap(connector):  # (shuffled - true) per sample: relative mean gap and paired t statistic
        true = heldout_losses(text_reliant_sd15, tiny_t5, connector, False)
        d = heldout_losses(text_reliant_sd15, tiny_t5, connector, True) - true
        return (d.mean() / true.mean()).item(), (d.mean() / (d.std() / len(d) ** 0.5)).item()

    trained_gap, trained_t = gap(trained)
    untrained_gap, _ = gap(untrained)
    # measured: trained ~18 % lower with the true captions (t ~ 9); untrained ~0 %; a connector that saw
    # captions only 5 % of the time (caption_dropout 0.95) ~1.5 %
    assert trained_t > 4.0 and trained_gap > 0.06, (trained_gap, trained_t)
    assert abs(untrained_gap) < 0.02, untrained_gap


def test_output_loads_in_the_comfyui_node(tiny_sd15, tiny_t5, datasets, tmp_path):
    out = tmp_path / "run"
    run_trainer(*_common(tiny_sd15, tiny_t5, datasets["folder"], out), "train.max_steps=1")
    # in a subprocess: ComfyUI's module-level state stays out of this test process
    models = tmp_path / "models" / "ella"
    models.mkdir(parents=True)
    shutil.copy(out / "ella.safetensors", models / "trained.safetensors")
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from devtools import tiny_models as tm
tm.import_comfy()
import folder_paths
folder_paths.add_model_folder_path("ella", {str(models)!r}, is_default=True)
from devtools import comfy_env  # not tests.*: ComfyUI's own tests/ package is on sys.path now
PACK_MODULE = "ella_pack_under_test"
comfy_env.load_pack(PACK_MODULE)
nodes = sys.modules[PACK_MODULE + ".nodes.ella_nodes"]
managed = nodes.EllaTSCConnectorLoader.execute("trained.safetensors").result[0]
from safetensors.torch import load_file
saved = load_file({str(out / 'ella.safetensors')!r})
state = managed.module.state_dict()
assert set(state) == set(saved), sorted(set(state) ^ set(saved))[:4]
assert all(torch.equal(state[k].float(), saved[k].float()) for k in saved)
assert managed.metadata.base_model == "sd15" and managed.metadata.token_length == 16
print("LOADED", managed.module.config.input_dim, managed.metadata.llm)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"LOADED 32 {tiny_t5}" in proc.stdout
