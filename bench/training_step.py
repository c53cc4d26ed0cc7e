"""The training step's cost beyond the frozen UNet at SD1.5 shapes, split into its parts, before and after.

What is counted where (printed with the figures):
  UNet fwd+bwd   the frozen UNet's forward on the noised latents and its backward from the loss down to the
                 context: dL/dcontext only (its weights have requires_grad False, so autograd computes no
                 weight gradient; checked below). The backward of its cross-attention K/V projections into the
                 context exists only because the connector trains; it is counted as the UNet's (it is the
                 UNet's backward) and timed apart on the same shapes to show its size.
  connector      its forward, its backward from dL/dcontext (weight gradients), and the optimizer: gradient
                 clipping (max norm 1), AdamW, zero_grad: what the issue calls "connector forward+backward+AdamW".
  EMA            the EMA update (only with train.ema_decay), shown apart, not in the connector's figure.
  overhead       connector / UNet fwd+bwd ("on top of the frozen UNet"); share = connector / (UNet + connector).
The trainer runs one backward through both; the bench splits it at the context (the same maths) to time
the parts. Two trainers alternate round by round on the same inputs: "before" (torch's default AdamW for the
device: the single-tensor loop on a CPU; clip_grad_norm_ in place; the per-tensor EMA lerp) and "now"
(training/optim.py's fused AdamW with the clipping folded into it, training/models.EMA: what the trainer uses). Figures are per step: minimum and median over the rounds.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from ella_core import ELLA, ELLAConfig
from training.config import OptimConfig
from training.models import EMA, ConnectorStep
from training.optim import clip_and_step, clip_gradients, make_optimizer

CONNECTOR_PHASES = ("connector fwd", "connector bwd", "clip + AdamW + zero_grad")


class PerTensorEMA(EMA):
    """The EMA update as the trainer did it before: one lerp_ per state tensor."""

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, value in module.state_dict().items():
            self.shadow[key].lerp_(value.detach().float(), 1.0 - decay)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _kv_backward_s(unet: Any, context: torch.Tensor, device: torch.device) -> float:
    """Seconds of the backward of every cross-attention's to_k/to_v into the context, alone."""
    layers = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    leaf = context.detach().requires_grad_(True)
    outs = [t for m in layers for t in (m.to_k(leaf), m.to_v(leaf))]
    grads = [torch.randn_like(t) for t in outs]
    _sync(device)
    start = time.perf_counter()
    torch.autograd.backward(outs, grads)
    _sync(device)
    return time.perf_counter() - start


def flop_line(unet: Any, batch: int, latent: int, tokens: int, input_dim: int) -> str:
    """The arithmetic of both parts, counted on the meta device (nothing computed): the connector's share of
    FLOPs is the floor of its overhead before the optimizer's memory traffic is added."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta_unet = type(unet).from_config(unet.config).requires_grad_(False)
        ella = ELLA(ELLAConfig(input_dim=input_dim))
        features, t = torch.randn(batch, tokens, input_dim), torch.full((batch,), 500.0)
        x = torch.randn(batch, 4, latent, latent)
    counters = [FlopCounterMode(display=False) for _ in range(3)]
    with counters[0]:
        context = ella(features, t)
    split = context.detach().requires_grad_(True)
    with counters[1]:
        meta_unet(x, t, encoder_hidden_states=split).sample.float().square().mean().backward()
    with counters[2]:
        context.backward(split.grad)
    fwd, unet_flops, bwd = (c.get_total_flops() / 1e9 for c in counters)
    return (f"  FLOPs: connector fwd {fwd:.1f} + bwd {bwd:.1f} G, UNet fwd+bwd (to the context) {unet_flops:.0f} G: "
            f"the connector's arithmetic alone is {100 * (fwd + bwd) / unet_flops:.1f} % on top of the UNet")


def step_lines(unet: Any, device: torch.device, batch: int, latent: int, rounds: int = 3, tokens: int = 128,
               input_dim: int = 2048) -> list[str]:
    """Times `rounds` steps of each trainer (after one warm-up step each); returns the lines to print."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, tokens, input_dim, generator=g).to(device)
    latents = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    noise = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noisy = latents * 0.7 + noise * 0.7
    config = OptimConfig()
    trainers: dict[str, dict[str, Any]] = {}
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def step_before(optimizer: torch.optim.Optimizer, params: list) -> None:
        clip_gradients(params, config.max_grad_norm)
        optimizer.step()

    def step_now(optimizer: torch.optim.Optimizer, params: list) -> None:
        clip_and_step(optimizer, scaler, params, config.max_grad_norm)

    for name, kernel, ema_cls, stepper in (("before", {}, PerTensorEMA, step_before), ("now", None, EMA, step_now)):
        torch.manual_seed(0)
        ella = ELLA(ELLAConfig(input_dim=input_dim)).to(device).train()
        trainers[name] = {"ella": ella, "module": ConnectorStep(ella),
                          "optimizer": make_optimizer(ella.parameters(), config, device, kernel),
                          "ema": ema_cls(ella, 0.9999), "step": stepper, "times": []}

    def one_step(tr: dict[str, Any], step: int) -> dict[str, float]:
        marks: list[tuple[str, float]] = []

        def mark(name: str) -> None:
            _sync(device)
            marks.append((name, time.perf_counter()))

        mark("start")
        context, _ = tr["module"](features, t.float())
        mark("connector fwd")
        split = context.detach().requires_grad_(True)
        pred = unet(noisy, t, encoder_hidden_states=split).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        mark("UNet fwd")
        loss.backward()
        mark("UNet bwd")
        context.backward(split.grad)
        mark("connector bwd")
        tr["step"](tr["optimizer"], list(tr["ella"].parameters()))
        tr["optimizer"].zero_grad(set_to_none=True)
        mark("clip + AdamW + zero_grad")
        tr["ema"].update(tr["ella"], step)
        mark("EMA update")
        return {name: end - begin for (_, begin), (name, end) in zip(marks, marks[1:])}

    for tr in trainers.values():  # warm-up (allocations, optimizer state) without the UNet
        context, _ = tr["module"](features, t.float())
        context.backward(torch.randn_like(context))
        tr["step"](tr["optimizer"], list(tr["ella"].parameters()))
        tr["optimizer"].zero_grad(set_to_none=True)
        tr["ema"].update(tr["ella"], 0)
    order = list(trainers)
    for step in range(1, rounds + 1):
        for name in order:
            trainers[name]["times"].append(one_step(trainers[name], step))
        order.reverse()  # alternate which trainer runs first
    unet_weight_grads = sum(p.grad is not None for p in unet.parameters())
    c = ELLAConfig(input_dim=input_dim)
    kv = min(_kv_backward_s(unet, features.new_zeros(batch, c.num_latents, c.width), device) for _ in range(2))

    unet_runs = [r["UNet fwd"] + r["UNet bwd"] for tr in trainers.values() for r in tr["times"]]
    unet_min, unet_med = min(unet_runs), statistics.median(unet_runs)
    fmt: Callable[[float], str] = lambda s: f"{s * 1000:8.1f}"  # noqa: E731
    lines = [f"step at SD1.5 shapes: batch {batch}, {latent}x{latent} latents, {tokens} tokens of width {input_dim}, "
             f"released connector layout; {rounds} rounds per trainer, alternated; ms per step, min / median",
             f"  UNet fwd+bwd (to the context)   {fmt(unet_min)} / {fmt(unet_med)}   (UNet weight gradients "
             f"computed: {unet_weight_grads}; of the bwd, the K/V projections into the context: {fmt(kv)})",
             flop_line(unet, batch, latent, tokens, input_dim)]
    for name, tr in trainers.items():
        runs = tr["times"]
        lines.append(f"  {name}:")
        for phase in (*CONNECTOR_PHASES, "EMA update"):
            values = [r[phase] for r in runs]
            lines.append(f"    {phase:<28} {fmt(min(values))} / {fmt(statistics.median(values))}")
        connector = [sum(r[p] for p in CONNECTOR_PHASES) for r in runs]
        c_min, c_med = min(connector), statistics.median(connector)
        lines.append(f"    connector (all of the above) {fmt(c_min)} / {fmt(c_med)}: overhead on top of the UNet "
                     f"{100 * c_min / unet_min:.1f} % / {100 * c_med / unet_med:.1f} %, share of the step "
                     f"{100 * c_min / (c_min + unet_min):.1f} % / {100 * c_med / (c_med + unet_med):.1f} %")
        ema = statistics.median(r["EMA update"] for r in runs)
        lines.append(f"    with the EMA update too: overhead {100 * (c_med + ema) / unet_med:.1f} % (median)")
    return lines
