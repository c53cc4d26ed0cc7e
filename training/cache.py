"""Feature cache: VAE latents and LLM features computed once, stored as safetensors shards.

The cache folder is named by a hash of everything that changes its contents (base model, VAE and LLM
dtypes, LLM and its hidden layer, token mode and length, resolution and buckets, the data source), so a
later run with the same settings reuses it and a run with different settings never reads stale features.
With a complete cache, the LLM is not loaded at all for training.

Layout of <cache.dir>/<hash>/:
  r<rank>-<n>.safetensors   "<slot>.latent" (C, h, w) scaled latents; "<slot>.text.<j>" (L, D) per caption
  index.json                entries in source order: shard, slot, bucket, sizes, captions; skipped samples
  prompts.safetensors       the empty prompt ("empty") and validation prompts ("prompt.<sha1>")
  COMPLETE                  written last; a folder without it is rebuilt
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ella_core.checkpoint import atomic_save_file

from .config import Config
from .data import (DataConfig, SkipCounter, decode_image, fit_to_bucket, make_buckets, nearest_bucket, pick_text,
                   stream_records)
from .distributed import Dist
from .models import Base, encode_texts, parse_dtype

log = logging.getLogger("training")
CACHE_VERSION = 1


def cache_settings(config: Config, base_dtype: torch.dtype) -> dict[str, Any]:
    """Everything the cached tensors depend on."""
    d = config.data
    return {
        "version": CACHE_VERSION, "model": config.model.pretrained, "model_revision": config.model.revision,
        "model_variant": config.model.variant, "vae_dtype": str(base_dtype),
        "llm": config.llm.source, "llm_tokenizer": config.llm.tokenizer, "llm_dtype": config.llm.dtype,
        "llm_hidden_layer": config.llm.hidden_layer, "token_mode": config.llm.token_mode,
        "max_length": config.llm.max_length, "resolution": d.resolution, "buckets": d.buckets,
        "bucket_step": d.bucket_step, "max_aspect": d.max_aspect, "data_format": d.format,
        "data_path": str(d.path), "image_column": d.image_column, "caption_columns": list(d.caption_columns),
        "latent_dtype": config.cache.latent_dtype,
    }


def cache_dir(config: Config, base_dtype: torch.dtype) -> Path:
    settings = cache_settings(config, base_dtype)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(config.cache.dir) if config.cache.dir else Path(config.output_dir) / "cache"
    return root / digest


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def prompt_key(prompt: str) -> str:
    return "prompt." + hashlib.sha1(prompt.encode("utf-8")).hexdigest()


class _ShardWriter:
    def __init__(self, folder: Path, rank: int, shard_size: int) -> None:
        self.folder, self.rank, self.shard_size = folder, rank, shard_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.slots = 0
        self.shards = 0
        self.entries: list[dict[str, Any]] = []

    @property
    def shard_name(self) -> str:
        return f"r{self.rank}-{self.shards:05d}.safetensors"

    def add(self, entry: dict[str, Any], latent: torch.Tensor, features: list[torch.Tensor]) -> None:
        slot = self.slots
        self.tensors[f"{slot}.latent"] = latent.cpu()
        for j, f in enumerate(features):
            self.tensors[f"{slot}.text.{j}"] = f.cpu()
        self.entries.append({**entry, "shard": self.shard_name, "slot": slot})
        self.slots += 1
        if self.slots >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.slots:
            atomic_save_file(self.tensors, self.folder / self.shard_name)
            self.tensors, self.slots, self.shards = {}, 0, self.shards + 1


def build_cache(config: Config, folder: Path, base: Base, get_llm: Callable[[], Any], dist: Dist) -> None:
    """Each rank encodes every world-th sample; rank 0 merges the indexes and marks the cache complete."""
    if dist.rank == 0 and folder.exists():
        shutil.rmtree(folder)  # an incomplete earlier attempt
    dist.barrier()
    folder.mkdir(parents=True, exist_ok=True)
    d: DataConfig = config.data
    buckets = make_buckets(d.resolution, d.bucket_step, d.max_aspect, d.buckets)
    latent_dtype = parse_dtype(config.cache.latent_dtype)
    skips = SkipCounter()
    writer = _ShardWriter(folder, dist.rank, config.cache.shard_size)
    llm = get_llm()
    chunk: list[tuple[dict[str, Any], Any]] = []

    def encode_chunk() -> None:
        texts = [c for entry, _ in chunk for c in entry["captions"]]
        features = encode_texts(llm, texts, config.llm)  # (n, L, D) in the LLM dtype
        latents: list[torch.Tensor] = [torch.empty(0)] * len(chunk)
        by_bucket: dict[tuple[int, ...], list[int]] = {}
        for i, (entry, _) in enumerate(chunk):
            by_bucket.setdefault(tuple(entry["bucket"]), []).append(i)
        with torch.no_grad():
            for members in by_bucket.values():  # one VAE batch per bucket
                encoded = base.encode_pixels(torch.stack([chunk[i][1].pixels for i in members]))  # (b, C, h, w)
                for i, latent in zip(members, encoded):
                    latents[i] = latent.to(latent_dtype)
        offset = 0
        for (entry, _), latent in zip(chunk, latents):
            n = len(entry["captions"])
            writer.add(entry, latent, list(features[offset:offset + n]))
            offset += n
        chunk.clear()

    seen = 0
    for ordinal, record in enumerate(stream_records(d, skips)):
        if ordinal % dist.world != dist.rank:
            continue
        seen += 1
        try:
            image = decode_image(record.load())
            bucket = nearest_bucket((image.size[1], image.size[0]), buckets)
            sample = fit_to_bucket(image, bucket)
        except Exception as e:  # any decoding failure: skip and count
            skips.add(f"unreadable image ({type(e).__name__}: {e})", record.key)
            continue
        entry = {"ordinal": ordinal, "key": record.key, "bucket": list(bucket), "captions": record.captions,
                 "original_size": list(sample.original_size), "crop_top_left": list(sample.crop_top_left)}
        chunk.append((entry, sample))
        if len(chunk) >= 16:
            encode_chunk()
        if seen % 1000 == 0:
            log.info("cache: rank %d encoded %d samples", dist.rank, seen)
    if chunk:
        encode_chunk()
    writer.flush()
    _atomic_write_text(folder / f"index-r{dist.rank}.json",
                       json.dumps({"entries": writer.entries, "skipped": skips.to_dict()}))
    dist.barrier()
    if dist.rank == 0:
        entries, total_skips = [], SkipCounter()
        for r in range(dist.world):
            part = json.loads((folder / f"index-r{r}.json").read_text())
            entries.extend(part["entries"])
            total_skips.merge(part["skipped"])
        entries.sort(key=lambda e: e["ordinal"])
        if not entries:
            raise RuntimeError(f"no usable samples in {d.path} ({total_skips.total} skipped: "
                               f"{dict(total_skips.counts)})")
        empty = encode_texts(llm, [""], config.llm)[0]
        prompts = {"empty": empty}
        prompts.update({prompt_key(p): f for p, f in zip(
            config.validation.prompts, encode_texts(llm, config.validation.prompts, config.llm)
            if config.validation.prompts else [])})
        atomic_save_file({k: v.float() for k, v in prompts.items()}, folder / "prompts.safetensors")
        index = {"settings": cache_settings(config, base.unet.dtype), "hidden_size": int(empty.shape[-1]),
                 "entries": entries, "skipped": total_skips.to_dict()}
        _atomic_write_text(folder / "index.json", json.dumps(index))
        _atomic_write_text(folder / "COMPLETE", "ok\n")
        log.info("cache: %d samples in %s (%d skipped)", len(entries), folder, total_skips.total)
    dist.barrier()


class FeatureCache:
    """Read side of a complete cache."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = json.loads((folder / "index.json").read_text())
        self.entries: list[dict[str, Any]] = index["entries"]
        self.hidden_size: int = index["hidden_size"]
        self.skipped: dict[str, Any] = index["skipped"]
        self.prompts = load_file(str(folder / "prompts.safetensors"))

    @staticmethod
    def is_complete(folder: Path) -> bool:
        return (folder / "COMPLETE").is_file()

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [tuple(e["bucket"]) for e in self.entries]

    def empty_features(self) -> torch.Tensor:
        return self.prompts["empty"]

    def prompt_features(self, prompts: list[str]) -> Optional[torch.Tensor]:
        """(P, L, D) for cached validation prompts, or None when one is missing."""
        keys = [prompt_key(p) for p in prompts]
        if not all(k in self.prompts for k in keys):
            return None
        return torch.stack([self.prompts[k] for k in keys])


class CachedDataset(torch.utils.data.Dataset):
    """Latents and the chosen caption's features of one sample visit, read from the shards."""

    def __init__(self, cache: FeatureCache, data: DataConfig) -> None:
        self.folder, self.entries, self.data = cache.folder, cache.entries, data
        self.empty = cache.empty_features()
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _shard(self, name: str) -> Any:
        if name not in self._handles:
            if len(self._handles) > 8:
                self._handles.clear()
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own handles
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        entry = self.entries[index]
        choice = pick_text(entry["captions"], seed, self.data)
        shard = self._shard(entry["shard"])
        latents = shard.get_tensor(f"{entry['slot']}.latent")
        features = self.empty if choice < 0 else shard.get_tensor(f"{entry['slot']}.text.{choice}")
        return {"latents": latents.float(), "features": features.float(), "original_size": tuple(entry["original_size"]),
                "crop_top_left": tuple(entry["crop_top_left"]), "seed": seed, "key": entry["key"]}
