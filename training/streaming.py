"""Training without the cache from a source too large to index (a webdataset; any format with
data.streaming=true): each process's loader workers stream their own parts of the source (training.parts:
part rank x workers + worker of processes x workers), so every sample is read by one worker only and is
trained on exactly once per epoch.

A part groups its samples by bucket and hands out a micro-batch when a bucket has train.batch_size of them
(what is left in the buckets at the end of the part comes out as smaller batches). Each batch says where
its part stands afterwards: the next position to read and the positions read but still waiting in a
bucket. A process takes its parts' batches in a fixed rotation, whatever the workers' timing, and the
rotation's turn is part of the position too, so a run resumed from a checkpoint continues with exactly
the batches the uninterrupted run would have had. A process whose parts are through the epoch trains on
empty micro-batches (keeping the collectives in step) until every process is through; then the next
epoch begins, with the shards dealt in another seeded order.

A resume with another number of processes or workers mid-epoch continues too: what each old part had not
consumed (unstarted shards, the tails of partly read ones, the entries waiting in its buckets) is dealt to
the new layout's parts (training.relayout), so the epoch still visits every sample exactly once; the
checkpoint keeps the positions each earlier layout of the epoch reached (`history`). The batches then
differ from an uninterrupted run's (other parts fill other buckets); the samples and their seeds do not.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from .config import Config, DataConfig, streamed_run
from .data import collate, make_buckets, pick_text, sample_seed, source_format, tar_urls
from .decoding import prepare
from .distributed import Dist
from .errors import TrainingError
from .parts import part_items, source_signature, split_note
from .relayout import epoch_tasks, task_items

log = logging.getLogger("training")


def streams(config: Config) -> bool:
    """Whether the run streams its source: training.config.streamed_run, the rule the config check applies
    (data.streaming, or by default a webdataset without the cache)."""
    return streamed_run(config)


def layout(world: int, num_workers: int) -> list[int]:
    """[processes, parts per process]: a process without loader workers reads one part itself."""
    return [world, max(1, num_workers)]


@dataclass(frozen=True)
class PartPosition:
    """Where one part stands: the next position to read, and positions read but not yet in a batch."""

    next: int = 0
    pending: tuple[int, ...] = ()

    def to_list(self) -> list[int]:
        return [self.next, *self.pending]

    @classmethod
    def from_list(cls, saved: list[int]) -> "PartPosition":
        return cls(int(saved[0]), tuple(int(p) for p in saved[1:]))


@dataclass
class StreamPosition:
    """The streamed epoch: each part's position and each process's turn in the rotation of its parts."""

    epoch: int = 0
    parts: dict[int, PartPosition] = field(default_factory=dict)
    turns: dict[int, int] = field(default_factory=dict)  # rank -> index of the part whose batch comes next
    layout: list[int] = field(default_factory=lambda: [1, 1])
    # this epoch's earlier layouts and the parts' positions they reached: [{"layout", "parts"}], oldest first
    history: list[dict[str, Any]] = field(default_factory=list)
    source: Optional[int] = None  # training.parts.source_signature of the source (checked when re-dealing)

    def to_dict(self) -> dict[str, Any]:
        out = {"epoch": self.epoch, "parts": {str(p): v.to_list() for p, v in sorted(self.parts.items())},
               "turns": {str(r): t for r, t in sorted(self.turns.items())}, "layout": list(self.layout)}
        if self.history:
            out["history"] = self.history
        if self.source is not None:
            out["source"] = self.source
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "StreamPosition":
        return cls(int(saved["epoch"]), {int(p): PartPosition.from_list(v) for p, v in saved["parts"].items()},
                   {int(r): int(t) for r, t in saved.get("turns", {}).items()}, list(saved["layout"]),
                   [dict(h) for h in saved.get("history", [])], saved.get("source"))

    def gathered(self, dist: Dist) -> dict[str, Any]:
        """Collective: every process's parts and turns in one position (for the checkpoint)."""
        merged = StreamPosition(self.epoch, {}, {}, self.layout, self.history, self.source)
        for other in dist.gather(self.to_dict()):
            part = StreamPosition.from_dict(other)
            merged.parts.update(part.parts)
            merged.turns.update(part.turns)
        return merged.to_dict()


def check_stream_layout(saved: dict[str, Any], world: int, num_workers: int, config: DataConfig) -> None:
    """A streamed checkpoint continues at any layout; refused: a map-style checkpoint, and a re-deal of the
    epoch (another layout mid-epoch) over a source whose shape changed (the positions would name other
    entries), with the numbers."""
    position = saved.get("position", {})
    if "parts" not in position:
        raise TrainingError("cannot resume: the checkpoint was trained from a map-style source (the cache or an "
                            "indexed folder/manifest) and this run streams (data.streaming); set data.streaming "
                            "as it was")
    old, new = list(position["layout"]), layout(world, num_workers)
    mid_epoch = bool(position["parts"]) or bool(position.get("history"))
    if mid_epoch and (old != new or position.get("history")) and position.get("source") is not None:
        now = source_signature(config)
        if now != position["source"]:
            what = "tar shards" if source_format(config) == "webdataset" else (
                "images" if source_format(config) == "folder" else "bytes of the manifest")
            raise TrainingError(
                f"cannot resume mid-epoch {position['epoch']} with another layout ({old[0]} x {old[1]} -> "
                f"{new[0]} x {new[1]} processes x parts): data.path has {now} {what}, the checkpoint's run "
                f"{position['source']}; the saved positions name entries of that source. Restore the source, or "
                f"resume with {old[0]} process(es) and data.num_workers={old[1] if old[1] > 1 else '0 or 1'}")


def _epoch_source(config: DataConfig, seed: int, epoch: int) -> DataConfig:
    """The source with its shards in this epoch's seeded order (other formats keep theirs)."""
    if source_format(config) != "webdataset":
        return config
    urls = tar_urls(config.path)
    random.Random(f"{seed}/shards/{epoch}").shuffle(urls)
    return dataclasses.replace(config, path=urls, format="webdataset")


def part_batches(config: DataConfig, seed: int, epoch: int, part: int, parts: int, batch_size: int,
                 resume: Optional[PartPosition] = None, history: Sequence[dict[str, Any]] = ()
                 ) -> Iterator[dict[str, Any]]:
    """One part's micro-batches of one epoch, each with "stream": (part, PartPosition after it); skipped
    entries are listed in the batch after them (counted in the first epoch only: later epochs read the same
    entries again). `history`: the epoch's earlier layouts (StreamPosition.history), whose unconsumed work
    this layout's parts share (training.relayout)."""
    buckets = make_buckets(config.resolution, config.bucket_step, config.max_aspect, config.buckets)
    resume = resume or PartPosition()
    waiting = set(resume.pending)
    begin = min(waiting | {resume.next})
    filling: dict[tuple[int, int], list[tuple[int, dict[str, Any]]]] = {}
    skipped: list[tuple[str, str, str]] = []
    read_to = resume.next

    def batch_of(bucket: tuple[int, int]) -> dict[str, Any]:
        items = filling.pop(bucket)
        state = PartPosition(read_to, tuple(sorted(p for group in filling.values() for p, _ in group)))
        batch = collate([sample for _, sample in items])
        batch["skipped"] = skipped + batch["skipped"]
        skipped.clear()
        batch["stream"] = (part, state)
        return batch

    source = _epoch_source(config, seed, epoch)
    entries = (task_items(source, epoch_tasks(source, history, parts)[part], begin) if history else
               part_items(source, part, parts, begin))
    for position, ordinal, item in entries:
        if position < resume.next and position not in waiting:
            continue  # in a batch before the checkpoint
        read_to = max(read_to, position + 1)
        prepared = prepare(position, ordinal, item, buckets)
        if prepared.skip is not None:
            if epoch == 0:
                skipped.append((prepared.key, *prepared.skip))
            continue
        visit = sample_seed(seed, epoch, ordinal)
        choice = pick_text(prepared.captions, visit, config)
        s = prepared.sample
        sample = {"pixels": s.pixels, "text": "" if choice < 0 else prepared.captions[choice],
                  "original_size": s.original_size, "crop_top_left": s.crop_top_left, "seed": visit,
                  "key": prepared.key}
        group = filling.setdefault(prepared.bucket, [])
        group.append((position, sample))
        if len(group) >= batch_size:
            yield batch_of(prepared.bucket)
    for bucket in sorted(filling):
        yield batch_of(bucket)
    if skipped:
        yield {"skipped": list(skipped), "stream": (part, PartPosition(read_to))}


class _RankParts(torch.utils.data.IterableDataset):
    """In loader worker w: the batches of part rank x W + w, then ("end", part)."""

    def __init__(self, config: DataConfig, seed: int, epoch: int, rank: int, lay: list[int], batch_size: int,
                 starts: dict[int, PartPosition], history: Sequence[dict[str, Any]] = ()) -> None:
        self.config, self.seed, self.epoch, self.rank, self.layout = config, seed, epoch, rank, lay
        self.batch_size, self.starts, self.history = batch_size, starts, list(history)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        world, per_rank = self.layout
        part = self.rank * per_rank + worker
        yield from part_batches(self.config, self.seed, self.epoch, part, world * per_rank, self.batch_size,
                                self.starts.get(part), self.history)
        yield ("end", part)


def _as_is(item: Any) -> Any:
    return item


class StreamingBatches:
    """This process's endless stream of micro-batches; each carries "position" (a StreamPosition after it)."""

    def __init__(self, config: Config, dist: Dist, position: Optional[StreamPosition] = None) -> None:
        d = config.data
        self.config, self.dist, self.workers = d, dist, d.num_workers
        self.seed, self.batch_size = config.seed, config.train.batch_size
        self.layout = layout(dist.world, d.num_workers)
        self.source = source_signature(d)
        p = position or StreamPosition(layout=self.layout)
        if p.layout != self.layout:  # the epoch's unconsumed work is dealt to this layout's parts
            history = p.history + ([{"layout": list(p.layout), "parts": p.to_dict()["parts"]}] if p.parts else [])
            if p.parts or p.history:
                log.info("streamed epoch %d resumed with %d x %d parts (was %d x %d): its remaining samples are "
                         "dealt to the new parts", p.epoch, *self.layout, *p.layout)
            p = StreamPosition(p.epoch, {}, {}, self.layout, history)
        self.position = dataclasses.replace(p, source=self.source)
        note = split_note(d, self.layout[0] * self.layout[1])
        if note and dist.is_main:
            log.warning("%s", note)

    def _mine(self) -> list[int]:
        world, per_rank = self.layout
        return [self.dist.rank * per_rank + w for w in range(per_rank)]

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        """This process's batches of the current epoch, its parts in rotation from the saved turn."""
        p = self.position
        dataset = _RankParts(self.config, self.seed, p.epoch, self.dist.rank, self.layout, self.batch_size,
                             dict(p.parts), p.history)
        mine = self._mine()
        if self.workers <= 0:
            source: Iterator[Any] = iter(dataset)
        else:
            source = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                                      collate_fn=_as_is))
        queues: dict[int, list[dict[str, Any]]] = {part: [] for part in mine}
        turn = p.turns.get(self.dist.rank, 0) % len(mine)
        rotation = mine[turn:] + mine[:turn]  # parts in the order their batches are taken
        active = list(rotation)
        try:
            while active:
                part = active[0]
                while not queues[part]:
                    item = next(source)
                    if isinstance(item, tuple):  # ("end", part)
                        queues[item[1]].append({"end": True})
                    else:
                        queues[item["stream"][0]].append(item)
                batch = queues[part].pop(0)
                if "end" in batch:
                    active.pop(0)
                    continue
                active = active[1:] + active[:1]
                _, state = batch.pop("stream")
                parts = {**self.position.parts, part: state}
                turns = {**self.position.turns, self.dist.rank: mine.index(active[0]) if active else 0}
                self.position = StreamPosition(p.epoch, parts, turns, self.layout, p.history, self.source)
                batch["position"] = self.position
                yield batch
        finally:
            del source  # ends the loader workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            fresh = not self.position.parts and not self.position.history  # a resumed epoch may have nothing left
            batches = self._epoch_batches()
            trained = False
            while True:
                batch = next(batches, None)
                if not self.dist.any(batch is not None):
                    break  # every process is through the epoch
                trained = True
                yield batch if batch is not None else {"skipped": [], "position": self.position}
            if fresh and not trained:
                raise TrainingError(f"no usable samples in {self.config.path} in epoch {self.position.epoch}")
            self.position = StreamPosition(self.position.epoch + 1, {}, {}, self.layout, [], self.source)
