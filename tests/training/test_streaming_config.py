"""Which runs stream their source, decided once from the settings (validated before any model loads) and
once by the loop from the data readers: the two must agree, and what a streamed run cannot do is refused."""

from __future__ import annotations

import itertools

import pytest

from tests.training.train_helpers import TINY_CONFIG, synthetic_samples, write_folder, write_jsonl, write_tars
from training.config import ConfigError, load_config, streamed_run
from training.streaming import streams


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    samples = synthetic_samples(8, seed=0)
    tars = write_tars(root / "tars", samples, per_shard=4)
    models = root / "models"  # existing folders: the settings are checked, nothing is loaded
    models.mkdir()
    return {"models": [f"model.pretrained={models}", f"llm.source={models}"], "folder": str(write_folder(root / "folder", samples)), "jsonl": str(write_jsonl(root / "jsonl", samples)),
            "webdataset": str(tars[0].parent / "shard-{0000..0001}.tar")}


@pytest.mark.parametrize("fmt, mode, streaming", list(itertools.product(
    ("folder", "jsonl", "webdataset"), ("full", "latents", "none"), (None, True, False))))
def test_the_settings_and_the_loop_agree_on_streaming(sources, fmt, mode, streaming):
    overrides = [*sources["models"], f"data.path={sources[fmt]}", f"cache.mode={mode}",
                 f"data.streaming={'null' if streaming is None else str(streaming).lower()}"]
    try:
        config = load_config(TINY_CONFIG, overrides)
    except ConfigError as e:  # only webdataset with cache.mode=none and data.streaming=false is refused
        assert (fmt, mode, streaming) == ("webdataset", "none", False), e
        assert "data.streaming" in str(e)
        return
    assert streamed_run(config) == streams(config)
    assert streams(config) == (mode == "none" and (streaming if streaming is not None else fmt == "webdataset"))


@pytest.mark.parametrize("overrides, message", [
    (["validation.holdout=4"], "validation.holdout needs an indexed source"),
    (["train.max_steps=null", "train.max_epochs=2"], "set train.max_steps"),
])
def test_what_a_streamed_run_cannot_do_is_refused_before_loading(sources, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, [*sources["models"], f"data.path={sources['webdataset']}", "cache.mode=none",
                                  *overrides])
    assert message in str(info.value)
