"""Feature cache: VAE latents and LLM features computed once, stored as safetensors shards.

The cache folder is named by a hash of everything that changes its contents (base model, VAE and LLM
dtypes, LLM and its hidden layer, token mode and length, resolution and buckets, the data source), so a
later run with the same settings reuses it and a run with different settings never reads stale features.
With a complete cache, the LLM is not loaded at all for training.

Layout of <cache.dir>/<hash>/:
  r<rank>-<n>.safetensors   "<slot>.latent" (C, h, w) scaled latents; "<slot>.text.<j>" (L, D) per caption;
                            metadata "progress": the shard's entries, the last source position it covers and
                            the rank's skip counts so far, so every shard is complete on its own
  done-r<rank>.json         the rank went through the whole source (final skip counts)
  index.json                entries in source order: shard, slot, bucket, sizes, captions; skipped samples
  prompts.safetensors       the empty prompt ("empty") and validation prompts ("prompt.<sha1>")
  COMPLETE                  written last, after every tensor was checked finite; a folder without it is resumed

Resumable: an interrupted build (SIGTERM, a crash, a killed job) keeps its finished shards; the next run
goes through the source again but encodes only what comes after each rank's last shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ella_core.checkpoint import atomic_save_file

from .config import Config
from .data import DataConfig, SkipCounter, make_buckets, pick_text
from .decoding import prepared_part as prepared_source
from .parts import source_signature, split_note
from .distributed import Dist
from .errors import TrainingError
from .models import Base, encode_texts, parse_dtype
from .stopping import Stop

log = logging.getLogger("training")
CACHE_VERSION = 3  # 3: shards' last_ordinal is a position in the rank's part (training.parts)
SYNC_EVERY = 64  # source entries between the processes' status exchanges (stop requests, failures)
CHUNK = 16  # samples encoded together (at most cache.shard_size); shards hold whole chunks
SHARD_NAME = re.compile(r"^r(\d+)-(\d+)\.safetensors$")


def cache_settings(config: Config, vae_dtype: torch.dtype) -> dict[str, Any]:
    """Everything the cached tensors depend on."""
    d = config.data
    return {
        "version": CACHE_VERSION, "model": config.model.pretrained, "model_revision": config.model.revision,
        "model_variant": config.model.variant, "vae_dtype": str(vae_dtype),
        "llm": config.llm.source, "llm_tokenizer": config.llm.tokenizer, "llm_dtype": config.llm.dtype,
        "llm_hidden_layer": config.llm.hidden_layer, "token_mode": config.llm.token_mode,
        "max_length": config.llm.max_length, "resolution": d.resolution, "buckets": d.buckets,
        "bucket_step": d.bucket_step, "max_aspect": d.max_aspect, "data_format": d.format,
        "data_path": d.path if isinstance(d.path, list) else str(d.path), "image_column": d.image_column,
        "caption_columns": list(d.caption_columns), "latent_dtype": config.cache.latent_dtype,
    }


def cache_dir(config: Config, vae_dtype: torch.dtype) -> Path:
    settings = cache_settings(config, vae_dtype)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(config.cache.dir) if config.cache.dir else Path(config.output_dir) / "cache"
    return root / digest


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prompt_key(prompt: str) -> str:
    return "prompt." + hashlib.sha1(prompt.encode("utf-8")).hexdigest()


class NonFiniteFeatures(TrainingError):
    """The VAE or the LLM produced inf/nan: the cache is not marked complete."""


def check_finite(tensor: torch.Tensor, keys: list[str], what: str, fix: str) -> None:
    """Raises NonFiniteFeatures naming the samples when any row of `tensor` (B, ...) has an inf or nan."""
    bad = [k for k, ok in zip(keys, torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(dim=1).tolist()) if not ok]
    if bad:
        raise NonFiniteFeatures(f"{what} are not finite (inf/nan) for {len(bad)} of {len(keys)} samples, e.g. "
                                f"{bad[:3]}: {fix}. The cache was not marked complete.")


def vae_fix(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return ("the VAE overflowed in float16 (the SDXL VAE is known to): set model.vae_dtype=float32 (or bfloat16), "
                "or use a VAE fixed for fp16")
    return f"the VAE ran in {dtype}; check these images and the VAE weights of model.pretrained"


def llm_fix(config: Config) -> str:
    if config.llm.dtype in ("float16", "fp16"):
        return (f"the text encoder {config.llm.source} overflowed in llm.dtype={config.llm.dtype} "
                "(T5 models are known to): set llm.dtype=bfloat16 or float32")
    return f"check the text encoder {config.llm.source} (llm.dtype={config.llm.dtype})"


# ---------------------------------------------------------------- shards
def _read_progress(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["progress"])


class _ShardWriter:
    """One rank's shards. Each holds whole encoded chunks and says which source positions it covers."""

    def __init__(self, folder: Path, rank: int, world: int, shard_size: int) -> None:
        self.folder, self.rank, self.world, self.shard_size = folder, rank, world, shard_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.pending: list[dict[str, Any]] = []
        self.entries: list[dict[str, Any]] = []  # of the written shards
        self.shards = 0
        self.last_ordinal = -1  # every source position up to this one is in a written shard or counted
        self.skips = SkipCounter()  # of this rank, up to last_ordinal once flushed

    def shard_name(self, n: int) -> str:
        return f"r{self.rank}-{n:05d}.safetensors"

    def resume(self) -> int:
        """Picks up this rank's intact shards (a damaged one and those after it are removed); returns how many."""
        numbers = sorted(int(m.group(2)) for p in self.folder.iterdir()
                         if (m := SHARD_NAME.match(p.name)) and int(m.group(1)) == self.rank)
        for n in numbers:
            path = self.folder / self.shard_name(n)
            try:
                if n != self.shards:
                    raise ValueError(f"shard {self.shards} is missing")
                progress = _read_progress(path)
                if progress["world"] != self.world or progress["rank"] != self.rank:
                    raise ValueError("written by another process layout")
            except Exception as e:  # noqa: BLE001 (a damaged file: it and everything after it is encoded again)
                log.warning("cache: dropping %s and later shards of rank %d (%s)", path.name, self.rank, e)
                for later in (x for x in numbers if x >= n):
                    (self.folder / self.shard_name(later)).unlink(missing_ok=True)
                break
            self.entries.extend(progress["entries"])
            self.last_ordinal = progress["last_ordinal"]
            self.skips = SkipCounter()
            self.skips.merge(progress["skipped"])
            self.shards += 1
        return self.shards

    def add(self, entry: dict[str, Any], latent: torch.Tensor, features: list[torch.Tensor]) -> None:
        slot = len(self.pending)
        self.tensors[f"{slot}.latent"] = latent.cpu()
        for j, f in enumerate(features):
            self.tensors[f"{slot}.text.{j}"] = f.cpu()
        self.pending.append({**entry, "shard": self.shard_name(self.shards), "slot": slot})

    def flush(self, last_ordinal: int, skips: Optional[SkipCounter] = None) -> None:
        """Writes the pending samples as one shard covering source positions up to `last_ordinal`, with the
        skip counts up to there (`skips`, default: all counted so far)."""
        if not self.pending:
            return
        progress = {"world": self.world, "rank": self.rank, "last_ordinal": last_ordinal, "entries": self.pending,
                    "skipped": (skips or self.skips).to_dict()}
        atomic_save_file(self.tensors, self.folder / self.shard_name(self.shards), {"progress": json.dumps(progress)})
        self.entries.extend(self.pending)
        self.tensors, self.pending, self.shards, self.last_ordinal = {}, [], self.shards + 1, last_ordinal


# ---------------------------------------------------------------- building
def _prepare_folder(folder: Path, world: int) -> None:
    """Rank 0: the folder exists; a partial build by another number of processes is started again."""
    folder.mkdir(parents=True, exist_ok=True)
    worlds = set()
    for p in folder.iterdir():
        if SHARD_NAME.match(p.name):
            try:
                worlds.add(_read_progress(p)["world"])
            except Exception:  # noqa: BLE001 (damaged: the owning rank drops it)
                pass
    if worlds and worlds != {world}:
        log.warning("cache: the partial build in %s was made by %s processes, now %d: starting it again",
                    folder, sorted(worlds), world)
        for p in folder.iterdir():
            p.unlink() if p.is_file() else shutil.rmtree(p)
    for p in folder.glob("done-r*.json"):
        p.unlink()  # written again by each rank that finishes now


def _check_shared(folder: Path, dist: Dist) -> None:
    """Every rank must see every other rank's files: shards of all ranks are merged by rank 0."""
    tokens = dist.gather(uuid.uuid4().hex)
    hosts = dist.gather(socket.gethostname())
    with dist.failing_together("cache: checking that cache.dir is shared"):
        _atomic_write_text(folder / f".present-r{dist.rank}", tokens[dist.rank])
    dist.agree("cache: checking that cache.dir is shared", 1)
    with dist.failing_together("cache: checking that cache.dir is shared"):
        unseen = []
        for r in range(dist.world):
            marker = folder / f".present-r{r}"
            if not marker.is_file() or marker.read_text() != tokens[r]:
                unseen.append(r)
        if unseen:
            raise TrainingError(
                f"cache.dir is not shared between the processes: rank {dist.rank} on {hosts[dist.rank]} does not see "
                f"the files of rank(s) {unseen} (on {sorted({hosts[r] for r in unseen})}) in {folder}. Put cache.dir "
                "on storage every node mounts (e.g. cache.dir=/shared/ella-cache)")
    dist.agree("cache: checking that cache.dir is shared", 2)


def build_cache(config: Config, folder: Path, base: Base, get_llm: Callable[[], Any], dist: Dist, stop: Stop) -> None:
    """Each rank encodes its part of the source (training.parts) into its own shards; rank 0 merges the
    indexes, encodes the prompts and marks the cache complete. Raises StopRequested (after writing what is
    finished) on a signal, PeerFailed on every rank when one fails."""
    where = f"cache build in {folder}"
    stop.phase = "the cache build"
    with dist.failing_together(where):
        if dist.is_main:
            _prepare_folder(folder, dist.world)
    dist.agree(where, 0)
    folder.mkdir(parents=True, exist_ok=True)
    if dist.enabled:
        _check_shared(folder, dist)
    writer = _ShardWriter(folder, dist.rank, dist.world, config.cache.shard_size)
    with dist.failing_together(where):
        if writer.resume():
            log.info("cache: resuming rank %d after %d finished shard(s) (%d samples, source position %d)",
                     dist.rank, writer.shards, len(writer.entries), writer.last_ordinal)
        llm = get_llm()
        last = _encode_source(config, base, llm, writer, dist, stop, where)
        _atomic_write_text(folder / f"done-r{dist.rank}.json",
                           json.dumps({"entries_seen": last + 1, "skipped": writer.skips.to_dict()}))
    dist.agree(where, 3)
    with dist.failing_together(where):
        if dist.is_main:
            _merge(config, folder, base, llm, dist.world)
    dist.agree(where, 4)


def _encode_source(config: Config, base: Base, llm: Any, writer: _ShardWriter, dist: Dist, stop: Stop,
                   where: str) -> int:
    """This rank's part of the source (training.parts: part rank of world) into shards, its images decoded in
    data.num_workers loader workers; returns the last position of the part."""
    d: DataConfig = config.data
    buckets = make_buckets(d.resolution, d.bucket_step, d.max_aspect, d.buckets)
    latent_dtype = parse_dtype(config.cache.latent_dtype)
    chunk_size = min(CHUNK, config.cache.shard_size)
    # chunks are whole multiples of chunk_size in this rank's sample sequence, so a resumed build encodes
    # exactly the batches an uninterrupted one does (batch composition changes the last bits of a VAE/LLM)
    chunk: list[tuple[dict[str, Any], Any]] = []
    before_chunk = (writer.last_ordinal, _copy(writer.skips))  # the state a stop falls back to

    def encode_chunk() -> None:
        if not chunk:
            return
        keys = [entry["key"] for entry, _ in chunk]
        texts = [c for entry, _ in chunk for c in entry["captions"]]
        features = encode_texts(llm, texts, config.llm)  # (n, L, D) in the LLM dtype
        text_keys = [entry["key"] for entry, _ in chunk for _ in entry["captions"]]
        check_finite(features, text_keys, "LLM features", llm_fix(config))
        latents: list[torch.Tensor] = [torch.empty(0)] * len(chunk)
        by_bucket: dict[tuple[int, ...], list[int]] = {}
        for i, (entry, _) in enumerate(chunk):
            by_bucket.setdefault(tuple(entry["bucket"]), []).append(i)
        with torch.no_grad():
            for members in by_bucket.values():  # one VAE batch per bucket
                encoded = base.encode_pixels(torch.stack([chunk[i][1].pixels for i in members]))  # (b, C, h, w)
                check_finite(encoded, [keys[i] for i in members], "VAE latents", vae_fix(base.vae.dtype))
                stored = encoded.to(latent_dtype)
                check_finite(stored, [keys[i] for i in members], f"VAE latents stored as {latent_dtype}",
                             "they overflow that dtype: set cache.latent_dtype=float32 (or bfloat16)")
                for i, latent in zip(members, stored):
                    latents[i] = latent
        offset = 0
        for (entry, _), latent in zip(chunk, latents):
            n = len(entry["captions"])
            writer.add(entry, latent, list(features[offset:offset + n]))
            offset += n
        chunk.clear()

    note = split_note(d, dist.world)
    if note and dist.is_main:
        log.warning("cache: %s", note)
    if dist.enabled:  # the split below is only right when every process sees the same source
        dist.agree(where, source_signature(d))
    last = writer.last_ordinal  # this rank's part position: everything up to it is in a shard or counted
    seen = 0  # entries of the part gone through in this run
    rounds = _Rounds(dist, where)
    with stop.deferred():
        source = prepared_source(d, dist.rank, dist.world, last + 1, buckets, d.num_workers)
        try:
            for prepared in source:
                stopping = rounds.exchange(stop.requested, busy=True) if seen % SYNC_EVERY == 0 else (
                    stop.requested and not dist.enabled)
                if stopping:
                    if chunk:  # dropped: encoded again on resume, with the same neighbours
                        writer.flush(*before_chunk)
                    else:
                        writer.flush(last)
                    _stop_now(stop, writer, dist)
                seen += 1
                if prepared.skip is not None:
                    writer.skips.add(prepared.skip[0], prepared.key, prepared.skip[1])
                else:
                    sample = prepared.sample
                    entry = {"ordinal": prepared.ordinal, "key": prepared.key, "bucket": list(prepared.bucket),
                             "captions": prepared.captions, "original_size": list(sample.original_size),
                             "crop_top_left": list(sample.crop_top_left)}
                    if not chunk:
                        before_chunk = (last, _copy(writer.skips))
                    chunk.append((entry, sample))
                    if len(chunk) >= chunk_size:
                        encode_chunk()
                        if len(writer.pending) >= config.cache.shard_size:
                            writer.flush(prepared.position)
                last = prepared.position
                if seen % 1000 == 0:
                    log.info("cache: rank %d at entry %d of its part, %d samples encoded", dist.rank, seen,
                             len(writer.entries) + len(writer.pending))
        finally:
            source.close()  # ends the loader workers
        encode_chunk()
        writer.flush(last)
        while dist.enabled:  # this part is done; the others may not be: keep exchanging until all are
            if rounds.exchange(stop.requested, busy=False):
                _stop_now(stop, writer, dist)
            if not rounds.busy:
                break
    return last


class _Rounds:
    """Status exchanges of the cache build: every SYNC_EVERY entries of its part, and after its part until
    every rank's is done, each rank reports whether a stop was requested and whether it still reads. The
    parts differ in length, so the number of exchanges is set by the longest part."""

    def __init__(self, dist: Dist, where: str) -> None:
        self.dist, self.where, self.count, self.busy = dist, where, 0, True

    def exchange(self, stop_requested: bool, busy: bool) -> bool:
        """True on every rank when any rank asks to stop; sets `busy` to whether any rank still reads."""
        if not self.dist.enabled:
            return stop_requested
        tag = 100 + 2 * self.count
        self.count += 1
        stopping = self.dist.agree(self.where, tag, stop_requested)
        self.busy = self.dist.agree(self.where, tag + 1, busy)  # "stop" carries "still reading" here
        return stopping


def _stop_now(stop: Stop, writer: _ShardWriter, dist: Dist) -> None:
    stop.raise_now(f"during the cache build: {writer.shards} shard(s) of rank {dist.rank} kept "
                   f"in {writer.folder}; the next run resumes there")


def _copy(skips: SkipCounter) -> SkipCounter:
    copy = SkipCounter()
    copy.merge(skips.to_dict())
    return copy


def _merge(config: Config, folder: Path, base: Base, llm: Any, world: int) -> None:
    """Rank 0: every rank's shards into index.json, the prompts encoded, then COMPLETE."""
    entries, skips = [], SkipCounter()
    for r in range(world):
        done = folder / f"done-r{r}.json"
        if not done.is_file():
            raise TrainingError(f"cache: rank {r} finished but its {done.name} is not in {folder}")
        skips.merge(json.loads(done.read_text())["skipped"])
        shards = sorted((int(m.group(2)), p) for p in folder.iterdir() if (m := SHARD_NAME.match(p.name))
                        and int(m.group(1)) == r)
        for _, path in shards:
            entries.extend(_read_progress(path)["entries"])
    entries.sort(key=lambda e: e["ordinal"])
    if not entries:
        raise TrainingError(f"no usable samples in {config.data.path} ({skips.total} skipped: {dict(skips.counts)}, "
                            f"e.g. {skips.examples[:3]})")
    empty = encode_texts(llm, [""], config.llm)  # alone, exactly as the online path encodes it
    check_finite(empty, ["''"], "LLM features of the empty prompt", llm_fix(config))
    prompts = {"empty": empty[0]}
    if config.validation.prompts:
        features = encode_texts(llm, config.validation.prompts, config.llm)
        check_finite(features, [repr(p[:40]) for p in config.validation.prompts],
                     "LLM features of the validation prompts", llm_fix(config))
        prompts.update({prompt_key(p): f for p, f in zip(config.validation.prompts, features)})
    atomic_save_file({k: v.float() for k, v in prompts.items()}, folder / "prompts.safetensors")
    index = {"settings": cache_settings(config, base.vae.dtype), "hidden_size": int(empty.shape[-1]),
             "entries": entries, "skipped": skips.to_dict()}
    _atomic_write_text(folder / "index.json", json.dumps(index))
    _atomic_write_text(folder / "COMPLETE", "ok\n")
    log.info("cache: %d samples in %s (%d skipped%s)", len(entries), folder, skips.total,
             f": {dict(skips.counts)}" if skips.total else "")


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
