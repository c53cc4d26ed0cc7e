"""Webdataset shards streamed over HTTP: the shard folder served by a real HTTP server on 127.0.0.1, the trainer
given `http://127.0.0.1:<port>/shard-{0000..0001}.tar` (webdataset opens http URLs through `curl`), and the run
compared with the same shards read from local disk."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.train_helpers import read_metrics, run_trainer

from training.cache import FeatureCache


class _Handler(http.server.SimpleHTTPRequestHandler):
    served: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).served.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture()
def shard_server(datasets):
    """(base URL, list of request paths served) for the webdataset test shards' folder."""
    if shutil.which("curl") is None:
        pytest.fail("curl is not on PATH: webdataset opens http:// shards with curl")
    folder = Path(datasets["webdataset"]).parent
    handler = type("Handler", (_Handler,), {"served": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _cache(out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    folder = next((out / "cache").glob("*/index.json")).parent
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("r*.safetensors")):
        tensors.update({f"{shard.name}/{k}": v for k, v in load_file(str(shard)).items()})
    cache = FeatureCache(folder)
    return [cache.entry(i) for i in range(len(cache))], tensors


def test_training_from_http_shards_equals_training_from_local_shards(tiny_sd15, tiny_t5, datasets, shard_server,
                                                                      tmp_path):
    url, served = shard_server
    local_pattern = datasets["webdataset"].replace("{0000..0002}", "{0000..0001}")
    common = [f"model.pretrained={tiny_sd15}", f"llm.source={tiny_t5}", "train.max_steps=2",
              "train.checkpoint_every=1000", "data.num_workers=0"]
    remote, local = tmp_path / "remote", tmp_path / "local"
    env = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}  # loopback, never a proxy
    run_trainer(*common, f"data.path={url}/shard-{{0000..0001}}.tar", f"output_dir={remote}", env=env)
    assert sorted(served) == ["/shard-0000.tar", "/shard-0001.tar"]  # each shard fetched once, over HTTP
    run_trainer(*common, f"data.path={local_pattern}", f"output_dir={local}")

    remote_entries, remote_tensors = _cache(remote)
    local_entries, local_tensors = _cache(local)
    assert len(remote_entries) == 16  # two shards of 8 samples, none skipped
    assert all(e["key"].startswith(f"{url}/shard-") for e in remote_entries)
    # the same samples in the same order with the same captions, latents and caption features
    assert [e["key"].split("#")[-1] for e in remote_entries] == [e["key"].split("#")[-1] for e in local_entries]
    assert [e["captions"] for e in remote_entries] == [e["captions"] for e in local_entries]
    assert remote_tensors.keys() == local_tensors.keys()
    assert all(torch.equal(remote_tensors[k], local_tensors[k]) for k in local_tensors)

    remote_metrics, local_metrics = read_metrics(remote), read_metrics(local)
    assert [m["step"] for m in remote_metrics] == [1, 2]
    assert remote_metrics[-1]["samples_seen"] == 8  # 2 steps x batch 4
    assert [m["loss"] for m in remote_metrics] == [m["loss"] for m in local_metrics]  # bit for bit on CPU
