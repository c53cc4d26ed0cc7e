"""The feature-cache build in-process on the real tiny models: interrupted at many points and resumed it
equals an uninterrupted build tensor for tensor, without encoding finished shards again, skip counts
included; a damaged shard is dropped and redone; non-finite VAE latents (a real fp16 overflow) stop the
build with an error naming the cause, and the cache is not marked complete."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.training.train_helpers import TINY_CONFIG, synthetic_samples, write_folder

from training import cache as feature_cache
from training.config import load_config
from training.data import Skip
from training.distributed import Dist
from training.models import load_base, load_llm
from training.stopping import Stop, StopRequested

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = write_folder(tmp_path_factory.mktemp("cache-data"), synthetic_samples(22, seed=21))
    (folder / "img0003.txt").unlink()  # missing caption
    (folder / "img0010.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # unreadable image
    (folder / "img0015.txt").write_bytes(b"\xff\n")  # invalid UTF-8
    return folder


@pytest.fixture(scope="module")
def models(tiny_sd15, tiny_t5, data):
    config = _config(tiny_sd15, tiny_t5, data, Path("/unused"))
    return load_base(config.model, CPU, torch.float32), load_llm(config.llm, CPU)


def _config(base, llm, data, cache_root, *extra):
    return load_config(TINY_CONFIG, [f"model.pretrained={base}", f"llm.source={llm}", f"data.path={data}",
                                     f"cache.dir={cache_root}", "cache.shard_size=4", *extra])


def _build(config, base, llm, stop=None) -> Path:
    folder = feature_cache.cache_dir(config, base.vae.dtype)
    feature_cache.build_cache(config, folder, base, lambda: llm, Dist(), stop or Stop())
    return folder


def _entries(folder: Path) -> list[dict]:
    cache = feature_cache.FeatureCache(folder)
    return [cache.entry(i) for i in range(len(cache))]


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """key -> {"latent": ..., "text.j": ...} read through the cache's index."""
    out = {}
    for entry in _entries(folder):
        with safe_open(str(folder / entry["shard"]), "pt") as f:
            prefix = f"{entry['slot']}."
            out[entry["key"]] = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return out


def _stop_after(monkeypatch, stop: Stop, items: int) -> None:
    """The source sends SIGTERM's flag after `items` entries (as the handler would, deferred)."""
    real = feature_cache.prepared_source

    def stream(*args):
        for n, item in enumerate(real(*args)):
            if n == items:
                stop.signum = signal.SIGTERM
            yield item

    monkeypatch.setattr(feature_cache, "prepared_source", stream)


@pytest.fixture(scope="module")
def reference(models, tiny_sd15, tiny_t5, data, tmp_path_factory):
    base, llm = models
    folder = _build(_config(tiny_sd15, tiny_t5, data, tmp_path_factory.mktemp("ref")), base, llm)
    return folder, _tensors(folder), json.loads((folder / "index.json").read_text())


def test_reference_build_counts_each_fault_once(reference):
    _, tensors, index = reference
    assert len(tensors) == 19
    assert index["skipped"]["counts"] == {Skip.NO_CAPTION: 1, Skip.UNREADABLE_IMAGE: 1, Skip.INVALID_UTF8: 1}


@pytest.mark.parametrize("stop_at", [0, 1, 4, 5, 9, 13, 17, 21])
def test_interrupted_build_resumes_to_the_same_cache(models, tiny_sd15, tiny_t5, data, reference, tmp_path,
                                                     monkeypatch, stop_at):
    base, llm = models
    config = _config(tiny_sd15, tiny_t5, data, tmp_path)
    stop = Stop()
    _stop_after(monkeypatch, stop, stop_at)
    with pytest.raises(StopRequested, match="during the cache build"):
        _build(config, base, llm, stop)
    monkeypatch.undo()
    folder = feature_cache.cache_dir(config, base.vae.dtype)
    assert not feature_cache.FeatureCache.is_complete(folder)
    shards = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("r0-*.safetensors")}
    kept = sum(feature_cache._read_progress(folder / name)["count"] for name in shards)
    encoded = []
    real_encode = base.encode_pixels
    monkeypatch.setattr(base, "encode_pixels", lambda pixels: encoded.append(len(pixels)) or real_encode(pixels))
    _build(config, base, llm)
    assert feature_cache.FeatureCache.is_complete(folder)
    assert sum(encoded) == 19 - kept  # finished shards were not encoded again
    assert all((folder / n).stat().st_ino == ino and (folder / n).stat().st_mtime_ns == mt
               for n, (ino, mt) in shards.items())  # and not rewritten
    _, ref_tensors, ref_index = reference
    index = json.loads((folder / "index.json").read_text())
    assert index["skipped"]["counts"] == ref_index["skipped"]["counts"]  # nothing counted twice or lost
    assert [e["key"] for e in _entries(folder)] == [e["key"] for e in _entries(reference[0])]
    tensors = _tensors(folder)
    for key, parts in ref_tensors.items():
        assert parts.keys() == tensors[key].keys(), key
        for k, v in parts.items():
            assert torch.equal(v, tensors[key][k]), (key, k, (v - tensors[key][k]).abs().max())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete-middle"])
def test_damaged_shard_is_dropped_and_encoded_again(models, tiny_sd15, tiny_t5, data, reference, tmp_path,
                                                    monkeypatch, damage):
    base, llm = models
    config = _config(tiny_sd15, tiny_t5, data, tmp_path)
    stop = Stop()
    _stop_after(monkeypatch, stop, 17)
    with pytest.raises(StopRequested):
        _build(config, base, llm, stop)
    monkeypatch.undo()
    folder = feature_cache.cache_dir(config, base.vae.dtype)
    shards = sorted(folder.glob("r0-*.safetensors"))
    assert len(shards) >= 3
    if damage == "truncate":
        shards[-1].write_bytes(shards[-1].read_bytes()[:200])
    elif damage == "garbage":
        shards[-1].write_bytes(b"\0" * 1000)
    else:
        shards[1].unlink()
    _build(config, base, llm)
    tensors = _tensors(folder)
    _, ref_tensors, ref_index = reference
    assert json.loads((folder / "index.json").read_text())["skipped"] == ref_index["skipped"]
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(v, tensors[key][k]) for key, parts in ref_tensors.items() for k, v in parts.items())


def _overflowing_vae(base_folder: Path, out: Path) -> Path:
    """A copy of the tiny base whose VAE's last conv overflows float16 (as the SDXL VAE does), fine in fp32."""
    import shutil

    from diffusers import AutoencoderKL

    shutil.copytree(base_folder, out)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    with torch.no_grad():
        vae.quant_conv.weight.mul_(1.5e5)
    vae.save_pretrained(out / "vae")
    return out


def test_vae_overflow_in_fp16_names_the_cause_and_leaves_no_complete_cache(tiny_sd15, tiny_t5, data, tmp_path,
                                                                           models):
    _, llm = models
    hot = _overflowing_vae(tiny_sd15, tmp_path / "hot-base")
    config = _config(hot, tiny_t5, data, tmp_path / "cache", "model.vae_dtype=float16")
    base = load_base(config.model, CPU, torch.float32)
    assert base.vae.dtype == torch.float16 and base.unet.dtype == torch.float32
    with pytest.raises(feature_cache.NonFiniteFeatures) as info:
        _build(config, base, llm)
    message = str(info.value)
    assert "VAE latents are not finite" in message and "overflowed in float16" in message
    assert "model.vae_dtype=float32" in message and "img0001.png" in message and " lr" not in message
    assert not feature_cache.FeatureCache.is_complete(feature_cache.cache_dir(config, base.vae.dtype))
    # the fix the message names works
    config = _config(hot, tiny_t5, data, tmp_path / "cache", "model.vae_dtype=float32")
    base = load_base(config.model, CPU, torch.float32)
    assert feature_cache.FeatureCache.is_complete(_build(config, base, llm))


def test_latents_overflowing_the_cache_dtype_are_refused(tiny_sd15, tiny_t5, data, tmp_path, models):
    _, llm = models
    hot = _overflowing_vae(tiny_sd15, tmp_path / "hot-base")  # finite in fp32, too large for fp16 storage
    config = _config(hot, tiny_t5, data, tmp_path / "cache", "cache.latent_dtype=float16")
    base = load_base(config.model, CPU, torch.float32)
    with pytest.raises(feature_cache.NonFiniteFeatures, match="stored as torch.float16.*cache.latent_dtype=float32"):
        _build(config, base, llm)


@pytest.mark.parametrize("values, bad", [([1.0, float("inf")], [1]), ([float("nan"), 0.0, float("-inf")], [0, 2]),
                                         ([0.0, 1.0], [])])
def test_check_finite_names_the_bad_samples(values, bad):
    tensor = torch.tensor(values).reshape(-1, 1, 1) * torch.ones(len(values), 3, 2)
    keys = [f"s{i}" for i in range(len(values))]
    if not bad:
        feature_cache.check_finite(tensor, keys, "LLM features", "fix")
        return
    with pytest.raises(feature_cache.NonFiniteFeatures) as info:
        feature_cache.check_finite(tensor, keys, "LLM features", "set llm.dtype=bfloat16")
    assert f"for {len(bad)} of {len(values)} samples" in str(info.value)
    assert str([keys[i] for i in bad]) in str(info.value) and "llm.dtype=bfloat16" in str(info.value)


def test_llm_fix_names_the_dtype():
    config = load_config(TINY_CONFIG, ["model.pretrained=o/b", "llm.source=o/t5", "data.path=/tmp", "llm.dtype=fp16"])
    assert "llm.dtype=bfloat16 or float32" in feature_cache.llm_fix(config)


@pytest.mark.parametrize("workers, stop_at, resume_workers", [(2, None, None), (1, None, None), (2, 5, 0),
                                                              (2, 13, 2), (0, 9, 2), (3, 0, 1)])
def test_a_build_in_loader_workers_equals_the_in_process_build(models, tiny_sd15, tiny_t5, data, reference,
                                                               tmp_path, monkeypatch, workers, stop_at,
                                                               resume_workers):
    """Decoding in data.num_workers processes changes nothing in the shards, bit for bit, also when the build
    is interrupted and resumed with another number of workers."""
    base, llm = models
    config = _config(tiny_sd15, tiny_t5, data, tmp_path, f"data.num_workers={workers}")
    if stop_at is not None:
        stop = Stop()
        _stop_after(monkeypatch, stop, stop_at)
        with pytest.raises(StopRequested, match="during the cache build"):
            _build(config, base, llm, stop)
        monkeypatch.undo()
        config = _config(tiny_sd15, tiny_t5, data, tmp_path, f"data.num_workers={resume_workers}")
    folder = _build(config, base, llm)
    ref_folder, ref_tensors, ref_index = reference
    assert folder == ref_folder.parent.parent / tmp_path.name / ref_folder.name  # workers are not in the hash
    index = json.loads((folder / "index.json").read_text())
    assert index["skipped"] == ref_index["skipped"] and _entries(folder) == _entries(ref_folder)
    tensors = _tensors(folder)
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(v, tensors[key][k]) for key, parts in ref_tensors.items() for k, v in parts.items())
