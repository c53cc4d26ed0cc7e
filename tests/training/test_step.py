"""The optimizer step: fused AdamW and the multi-tensor EMA against their reference computations, when the
loop looks for stop requests, and, on the real script (one process, and two gloo ranks started as torchrun
starts them), that steps between log intervals make no host sync and no collective, that DDP all-reduces
gradients on the last micro-step only, and that a SIGTERM on one rank stops all within the bound."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from tests.training.train_helpers import ROOT, TINY_CONFIG, python

from training.config import OptimConfig
from training.models import EMA
from training.optim import clip_and_step, make_optimizer
from training.stopping import stop_check_due

PROBE = Path(__file__).with_name("step_probe_entry.py")


# ---------------------------------------------------------------- numerics of the pieces
def _params(seed: int, shapes) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


@pytest.mark.parametrize("seed,weight_decay,lr", [(0, 0.01, 1e-4), (1, 0.0, 1e-3), (2, 0.1, 3e-4), (3, 0.01, 1e-2)])
def test_fused_adamw_follows_the_single_tensor_loop(seed, weight_decay, lr):
    shapes = [(64, 48), (48,), (3, 5, 7), (1,), (1000,)]
    fused, loop = _params(seed, shapes), _params(seed, shapes)
    config = OptimConfig(lr=lr, weight_decay=weight_decay)
    opt_fused = make_optimizer(fused, config, torch.device("cpu"))
    opt_loop = make_optimizer(loop, config, torch.device("cpu"), kernel={"foreach": False})
    assert opt_fused.defaults["fused"] is True and not opt_loop.defaults["foreach"]
    g = torch.Generator().manual_seed(100 + seed)
    for step in range(8):
        scale = 10.0 ** (-step % 4)  # gradients of several magnitudes, as over a run
        for a, b in zip(fused, loop):
            a.grad = (torch.randn(a.shape, generator=g) * scale)
            b.grad = a.grad.clone()
        for opt in (opt_fused, opt_loop):
            opt.param_groups[0]["lr"] = lr * (step + 1) / 8  # a warm-up, as the loop sets it
            opt.step()
    for a, b, start in zip(fused, loop, _params(seed, shapes)):
        moved = (b - start).detach().abs().max()
        assert moved > 0  # within a few units in the last place of the weights, far below one step
        torch.testing.assert_close(a.detach(), b.detach(), rtol=4 * torch.finfo(torch.float32).eps,
                                   atol=1e-4 * moved.item())


@pytest.mark.parametrize("max_norm", [None, 1e-3, 0.5, 1.0, 1e6])
def test_clipping_folded_into_the_fused_step_equals_clipping_in_place(max_norm):
    """The trainer's clip_and_step against torch's clip_grad_norm_ followed by the same fused AdamW, with
    gradient norms below and above max_norm."""
    shapes = [(64, 48), (48,), (1000,)]
    folded, reference, unclipped = _params(7, shapes), _params(7, shapes), _params(7, shapes)
    config = OptimConfig(lr=1e-3)
    opt_a = make_optimizer(folded, config, torch.device("cpu"))
    opt_b = make_optimizer(reference, config, torch.device("cpu"))
    opt_c = make_optimizer(unclipped, config, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        for a, b, c in zip(folded, reference, unclipped):
            a.grad = torch.randn(a.shape, generator=g) * 10.0 ** (step - 3)
            b.grad, c.grad = a.grad.clone(), a.grad.clone()
        clip_and_step(opt_a, scaler, folded, max_norm)
        opt_c.step()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(reference, max_norm)
        opt_b.step()
        assert not hasattr(opt_a, "grad_scale")
        for a, b in zip(folded, reference):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=4 * torch.finfo(torch.float32).eps, atol=1e-9)
    clipped_something = max_norm is not None and max_norm < 1e2  # the largest gradient norms are about 3e3
    assert clipped_something == any(not torch.allclose(a, c, rtol=0, atol=1e-6) for a, c in zip(folded, unclipped))


@pytest.mark.parametrize("decay,dtype", [(0.9999, torch.float32), (0.8, torch.float32), (0.99, torch.float64)])
def test_ema_update_equals_the_per_tensor_lerp(decay, dtype):
    module = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5)).to(dtype)
    ema = EMA(module, decay)
    reference = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for step in range(1, 12):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=dtype))
        ema.update(module, step)
        d = min(decay, (1 + step) / (10 + step))
        for key, value in module.state_dict().items():
            reference[key].lerp_(value.detach().float(), 1.0 - d)
        assert all(torch.equal(ema.shadow[k], reference[k]) for k in reference), step


@pytest.mark.parametrize("every", [1, 2, 3, 7, 10])
def test_stop_requests_are_seen_within_the_bound(every):
    for arrival in range(1, 40):  # a signal that arrives during step `arrival` is seen at the first check after
        seen = next(s for s in range(arrival, arrival + every + 1) if stop_check_due(s, every, distributed=True))
        assert seen - arrival < every and seen % every == 0
        assert stop_check_due(arrival, every, distributed=False)  # one process: free, so every step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,dtype", [((2, 4, 64, 64), torch.float32), ((2, 128, 2048), torch.float32),
                                         ((3,), torch.int64)])
def test_host_to_device_copies_queue_without_a_host_sync(shape, dtype):
    from training.transfer import to_device

    x = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 1000, shape)
    torch.cuda.set_sync_debug_mode("error")  # a synchronising copy raises
    try:
        y = to_device(x, torch.device("cuda", torch.cuda.current_device()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(y.cpu(), x)


# ---------------------------------------------------------------- the real script, observed step by step
def _probe_env(probe_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "ELLA_TEST_PROBE_DIR": str(probe_dir), **extra}


def _args(base: Path, llm: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [python(), str(PROBE), "--config", str(TINY_CONFIG), f"model.pretrained={base}",
            f"llm.source={llm}", f"data.path={data}", f"output_dir={out}", "train.max_steps=100",
            "train.checkpoint_every=1000", *extra]


def _windows(events: list[list]) -> dict[int, list[list]]:
    """Events per optimizer step: from its start to the next step's start (the last step: to the exit)."""
    windows: dict[int, list[list]] = {}
    current = None
    for event in events:
        if event[0] == "step":
            current = event[1]
            windows[current] = []
        elif current is not None:
            windows[current].append(event)
    return windows


def _syncs(window: list[list]) -> list[list]:
    return [e for e in window if e[0] in ("sync", "collective")]


def test_one_process_steps_between_logs_make_no_host_sync(tiny_sd15, tiny_t5, datasets, tmp_path):
    """log_every 4; SIGTERM during step 6: the run stops after step 6 (one process checks every step)."""
    probe, out = tmp_path / "probe", tmp_path / "run"
    proc = subprocess.run(_args(tiny_sd15, tiny_t5, datasets["folder"], out, "train.log_every=4",
                                "train.threads=1"),
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                          env=_probe_env(probe, ELLA_TEST_SIGNAL_AT="6@0"))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-4000:]
    assert "1 CPU threads" in proc.stderr  # train.threads applied at start-up
    events = json.loads((probe / "rank0.json").read_text())
    windows = _windows(events)
    assert sorted(windows) == [1, 2, 3, 4, 5, 6] and events[-1] == ["exit", 143]
    for step in (1, 2, 3, 5):
        assert _syncs(windows[step]) == [], (step, windows[step])
    assert ["sync", "item", "loop.py"] in windows[4]  # the log step reads the loss
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000006"]


def test_two_gloo_ranks_sync_gradients_once_per_step_and_stop_together(tiny_sd15, tiny_t5, datasets, tmp_path):
    """grad_accum 4, log_every 4, stop_check_every 3, SIGTERM to rank 1 only, during step 5: both ranks stop
    after step 6 (the first check after it), each step's gradients are all-reduced after its 4th micro-batch
    only, and steps that neither log nor check make no host sync and no collective."""
    probe, out = tmp_path / "probe", tmp_path / "run"
    args = _args(tiny_sd15, tiny_t5, datasets["folder"], out, "train.log_every=4", "train.stop_check_every=3",
                 "train.grad_accum=4", "train.batch_size=2", "train.backend=gloo")
    port = str(random.randint(20000, 40000))
    procs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                              env=_probe_env(probe, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                             ELLA_TEST_SIGNAL_AT="5@1"))
             for r in range(2)]
    try:
        stderr = [p.communicate(timeout=400)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 128 + signal.SIGTERM, (r, stderr[r][-4000:])
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000006"]
    for rank in range(2):
        events = json.loads((probe / f"rank{rank}.json").read_text())
        windows = _windows(events)
        assert sorted(windows) == [1, 2, 3, 4, 5, 6], rank
        for step, window in windows.items():
            micros = [i for i, e in enumerate(window) if e[0] == "micro"]
            syncs = [i for i, e in enumerate(window) if e[0] == "grad_allreduce"]
            assert [window[i][1] for i in micros] == [0, 1, 2, 3], (rank, step)
            assert syncs and min(syncs) > micros[-1], (rank, step, window)  # only the last micro-step's backward
        per_step = {len([e for e in w if e[0] == "grad_allreduce"]) for w in windows.values()}
        assert len(per_step) == 1, per_step  # the same buckets every step
        for step in (1, 2, 5):
            assert _syncs(windows[step]) == [], (rank, step, windows[step])
        # the stop check alone: one all-reduce of the flag, read once
        assert _syncs(windows[3]) == [["collective", "all_reduce"], ["sync", "item", "distributed.py"]], rank
        assert ["collective", "all_reduce"] in windows[4] and ["sync", "item", "loop.py"] in windows[4]  # logging
