"""The training run, top to bottom: set-up, data, models, the loop, checkpoints and the final connector.

One optimizer step = `grad_accum` micro-batches of `batch_size` samples on each of `world` processes.
For every sample: latents z0 and LLM features f (from the cache or computed now), a timestep t uniform in
[0, T), noise e, all seeded per sample visit. The connector gives the UNet's context c = ELLA(f, t)
(SDXL: also the pooled embedding), and the loss is the MSE between the UNet's prediction on the noised
latents and the target (e, or v for v-prediction bases), optionally min-SNR weighted. Only the connector
receives gradients.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ella_core import ELLA

from . import cache as feature_cache
from .checkpoints import check_layout, load_checkpoint, remove_orphans, resolve_resume, save_checkpoint
from .config import Config, OptimConfig, result_changes, save_config
from .data import (BatchPlan, Data, DataPosition, OnlineDataset, SkipCounter, describe, image_failure, image_size,
                   indexable_records, make_buckets, make_loader, nearest_bucket)
from .distributed import Dist, setup
from .errors import TrainingError
from .models import EMA, Base, ConnectorStep, build_connector, encode_texts, load_base, load_llm, sdxl_time_ids
from .optim import clip_and_step, make_optimizer
from .sampling import sample
from .stopping import Stop, stop_check_due
from .transfer import to_device

log = logging.getLogger("training")
NOISE_STREAM = 0x9E3779B97F4A7C15  # xor-ed into a sample's seed: the noise draws differ from the caption draws
MIXED = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- small pieces
def lr_factor(step: int, config: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    total = max(1, (config.schedule_steps or max_steps) - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / total)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return 1.0 - progress
    return 1.0


def snr_weights(base: Base, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023): min(SNR, gamma)/SNR, or /(SNR+1) for v."""
    alphas = base.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1.0 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if base.prediction_type == "v_prediction" else clipped / snr


def draw_noise(seeds: list[int], shape: tuple[int, ...], num_timesteps: int, noise_offset: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample timesteps (B,) and noise (B, C, h, w) from each sample visit's own seed."""
    ts, noises = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed ^ NOISE_STREAM)
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noise = torch.randn(shape, generator=g)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(shape[0], 1, 1, generator=g)
        noises.append(noise)
    return torch.cat(ts), torch.stack(noises)


# ---------------------------------------------------------------- data
def prepare_data(config: Config, base: Base, dist: Dist, stop: Stop) -> Data:
    d = config.data
    skipped = SkipCounter()
    if config.cache.enabled:
        folder = feature_cache.cache_dir(config, base.vae.dtype)
        if not feature_cache.FeatureCache.is_complete(folder):
            log.info("building the feature cache in %s", folder)
            llm_holder: dict[str, Any] = {}

            def get_llm() -> Any:
                llm_holder.setdefault("llm", load_llm(config.llm, dist.device))
                return llm_holder["llm"]

            feature_cache.build_cache(config, folder, base, get_llm, dist, stop)
            llm_holder.clear()  # the LLM leaves memory before training starts
        else:
            log.info("reusing the feature cache in %s", folder)
        cache = feature_cache.FeatureCache(folder)
        skipped.merge(cache.skipped)
        dataset = feature_cache.CachedDataset(cache, d)
        return Data(dataset, cache.buckets, cache.empty_features(), None, skipped, cache)
    records = indexable_records(d, skipped)
    bucket_set = make_buckets(d.resolution, d.bucket_step, d.max_aspect, d.buckets)
    kept, buckets = [], []
    for record in records:
        try:
            buckets.append(nearest_bucket(image_size(record), bucket_set))
            kept.append(record)
        except Exception as e:  # noqa: BLE001 (PIL raises many types for corrupt files)
            skipped.add(image_failure(e), record.key, describe(e))
    if not kept:
        raise TrainingError(f"no usable samples in {d.path} ({skipped.total} skipped: {dict(skipped.counts)}, "
                            f"e.g. {skipped.examples[:3]})")
    llm = load_llm(config.llm, dist.device)
    empty = encode_texts(llm, [""], config.llm)[0].float().cpu()
    return Data(OnlineDataset(kept, buckets, d), buckets, empty, llm, skipped, None)


# ---------------------------------------------------------------- one micro-step
def micro_step_loss(batch: dict[str, Any], base: Base, data: Data, step_module: torch.nn.Module, config: Config,
                    device: torch.device, autocast: Any) -> tuple[torch.Tensor, int]:
    """Loss of one micro-batch (mean over its samples) and the number of samples it had."""
    if "seed" not in batch:  # every sample of this micro-batch failed to load: keep collectives in step
        features = to_device(data.empty[None], device)
        with autocast:
            context, pooled = step_module(features, torch.zeros(1, device=device))
        zero = context.float().sum() * 0.0 + (pooled.float().sum() * 0.0 if pooled is not None else 0.0)
        return zero, 0
    with torch.no_grad():
        if "latents" in batch:
            latents = to_device(batch["latents"], device)  # (B, C, h, w), already scaled
            features = to_device(batch["features"], device)  # (B, L, D)
        else:
            latents = base.encode_pixels(to_device(batch["pixels"], device)).float()
            feature_cache.check_finite(latents, batch["key"], "VAE latents", feature_cache.vae_fix(base.vae.dtype))
            features = encode_texts(data.llm, batch["text"], config.llm).float().to(device)
            feature_cache.check_finite(features, batch["key"], "LLM features", feature_cache.llm_fix(config))
    b = latents.shape[0]
    timesteps, noise = draw_noise(batch["seed"], tuple(latents.shape[1:]), base.scheduler.config.num_train_timesteps,
                                  config.train.noise_offset)
    timesteps, noise = to_device(timesteps, device), to_device(noise, device)
    noisy = base.scheduler.add_noise(latents, noise, timesteps)
    target = noise if base.prediction_type == "epsilon" else base.scheduler.get_velocity(latents, noise, timesteps)
    added = None
    with autocast:
        context, pooled = step_module(features, timesteps.float())  # (B, N, W), (B, P) or None
        if base.kind == "sdxl":
            target_size = (latents.shape[2] * base.latent_scale, latents.shape[3] * base.latent_scale)
            time_ids = to_device(torch.tensor([sdxl_time_ids(o, c, target_size) for o, c in
                                               zip(batch["original_size"], batch["crop_top_left"])]), device)
            added = {"text_embeds": pooled.to(base.unet.dtype), "time_ids": time_ids.to(base.unet.dtype)}
        pred = base.unet(noisy.to(base.unet.dtype), timesteps, encoder_hidden_states=context.to(base.unet.dtype),
                         added_cond_kwargs=added).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if config.train.min_snr_gamma:
        per_sample = per_sample * snr_weights(base, timesteps, config.train.min_snr_gamma)
    return per_sample.mean(), b


def optimizer_step(batches: Any, base: Base, data: Data, step_module: torch.nn.Module, ella: ELLA,
                   optimizer: torch.optim.Optimizer, scaler: Any, config: Config, dist: Dist, autocast: Any
                   ) -> tuple[list[torch.Tensor], int, DataPosition]:
    """One optimizer step over grad_accum micro-batches (gradients synchronised on the last one only).
    Returns the micro-batch losses, the samples seen by all ranks, and the data position after it."""
    t = config.train
    optimizer.zero_grad(set_to_none=True)
    losses, samples = [], 0
    for micro in range(t.grad_accum):
        batch = next(batches)
        for key, reason, detail in batch["skipped"]:
            data.runtime_skips.add(reason, key, detail)
        last = micro == t.grad_accum - 1
        with step_module.no_sync() if dist.enabled and not last else contextlib.nullcontext():
            loss, n = micro_step_loss(batch, base, data, step_module, config, dist.device, autocast)
            scaler.scale(loss / t.grad_accum).backward()
        samples += n * dist.world
        losses.append(loss.detach())
    clip_and_step(optimizer, scaler, ella.parameters(), config.optim.max_grad_norm)  # training/optim.py
    return losses, samples, DataPosition(*batch["position"])


# ---------------------------------------------------------------- the run
def connector_metadata(config: Config, base: Base, step: int) -> dict[str, Any]:
    return {"base_model": base.kind, "llm": config.llm.source, "llm_dtype": config.llm.dtype,
            "llm_hidden_layer": config.llm.hidden_layer, "token_length": config.llm.max_length,
            "token_mode": config.llm.token_mode,
            "extra": {"trainer": "ella-tsc training", "trained_steps": str(step),
                      "base_model_source": config.model.pretrained, "prediction_type": base.prediction_type}}


def _setup_logging(dist: Dist, out: Path) -> None:
    level = logging.INFO if dist.is_main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if dist.is_main:
        handlers.append(logging.FileHandler(out / "train.log"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)


def run(config: Config, stop: Optional[Stop] = None) -> Path:
    """Trains the connector; returns the path of the final connector file. Raises StopRequested after saving
    what is resumable when a SIGTERM/SIGINT arrives (`stop`, installed by train.py before start-up)."""
    stop = stop or Stop().install()
    t = config.train
    dist = setup(t.device, t.backend, t.collective_timeout_s)
    if t.threads:
        torch.set_num_threads(t.threads)
    out = Path(config.output_dir)
    ckpt_root = out / "checkpoints"
    with dist.failing_together("start-up"):
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_orphans(ckpt_root)
    dist.agree("start-up", 0)
    _setup_logging(dist, out)
    random.seed(config.seed + dist.rank)
    np.random.seed(config.seed + dist.rank)
    torch.manual_seed(config.seed + dist.rank)
    if dist.is_main:
        save_config(config, out / "config.yaml")
    log.info("%d process(es), device %s, %d CPU threads, global batch %d", dist.world, dist.device,
             torch.get_num_threads(), t.batch_size * t.grad_accum * dist.world)

    # resume: which checkpoint, and whether it can continue this run (before anything is loaded)
    resume, saved_state = None, None
    with dist.failing_together("resume"):
        resume = resolve_resume(t.resume, ckpt_root) if t.resume else None
        if t.resume and resume is None:
            log.info("train.resume=%s: no intact checkpoint in %s, starting fresh", t.resume, ckpt_root)
        if resume is not None:
            saved_state = json.loads((resume / "trainer_state.json").read_text())
            changes = result_changes(saved_state.get("config", {}), config, int(saved_state.get("world", 1)),
                                     dist.world)
            if changes:
                log.warning("resume: these settings differ from %s's and change the result:\n  %s", resume.name,
                            "\n  ".join(changes))
            check_layout(saved_state, t.batch_size, dist.world)
    chosen = dist.gather(str(resume))
    if len(set(chosen)) > 1:
        raise TrainingError(f"the processes chose different checkpoints to resume from: {chosen}; is output_dir "
                            "shared between the nodes?")

    # models: the frozen base, the data (with the LLM only if there is no cache), the connector
    weight_dtype = MIXED[t.mixed_precision]
    with dist.failing_together("loading the base model"):
        base = load_base(config.model, dist.device, weight_dtype)
        if t.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
    dist.agree("loading the base model", 1)
    data = prepare_data(config, base, dist, stop)  # the cache build defers signals while it encodes
    if data.skipped.total:
        log.warning("skipped %d unusable samples: %s (e.g. %s)", data.skipped.total, dict(data.skipped.counts),
                    data.skipped.examples[:3])
    torch.manual_seed(config.seed)  # same initial connector however many processes and whatever ran before
    ella: ELLA = build_connector(config.connector, data.hidden_size, base).to(dist.device)
    step_module: torch.nn.Module = ConnectorStep(ella)
    if t.compile:
        step_module = torch.compile(step_module)
    if dist.enabled:
        # gradients as views of DDP's all-reduce buckets: no copy between the two after each sync
        step_module = DistributedDataParallel(step_module, device_ids=[dist.device] if dist.device.type == "cuda"
                                              else None, gradient_as_bucket_view=True)
    o = config.optim
    optimizer = make_optimizer(ella.parameters(), o, dist.device)  # fused AdamW (training/optim.py)
    ema = EMA(ella, t.ema_decay) if t.ema_decay else None
    use_autocast = t.mixed_precision != "no"
    autocast = (torch.autocast(dist.device.type, dtype=weight_dtype) if use_autocast else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(dist.device.type, enabled=t.mixed_precision == "fp16")
    log.info("connector: %s, %.1f M trainable parameters", ella.config,
             sum(p.numel() for p in ella.parameters()) / 1e6)

    step, position, samples_seen = 0, DataPosition(), 0
    if resume is not None:
        state = load_checkpoint(resume, ella, optimizer, dist)
        step, samples_seen = state["step"], state["samples_seen"]
        position = DataPosition(**state["position"])
        data.skipped = SkipCounter()  # the saved counts already include the cache's and earlier steps'
        data.skipped.merge(state["skipped"])
        if ema is not None and "ema" in state:
            ema.shadow = {k: v.float().to(dist.device) for k, v in state["ema"].items()}
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s at step %d", resume, step)

    plan = BatchPlan(data.buckets, t.batch_size, dist.world, dist.rank, config.seed, position)
    batches = iter(make_loader(data.dataset, plan, config.data.num_workers))
    writer = metrics_file = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        keep_metrics_until(out / "metrics.jsonl", step)  # steps after the checkpoint are trained again
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)
        metrics_file = open(out / "metrics.jsonl", "a")

    def save(at_step: int) -> None:
        state = {"step": at_step, "samples_seen": samples_seen, "position": position.to_dict(),
                 "skipped": data.all_skips(dist).to_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "world": dist.world, "config": config.to_dict()}
        save_checkpoint(ckpt_root, at_step, ella, connector_metadata(config, base, at_step), optimizer,
                        ema.shadow if ema else None, state, dist, t.keep_checkpoints)

    from tqdm import tqdm

    bar = tqdm(total=t.max_steps, initial=step, disable=not dist.is_main, dynamic_ncols=True, unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    started, started_step = time.time(), step
    stopping = False
    interval_losses: list[torch.Tensor] = []  # on the device until the next log step
    stop.phase = "training"
    with stop.deferred():
        while step < t.max_steps:
            for group in optimizer.param_groups:
                group["lr"] = o.lr * lr_factor(step, o, t.max_steps)
            losses, n, position = optimizer_step(batches, base, data, step_module, ella, optimizer, scaler, config,
                                                 dist, autocast)
            samples_seen += n
            step += 1
            interval_losses.extend(losses)
            if ema is not None:
                ema.update(ella, step)
            bar.update(1)

            if step % t.log_every == 0 or step == t.max_steps:
                loss_value = dist.mean(torch.stack(interval_losses).mean()).item()  # the interval's mean
                interval_losses.clear()
                skipped = data.all_skips(dist).total
                if not math.isfinite(loss_value):
                    raise TrainingError(f"loss is {loss_value} at step {step} although the latents and features "
                                        "were finite: the training diverged; lower optim.lr, set optim.max_grad_norm, "
                                        "or train in bf16/fp32 (train.mixed_precision)")
                if dist.is_main:
                    rate = (step - started_step) / max(time.time() - started, 1e-9)
                    record = {"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                              "samples_seen": samples_seen, "skipped": skipped, "steps_per_s": rate}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/lr", record["lr"], step)
                    writer.add_scalar("data/skipped", skipped, step)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}")
            v = config.validation
            if v.every and v.prompts and step % v.every == 0:
                validate(config, base, ella, ema, data, dist, out, writer, step)
            # an all-reduce and a host sync: every stop_check_every steps (at once in a single process)
            stopping = stop_check_due(step, t.stop_check_every, dist.enabled) and dist.any(stop.requested)
            if step % t.checkpoint_every == 0 or step == t.max_steps or stopping:
                save(step)
            if stopping:
                break
    bar.close()

    final = out / "ella.safetensors"
    skipped = data.all_skips(dist)
    if dist.is_main:
        if step >= t.max_steps and not stopping:
            save_final(ella, ema, connector_metadata(config, base, step), out)
            log.info("wrote %s (%d samples skipped in total: %s)", final, skipped.total, dict(skipped.counts))
        writer.close()
        metrics_file.close()
    dist.barrier()
    dist.close()
    if stopping:
        stop.raise_now(f"at step {step}: checkpoint {ckpt_root / f'step-{step:08d}'} saved; "
                       "continue with --resume latest")
    return final


def keep_metrics_until(path: Path, step: int) -> None:
    """Drops metrics.jsonl records after `step` (logged by a run that stopped before its next checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d record(s) after step %d", len(lines) - len(kept), step)


def save_final(ella: ELLA, ema: Optional[EMA], metadata: dict[str, Any], out: Path) -> None:
    """The deliverable: ella.safetensors (and ella_ema.safetensors), loadable by ella_core and the nodes."""
    from ella_core import save_ella

    save_ella(ella, out / "ella.safetensors", metadata)
    if ema is not None:
        ema_model = ELLA(ella.config)
        ema.copy_to(ema_model)
        save_ella(ema_model, out / "ella_ema.safetensors", metadata)


def validate(config: Config, base: Base, ella: ELLA, ema: Optional[EMA], data: Data, dist: Dist, out: Path,
             writer: Any, step: int) -> None:
    """Rank 0 samples the validation prompts (with the EMA weights when enabled) and saves PNGs."""
    if not dist.is_main:
        return
    v = config.validation
    prompts = data.cache.prompt_features(v.prompts) if data.cache is not None else None
    if prompts is None:
        if data.validation_prompts is None:  # not cached (prompts changed since the cache was built)
            llm = data.llm or load_llm(config.llm, dist.device)
            data.validation_prompts = encode_texts(llm, v.prompts, config.llm).float().cpu()
        prompts = data.validation_prompts
    model = ella
    if ema is not None:
        model = ELLA(ella.config).to(dist.device)
        ema.copy_to(model)
    was_training = model.training
    model.eval()
    images = sample(base, model, prompts, data.empty, steps=v.steps, guidance_scale=v.guidance_scale,
                    height=v.height or config.data.resolution, width=v.width or config.data.resolution, seed=v.seed)
    model.train(was_training)
    folder = out / "samples" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(folder / f"{i:02d}.png")
    writer.add_images("validation", images, step)
    log.info("validation images in %s", folder)
