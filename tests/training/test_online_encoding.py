"""cache.mode full | latents | none: the config choice (old cache.enabled included), the latents-only cache
built without the LLM, the per-batch features of the resident LLM against the full cache's for many sample
visits, and the trainer run as a script in the three modes (equal losses), resumed in latents mode, and in
latents mode on two gloo processes against one."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tests.training.train_helpers import TINY_CONFIG, python, read_metrics, run_trainer, synthetic_samples, write_folder

from training import cache as feature_cache
from training import online
from training.config import ConfigError, config_from_dict, load_config, result_changes
from training.data import sample_seed
from training.distributed import Dist
from training.models import load_base, load_llm
from training.stopping import Stop

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the config choice
@pytest.fixture()
def paths(tmp_path, tiny_sd15, tiny_t5) -> list[str]:
    (tmp_path / "data").mkdir()
    return [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={tmp_path / 'data'}",
            f"output_dir={tmp_path / 'run'}"]


def _legacy_file(tmp_path: Path, enabled: bool) -> Path:
    """tiny_cpu.yaml as configs were written before cache.mode: `cache: {enabled: ...}`."""
    text = TINY_CONFIG.read_text().replace("  mode: full\n", f"  enabled: {str(enabled).lower()}\n")
    assert "enabled:" in text
    path = tmp_path / "legacy.yaml"
    path.write_text(text)
    return path


MODES = [  # (file: None = tiny_cpu.yaml with mode: full, or the old `enabled` spelling), overrides, mode
    (None, [], "full"),
    (None, ["cache.mode=latents"], "latents"),
    (None, ["cache.mode=none"], "none"),
    (None, ["cache.enabled=false"], "none"),  # the old spelling on the command line replaces the file's mode
    (None, ["cache.enabled=true"], "full"),
    (None, ["cache.enabled=true", "cache.mode=latents"], "latents"),  # consistent: latents has a cache
    (True, [], "full"),
    (False, [], "none"),
    (False, ["cache.mode=latents"], "latents"),  # the command line replaces an old file's setting
    (True, ["cache.mode=none"], "none"),
    (False, ["cache.enabled=true"], "full"),
]


@pytest.mark.parametrize("legacy, overrides, mode", MODES)
def test_cache_mode_from_either_spelling(paths, tmp_path, legacy, overrides, mode):
    path = TINY_CONFIG if legacy is None else _legacy_file(tmp_path, legacy)
    config = load_config(path, paths + overrides)
    assert config.cache.mode == mode and config.cache.enabled == (mode != "none")
    saved = config.to_dict()
    assert saved["cache"]["mode"] == mode and "enabled" not in saved["cache"]  # one spelling is saved
    assert config_from_dict(saved) == config


BAD = [
    (["cache.mode=disk"], "cache.mode='disk' is not one of ['full', 'latents', 'none']"),
    (["cache.enabled=false", "cache.mode=full"],
     "the command line sets both cache.enabled=false and cache.mode=full, which contradict each other"),
    (["cache.enabled=true", "cache.mode=none"],
     "the command line sets both cache.enabled=true and cache.mode=none"),
    (["cache.enabled=off please"], "cache.enabled='off please': must be true or false"),
    (["cache.mode=none", "data.streaming=false", "data.path=/x/shard-{0000..0003}.tar"],
     "use cache.mode=full / latents to read them once into a cache"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_cache_mode_is_refused_naming_the_keys(paths, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, paths + overrides)
    assert message in str(info.value)


def test_a_file_contradicting_itself_is_named(paths, tmp_path):
    path = _legacy_file(tmp_path, False)
    path.write_text(path.read_text().replace("  enabled: false\n", "  enabled: false\n  mode: latents\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path, paths)
    assert f"{path} sets both cache.enabled=false and cache.mode=latents" in str(info.value)


def test_webdataset_shards_train_in_latents_mode(paths):
    config = load_config(TINY_CONFIG, paths + ["cache.mode=latents", "data.path=/x/shard-{0000..0003}.tar"])
    assert config.cache.mode == "latents"


@pytest.mark.parametrize("old_enabled, mode", [(True, "full"), (True, "latents"), (False, "none"), (True, "none")])
def test_resuming_an_old_checkpoint_or_switching_modes_changes_nothing_trained(paths, old_enabled, mode):
    """The modes train on the same latents, captions and features (the runs below), so a checkpoint saved
    with `cache.enabled` (before cache.mode) or with another mode continues without a warning."""
    config = load_config(TINY_CONFIG, paths + [f"cache.mode={mode}"])
    saved = config.to_dict()
    saved["cache"] = {k: v for k, v in saved["cache"].items() if k != "mode"} | {"enabled": old_enabled}
    assert result_changes(saved, config) == []
    other = load_config(TINY_CONFIG, paths + ["cache.latent_dtype=bfloat16", f"cache.mode={mode}"])
    assert result_changes(saved, other) == ["cache.latent_dtype: 'float32' -> 'bfloat16'"]  # still seen


LLM_CHANGES = ["llm.dtype=bfloat16", "llm.max_length=8", "llm.hidden_layer=-2", "llm.source=org/other-llm",
               "llm.tokenizer=org/other-tokenizer"]


@pytest.mark.parametrize("change", LLM_CHANGES)
def test_a_latents_cache_does_not_depend_on_the_llm(paths, change):
    """Other LLM settings: the same latents-only cache, another full cache (its features differ)."""
    def folder(*extra):
        return feature_cache.cache_dir(load_config(TINY_CONFIG, paths + list(extra)), torch.float32)

    assert folder("cache.mode=latents") == folder("cache.mode=latents", change)
    assert folder("cache.mode=full") != folder("cache.mode=full", change)
    assert folder("cache.mode=latents") != folder("cache.mode=full")
    full = feature_cache.cache_settings(load_config(TINY_CONFIG, paths), torch.float32)
    assert "features" not in full and set(feature_cache.LLM_SETTINGS) <= set(full)  # full caches keep their hash


# ---------------------------------------------------------------- the latents cache and the online features
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = write_folder(tmp_path_factory.mktemp("online-data"), synthetic_samples(21, seed=31))
    (folder / "img0004.txt").unlink()  # missing caption
    (folder / "img0011.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # unreadable image
    Image.new("RGB", (48, 32), (200, 10, 10)).save(folder / "img0013.png")  # another size: cropped to the bucket
    (folder / "img0017.txt").write_text("a plain red picture\nsomething else\na third caption, longer than both\n")
    return folder


def _config(tiny_sd15, tiny_t5, data, root, *extra):
    return load_config(TINY_CONFIG, [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={data}",
                                     f"cache.dir={root}", "cache.shard_size=4", *extra])


@pytest.fixture(scope="module")
def caches(tiny_sd15, tiny_t5, data, tmp_path_factory):
    """A full and a latents-only cache of the same data; the latents one built with an LLM loader that fails."""
    root = tmp_path_factory.mktemp("online-caches")
    full_config = _config(tiny_sd15, tiny_t5, data, root)
    base = load_base(full_config.model, CPU, torch.float32)
    llm = load_llm(full_config.llm, CPU)
    built = {}
    for mode, get_llm in (("full", lambda: llm), ("latents", lambda: pytest.fail("the build loaded the LLM"))):
        config = _config(tiny_sd15, tiny_t5, data, root, f"cache.mode={mode}")
        folder = feature_cache.cache_dir(config, base.vae.dtype)
        feature_cache.build_cache(config, folder, base, get_llm, Dist(), Stop())
        built[mode] = (config, feature_cache.FeatureCache(folder))
    return built, llm


def _entries(cache: feature_cache.FeatureCache) -> list[dict]:
    """Every sample's index entry (key, captions, shard file, slot, bucket, sizes), in source order."""
    return [cache.entry(i) for i in range(len(cache))]


def _shard_tensors(cache: feature_cache.FeatureCache) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for entry in _entries(cache):
        with safe_open(str(cache.folder / entry["shard"]), "pt") as f:
            prefix = f"{entry['slot']}."
            out[entry["key"]] = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return out


def test_the_latents_cache_holds_the_full_caches_latents_and_captions(caches):
    built, _ = caches
    full, latents = built["full"][1], built["latents"][1]
    assert full.folder != latents.folder and not latents.has_features and full.has_features
    assert not (latents.folder / "prompts.safetensors").exists() and latents.prompts == {}
    assert latents.hidden_size is None and full.hidden_size == 32
    assert [{k: v for k, v in e.items() if k not in ("shard", "slot")} for e in _entries(latents)] == \
        [{k: v for k, v in e.items() if k not in ("shard", "slot")} for e in _entries(full)]  # captions, buckets...
    assert len(latents) == 19 and latents.skipped == full.skipped and latents.skipped["total"] == 2
    a, b = _shard_tensors(full), _shard_tensors(latents)
    assert all(set(b[k]) == {"latent"} for k in b)  # no text tensors
    assert all(torch.equal(a[k]["latent"], b[k]["latent"]) for k in a)  # the same VAE batches: bit-equal
    assert latents.prompt_features(["a prompt"]) is None  # validation prompts come from the resident LLM


RULES = [  # DataConfig changes: caption rule and dropout
    {"caption_rule": "random", "caption_dropout": 0.3},
    {"caption_rule": "random", "caption_dropout": 0.0},
    {"caption_rule": "first", "caption_dropout": 0.5},
    {"caption_rule": "longest", "caption_dropout": 0.2},
    {"caption_rule": "weighted", "caption_weights": [0.2, 0.3, 0.5], "caption_dropout": 0.25},
]


@pytest.mark.parametrize("rule", RULES, ids=[r["caption_rule"] + str(r["caption_dropout"]) for r in RULES])
def test_online_features_are_the_cached_features_of_every_visit(caches, rule):
    """Many sample visits (3 epochs, shuffled, batches of 1 to 7): the latents dataset names the caption
    whose features the full dataset reads, or "" exactly when the full dataset gives the empty prompt, and the
    resident LLM's features of the batch equal the cached ones."""
    built, llm = caches
    (config, full), (_, latents) = built["full"], built["latents"]
    d = dataclasses.replace(config.data, **rule)
    cached = feature_cache.CachedDataset(full, d)
    texts = feature_cache.CachedDataset(latents, d)
    stored = _shard_tensors(full)
    _, empty = online.load_resident_llm(config, Dist())
    assert torch.equal(empty, full.empty_features())  # encoded once, alone, as the cache's merge does
    rng = random.Random(str(rule))
    visits = [(rng.randrange(len(full)), sample_seed(0, epoch, pos)) for epoch in range(3)
              for pos in range(len(full))]
    dropped = 0
    sizes = itertools.cycle([1, 3, 4, 7, 2])
    while visits:
        n = next(sizes)
        batch, visits = visits[:n], visits[n:]
        want = [cached[v] for v in batch]
        got = [texts[v] for v in batch]
        for w, g, (index, _) in zip(want, got, batch):
            entry = full.entry(index)
            assert torch.equal(w["latents"], g["latents"]) and w["key"] == g["key"] == entry["key"]
            assert "features" not in g and "latents" in g
            if g["text"] == "":
                assert torch.equal(w["features"], empty)
                dropped += 1
            else:  # the caption the full dataset read, by its position among the entry's captions
                assert torch.equal(w["features"], stored[entry["key"]][f"text.{entry['captions'].index(g['text'])}"])
        features, bias = online.batch_features(llm, [g["text"] for g in got], empty, config, [g["key"] for g in got])
        assert bias is None  # fixed token mode: no padding to hide
        assert features.dtype == torch.float32 and not features.requires_grad
        # The cache encodes a chunk's captions together, the online path a micro-batch's: the same maths per
        # row. BLAS may block other batch sizes differently, which would move last bits only (on this CPU the
        # tiny T5's rows come out bit-equal); dropped rows are the very tensor the cache holds.
        expected = torch.stack([w["features"] for w in want])
        assert torch.allclose(features, expected, rtol=0, atol=1e-6 * expected.abs().max().item())
        for row, g in enumerate(got):
            if g["text"] == "":
                assert torch.equal(features[row], empty)
    rate = dropped / (3 * len(full))
    assert abs(rate - rule["caption_dropout"]) < 0.15 and (dropped > 0) == (rule["caption_dropout"] > 0)


def test_batch_features_skip_the_llm_for_dropped_captions(caches):
    built, llm = caches
    config = built["full"][0]
    _, empty = online.load_resident_llm(config, Dist())
    calls = []
    real = online.encode_texts

    def counting(encoder, texts, llm_config):
        calls.append(list(texts))
        return real(encoder, texts, llm_config)

    online.encode_texts = counting
    try:
        all_dropped, _ = online.batch_features(llm, ["", ""], empty, config, ["a", "b"])
        mixed, _ = online.batch_features(llm, ["", "a plain red picture", ""], empty, config, ["a", "b", "c"])
    finally:
        online.encode_texts = real
    assert calls == [["a plain red picture"]]
    assert torch.equal(all_dropped, empty[None].expand(2, -1, -1))
    assert torch.equal(mixed[1], real(llm, ["a plain red picture"], config.llm)[0])


# ---------------------------------------------------------------- the trainer in the three modes
RUN = ["train.max_steps=4", "train.batch_size=4", "train.grad_accum=2", "data.caption_columns=[caption, dense]",
       "data.caption_dropout=0.3", "optim.lr=1e-4", "optim.schedule_steps=4", "train.checkpoint_every=2",
       "validation.every=4", "validation.steps=2", "validation.prompts=[a plain red picture, a plain blue picture]"]


def _common(base: Path, llm: Path, data, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={base}", f"llm.source={llm}", f"data.path={data}", f"output_dir={out}", *RUN, *extra]


def _losses(out: Path) -> list[float]:
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["samples_seen"] == 8 * m["step"] for m in metrics)
    return [m["loss"] for m in metrics]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "ella.safetensors"))


def _images(out: Path) -> list[np.ndarray]:
    files = sorted((out / "samples" / "step-00000004").glob("*.png"))
    assert len(files) == 2
    return [np.asarray(Image.open(f), dtype=np.int16) for f in files]


@pytest.fixture(scope="module")
def mode_runs(tiny_sd15, tiny_t5, datasets, tmp_path_factory) -> dict[str, Path]:
    """The same 4 steps (24 samples, 2 captions each, dropout 0.3: into the second epoch) in every mode."""
    root = tmp_path_factory.mktemp("mode-runs")
    runs = {}
    for mode in ("full", "latents", "none"):
        runs[mode] = root / mode
        proc = run_trainer(*_common(tiny_sd15, tiny_t5, datasets["jsonl"], runs[mode]), f"cache.mode={mode}")
        (runs[mode] / "stderr.txt").write_text(proc.stderr)
    return runs


def test_the_three_modes_train_the_same_connector(mode_runs):
    full, latents, none = (_losses(mode_runs[m]) for m in ("full", "latents", "none"))
    # full vs latents: the same cached latents, the same captions and empty prompt, the LLM's rows do not
    # depend on their batch (test above): the same maths throughout, so bit-equal
    assert latents == full
    a, b = _weights(mode_runs["full"]), _weights(mode_runs["latents"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(x, y) for x, y in zip(_images(mode_runs["full"]), _images(mode_runs["latents"])))
    # none: the VAE encodes each micro-batch instead of the cache's chunks of 16, which moves the latents'
    # last bits (about 1e-6, the convolutions block another batch size differently): a tight tolerance
    assert none == pytest.approx(full, rel=1e-5)
    c = _weights(mode_runs["none"])
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-5
    lat = mode_runs["latents"]
    stderr = (lat / "stderr.txt").read_text()
    assert "(latents and captions)" in stderr and "online encoding:" in stderr
    assert stderr.index("(latents and captions)") < stderr.index("online encoding:")  # loaded after the build
    folder = next((lat / "cache").glob("*/index.json")).parent
    assert not (folder / "prompts.safetensors").exists()
    assert not (mode_runs["none"] / "cache").exists() and "online encoding:" not in \
        (mode_runs["full"] / "stderr.txt").read_text()


def test_resume_in_latents_mode_continues_exactly(mode_runs, tiny_sd15, tiny_t5, datasets, tmp_path):
    part = tmp_path / "part"
    common = _common(tiny_sd15, tiny_t5, datasets["jsonl"], part, "cache.mode=latents",
                     f"cache.dir={mode_runs['latents'] / 'cache'}")
    run_trainer(*common, "train.max_steps=2")
    (part / "ella.safetensors").unlink()
    proc = run_trainer(*common, "resume=latest")
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr and "reusing the feature cache" in proc.stderr
    assert "differ from" not in proc.stderr
    assert _losses(part) == _losses(mode_runs["latents"])
    a, b = _weights(part), _weights(mode_runs["latents"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_processes_in_latents_mode_match_one(mode_runs, tiny_sd15, tiny_t5, datasets, tmp_path):
    """Each process builds its share of the latents cache without the LLM, then holds its own LLM and encodes
    its half of every global micro-batch."""
    two = tmp_path / "two"
    torchrun = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(random.randint(20000, 40000))]
    run_trainer(*_common(tiny_sd15, tiny_t5, datasets["jsonl"], two), "cache.mode=latents", "train.batch_size=2",
                "train.backend=gloo", launcher=torchrun, timeout=400)
    folder = next((two / "cache").glob("*/index.json")).parent
    assert {p.name[:2] for p in folder.glob("r*-*.safetensors")} == {"r0", "r1"}  # both processes encoded
    assert json.loads((folder / "index.json").read_text())["settings"]["features"] is False
    # Gradients averaged over two processes and latents from other VAE batches (each process's own chunks)
    # differ from one process's in the last bits; attention key biases have an exactly zero gradient
    # (softmax ignores a constant shift), so theirs is rounding noise that Adam turns into steps of up to lr:
    # checked apart, as in test_train_script.py.
    assert _losses(two) == pytest.approx(_losses(mode_runs["latents"]), rel=1e-5)
    a, b = _weights(mode_runs["latents"]), _weights(two)
    width = a["connector.latents"].shape[1]
    key_bias = {}
    for k in [k for k in a if k.endswith("in_proj_bias")]:
        key_bias[k] = (a[k][width:2 * width] - b[k][width:2 * width]).abs().max().item()
        a[k], b[k] = a[k].clone(), b[k].clone()
        a[k][width:2 * width] = b[k][width:2 * width] = 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(key_bias.values()) < 1e-4  # lr 1e-4 x 4 steps
