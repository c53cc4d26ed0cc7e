"""Feature cache: VAE latents and LLM features computed once, stored as safetensors shards.

The cache folder is named by a hash of everything that changes its contents (base model, VAE and LLM
dtypes, LLM and its hidden layer, token mode and length, resolution and buckets, the data source, the
format version), so a later run with the same settings reuses it and a run with different settings never
reads stale features. With a complete cache, the LLM is not loaded at all for training.

Layout of <cache.dir>/<hash>/ (version 3):
  layout.json               the number of processes of this build (a build by another number starts again)
  r<rank>-<n>.safetensors   "<slot>.latent" (C, h, w) scaled latents; "<slot>.text.<j>" (L, D) per caption in
                            the LLM's dtype (training.features: L = max_length in fixed mode, the caption's own
                            tokens in flexible mode); metadata "progress": the shard's row count, its first row
                            in the rank's index files, the last source position it covers and the rank's skip
                            counts so far
  index-r<rank>.bin,        the rank's rows (training.cache_index): shard, slot, bucket, sizes, source position;
  entries-r<rank>.jsonl     keys and captions, one line per row. Appended before each shard is written
  done-r<rank>.json         the rank went through the whole source (row count, final skip counts)
  index.json                small manifest: settings, rows per rank, hidden size, skipped samples
  prompts.safetensors       the empty prompt ("empty") and validation prompts ("prompt.<sha1>")
  COMPLETE                  written last, after every tensor was checked finite; a folder without it is resumed

Finishing a build is O(ranks) on rank 0 (no merge of the samples); readers memory-map the rows.
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
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ella_core.checkpoint import atomic_save_file
from ella_core.file_modes import match_umask

from . import features as llm_features
from .cache_index import RECORD, CacheIndex, IndexBehind, RankIndexWriter, record_rows, records_name, row_entry
from .config import Config, cache_root
from .data import DataConfig, SkipCounter, make_buckets, pick_text
from .decoding import prepared_part as prepared_source
from .parts import source_signature, split_note
from .distributed import Dist
from .errors import TrainingError
from .models import Base, encode_texts, parse_dtype
from .stopping import Stop
from .validation import prompt_texts

log = logging.getLogger("training")
CACHE_VERSION = 3  # 3: features in the LLM dtype, flexible mode unpadded, per-rank memory-mapped index; shards'
# last_ordinal is a position in the rank's part of the source (training.parts)
SYNC_EVERY = 64  # source entries between the processes' status exchanges (stop requests, failures)
CHUNK = 16  # samples encoded together (at most cache.shard_size); shards hold whole chunks
SHARD_NAME = re.compile(r"^r(\d+)-(\d+)\.safetensors$")


LLM_SETTINGS = ("llm", "llm_tokenizer", "llm_dtype", "llm_hidden_layer", "token_mode", "max_length")


def cache_settings(config: Config, vae_dtype: torch.dtype) -> dict[str, Any]:
    """Everything the cached tensors depend on. A latents-only cache (cache.mode=latents) holds no LLM
    features, so it does not depend on the LLM settings: runs with other LLMs share it."""
    d = config.data
    settings = {
        "version": CACHE_VERSION, "model": _identity(config.model.pretrained), "model_revision": config.model.revision,
        "model_variant": config.model.variant, "vae_dtype": str(vae_dtype),
        "llm": _identity(config.llm.source), "llm_tokenizer": _identity(config.llm.tokenizer), "llm_dtype": config.llm.dtype,
        "llm_hidden_layer": config.llm.hidden_layer, "token_mode": config.llm.token_mode,
        "max_length": config.llm.max_length, "resolution": d.resolution, "buckets": d.buckets,
        "bucket_step": d.bucket_step, "max_aspect": d.max_aspect, "data_format": d.format,
        "data_path": [_identity(p) for p in d.path] if isinstance(d.path, list) else _identity(str(d.path)), "image_column": d.image_column,
        "caption_extension": d.caption_extension,
        "caption_columns": list(d.caption_columns), "latent_dtype": config.cache.latent_dtype,
    }
    if not caches_features(config):
        settings = {k: v for k, v in settings.items() if k not in LLM_SETTINGS} | {"features": False}
    return settings


def caches_features(config: Config) -> bool:
    """Whether the cache stores LLM features (cache.mode=full); otherwise the build never loads the LLM."""
    return config.cache.mode == "full"


def _identity(value: Optional[str]) -> Optional[str]:
    """A local path as an absolute one (caches are shared between runs started in other folders); hub ids,
    URLs and patterns unchanged."""
    if value and Path(value).expanduser().exists():
        return os.path.abspath(os.path.expanduser(value))
    return value


def cache_dir(config: Config, vae_dtype: torch.dtype) -> Path:
    settings = cache_settings(config, vae_dtype)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(config) / digest


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    match_umask(fd)  # mkstemp's 0600 -> what open() gives under the user's umask
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


def shard_name(rank: int, n: int) -> str:
    return f"r{rank}-{n:05d}.safetensors"


class _ShardWriter:
    """One rank's shards. Each holds whole encoded chunks and says which source positions it covers; its
    rows go to the rank's index files first (write-ahead), so every written shard is indexed."""

    def __init__(self, folder: Path, rank: int, world: int, shard_size: int) -> None:
        self.folder, self.rank, self.world, self.shard_size = folder, rank, world, shard_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.pending: list[dict[str, Any]] = []
        self.index = RankIndexWriter(folder, rank)
        self.samples = 0  # rows of the written shards
        self.shards = 0
        self.last_ordinal = -1  # every source position up to this one is in a written shard or counted
        self.skips = SkipCounter()  # of this rank, up to last_ordinal once flushed

    def shard_name(self, n: int) -> str:
        return shard_name(self.rank, n)

    def _drop(self, numbers: list[int], why: str) -> None:
        if numbers:
            log.warning("cache: dropping %s and later shards of rank %d (%s)", self.shard_name(numbers[0]),
                        self.rank, why)
        for n in numbers:
            (self.folder / self.shard_name(n)).unlink(missing_ok=True)

    def resume(self) -> int:
        """Picks up this rank's intact shards (a damaged one and those after it are removed, as are shards
        whose rows the index files lack); returns how many."""
        numbers = sorted(int(m.group(2)) for p in self.folder.iterdir()
                         if (m := SHARD_NAME.match(p.name)) and int(m.group(1)) == self.rank)
        intact: list[dict[str, Any]] = []
        for n in numbers:
            path = self.folder / self.shard_name(n)
            try:
                if n != len(intact):
                    raise ValueError(f"shard {len(intact)} is missing")
                progress = _read_progress(path)
                if progress["world"] != self.world or progress["rank"] != self.rank:
                    raise ValueError("written by another process layout")
                expected = intact[-1]["first_row"] + intact[-1]["count"] if intact else 0
                if progress["first_row"] != expected:
                    raise ValueError(f"its rows start at {progress['first_row']}, not {expected}")
            except Exception as e:  # noqa: BLE001 (a damaged file: it and everything after it is encoded again)
                self._drop([x for x in numbers if x >= n], str(e))
                break
            intact.append(progress)
        have = self.index.records.stat().st_size // RECORD.itemsize if self.index.records.is_file() else 0
        covered = [p for p in intact if p["first_row"] + p["count"] <= have]
        if len(covered) < len(intact):
            self._drop(list(range(len(covered), len(intact))), f"{records_name(self.rank)} lacks their rows")
        try:
            self.index.keep(covered[-1]["first_row"] + covered[-1]["count"] if covered else 0)
        except IndexBehind as e:
            self._drop(list(range(len(covered))), str(e))
            covered = []
            self.index.keep(0)
        for progress in covered:
            self.last_ordinal = progress["last_ordinal"]
            self.skips = SkipCounter()
            self.skips.merge(progress["skipped"])
        self.shards, self.samples = len(covered), self.index.rows
        return self.shards

    def add(self, entry: dict[str, Any], latent: torch.Tensor, features: list[torch.Tensor]) -> None:
        """features: one (L, D) tensor per caption, as training.features.for_storage gives them."""
        slot = len(self.pending)
        self.tensors[f"{slot}.latent"] = latent.cpu()
        for j, f in enumerate(features):
            self.tensors[f"{slot}.text.{j}"] = f.cpu()
        self.pending.append({**entry, "slot": slot})

    def flush(self, last_ordinal: int, skips: Optional[SkipCounter] = None) -> None:
        """Writes the pending samples as one shard covering source positions up to `last_ordinal`, with the
        skip counts up to there (`skips`, default: all counted so far)."""
        if not self.pending:
            return
        self.index.append(record_rows(self.pending, self.shards),
                          [{"key": e["key"], "captions": e["captions"]} for e in self.pending])
        progress = {"world": self.world, "rank": self.rank, "last_ordinal": last_ordinal,
                    "count": len(self.pending), "first_row": self.samples, "skipped": (skips or self.skips).to_dict()}
        atomic_save_file(self.tensors, self.folder / self.shard_name(self.shards), {"progress": json.dumps(progress)})
        self.samples += len(self.pending)
        self.tensors, self.pending, self.shards, self.last_ordinal = {}, [], self.shards + 1, last_ordinal


# ---------------------------------------------------------------- building
def _prepare_folder(folder: Path, world: int) -> None:
    """Rank 0: the folder exists; a partial build by another number of processes is started again. O(1):
    layout.json says who built it (each rank checks its own shards when it resumes)."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = folder / "layout.json"
    built_by = json.loads(layout.read_text()).get("world") if layout.is_file() else None
    leftovers = built_by is None and any(SHARD_NAME.match(p.name) for p in folder.iterdir())
    if (built_by is not None and built_by != world) or leftovers:
        log.warning("cache: the partial build in %s was made by %s processes, now %d: starting it again",
                    folder, built_by or "an unknown number of", world)
        for p in folder.iterdir():
            p.unlink() if p.is_file() else shutil.rmtree(p)
    if built_by != world:
        _atomic_write_text(layout, json.dumps({"world": world, "version": CACHE_VERSION}))
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
    """Each rank encodes its part of the source (training.parts) into its own shards and index files; rank 0
    writes the manifest (O(ranks)), encodes the prompts and marks the cache complete. Raises StopRequested
    (after writing what is finished) on a signal, PeerFailed on every rank when one fails."""
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
                     dist.rank, writer.shards, writer.samples, writer.last_ordinal)
        llm = get_llm() if caches_features(config) else None
        last = _encode_source(config, base, llm, writer, dist, stop, where)
        _atomic_write_text(folder / f"done-r{dist.rank}.json",
                           json.dumps({"entries_seen": last + 1, "samples": writer.samples, "shards": writer.shards,
                                       "skipped": writer.skips.to_dict()}))
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
        stored_texts: list[torch.Tensor] = []
        if llm is not None:
            texts = [c for entry, _ in chunk for c in entry["captions"]]
            features = encode_texts(llm, texts, config.llm)  # (n, L, D) float32
            text_keys = [entry["key"] for entry, _ in chunk for _ in entry["captions"]]
            check_finite(features, text_keys, "LLM features", llm_fix(config))
            stored_texts = llm_features.for_storage(llm, texts, features, config.llm)  # LLM dtype, unpadded if flexible
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
            n = len(entry["captions"]) if llm is not None else 0  # latents only: the index keeps the captions
            writer.add(entry, latent, stored_texts[offset:offset + n])
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
        source = prepared_source(d, dist.rank, dist.world, last + 1, buckets, d.num_workers, 2 * chunk_size)
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
                             writer.samples + len(writer.pending))
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
    """Rank 0: the manifest from every rank's done file (O(ranks): the rows stay in the ranks' index files),
    the prompts encoded (not in a latents-only cache: the loop's resident LLM encodes them), then COMPLETE."""
    counts, shards, skips = [], [], SkipCounter()
    for r in range(world):
        done = folder / f"done-r{r}.json"
        if not done.is_file():
            raise TrainingError(f"cache: rank {r} finished but its {done.name} is not in {folder}")
        state = json.loads(done.read_text())
        skips.merge(state["skipped"])
        records = folder / records_name(r)
        size = records.stat().st_size if records.is_file() else 0
        if size != state["samples"] * RECORD.itemsize:
            raise TrainingError(f"cache: {records} holds {size // RECORD.itemsize} rows but rank {r} wrote "
                                f"{state['samples']} samples: the file was changed; delete {folder} to rebuild")
        counts.append(state["samples"])
        shards.append(state["shards"])
    if not sum(counts):
        raise TrainingError(f"no usable samples in {config.data.path} ({skips.total} skipped: {dict(skips.counts)}, "
                            f"e.g. {skips.examples[:3]})")
    manifest = {"version": CACHE_VERSION, "settings": cache_settings(config, base.vae.dtype), "hidden_size": None,
                "world": world, "counts": counts, "shards": shards, "samples": sum(counts),
                "record_bytes": RECORD.itemsize, "skipped": skips.to_dict()}
    if llm is not None:
        manifest["hidden_size"] = _write_prompts(config, folder, llm)
    _atomic_write_text(folder / "index.json", json.dumps(manifest))
    _atomic_write_text(folder / "COMPLETE", "ok\n")
    log.info("cache: %d samples%s in %s (%d skipped%s)", sum(counts), "" if llm is not None else " (latents and captions)",
             folder, skips.total, f": {dict(skips.counts)}" if skips.total else "")


def _write_prompts(config: Config, folder: Path, llm: Any) -> int:
    """prompts.safetensors: the empty prompt and the validation prompts; returns the LLM's width."""
    empty = encode_texts(llm, [""], config.llm)  # alone, exactly as the online path encodes it
    check_finite(empty, ["''"], "LLM features of the empty prompt", llm_fix(config))
    prompts = {"empty": llm_features.for_storage(llm, [""], empty, config.llm)[0]}
    texts = prompt_texts(config)  # the prompts and the negative prompt of the validation images
    if texts:
        features = encode_texts(llm, texts, config.llm)
        check_finite(features, [repr(p[:40]) for p in texts], "LLM features of the validation prompts",
                     llm_fix(config))
        stored = llm_features.for_storage(llm, texts, features, config.llm)
        prompts.update({prompt_key(p): f for p, f in zip(texts, stored)})
    atomic_save_file(prompts, folder / "prompts.safetensors")
    return int(empty.shape[-1])


class FeatureCache:
    """Read side of a complete cache: the manifest, the prompts, and the rows (memory-mapped)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        manifest = json.loads((folder / "index.json").read_text())
        if manifest.get("version") != CACHE_VERSION or manifest.get("record_bytes") != RECORD.itemsize:
            found = manifest.get("version", "2 or older")
            raise TrainingError(f"the feature cache {folder} was written in format {found}, this trainer reads "
                                f"format {CACHE_VERSION}: delete {folder / 'COMPLETE'} to rebuild it")
        self.hidden_size: Optional[int] = manifest["hidden_size"]  # None: latents only
        self.skipped: dict[str, Any] = manifest["skipped"]
        self.index = CacheIndex(folder, manifest["counts"])
        self.has_features: bool = manifest["settings"].get("features", True)  # False: latents and captions only
        self.prompts = ({k: v.float() for k, v in load_file(str(folder / "prompts.safetensors")).items()}
                        if self.has_features else {})

    @staticmethod
    def is_complete(folder: Path) -> bool:
        return (folder / "COMPLETE").is_file()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def buckets(self) -> np.ndarray:
        """(N, 2) int32 (height, width) per sample, in source order (what training.data.BatchPlan takes)."""
        return self.index.buckets()

    def entry(self, index: int) -> dict[str, Any]:
        """Sample `index` as a dict (key, captions, shard, slot, bucket, sizes): for logs and tests."""
        rank, row = self.index.locate(index)
        return row_entry(rank, row, self.index.text(rank, row)) | {"shard": shard_name(rank, int(row["shard"]))}

    def empty_features(self) -> torch.Tensor:
        """(L, D) float32: the empty prompt (L = its own tokens in flexible mode)."""
        return self.prompts["empty"]

    def prompt_features(self, prompts: list[str]) -> Optional[list[torch.Tensor]]:
        """P tensors (L_i, D) for cached validation prompts, or None when one is missing."""
        keys = [prompt_key(p) for p in prompts]
        if not all(k in self.prompts for k in keys):
            return None
        return [self.prompts[k] for k in keys]


class CachedDataset(torch.utils.data.Dataset):
    """Latents and the chosen caption's features of one sample visit, read from the shards (upcast to fp32,
    exact); from a latents-only cache the chosen caption's text instead ("" when dropped), which the loop
    encodes. Keeps up to `open_shards` shard handles open (least recently used closed first), per process:
    DataLoader workers keep their own."""

    def __init__(self, cache: FeatureCache, data: DataConfig, open_shards: int = 16) -> None:
        self.folder, self.index, self.data, self.open_shards = cache.folder, cache.index, data, open_shards
        self.empty = cache.empty_features() if cache.has_features else None
        self._handles: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._pid = os.getpid()
        self.opens = 0  # shard files opened by this process (the LRU's misses)

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, rank: int, number: int) -> Any:
        if self._pid != os.getpid():  # a forked DataLoader worker: its own handles
            self._handles, self._pid, self.opens = OrderedDict(), os.getpid(), 0
        key = (rank, number)
        handle = self._handles.get(key)
        if handle is not None:
            self._handles.move_to_end(key)
            return handle
        while len(self._handles) >= self.open_shards:
            self._handles.popitem(last=False)
        handle = self._handles[key] = safe_open(str(self.folder / shard_name(rank, number)), framework="pt")
        self.opens += 1
        return handle

    def __getstate__(self) -> dict[str, Any]:  # spawned DataLoader workers open their own handles
        return {**self.__dict__, "_handles": OrderedDict(), "opens": 0}

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        rank, row = self.index.locate(index)
        entry = self.index.text(rank, row)
        choice = pick_text(entry["captions"], seed, self.data)
        shard = self._shard(rank, int(row["shard"]))
        slot = int(row["slot"])
        latents = shard.get_tensor(f"{slot}.latent")
        if self.empty is None:  # latents only
            chosen: dict[str, Any] = {"text": "" if choice < 0 else entry["captions"][choice]}
        else:
            chosen = {"features": self.empty if choice < 0 else shard.get_tensor(f"{slot}.text.{choice}").float()}
        return {"latents": latents.float(), **chosen,
                "original_size": (int(row["original_size"][0]), int(row["original_size"][1])),
                "crop_top_left": (int(row["crop_top_left"][0]), int(row["crop_top_left"][1])),
                "seed": seed, "key": entry["key"]}
