"""A streamed epoch resumed with another layout (processes x loader workers): what the old parts have not
consumed yet is dealt to the new layout's parts, so the epoch still visits every entry exactly once.

A part's work is a list of tasks, each a run of entries of one unit; a unit is a tar shard (its number in
the epoch's shard order) or ALL, the source's whole entry sequence (folders, manifests, or fewer shards
than parts):
  Task(unit, begin, stride)      entries begin, begin + stride, begin + 2 * stride, ... of the unit
  Task(unit, items=(i, j, ...))  those entries of the unit (ascending)
A part reads its tasks in order, and the position of the j-th entry of its k-th task is (k << 32) | j. The
layout's own split (training.parts) is such a list: whole shards are tasks (shard, 0, 1), entries dealt by
position the single task (ALL, part, parts), and `part_items` positions are exactly these positions.

So a saved PartPosition (next position, positions waiting in a bucket) says what the part consumed: its
tasks before the k of `next`, task k up to j, less the waiting positions. What remains (the tails, the
unstarted tasks, the waiting entries as item tasks) is dealt round-robin to the new parts; when there are
fewer tasks than parts, runs are split by stride (a shard's tail is then read by several parts, each keeping
its own entries). The deal is a function of the saved positions alone, so a checkpoint keeps only the
positions each earlier layout of the epoch reached (StreamPosition.history), and a run can change layout
several times within an epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .config import DataConfig
from .data import (Record, Rejected, folder_entry, folder_images, imagefolder_items, is_imagefolder, manifest_items,
                   shard_items, source_format, tar_urls)
from .parts import SHARD_BITS

ALL = -1  # the unit of the source's whole entry sequence
LOW = (1 << SHARD_BITS) - 1


@dataclass(frozen=True)
class Task:
    unit: int
    begin: int = 0
    stride: int = 1
    items: Optional[tuple[int, ...]] = None

    def entry(self, j: int) -> int:
        """The unit's entry number of this task's j-th entry."""
        return self.items[j] if self.items is not None else self.begin + j * self.stride

    def after(self, j: int) -> Optional["Task"]:
        """The task less its first j entries (None when nothing can be left)."""
        if self.items is not None:
            return replace(self, items=self.items[j:]) if self.items[j:] else None
        return replace(self, begin=self.begin + j * self.stride)


def part_tasks(config: DataConfig, part: int, parts: int) -> list[Task]:
    """Part `part` of `parts` of the epoch's source (`config.path`: the epoch's shard order), as
    training.parts deals it: whole shards, or entries by position."""
    if source_format(config) == "webdataset":
        shards = len(tar_urls(config.path))
        if shards >= parts:
            return [Task(shard) for shard in range(part, shards, parts)]
    return [Task(ALL, part, parts)]


def remaining(tasks: Sequence[Task], nxt: int, pending: Sequence[int]) -> list[Task]:
    """What a part has not consumed at PartPosition(nxt, pending): its waiting entries (one item task per
    unit, first), the tail of its current task and its unstarted tasks."""
    k, j = nxt >> SHARD_BITS, nxt & LOW
    waiting: dict[int, set[int]] = {}
    for position in pending:
        task = tasks[position >> SHARD_BITS]
        waiting.setdefault(task.unit, set()).add(task.entry(position & LOW))
    out = [Task(unit, items=tuple(sorted(entries))) for unit, entries in sorted(waiting.items())]
    for index, task in enumerate(tasks):
        rest = task.after(j) if index == k else task if index > k else None
        if rest is not None:
            out.append(rest)
    return out


def deal(per_part: Sequence[Sequence[Task]], parts: int) -> list[list[Task]]:
    """The old parts' remaining tasks to `parts` new parts: taken round-robin over the old parts (the work
    stays spread), task t to new part t mod parts; runs are split by stride while there are fewer tasks."""
    tasks = [t for row in _round_robin(per_part) for t in row]
    runs = sum(1 for t in tasks if t.items is None)
    if runs and len(tasks) < parts:
        k = math.ceil((parts - (len(tasks) - runs)) / runs)
        tasks = [piece for t in tasks for piece in ([t] if t.items is not None else
                                                    [Task(t.unit, t.begin + i * t.stride, t.stride * k)
                                                     for i in range(k)])]
    return [tasks[q::parts] for q in range(parts)]


def _round_robin(rows: Sequence[Sequence[Task]]) -> Iterator[list[Task]]:
    for i in range(max((len(r) for r in rows), default=0)):
        yield [r[i] for r in rows if i < len(r)]


def epoch_tasks(config: DataConfig, history: Sequence[dict], parts: int) -> list[list[Task]]:
    """Every part's tasks in the current layout of an epoch whose earlier layouts reached the positions in
    `history` ([{"layout": [processes, per process], "parts": {part: [next, *pending]}}, ...], oldest first)."""
    if not history:
        return [part_tasks(config, p, parts) for p in range(parts)]
    first = math.prod(history[0]["layout"])
    tasks = [part_tasks(config, p, first) for p in range(first)]
    for n, entry in enumerate(history):
        old = math.prod(entry["layout"])
        new = math.prod(history[n + 1]["layout"]) if n + 1 < len(history) else parts
        saved = {int(p): v for p, v in entry["parts"].items()}
        rest = [remaining(tasks[p], *_split(saved.get(p, [0]))) for p in range(old)]
        tasks = deal(rest, new)
    return tasks


def _split(saved: list[int]) -> tuple[int, list[int]]:
    return int(saved[0]), [int(p) for p in saved[1:]]


def task_items(config: DataConfig, tasks: Sequence[Task], start: int = 0
               ) -> Iterator[tuple[int, int, Record | Rejected]]:
    """(position, ordinal, entry) of a part's tasks from position `start` on; ordinals as training.parts'.
    Only what a task takes is read (captions files and images of its own entries; whole shards that hold
    its entries)."""
    first_task, first_j = start >> SHARD_BITS, start & LOW
    for k, task in enumerate(tasks):
        if k < first_task:
            continue  # consumed before `start`: not opened again
        skip = first_j if k == first_task else 0
        for j, ordinal, item in _task_entries(config, task, skip):
            yield k << SHARD_BITS | j, ordinal, item


def _task_entries(config: DataConfig, task: Task, skip: int) -> Iterator[tuple[int, int, Record | Rejected]]:
    """(j, ordinal, entry) of the task's entries from its j-th = `skip`."""
    if task.items is not None:
        wanted = {e: j for j, e in enumerate(task.items) if j >= skip}
        index = wanted.get
        last = max(wanted, default=-1)
    else:
        begin = task.begin + skip * task.stride

        def index(e: int) -> Optional[int]:
            return (e - task.begin) // task.stride if e >= begin and (e - begin) % task.stride == 0 else None

        last = None
    if task.items is not None and not wanted:
        return
    if task.unit == ALL and source_format(config) == "folder" and not is_imagefolder(Path(config.path)):
        root = Path(config.path)  # a plain folder: only the task's own captions files and images are read
        images = folder_images(root)
        chosen = sorted(wanted) if task.items is not None else range(begin, len(images), task.stride)
        for e in chosen:
            if e < len(images):
                yield index(e), e, folder_entry(root, images[e], config)
        return
    for e, ordinal, item in _unit_sequence(config, task.unit):
        j = index(e)
        if j is not None:
            yield j, ordinal, item
        if last is not None and e >= last:
            return


def _unit_sequence(config: DataConfig, unit: int) -> Iterator[tuple[int, int, Record | Rejected]]:
    """(entry number, ordinal, entry) of a unit, in order."""
    fmt = source_format(config)
    if fmt == "webdataset":
        urls = tar_urls(config.path)
        if unit != ALL:
            for n, item in enumerate(shard_items(urls[unit], config)):
                yield n, unit << SHARD_BITS | n, item
            return
        entries = ((shard << SHARD_BITS | n, item) for shard, url in enumerate(urls)
                   for n, item in enumerate(shard_items(url, config)))
    elif fmt == "folder":  # an imagefolder (plain folders are read entry by entry above)
        entries = enumerate(imagefolder_items(Path(config.path), config))
    else:
        entries = enumerate(manifest_items(Path(config.path), fmt, config))
    for e, (ordinal, item) in enumerate(entries):
        yield e, ordinal, item
