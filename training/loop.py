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
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ella_core import ELLA

from . import cache as feature_cache
from . import online
from .checkpoints import (check_layout, load_checkpoint, remove_orphans, resolve_resume, save_checkpoint,
                          saved_global_batch)
from .config import Config, OptimConfig, TrainConfig, result_changes, save_config
from .data import (BatchPlan, Data, DataPosition, OnlineDataset, SkipCounter, describe, epoch_batches, image_failure,
                   image_size, indexable_records, make_buckets, make_loader, nearest_bucket)
from .distributed import Dist, setup
from .errors import TrainingError
from .hooks import call_hooks, due, resolve_hooks
from .models import EMA, Base, ConnectorStep, build_connector, load_base, load_llm, sdxl_time_ids
from .optim import clip_and_step, make_optimizer
from .reporting import open_reporter
from .split import TrainingSubset, check_source_size, require_full_batch, split_holdout
from .stopping import Stop, stop_check_due
from .streaming import StreamingBatches, StreamPosition, check_stream_layout, streams
from .transfer import to_device
from .validation import HeldOut, ema_model, sample_key, validation_images

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


def run_length(t: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: train.max_steps or train.max_epochs passes over the training samples,
    whichever ends first (an epoch's last step may take its last micro-batches from the next epoch)."""
    limits = [t.max_steps] if t.max_steps is not None else []
    if t.max_epochs is not None:
        limits.append(max(1, math.ceil(t.max_epochs * batches_per_epoch / t.grad_accum)))
    return min(limits)


def epoch_progress(position: Any, samples_per_epoch: int) -> float:
    """Epochs completed, fractional: 1.5 is halfway through the second (a streamed run: whole epochs only,
    its epoch's length is not known before it ends)."""
    if isinstance(position, DataPosition):
        return position.epoch + position.sample / max(1, samples_per_epoch)
    return float(position.epoch)


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
            check_source_size(config, dist.world)  # too few samples: said after a listing, not after encoding
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
        dataset = feature_cache.CachedDataset(cache, d, config.cache.open_shards)
        if not cache.has_features:  # cache.mode=latents: the resident LLM encodes every batch's captions
            llm, empty = online.load_resident_llm(config, dist)
            return Data(dataset, cache.buckets, empty, llm, skipped, cache)
        return Data(dataset, cache.buckets, cache.empty_features(), None, skipped, cache)
    if streams(config):  # the source is read in parts by the loader workers, never indexed
        llm, empty = online.load_resident_llm(config, dist)
        return Data(None, [], empty, llm, skipped, None)
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
    llm, empty = online.load_resident_llm(config, dist)
    return Data(OnlineDataset(kept, buckets, d), buckets, empty, llm, skipped, None)


# ---------------------------------------------------------------- one micro-step
@torch.no_grad()
def batch_inputs(batch: dict[str, Any], base: Base, data: Data, config: Config, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A micro-batch's latents (B, C, h, w), LLM features (B, L, D) and the text_bias hiding flexible-mode
    padding (None when there is none), from the cache or computed now (cache.mode latents / none)."""
    if "latents" in batch:
        latents = to_device(batch["latents"], device)  # already scaled
    else:
        latents = base.encode_pixels(to_device(batch["pixels"], device)).float()
        feature_cache.check_finite(latents, batch["key"], "VAE latents", feature_cache.vae_fix(base.vae.dtype))
    if "features" in batch:
        features, text_bias = batch["features"], batch.get("text_bias")
    else:  # the captions (B,) through the resident LLM
        features, text_bias = online.batch_features(data.llm, batch["text"], data.empty, config, batch["key"])
    return latents, to_device(features, device), None if text_bias is None else to_device(text_bias, device)


def micro_step_loss(batch: dict[str, Any], base: Base, data: Data, step_module: torch.nn.Module, config: Config,
                    device: torch.device, autocast: Any) -> tuple[torch.Tensor, int]:
    """Loss of one micro-batch (mean over its samples) and the number of samples it had."""
    if "seed" not in batch:  # every sample of this micro-batch failed to load: keep collectives in step
        features = to_device(data.empty[None], device)
        with autocast:
            context, pooled = step_module(features, torch.zeros(1, device=device))
        zero = context.float().sum() * 0.0 + (pooled.float().sum() * 0.0 if pooled is not None else 0.0)
        return zero, 0
    latents, features, text_bias = batch_inputs(batch, base, data, config, device)
    b = latents.shape[0]
    timesteps, noise = draw_noise(batch["seed"], tuple(latents.shape[1:]), base.scheduler.config.num_train_timesteps,
                                  config.train.noise_offset)
    timesteps, noise = to_device(timesteps, device), to_device(noise, device)
    noisy = base.scheduler.add_noise(latents, noise, timesteps)
    target = noise if base.prediction_type == "epsilon" else base.scheduler.get_velocity(latents, noise, timesteps)
    added = None
    with autocast:
        context, pooled = step_module(features, timesteps.float(), text_bias)  # (B, N, W), (B, P) or None
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
                   ) -> tuple[list[torch.Tensor], int, Any]:
    """One optimizer step over grad_accum micro-batches (gradients synchronised on the last one only).
    Returns the micro-batch losses, the samples seen by all ranks, and the data position after it (a
    DataPosition, or a StreamPosition when streaming)."""
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
    return losses, samples, batch["position"]


# ---------------------------------------------------------------- the run
def connector_metadata(config: Config, base: Base, step: int) -> dict[str, Any]:
    return {"base_model": base.kind, "llm": config.llm.source, "llm_dtype": config.llm.dtype,
            "llm_hidden_layer": config.llm.hidden_layer, "token_length": config.llm.max_length,
            "token_mode": config.llm.token_mode,
            "extra": {"trainer": "ella-tsc training", "trained_steps": str(step),
                      "base_model_source": config.model.pretrained, "prediction_type": base.prediction_type}}


def _setup_logging(dist: Dist, out: Path) -> None:
    """Rank 0 logs info and warnings (console and train.log); the other ranks only errors, their libraries'
    warnings included, so each message appears once however many processes run."""
    level = logging.INFO if dist.is_main else logging.ERROR
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if dist.is_main:
        handlers.append(logging.FileHandler(out / "train.log"))
    else:
        warnings.simplefilter("ignore")
        for name in ("transformers", "diffusers", "torch", "py.warnings"):
            logging.getLogger(name).setLevel(logging.ERROR)
        for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # read when they configure logging
            os.environ[variable] = "error"
        with contextlib.suppress(ImportError):
            import transformers
            import diffusers

            transformers.logging.set_verbosity_error()
            diffusers.logging.set_verbosity_error()
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
            if streams(config):
                check_stream_layout(saved_state, dist.world, config.data.num_workers)
            else:
                check_layout(saved_state, t.batch_size, dist.world)
    chosen = dist.gather(str(resume))
    if len(set(chosen)) > 1:
        raise TrainingError(f"the processes chose different checkpoints to resume from: {chosen}; is output_dir "
                            "shared between the nodes?")

    eval_hooks = resolve_hooks(config.validation.hooks)  # imported already by the config check: no surprise later

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

    # the held-out samples (never trained on) and the length of the run
    streaming = streams(config)
    if not streaming:
        require_full_batch(len(data.dataset), config, dist.world, f"data.path {config.data.path}")
    train_indices, held_indices = range(len(data.dataset) if not streaming else 0), []
    if config.validation.holdout:  # not when streaming (refused by the config check)
        keys = [sample_key(data, i) for i in range(len(data.dataset))]
        train_indices, held_indices = split_holdout(keys, config.validation.holdout, config.seed)
    heldout = HeldOut(data, held_indices, config) if held_indices else None
    if heldout is not None:
        log.info("validation loss on %d held-out samples (listed in %s), trained on the other %d", len(heldout),
                 out / "holdout.txt", len(train_indices))
        if dist.is_main:
            (out / "holdout.txt").write_text("".join(keys[i] + "\n" for i in held_indices))
    train_buckets = [data.buckets[i] for i in train_indices] if held_indices else data.buckets
    train_dataset = TrainingSubset(data.dataset, train_indices) if held_indices else data.dataset
    epoch_order = epoch_batches(train_buckets, t.batch_size * dist.world, config.seed, 0) if not streaming else []
    batches_per_epoch, samples_per_epoch = len(epoch_order), sum(len(b) for b in epoch_order)
    total = run_length(t, batches_per_epoch) if not streaming else t.max_steps
    log.info("%d optimizer steps (train.max_steps=%s, train.max_epochs=%s; an epoch is %d micro-batches of %d)",
             total, t.max_steps, t.max_epochs, batches_per_epoch, t.batch_size * dist.world)
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
        position = (StreamPosition.from_dict(state["position"]) if streams(config) else
                    DataPosition.from_dict(state["position"], saved_global_batch(state, t.batch_size, dist.world)))
        data.skipped = SkipCounter()  # the saved counts already include the cache's and earlier steps'
        data.skipped.merge(state["skipped"])
        if ema is not None and "ema" in state:
            ema.shadow = {k: v.float().to(dist.device) for k, v in state["ema"].items()}
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s at step %d", resume, step)

    if streams(config):
        batches = iter(StreamingBatches(config, dist, position if resume is not None else None))
    else:
        plan = BatchPlan(train_buckets, t.batch_size, dist.world, dist.rank, config.seed, position)
        batches = iter(make_loader(train_dataset, plan, config.data.num_workers))
    metrics_file = None
    if dist.is_main:
        keep_metrics_until(out / "metrics.jsonl", step)  # steps after the checkpoint are trained again
        metrics_file = open(out / "metrics.jsonl", "a")
    reporter = open_reporter(config, out, step, dist.is_main)
    epochs_done = int(epoch_progress(position, samples_per_epoch))

    def save(at_step: int) -> None:
        where = position.gathered(dist) if isinstance(position, StreamPosition) else position.to_dict()
        state = {"step": at_step, "samples_seen": samples_seen, "position": where,
                 "skipped": data.all_skips(dist).to_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "world": dist.world, "config": config.to_dict()}
        save_checkpoint(ckpt_root, at_step, ella, connector_metadata(config, base, at_step), optimizer,
                        ema.shadow if ema else None, state, dist, t.keep_checkpoints)

    hook_llm: dict[str, Any] = {}  # the LLM a hook's ctx.encode loaded, kept for the next validation

    def evaluate(at_step: int) -> None:
        """validation.hooks on rank 0 (training/hooks.py); a failing hook fails every rank."""
        def write(record: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        with dist.failing_together(f"evaluation hooks at step {at_step}"):
            call_hooks(eval_hooks, step=at_step, total=total, ella=ella, ema=ema, base=base, data=data,
                       config=config, dist=dist, out=out, write=write, reporter=reporter, llm_holder=hook_llm)
        dist.agree("evaluation hooks", at_step)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not dist.is_main, dynamic_ncols=True, unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    started, started_step = time.time(), step
    stopping = False
    interval_losses: list[torch.Tensor] = []  # on the device until the next log step
    stop.phase = "training"
    with stop.deferred():
        while step < total:
            for group in optimizer.param_groups:
                group["lr"] = o.lr * lr_factor(step, o, total)
            losses, n, position = optimizer_step(batches, base, data, step_module, ella, optimizer, scaler, config,
                                                 dist, autocast)
            samples_seen += n
            step += 1
            interval_losses.extend(losses)
            if ema is not None:
                ema.update(ella, step)
            bar.update(1)
            epoch = epoch_progress(position, samples_per_epoch)
            if int(epoch) > epochs_done:
                epochs_done = int(epoch)
                log.info("epoch %d%s done at step %d", epochs_done, f" of {t.max_epochs}" if t.max_epochs else "",
                         step)

            if step % t.log_every == 0 or step == total:
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
                              "epoch": round(epoch, 4), "samples_seen": samples_seen, "skipped": skipped,
                              "steps_per_s": rate}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    reporter.scalars({"train/loss": loss_value, "train/lr": record["lr"], "train/epoch": epoch,
                                      "data/skipped": skipped}, step)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}", epoch=f"{epoch:.2f}")
            v = config.validation
            if v.every and step % v.every == 0:
                if heldout is not None:  # every rank evaluates its share
                    val_loss, val_samples = heldout.loss(base, ella, dist, autocast)
                    if dist.is_main:
                        metrics_file.write(json.dumps({"step": step, "val_loss": val_loss, "val_samples": val_samples,
                                                       "epoch": round(epoch, 4)}) + "\n")
                        metrics_file.flush()
                        reporter.scalars({"val/loss": val_loss}, step)
                        log.info("step %d: validation loss %.6f on %d held-out samples", step, val_loss, val_samples)
                if v.prompts and dist.is_main:
                    images = validation_images(config, base, ema_model(ella, ema, dist.device), data, dist, out, step)
                    reporter.images("validation", images, step)
            # an all-reduce and a host sync: every stop_check_every steps (at once in a single process)
            stopping = stop_check_due(step, t.stop_check_every, dist.enabled) and dist.any(stop.requested)
            if step % t.checkpoint_every == 0 or step == total or stopping:
                save(step)
            if stopping:
                break
            if due(eval_hooks, step, total, v.every):  # after the checkpoint: a failing hook loses no training
                evaluate(step)
    bar.close()

    final = out / "ella.safetensors"
    skipped = data.all_skips(dist)
    if dist.is_main:
        if step >= total and not stopping:
            save_final(ella, ema, connector_metadata(config, base, step), out)
            log.info("wrote %s (%d samples skipped in total: %s)", final, skipped.total, dict(skipped.counts))
        metrics_file.close()
    reporter.close()
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
