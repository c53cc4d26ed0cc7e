"""Which samples train and which are held out for the validation loss, and whether there are enough to train.

The held-out samples are chosen by a hash of each sample's key and the run seed, not by position, so the split
is the same whatever the number of processes, with or without the cache, and in any source order. They are
never trained on: the training order is planned over the rest.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Any, Sequence, Union

import torch

from .config import Config, DataConfig
from .data import Record, stream_items
from .errors import TrainingError
from .formats import resolve_format


def holdout_count(holdout: Union[int, float], usable: int) -> int:
    """validation.holdout as a number of samples: a count, or a fraction (below 1) of the usable ones."""
    if isinstance(holdout, float) and 0.0 < holdout < 1.0:
        return max(1, round(holdout * usable))
    return int(holdout)


def split_holdout(keys: Sequence[str], holdout: Union[int, float], seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), both ascending: the held-out ones have the smallest
    sha256(seed/key)."""
    n_held = holdout_count(holdout, len(keys))
    if n_held == 0:
        return list(range(len(keys))), []
    held = set(heapq.nsmallest(n_held, range(len(keys)),
                               key=lambda i: (hashlib.sha256(f"{seed}/{keys[i]}".encode()).digest(), i)))
    return [i for i in range(len(keys)) if i not in held], sorted(held)


def sample_keys(data: Any) -> list[str]:
    """Every sample's key in the data set's order (what split_holdout hashes): a cache's from its index's
    entries files in one sequential pass, an indexed source's from its records."""
    if data.cache is not None:
        return data.cache.index.keys()
    return [record.key for record in data.dataset.records]


def require_full_batch(usable: int, config: Config, world: int, where: str) -> None:
    """Raises when the usable samples less the held-out ones cannot fill one global micro-batch."""
    t = config.train
    global_batch = t.batch_size * world
    held = holdout_count(config.validation.holdout, usable)
    if usable - held >= global_batch:
        return
    held_text = f", {held} of them held out by validation.holdout={config.validation.holdout}" if held else ""
    raise TrainingError(
        f"{where}: {usable} usable sample(s){held_text}, fewer than one global batch of {global_batch} "
        f"(train.batch_size={t.batch_size} x {world} process(es)) to train on. Lower train.batch_size"
        + (" or validation.holdout" if held else "") + ", or add data")


def check_source_size(config: Config, world: int) -> None:
    """Before the cache pass: lists a folder or manifest until one global batch (plus the held-out samples) is
    found, so a data set that is too small is reported in the time of a listing, not after encoding it. Only
    small sources are listed to the end. Tar shards are not read twice for this (they may be downloads): a
    too small webdataset is reported after the cache pass."""
    d: DataConfig = config.data
    if resolve_format(d.format, d.path) == "webdataset":
        return
    need = config.train.batch_size * world
    usable = rejected = 0
    for item in stream_items(d):
        if isinstance(item, Record):
            usable += 1
            if usable - holdout_count(config.validation.holdout, usable) >= need:
                return
        else:
            rejected += 1
    require_full_batch(usable, config, world, f"data.path {d.path} (listed before the cache pass; "
                                              f"{rejected} entr{'y' if rejected == 1 else 'ies'} not usable)")


class TrainingSubset(torch.utils.data.Dataset):
    """The samples a run trains on: item (i, seed) of this dataset is item (indices[i], seed) of the whole."""

    def __init__(self, inner: torch.utils.data.Dataset, indices: Sequence[int]) -> None:
        self.inner, self.indices = inner, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        return self.inner[(self.indices[index], seed)]
