"""What was left of issue 10 (the trainer at scale): one format rule for the config check and the readers;
the held-out split's keys read from the cache index in one pass; samples_seen exact when the ranks'
micro-batches differ; a streamed run resumed mid-epoch with another layout visits the epoch exactly once."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
from tests.training.train_helpers import TINY_CONFIG, synthetic_samples, write_csv, write_folder, write_jsonl, write_tars

from training.config import ConfigError, _resolved_format, load_config, streamed_run
from training.data import source_format
from training.streaming import streams


# ---------------------------------------------------------------- one format rule
@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every kind of data.path, with the format it names."""
    root = tmp_path_factory.mktemp("paths")
    samples = synthetic_samples(4, seed=1)
    tars = write_tars(root / "tars", samples, per_shard=2)
    imagefolder = write_folder(root / "imagefolder", samples)
    (imagefolder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{k}.png", "text": c[0]}) + "\n"
                                                        for k, _, c in samples))
    return {
        "folder": (str(write_folder(root / "folder", samples)), "folder"),
        "imagefolder": (str(imagefolder), "folder"),
        "jsonl": (str(write_jsonl(root / "jsonl", samples)), "jsonl"),
        "csv": (str(write_csv(root / "csv", samples)), "csv"),
        "tar folder": (str(tars[0].parent), "webdataset"),  # a folder of .tar files (the two rules differed here)
        "brace": (str(tars[0].parent / "shard-{0000..0001}.tar"), "webdataset"),
        "one tar": (str(tars[0]), "webdataset"),
        "list": ([str(t) for t in tars], "webdataset"),
        "url": ("https://example.org/shards/{000..009}.tar", "webdataset"),
        "pipe": ("pipe:curl -s https://example.org/a.tar", "webdataset"),
    }


KINDS = ["folder", "imagefolder", "jsonl", "csv", "tar folder", "brace", "one tar", "list", "url", "pipe"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_config_check_and_the_readers_resolve_the_same_format(paths, tmp_path, kind):
    """Every data.format x cache.mode x data.streaming for each kind of path: the format and the decision to
    stream are the same in the config check and in the readers, and are what the path names."""
    path, named = paths[kind]
    models = tmp_path / "models"
    models.mkdir()
    for fmt, mode, streaming in itertools.product(("auto", "folder", "jsonl", "csv", "webdataset"),
                                                  ("full", "latents", "none"), (None, True, False)):
        overrides = [f"model.pretrained={models}", f"llm.source={models}", f"data.format={fmt}", f"cache.mode={mode}",
                     f"data.streaming={'null' if streaming is None else str(streaming).lower()}"]
        expected = named if fmt == "auto" else fmt
        case = (kind, fmt, mode, streaming)
        try:
            config = load_config(TINY_CONFIG, overrides + ([f"data.path={path}"] if isinstance(path, str) else []))
            if not isinstance(path, str):
                config.data.path = path
        except ConfigError as e:  # webdataset indexed without a cache, or a manifest format on a folder
            assert (expected, mode, streaming) == ("webdataset", "none", False) or "data.path" in str(e), (case, e)
            continue
        assert _resolved_format(config.data) == source_format(config.data) == expected, case
        assert streamed_run(config) == streams(config) == (
            mode == "none" and (streaming if streaming is not None else expected == "webdataset")), case
