"""Config parsing and the data layer, in-process (fast): sources, bad samples, captions, buckets, order."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tests.training.train_helpers import TINY_CONFIG, synthetic_samples, write_csv, write_folder, write_jsonl, write_tars

from training.config import ConfigError, load_config
from training.data import (BatchPlan, DataPosition, Skip, SkipCounter, choose_caption, epoch_batches, fit_to_bucket,
                           make_buckets, nearest_bucket, stream_records)
from training.errors import TrainingError

REQUIRED = ["model.pretrained=org/base", "llm.source=org/llm"]  # hub ids: not checked for existence


# ---------------------------------------------------------------- config
def test_overrides_are_typed_and_nested(tmp_path):
    c = load_config(TINY_CONFIG, REQUIRED + [f"data.path={tmp_path}", "optim.lr=3e-4", "train.max_steps=7",
                                             "resume=latest", "data.caption_columns=[caption, dense]",
                                             "train.ema_decay=0.99"])
    assert c.optim.lr == pytest.approx(3e-4) and isinstance(c.optim.lr, float)
    assert c.train.max_steps == 7 and c.train.resume == "latest" and c.train.ema_decay == 0.99
    assert c.data.caption_columns == ["caption", "dense"]
    assert c.connector.layers == 2  # from the file


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown config key"),
    ("data.caption_rule=best", "data.caption_rule"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.caption_dropout=1.5", "caption_dropout"),
    ("llm.token_mode=padded", "token_mode"),
    ("data.caption_rule=weighted", "caption_weights"),
    ("optim.lr=fast", "optim.lr"),
])
def test_bad_config_is_named(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CONFIG, REQUIRED + [f"data.path={tmp_path}", override])


@pytest.mark.parametrize("name", ["sd15_1gpu", "sd15_8gpu", "sdxl_1gpu", "sdxl_8gpu"])
def test_example_configs_load_with_paper_defaults(name, tmp_path):
    c = load_config(Path(TINY_CONFIG).parent / f"{name}.yaml", [f"data.path={tmp_path}"])
    assert c.optim.weight_decay == 0.01 and c.llm.max_length == 128 and c.llm.token_mode == "fixed"
    assert c.optim.lr == pytest.approx(1e-4 if name.startswith("sd15") else 1e-5)
    assert c.model.base == name.split("_")[0]


# ---------------------------------------------------------------- sources and bad samples
def _data_config(path, **kw):
    return load_config(TINY_CONFIG, REQUIRED + [f"data.path={path}"] + [f"data.{k}={v}" for k, v in kw.items()]).data


def test_every_format_yields_the_same_samples(tmp_path):
    samples = synthetic_samples(10, 1)
    sources = {
        "folder": _data_config(write_folder(tmp_path / "f", samples)),
        "jsonl": _data_config(write_jsonl(tmp_path / "j", samples), caption_columns="[caption, dense]"),
        "csv": _data_config(write_csv(tmp_path / "c", samples), caption_columns="[caption, dense]"),
        "webdataset": _data_config(f"{tmp_path / 't'}/shard-{{0000..0002}}.tar"),
    }
    write_tars(tmp_path / "t", samples, per_shard=4)
    for fmt, cfg in sources.items():
        skips = SkipCounter()
        records = list(stream_records(cfg, skips))
        assert skips.total == 0, (fmt, skips.to_dict())
        assert [r.captions for r in records] == [s[2] for s in samples], fmt
        assert records[3].load()[:8] == b"\x89PNG\r\n\x1a\n", fmt


def test_bad_samples_are_skipped_and_counted(tmp_path):
    samples = synthetic_samples(6, 2)
    folder = write_folder(tmp_path / "f", samples)
    (folder / "img0001.txt").unlink()  # missing caption
    (folder / "img0002.txt").write_text("\n \n")  # empty caption
    (folder / "orphan.png").write_bytes(b"not a png")  # no caption either
    skips = SkipCounter()
    records = list(stream_records(_data_config(folder), skips))
    assert len(records) == 4 and skips.counts == Counter({Skip.NO_CAPTION: 2, Skip.EMPTY_CAPTION: 1})

    jsonl = write_jsonl(tmp_path / "j", samples)
    jsonl.write_text(jsonl.read_text() + "{not json\n[1, 2]\n" + json.dumps({"caption": "no image"}) + "\n")
    skips = SkipCounter()
    assert len(list(stream_records(_data_config(jsonl), skips))) == 6
    assert skips.counts == Counter({Skip.INVALID_JSON: 1, Skip.NOT_AN_OBJECT: 1, Skip.NO_IMAGE_FIELD: 1})

    tars = write_tars(tmp_path / "t", samples, per_shard=3)
    tars[1].write_bytes(tars[1].read_bytes()[:700])  # truncated shard
    skips = SkipCounter()
    records = list(stream_records(_data_config(tmp_path / "t"), skips))
    assert len(records) == 3 and skips.counts == Counter({Skip.TRUNCATED_SHARD: 1})


def test_missing_manifest_column_names_the_file(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("file,caption\na.png,hi\n")
    with pytest.raises(TrainingError, match=r"x\.csv: no column 'image'"):
        list(stream_records(_data_config(path), SkipCounter()))


# ---------------------------------------------------------------- captions, buckets, order
def test_caption_rules():
    caps = ["short", "a much longer dense caption", "mid one"]
    g = torch.Generator().manual_seed(0)
    assert choose_caption(caps, "first", g) == 0
    assert choose_caption(caps, "longest", g) == 1
    picks = Counter(choose_caption(caps, "weighted", g, [0.0, 0.25, 0.75]) for _ in range(2000))
    assert picks[0] == 0 and 0.68 < picks[2] / 2000 < 0.82
    picks = Counter(choose_caption(caps, "random", g) for _ in range(3000))
    assert all(850 < picks[i] < 1150 for i in range(3))


def test_buckets_cover_aspects_and_crop_is_recorded():
    buckets = make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets and all(h * w <= 512 * 512 and h % 64 == 0 and w % 64 == 0 for h, w in buckets)
    assert nearest_bucket((300, 900), buckets)[1] > nearest_bucket((300, 900), buckets)[0]  # wide -> wide
    from PIL import Image

    sample = fit_to_bucket(Image.new("RGB", (120, 60), (255, 0, 0)), (32, 32))
    assert sample.pixels.shape == (3, 32, 32) and sample.original_size == (60, 120)
    assert sample.crop_top_left == (0, 16)  # resized to 64x32, centre crop
    assert sample.pixels.dtype == torch.uint8  # scaled to [-1, 1] on the encoder's device (models.vae_input)
    assert bool((sample.pixels[0] == 255).all()) and bool((sample.pixels[1:] == 0).all())


def test_byte_pixels_reach_the_vae_as_float_pixels_did(tiny_sd15):
    """Pixels travel as uint8 and are scaled where the VAE runs: bit for bit the values, and so the latents, of
    the float32 `x / 127.5 - 1` pixels they replace (caches built before the change stay valid)."""
    import numpy as np
    from PIL import Image

    from training.config import ModelConfig
    from training.models import load_base, vae_input

    base = load_base(ModelConfig(pretrained=str(tiny_sd15)), torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(7)
    by_bucket: dict = {}
    for i in range(24):
        size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        bucket = [(32, 32), (16, 48), (48, 16)][i % 3]
        pixels = fit_to_bucket(image, bucket).pixels
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, *bucket)
        as_float = torch.from_numpy(pixels.numpy().astype(np.float32) / 127.5 - 1.0)  # the former output
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(vae_input(pixels, torch.device("cpu"), dtype), as_float.to(dtype)), dtype
        by_bucket.setdefault(bucket, []).append((pixels, as_float))
    assert torch.equal(vae_input(torch.arange(256, dtype=torch.uint8), torch.device("cpu"), torch.float32),
                       torch.from_numpy(np.arange(256, dtype=np.float32) / 127.5 - 1.0))
    with torch.no_grad():
        for pairs in by_bucket.values():
            as_bytes = base.encode_pixels(torch.stack([b for b, _ in pairs]))
            assert torch.equal(as_bytes, base.encode_pixels(torch.stack([f for _, f in pairs])))
            assert torch.isfinite(as_bytes).all() and as_bytes.abs().sum() > 0


def test_batch_plan_is_the_same_split_over_processes_and_resumable():
    buckets = [(32, 32)] * 10 + [(32, 64)] * 7
    one = BatchPlan(buckets, 4, 1, 0, seed=3)
    two = [BatchPlan(buckets, 2, 2, r, seed=3) for r in range(2)]
    it1, it2 = iter(one), [iter(p) for p in two]
    for _ in range(9):  # crosses epoch boundaries (3 global batches per epoch)
        global_batch = next(it1)
        assert global_batch == next(it2[0]) + next(it2[1])
        assert len({buckets[i] for i, _ in global_batch}) == 1
    # resuming from a saved position continues the same stream
    saved = DataPosition(**one.position.to_dict())
    expected = [next(it1) for _ in range(4)]
    resumed = iter(BatchPlan(buckets, 4, 1, 0, seed=3, position=saved))
    assert [next(resumed) for _ in range(4)] == expected
    assert epoch_batches(buckets, 4, 3, 0) != epoch_batches(buckets, 4, 3, 1)  # reshuffled every epoch
