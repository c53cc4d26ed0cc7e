"""Checkpoints in-process on a real connector and AdamW: a table of damage to the newest checkpoint, each
reported and passed over for the newest intact one; orphan temporary folders removed; the resume layout
rule (same global micro-batch continues, otherwise refused with the numbers); which config differences
are reported; metrics.jsonl cut back to the resumed step."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tests.training.train_helpers import TINY_CONFIG

from ella_core import ELLA, ELLAConfig
from training.checkpoints import (check_layout, damage, list_checkpoints, load_checkpoint, remove_orphans,
                                  resolve_resume, save_checkpoint)
from training.config import load_config, result_changes
from training.distributed import Dist
from training.errors import TrainingError
from training.loop import keep_metrics_until


def _train_and_save(root: Path, steps: int) -> tuple[ELLA, torch.optim.Optimizer, dict[int, dict]]:
    torch.manual_seed(0)
    ella = ELLA(ELLAConfig(input_dim=16, width=32, layers=1, heads=4, num_latents=4, time_channel=32,
                           time_embed_dim=32))
    optimizer = torch.optim.AdamW(ella.parameters(), lr=1e-3)
    saved = {}
    for step in range(1, steps + 1):
        loss = ella(torch.randn(2, 5, 16), torch.rand(2) * 999).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = {"step": step, "samples_seen": 2 * step, "position": {"epoch": 0, "batch": step}, "skipped": {},
                 "world": 1, "config": {"train": {"batch_size": 2}}}
        ema = {k: v.detach().clone() for k, v in ella.state_dict().items()}
        save_checkpoint(root, step, ella, {"base_model": "sd15"}, optimizer, ema, state, Dist(), keep=0)
        saved[step] = {k: v.detach().clone() for k, v in ella.state_dict().items()}
    return ella, optimizer, saved


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {  # name -> (change to the newest checkpoint folder, what the report must say)
    "connector deleted": (lambda p: (p / "connector.safetensors").unlink(), "missing ['connector.safetensors']"),
    "connector cut": (lambda p: (p / "connector.safetensors").write_bytes(
        (p / "connector.safetensors").read_bytes()[:300]), "connector.safetensors does not match its checksum"),
    "connector bit flip": (lambda p: _flip(p / "connector.safetensors", 0.9), "connector.safetensors does not match"),
    "optimizer bit flip": (lambda p: _flip(p / "optimizer.pt"), "optimizer.pt does not match its checksum"),
    "optimizer empty": (lambda p: (p / "optimizer.pt").write_bytes(b""), "optimizer.pt does not match"),
    "rng cut": (lambda p: (p / "rng.pt").write_bytes((p / "rng.pt").read_bytes()[:50]), "rng.pt does not match"),
    "ema flip": (lambda p: _flip(p / "ema.safetensors", 0.7), "ema.safetensors does not match its checksum"),
    "state garbage": (lambda p: (p / "trainer_state.json").write_text("{nope"), "trainer_state.json is not valid"),
    "state not an object": (lambda p: (p / "trainer_state.json").write_text("[]"), "lacks step/position"),
    "state deleted": (lambda p: (p / "trainer_state.json").unlink(), "missing ['trainer_state.json']"),
    "checksums deleted": (lambda p: (p / "checksums.json").unlink(), "missing checksums.json"),
    "checksums garbage": (lambda p: (p / "checksums.json").write_bytes(b"\xff\xfe"), "checksums.json is not valid"),
    "emptied folder": (lambda p: [f.unlink() for f in p.iterdir()], "missing ["),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact(tmp_path, caplog, name):
    root = tmp_path / "checkpoints"
    ella, optimizer, saved = _train_and_save(root, 3)
    change, report = DAMAGE[name]
    assert all(damage(p) is None for _, p in list_checkpoints(root))
    change(root / "step-00000003")
    assert report in (damage(root / "step-00000003") or "")
    with caplog.at_level(logging.WARNING, logger="training"):
        chosen = resolve_resume("latest", root)
    assert chosen == root / "step-00000002"
    assert "step-00000003 is damaged" in caplog.text and report in caplog.text
    state = load_checkpoint(chosen, ella, optimizer, Dist())
    assert state["step"] == 2 and all(torch.equal(v, saved[2][k]) for k, v in ella.state_dict().items())
    with pytest.raises(TrainingError, match=r"the checkpoint is damaged"):
        resolve_resume(str(root / "step-00000003"), root)  # named explicitly: no silent substitute


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    _train_and_save(root, 2)
    for _, p in list_checkpoints(root):
        (p / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(TrainingError, match="every checkpoint in .* is damaged"):
        resolve_resume("latest", root)
    assert resolve_resume("latest", tmp_path / "none-yet") is None  # no checkpoint at all: a fresh start


def test_a_save_replaces_a_damaged_checkpoint_of_the_same_step(tmp_path):
    root = tmp_path / "checkpoints"
    ella, optimizer, _ = _train_and_save(root, 2)
    (root / "step-00000002" / "rng.pt").write_bytes(b"")
    save_checkpoint(root, 2, ella, {"base_model": "sd15"}, optimizer, None, {"step": 2, "samples_seen": 4,
                    "position": {"epoch": 0, "batch": 2}}, Dist(), keep=0)
    assert damage(root / "step-00000002") is None


def test_orphans_of_killed_saves_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    _train_and_save(root, 1)
    for name in (".tmp-step-00000002-4242", ".tmp-step-00000009-1"):
        (root / name).mkdir()
        (root / name / "connector.safetensors").write_bytes(b"half")
    assert remove_orphans(root) == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    assert remove_orphans(tmp_path / "absent") == 0


LAYOUTS = [  # (saved batch, saved world, batch, world, changed)
    (4, 1, 4, 1, False), (4, 1, 2, 2, False), (2, 2, 4, 1, False), (4, 1, 3, 1, True), (4, 1, 4, 2, True),
    (2, 2, 2, 1, True), (3, 1, 1, 2, True), (8, 2, 4, 2, True),
]


@pytest.mark.parametrize("saved_batch, saved_world, batch, world, changed", LAYOUTS)
def test_any_resume_layout_continues_and_a_change_is_logged(saved_batch, saved_world, batch, world, changed, caplog):
    state = {"world": saved_world, "config": {"train": {"batch_size": saved_batch}}}
    with caplog.at_level("INFO", logger="training"):
        check_layout(state, batch, world)  # continues (tests/training/test_resume_layouts.py: nothing lost)
    logged = [r.getMessage() for r in caplog.records if "global micro-batch" in r.getMessage()]
    assert bool(logged) == changed
    if changed:
        assert f"{saved_batch * saved_world} (train.batch_size x processes) -> {batch * world} ({batch} x {world})" \
            in logged[0]


def test_a_streamed_checkpoint_is_not_resumed_as_map_style():
    state = {"world": 1, "position": {"epoch": 0, "parts": {"0": [3]}, "turns": {}, "layout": [1, 1]}}
    with pytest.raises(TrainingError, match="the checkpoint streamed its source"):
        check_layout(state, 4, 1)


def _config(*extra):
    return load_config(TINY_CONFIG, ["model.pretrained=o/b", "llm.source=o/l", "data.path=/tmp", *extra])


@pytest.mark.parametrize("change, reported", [
    (["optim.lr=2e-3"], ["optim.lr: 0.001 -> 0.002"]),
    (["data.caption_dropout=0.5"], ["data.caption_dropout: 0.1 -> 0.5"]),
    (["model.pretrained=o/other"], ["model.pretrained: 'o/b' -> 'o/other'"]),
    (["train.max_steps=9"], ["train.max_steps: 4 -> 9"]),  # cosine without schedule_steps: the lr curve moves
    (["train.max_steps=9", "optim.schedule_steps=4"], ["optim.schedule_steps: None -> 4"]),
    (["train.max_steps=9", "optim.schedule=constant"], ["optim.schedule: 'cosine' -> 'constant'"]),
    (["output_dir=elsewhere", "train.log_every=5", "train.checkpoint_every=7", "train.keep_checkpoints=1",
      "data.num_workers=2", "cache.dir=/c", "cache.shard_size=8", "validation.every=3", "train.resume=latest",
      "train.collective_timeout_s=60"], []),
])
def test_result_changing_differences_are_reported(change, reported):
    saved = _config().to_dict()
    assert result_changes(saved, _config(*change)) == reported


@pytest.mark.parametrize("saved_world, world, batch, reported", [(1, 1, 2, True), (2, 1, 8, False), (2, 1, 2, True),
                                                                  (1, 2, 2, False)])
def test_batch_size_is_reported_only_when_the_global_micro_batch_changes(saved_world, world, batch, reported):
    saved = _config("train.batch_size=4").to_dict()
    changes = result_changes(saved, _config(f"train.batch_size={batch}"), saved_world, world)
    assert changes == ([f"train.batch_size: 4 -> {batch}"] if reported else [])


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    keep_metrics_until(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    keep_metrics_until(path, 0)
    assert path.read_text() == ""
    keep_metrics_until(tmp_path / "absent.jsonl", 2)  # no file yet: nothing to do
    shutil.rmtree(tmp_path)
