"""Part p of P of a training source: the one way the cache build and the streaming loader split the source
between processes and loader workers (P = processes x workers, or processes alone for the cache build).

- webdataset: whole tar shards are dealt to the parts (shard i to part i mod P), member order kept, so a
  part opens only its own shards. With fewer shards than parts every part reads every shard and keeps
  every P-th sample (`split_note` says so for the log).
- folder, JSONL, CSV, Hugging Face imagefolder: entries by position (entry i to part i mod P). The listing or the manifest is read
  by every part (cheap); captions files and image bytes only by the part that owns the entry.

Every entry, usable or rejected, belongs to exactly one part, so the union over the parts is the source
once and each skipped entry is counted once over all processes and workers.

Each entry comes with two numbers:
  position  where it is in its part, increasing; a part read from `start` continues after an interruption.
            webdataset shards dealt whole: (the part's shard number << 32) | the sample's number in its
            shard, so a resumed part does not open the shards before its position; otherwise dense.
  ordinal   where it is in the whole source, increasing: (shard << 32) | sample for webdataset, the entry
            number otherwise. Sorting by it gives the source order whatever the split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from .config import DataConfig
from .data import (Record, Rejected, folder_entry, folder_images, imagefolder_items, is_imagefolder, manifest_items,
                   shard_items, source_format, tar_urls)

SHARD_BITS = 32  # a shard holds fewer than 2**32 samples


def split_note(config: DataConfig, parts: int) -> Optional[str]:
    """A line for the log when the source cannot be split by whole shards, else None."""
    if source_format(config) != "webdataset" or parts <= 1:
        return None
    shards = len(tar_urls(config.path))
    if shards >= parts:
        return None
    return (f"data: {shards} webdataset shard(s) for {parts} parts (processes x workers): every part reads every "
            f"shard and keeps every {parts}-th sample; with at least {parts} shards each part reads only its own")


def source_signature(config: DataConfig) -> int:
    """A cheap number every process must agree on before splitting (the same data.path contents): the number
    of shards or images, or the manifest's size in bytes."""
    fmt = source_format(config)
    if fmt == "webdataset":
        return len(tar_urls(config.path))
    if fmt == "folder":
        return len(folder_images(Path(config.path)))
    path = Path(config.path)
    return path.stat().st_size if path.is_file() else -1


def part_items(config: DataConfig, part: int, parts: int, start: int = 0
               ) -> Iterator[tuple[int, int, Record | Rejected]]:
    """(position, ordinal, entry) of this part's entries from position `start` on (see the module doc)."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}")
    fmt = source_format(config)
    if fmt == "webdataset":
        urls = tar_urls(config.path)
        if len(urls) >= parts:
            yield from _whole_shards(urls, config, part, parts, start)
        else:
            entries = ((shard << SHARD_BITS | n, item) for shard, url in enumerate(urls)
                       for n, item in enumerate(shard_items(url, config)))
            yield from _dealt(entries, part, parts, start)
        return
    path = Path(config.path)
    if fmt == "folder" and is_imagefolder(path):  # metadata rows, then the images no row names
        yield from _dealt(enumerate(imagefolder_items(path, config)), part, parts, start)
        return
    if fmt == "folder":
        images = folder_images(path)
        for position in range(start, (len(images) - part + parts - 1) // parts):
            ordinal = position * parts + part
            yield position, ordinal, folder_entry(path, images[ordinal], config)
        return
    yield from _dealt(enumerate(manifest_items(path, fmt, config)), part, parts, start)


def _whole_shards(urls: list[str], config: DataConfig, part: int, parts: int, start: int
                  ) -> Iterator[tuple[int, int, Record | Rejected]]:
    for k, shard in enumerate(range(part, len(urls), parts)):
        if (k + 1) << SHARD_BITS <= start:
            continue  # finished before the interruption: not opened again
        for n, item in enumerate(shard_items(urls[shard], config)):
            position = k << SHARD_BITS | n
            if position >= start:
                yield position, shard << SHARD_BITS | n, item


def _dealt(entries: Iterator[tuple[int, Record | Rejected]], part: int, parts: int, start: int
           ) -> Iterator[tuple[int, int, Record | Rejected]]:
    """Entry i of the (ordinal, entry) sequence to part i mod P, at position i div P."""
    for i, (ordinal, item) in enumerate(entries):
        if i % parts == part and i // parts >= start:
            yield i // parts, ordinal, item
