"""The cache's storage at scale: features in the LLM's dtype read back bit for bit, flexible-mode captions
stored unpadded and batched with a -inf text_bias that gives each sample its unpadded context, a compact
memory-mapped index (no Python object per sample, source order for any number of ranks, finishing a build
without reading a shard), readers that keep a bounded number of shards open, and the format version."""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tests.training.train_helpers import TINY_CONFIG, synthetic_samples, write_folder

from ella_core import ELLA, ELLAConfig
from training import cache as feature_cache
from training import features as llm_features
from training.cache_index import RECORD, CacheIndex, RankIndexWriter, record_rows
from training.config import load_config
from training.data import collate, epoch_batches, pick_text
from training.distributed import Dist
from training.errors import TrainingError
from training.models import load_base, load_llm
from training.stopping import Stop

CPU = torch.device("cpu")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    samples = synthetic_samples(13, seed=31)
    # captions of many token lengths, one longer than llm.max_length (16): flexible mode truncates it
    extra = ["red", "a small plain picture of a red thing", "one two three four five six seven eight nine ten "
             "eleven twelve thirteen fourteen fifteen sixteen seventeen"]
    samples = [(k, im, caps if i % 3 else caps + [extra[i % len(extra)]]) for i, (k, im, caps) in enumerate(samples)]
    return write_folder(tmp_path_factory.mktemp("store-data"), samples)


@pytest.fixture(scope="module")
def base(tiny_sd15):
    return load_base(load_config(TINY_CONFIG, [f"model.pretrained={tiny_sd15}", "llm.source=o/t",
                                               "data.path=/tmp"]).model, CPU, torch.float32)


def _config(tiny_sd15, tiny_t5, data, root, *extra):
    return load_config(TINY_CONFIG, [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={data}",
                                     f"cache.dir={root}", "cache.shard_size=4", *extra])


def _build(config, base, llm) -> Path:
    folder = feature_cache.cache_dir(config, base.vae.dtype)
    feature_cache.build_cache(config, folder, base, lambda: llm, Dist(), Stop())
    return folder


def _stored(folder: Path, entry: dict) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / entry["shard"]), "pt") as f:
        return {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(f"{entry['slot']}.")}


# ---------------------------------------------------------------- features: dtype and padding
@pytest.mark.parametrize("mode", ["fixed", "flexible"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cached_features_are_the_online_ones_bit_for_bit(tiny_sd15, tiny_t5, data, base, tmp_path, monkeypatch,
                                                        dtype, mode):
    config = _config(tiny_sd15, tiny_t5, data, tmp_path, f"llm.dtype={dtype}", f"llm.token_mode={mode}")
    llm = load_llm(config.llm, CPU)
    assert llm.dtype == DTYPES[dtype]
    online: list[tuple[str, torch.Tensor]] = []  # every caption's float32 features as the LLM gave them, in order
    real = feature_cache.encode_texts

    def recording(encoder, texts, cfg):
        out = real(encoder, texts, cfg)
        online.extend(zip(texts, llm_features.unpadded(encoder, texts, cfg, out)))
        return out

    monkeypatch.setattr(feature_cache, "encode_texts", recording)
    folder = _build(config, base, llm)
    monkeypatch.undo()
    cache = feature_cache.FeatureCache(folder)
    dataset = feature_cache.CachedDataset(cache, config.data)
    lengths_seen = set()
    calls = iter(online)  # one rank: the samples were encoded in source order
    for i in range(len(cache)):
        entry = cache.entry(i)
        stored = _stored(folder, entry)
        for j, caption in enumerate(entry["captions"]):
            text = stored[f"text.{j}"]
            encoded_caption, encoded = next(calls)
            assert encoded_caption == caption
            assert text.dtype == DTYPES[dtype], (entry["key"], j)  # the LLM's dtype on disk
            n = llm.count_tokens(caption, max_length=16, mode=mode).kept if mode == "flexible" else 16
            assert text.shape == (n, 32)
            lengths_seen.add(n)
            assert torch.equal(text.float(), encoded), (entry["key"], j)
            if mode == "flexible":  # flexible encodes each prompt alone: the online path's exact features
                alone = real(llm, [caption], config.llm)[0]
                assert torch.equal(text.float(), alone)
        for seed in range(6):  # what training reads: the chosen caption's stored features, upcast exactly
            item = dataset[(i, seed)]
            choice = pick_text(entry["captions"], seed, config.data)
            expected = cache.empty_features() if choice < 0 else stored[f"text.{choice}"].float()
            assert item["features"].dtype == torch.float32 and torch.equal(item["features"], expected)
            assert torch.equal(item["latents"], stored["latent"].float())
    assert len(lengths_seen) >= (4 if mode == "flexible" else 1)
    empty = real(llm, [""], config.llm)
    assert torch.equal(cache.empty_features(), llm_features.unpadded(llm, [""], config.llm, empty)[0])


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize("values, target, kept", [
    ([0.5, -2.0, 1024.0, 0.0], F16, F16), ([1.0 + 2**-20], F16, F32), ([70000.0], F16, F32), ([1e-9], F16, F32),
    ([0.5, -2.0, 1024.0], BF16, BF16), ([1.0 + 2**-10], BF16, F32), ([70000.0], BF16, F32), ([196608.0], BF16, BF16),
    ([1.0 + 2**-10], F32, F32)])
def test_storage_cast_is_exact_or_kept_in_float32(values, target, kept):
    out = llm_features.lossless(torch.tensor(values), target)
    assert out.dtype == kept and torch.equal(out.float(), torch.tensor(values))


def _connector() -> ELLA:
    torch.manual_seed(0)
    ella = ELLA(ELLAConfig(input_dim=24, width=32, layers=2, heads=4, num_latents=16, time_channel=32,
                           time_embed_dim=32)).eval()
    with torch.no_grad():  # AdaLN starts as plain LayerNorm: make the timestep matter
        for block in ella.connector.perceiver_blocks:
            for norm in (block.ln_1, block.ln_2, block.ln_ff):
                norm.linear.weight.normal_(0, 0.2)
    return ella


@pytest.mark.parametrize("lengths", [[1, 16], [3, 7, 16, 2], [5, 5, 9], [16, 16], [4, 1, 1, 12, 8]])
def test_padded_batch_context_equals_each_unpadded_forward(lengths):
    ella = _connector()
    g = torch.Generator().manual_seed(sum(lengths))
    captions = [torch.randn(n, 24, generator=g) * 3 for n in lengths]
    items = [{"features": f, "seed": i, "key": f"s{i}"} for i, f in enumerate(captions)]
    batch = collate(items)
    assert batch["features"].shape == (len(lengths), max(lengths), 24)
    assert ("text_bias" in batch) == (len(set(lengths)) > 1)
    t = torch.tensor([10.0, 500.0, 999.0, 250.0, 3.0][:len(lengths)])
    with torch.no_grad():
        together = ella(batch["features"], t, batch.get("text_bias"))
        for i, f in enumerate(captions):
            alone = ella(f[None], t[i:i + 1])
            assert torch.allclose(together[i], alone[0], rtol=1e-5, atol=1e-5), (lengths, i)
        if len(set(lengths)) > 1:  # the bias is what makes them equal: zero padding alone changes the context
            plain = ella(batch["features"], t)
            short = lengths.index(min(lengths))
            assert not torch.allclose(plain[short], ella(captions[short][None], t[short:short + 1])[0], atol=1e-4)


def test_flexible_mode_trains_cached_and_online_with_the_same_losses(tiny_sd15, tiny_t5, data, tmp_path):
    from tests.training.train_helpers import read_metrics, run_trainer

    from ella_core import load_ella_with_metadata

    common = [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", f"data.path={data}", "llm.token_mode=flexible",
              "llm.dtype=float16", "train.max_steps=3", "data.caption_dropout=0.3", "train.checkpoint_every=100"]
    validation = ["validation.every=3", "validation.steps=2", "validation.prompts=[red, a small plain picture of a "
                  "blue thing on a white table]"]  # prompts of unequal lengths, sampled from the cache's features
    run_trainer(*common, *validation, f"output_dir={tmp_path / 'cached'}")
    run_trainer(*common, f"output_dir={tmp_path / 'online'}", "cache.enabled=false")
    assert len(list((tmp_path / "cached" / "samples" / "step-00000003").glob("*.png"))) == 2
    cached, online = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "online")
    assert [m["step"] for m in cached] == [1, 2, 3]
    # same features bit for bit (flexible encodes prompts alone); the VAE batches differ in the last bits
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in online], rel=1e-5)
    _, meta = load_ella_with_metadata(tmp_path / "cached" / "ella.safetensors")
    assert meta.token_mode == "flexible"


# ---------------------------------------------------------------- the index
def _synthetic_index(folder: Path, world: int, n: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """n rows dealt round-robin to `world` ranks in source order (some positions skipped), as a build writes
    them; returns the rows per rank and the expected buckets in source order."""
    rng = np.random.default_rng(seed)
    ordinals = np.sort(rng.choice(np.arange(2 * n), size=n, replace=False))
    buckets = rng.integers(1, 5, size=(n, 2)) * 64
    writers = [RankIndexWriter(folder, r) for r in range(world)]
    for start in range(0, n, 256):
        chunk = range(start, min(n, start + 256))
        for r, writer in enumerate(writers):
            mine = [i for i in chunk if ordinals[i] % world == r]
            entries = [{"ordinal": int(ordinals[i]), "slot": k, "bucket": buckets[i].tolist(), "key": f"k{i}",
                        "captions": [f"caption {i}", "ünïcode ✓"], "original_size": [i % 999, 7],
                        "crop_top_left": [1, 2]} for k, i in enumerate(mine)]
            if entries:
                writer.append(record_rows(entries, start // 256), [{"key": e["key"], "captions": e["captions"]}
                                                                   for e in entries])
    return [w.rows for w in writers], buckets


def test_index_is_in_source_order_for_any_number_of_ranks(tmp_path):
    n = 3000
    for world in (1, 2, 3):
        folder = tmp_path / f"w{world}"
        folder.mkdir()
        counts, buckets = _synthetic_index(folder, world, n)
        index = CacheIndex(folder, counts)
        assert len(index) == n and (folder / "index-r0.bin").stat().st_size == counts[0] * RECORD.itemsize
        assert np.array_equal(index.buckets(), buckets)
        ordinals = [int(index.locate(i)[1]["ordinal"]) for i in range(n)]
        assert ordinals == sorted(ordinals)
        for i in random.Random(world).sample(range(n), 50):
            rank, row = index.locate(i)
            assert index.text(rank, row) == {"key": f"k{i}", "captions": [f"caption {i}", "ünïcode ✓"]}
            assert int(row["original_size"][0]) == i % 999


def test_opening_an_index_makes_no_python_object_per_sample(tmp_path):
    import tracemalloc

    def opened(n: int) -> tuple[int, int]:
        folder = tmp_path / f"n{n}"
        folder.mkdir()
        counts, _ = _synthetic_index(folder, 2, n)
        gc.collect()
        objects = len(gc.get_objects())
        tracemalloc.start()
        index = CacheIndex(folder, counts)
        buckets = index.buckets()
        index.locate(n - 1)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        gc.collect()
        grown = len(gc.get_objects()) - objects
        del index, buckets
        return grown, held

    (small_objects, small_bytes), (objects, held) = opened(2000), opened(40000)
    assert objects <= small_objects + 20 and objects < 200, (small_objects, objects)  # no object per sample
    assert held < 12 * 40000 + 100_000, held  # the sort into source order and the buckets: 12 bytes a sample


def test_epoch_batches_of_an_array_equal_those_of_pairs():
    rng = random.Random(0)
    for case in range(30):
        n = rng.randint(1, 300)
        kinds = [(32, 32), (32, 64), (64, 32), (48, 48)][:rng.randint(1, 4)]
        pairs = [rng.choice(kinds) for _ in range(n)]
        array = np.array(pairs, dtype=np.int32)
        for global_batch in (1, 3, 8):
            for epoch in (0, 1):
                expected = epoch_batches(pairs, global_batch, case, epoch)
                assert epoch_batches(array, global_batch, case, epoch) == expected


# ---------------------------------------------------------------- finishing, readers, versions
def test_finishing_a_build_reads_no_shard(tiny_sd15, tiny_t5, data, base, tmp_path, monkeypatch):
    config = _config(tiny_sd15, tiny_t5, data, tmp_path)
    llm = load_llm(config.llm, CPU)

    def no_shard_reads(*args, **kwargs):
        raise AssertionError("a shard was read while finishing the build")

    monkeypatch.setattr(feature_cache, "safe_open", no_shard_reads)
    monkeypatch.setattr(feature_cache, "_read_progress", no_shard_reads)
    folder = _build(config, base, llm)
    monkeypatch.undo()
    manifest = json.loads((folder / "index.json").read_text())
    assert "entries" not in manifest and manifest["samples"] == 13 and manifest["counts"] == [13]
    assert len((folder / "index.json").read_bytes()) < 4000  # O(ranks), not O(samples)


def test_readers_keep_a_bounded_number_of_shards_open(tiny_sd15, tiny_t5, data, base, tmp_path, monkeypatch):
    config = _config(tiny_sd15, tiny_t5, data, tmp_path)
    folder = _build(config, base, load_llm(config.llm, CPU))
    cache = feature_cache.FeatureCache(folder)
    shards = [cache.entry(i)["shard"] for i in range(len(cache))]
    assert len(set(shards)) == 4  # 13 samples, 4 per shard
    opened: list[str] = []
    real = feature_cache.safe_open
    monkeypatch.setattr(feature_cache, "safe_open",
                        lambda path, **kw: opened.append(Path(path).name) or real(path, **kw))
    roomy = feature_cache.CachedDataset(cache, config.data, open_shards=8)
    for _ in range(3):
        for i in range(len(cache)):
            roomy[(i, i)]
    assert sorted(opened) == sorted(set(shards)) and roomy.opens == 4  # each shard opened once, then kept
    opened.clear()
    tight = feature_cache.CachedDataset(cache, config.data, open_shards=2)
    order = [0, 4, 0, 4, 8, 0, 12, 12, 4]  # shards 0 1 0 1 2 0 3 3 1
    for i in order:
        tight[(i, 0)]
        assert len(tight._handles) <= 2
    assert opened == [shards[i] for i in (0, 4, 8, 0, 12, 4)]  # least recently used closed first


def test_an_old_format_cache_is_refused_not_misread(tiny_sd15, tiny_t5, data, base, tmp_path):
    config = _config(tiny_sd15, tiny_t5, data, tmp_path)
    settings = feature_cache.cache_settings(config, base.vae.dtype)
    assert settings["version"] == feature_cache.CACHE_VERSION == 3
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"settings": {**settings, "version": 2}, "hidden_size": 32,
                                                "entries": [], "skipped": {}}))
    (old / "COMPLETE").write_text("ok\n")
    with pytest.raises(TrainingError, match=r"format 2 or older, this trainer reads format 3.*delete .*COMPLETE"):
        feature_cache.FeatureCache(old)


def test_resume_cuts_rows_beyond_the_last_shard_and_redoes_shards_the_index_lacks(tiny_sd15, tiny_t5, data, base,
                                                                                  tmp_path):
    config = _config(tiny_sd15, tiny_t5, data, tmp_path / "ref")
    llm = load_llm(config.llm, CPU)
    ref = _build(config, base, llm)
    ref_cache = feature_cache.FeatureCache(ref)
    expected = [(ref_cache.entry(i)["key"], _stored(ref, ref_cache.entry(i))) for i in range(len(ref_cache))]
    for damage in ("rows-after-last-shard", "index-cut", "index-deleted"):
        config = _config(tiny_sd15, tiny_t5, data, tmp_path / damage)
        folder = _build(config, base, llm)
        (folder / "COMPLETE").unlink()
        records = folder / "index-r0.bin"
        if damage == "rows-after-last-shard":  # killed after appending rows, before writing the shard
            (folder / "r0-00003.safetensors").unlink()
        elif damage == "index-cut":
            records.write_bytes(records.read_bytes()[:6 * RECORD.itemsize])  # shards 0 and 1 stay indexed
        else:
            records.unlink()
        _build(config, base, llm)
        cache = feature_cache.FeatureCache(folder)
        got = [(cache.entry(i)["key"], _stored(folder, cache.entry(i))) for i in range(len(cache))]
        assert [k for k, _ in got] == [k for k, _ in expected], damage
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for (_, a), (_, b) in
                   zip(got, expected)), damage
        assert records.stat().st_size == 13 * RECORD.itemsize
