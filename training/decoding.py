"""A part of the source decoded and fitted to its bucket in loader worker processes, delivered in part order.

The cache build's main process runs the VAE and the LLM; reading, decoding and resizing images (the slow,
single-threaded part) run in `data.num_workers` torch DataLoader workers. Worker w of W prepares the entries
j = w, w + W, ... of the part (counted from where this run starts) and the main process puts them back in
order, so what the main process sees, and therefore how it groups samples into encoder chunks, is the
same for any number of workers, whatever their timing: a 0-worker and an N-worker build write identical
shards. (For webdataset every worker reads the part's tar stream and decodes only its own samples; the
workers stay within a few samples of each other, so the page cache serves the repeated reads.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from .config import DataConfig
from .data import ImageSample, Rejected, decode_image, describe, fit_to_bucket, image_failure, nearest_bucket
from .parts import part_items


@dataclass
class Prepared:
    """One entry of the part: a sample ready for the encoders, or why it is skipped."""

    position: int
    ordinal: int
    key: str
    captions: list[str]
    bucket: Optional[tuple[int, int]] = None
    sample: Optional[ImageSample] = None
    skip: Optional[tuple[str, str]] = None  # (a Skip reason, detail)


def prepare(position: int, ordinal: int, item: Any, buckets: Sequence[tuple[int, int]]) -> Prepared:
    """Decodes and fits one entry; a rejected entry or an image that fails to decode becomes a skip."""
    if isinstance(item, Rejected):
        return Prepared(position, ordinal, item.key, [], skip=(item.reason, item.detail))
    try:
        image = decode_image(item.load())
        bucket = nearest_bucket((image.size[1], image.size[0]), buckets)
        sample = fit_to_bucket(image, bucket)
    except Exception as e:  # noqa: BLE001 (PIL raises many types for corrupt files)
        return Prepared(position, ordinal, item.key, [], skip=(image_failure(e), describe(e)))
    return Prepared(position, ordinal, item.key, item.captions, bucket, sample)


class _WorkerShare(torch.utils.data.IterableDataset):
    """In worker w of W: (j, Prepared) for the part's entries j = w mod W, then (None, w) at the end."""

    def __init__(self, config: DataConfig, part: int, parts: int, start: int,
                 buckets: Sequence[tuple[int, int]]) -> None:
        self.config, self.part, self.parts, self.start, self.buckets = config, part, parts, start, list(buckets)

    def __iter__(self) -> Iterator[tuple[Optional[int], Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for j, (position, ordinal, item) in enumerate(part_items(self.config, self.part, self.parts, self.start)):
            if j % workers == worker:
                yield j, prepare(position, ordinal, item, self.buckets)
        yield None, worker


def _as_is(item: Any) -> Any:
    return item


def prepared_part(config: DataConfig, part: int, parts: int, start: int, buckets: Sequence[tuple[int, int]],
                  num_workers: int, lookahead: int = 32) -> Iterator[Prepared]:
    """The part's entries from position `start`, prepared, in part order (in `num_workers` processes; 0:
    here). Closing the iterator (or an exception in the consumer) ends the workers.

    The workers keep up to `lookahead` entries ready between them: a consumer that takes a chunk and then
    encodes it should give at least twice its chunk, or the workers stop while it encodes (measured: with 4
    entries ahead and chunks of 16, one worker overlapped nothing with a GPU-like encoder)."""
    if num_workers <= 0:
        for position, ordinal, item in part_items(config, part, parts, start):
            yield prepare(position, ordinal, item, buckets)
        return
    loader = torch.utils.data.DataLoader(_WorkerShare(config, part, parts, start, buckets), batch_size=None,
                                         num_workers=num_workers, collate_fn=_as_is,
                                         prefetch_factor=max(2, -(-lookahead // num_workers)))
    iterator = iter(loader)
    try:
        waiting: dict[int, Prepared] = {}
        ended: set[int] = set()
        j = 0
        for index, value in iterator:
            if index is None:
                ended.add(value)
            else:
                waiting[index] = value
            while j in waiting:
                yield waiting.pop(j)
                j += 1
            if j % num_workers in ended:
                return  # that worker ended before entry j: the part has no entry j
    finally:
        del iterator  # shuts the workers down now, also when the consumer stops early
