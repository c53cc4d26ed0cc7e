"""The feature cache's index: fixed-size numpy records per rank, memory-mapped by readers.

Why: one JSON list of every sample (the old index.json) costs ~1.4 kB of Python objects per sample in every
reader and an O(samples) merge on rank 0 at the end of the build. Here each rank appends, shard by shard,
  index-r<rank>.bin      RECORD rows (shard, slot, bucket, caption count, sizes, crop, source position)
  entries-r<rank>.jsonl  one JSON line per row: {"key": ..., "captions": [...]} (read one line at a time)
so finishing a build is O(ranks), and a reader holds a few numpy arrays (the sort of the source positions
and the buckets, about 12 bytes per sample) instead of a dict per sample.

Appends are write-ahead: a shard's rows are appended (and synced) before the shard itself is written, so
every intact shard's rows are in the files; rows beyond the last intact shard are cut off on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

RECORD = np.dtype([
    ("ordinal", "<i8"),  # position in the source: the global sample order, whatever the number of ranks
    ("shard", "<i4"),  # shard number of this rank: r<rank>-<shard>.safetensors
    ("slot", "<i4"),  # tensors "<slot>.latent", "<slot>.text.<j>"
    ("bucket", "<u2", (2,)),  # (height, width) in pixels
    ("captions", "<u2"),
    ("original_size", "<i4", (2,)),  # (height, width) before resizing
    ("crop_top_left", "<i4", (2,)),
    ("text_offset", "<i8"),  # this row's line in entries-r<rank>.jsonl
    ("text_size", "<u4"),
])


def records_name(rank: int) -> str:
    return f"index-r{rank}.bin"


def entries_name(rank: int) -> str:
    return f"entries-r{rank}.jsonl"


def _sync_append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class IndexBehind(Exception):
    """The index files hold fewer rows than the intact shards need (they were damaged or removed)."""


class RankIndexWriter:
    """Appends one rank's rows; `keep(rows)` cuts the files back to the first `rows` rows (resume)."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.records = folder / records_name(rank)
        self.entries = folder / entries_name(rank)
        self.rows = 0
        self.text_end = 0  # bytes of entries-r<rank>.jsonl that belong to the kept rows

    def keep(self, rows: int) -> None:
        """Truncates both files to `rows` rows; raises IndexBehind when they hold fewer."""
        have = self.records.stat().st_size // RECORD.itemsize if self.records.is_file() else 0
        if have < rows:
            raise IndexBehind(f"{self.records.name} holds {have} rows, the intact shards {rows}")
        text_end = 0
        if rows:
            last = np.fromfile(self.records, dtype=RECORD, count=1, offset=(rows - 1) * RECORD.itemsize)[0]
            text_end = int(last["text_offset"]) + int(last["text_size"])
            if not self.entries.is_file() or self.entries.stat().st_size < text_end:
                raise IndexBehind(f"{self.entries.name} is shorter than its rows say ({text_end} bytes)")
        for path, size in ((self.records, rows * RECORD.itemsize), (self.entries, text_end)):
            with open(path, "ab") as f:
                f.truncate(size)
                os.fsync(f.fileno())
        self.rows, self.text_end = rows, text_end

    def append(self, rows: np.ndarray, texts: list[dict[str, Any]]) -> None:
        """rows: RECORD array (its text_offset/text_size are filled here); texts: one dict per row."""
        lines = [(json.dumps(t, ensure_ascii=False) + "\n").encode("utf-8") for t in texts]
        sizes = np.array([len(line) for line in lines], dtype=np.int64)
        rows = rows.copy()
        rows["text_size"] = sizes
        rows["text_offset"] = self.text_end + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        _sync_append(self.entries, b"".join(lines))
        _sync_append(self.records, rows.tobytes())
        self.rows += len(rows)
        self.text_end += int(sizes.sum())


class CacheIndex:
    """Read side: every rank's rows in source order. Row lookup is O(1); no Python object per sample.

    The rows stay memory-mapped (pages are read when touched and shared by the processes of a node); only
    the permutation into source order and the buckets are arrays in memory.
    """

    def __init__(self, folder: Path, counts: list[int]) -> None:
        self.folder, self.counts = folder, list(counts)
        self._open()

    def _open(self) -> None:
        self._records = [np.memmap(self.folder / records_name(r), dtype=RECORD, mode="r", shape=(n,)) if n else
                         np.zeros(0, dtype=RECORD) for r, n in enumerate(self.counts)]
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        ordinals = np.concatenate([m["ordinal"] for m in self._records]) if self._records else np.zeros(0, np.int64)
        # every rank's rows are already in source order: a stable sort merges the runs in O(N log ranks)
        order = np.argsort(ordinals, kind="stable")
        self._order = order.astype(np.int32) if len(order) < 2**31 else order
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:  # pickled (spawned DataLoader workers): reopened there
        return {"folder": self.folder, "counts": self.counts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder, self.counts = state["folder"], state["counts"]
        self._open()

    def locate(self, index: int) -> tuple[int, Any]:
        """Sample `index` (source order) -> (rank, its RECORD row)."""
        flat = int(self._order[index])
        rank = int(np.searchsorted(self._starts, flat, side="right")) - 1
        return rank, self._records[rank][flat - self._starts[rank]]

    def buckets(self) -> np.ndarray:
        """(N, 2) int32 (height, width) of every sample, in source order."""
        if not len(self):
            return np.zeros((0, 2), dtype=np.int32)
        every = np.concatenate([m["bucket"] for m in self._records]).astype(np.int32)
        return every[self._order]

    def text(self, rank: int, row: Any) -> dict[str, Any]:
        """{"key", "captions"} of one row, read from its line of entries-r<rank>.jsonl."""
        if self._pid != os.getpid():  # a forked DataLoader worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(rank)
        if fd is None:
            fd = self._fds[rank] = os.open(self.folder / entries_name(rank), os.O_RDONLY)
        raw = os.pread(fd, int(row["text_size"]), int(row["text_offset"]))
        return json.loads(raw)

    def keys(self) -> list[str]:
        """Every sample's key in source order, read with one sequential pass over each rank's entries file
        (not one random read per row): what the held-out split hashes at start-up."""
        flat: list[str] = []
        for rank, count in enumerate(self.counts):
            path = self.folder / entries_name(rank)
            before = len(flat)
            if count:
                with open(path, "rb") as f:
                    for line in f:
                        flat.append(_line_key(line))
                        if len(flat) - before == count:
                            break
            if len(flat) - before != count:
                raise ValueError(f"{path}: {len(flat) - before} entries, the index has {count} rows")
        return [flat[i] for i in self._order.tolist()]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


_KEY_PREFIX = b'{"key": '
_DECODER = json.JSONDecoder()


def _line_key(line: bytes) -> str:
    """The "key" of one entries line; written first by RankIndexWriter, so only its string is decoded."""
    if line.startswith(_KEY_PREFIX):
        key, _ = _DECODER.raw_decode(line.decode("utf-8"), len(_KEY_PREFIX))
        if isinstance(key, str):
            return key
    return json.loads(line)["key"]


def record_rows(entries: list[dict[str, Any]], shard: int) -> np.ndarray:
    """The RECORD rows of a shard's entries (dicts as the build makes them, with "slot")."""
    rows = np.zeros(len(entries), dtype=RECORD)
    for i, e in enumerate(entries):
        rows[i]["ordinal"], rows[i]["shard"], rows[i]["slot"] = e["ordinal"], shard, e["slot"]
        rows[i]["bucket"], rows[i]["captions"] = e["bucket"], len(e["captions"])
        rows[i]["original_size"], rows[i]["crop_top_left"] = e["original_size"], e["crop_top_left"]
    return rows


def row_entry(rank: int, row: Any, text: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A row as a plain dict (for logs and tests)."""
    out = {"rank": rank, "ordinal": int(row["ordinal"]), "shard": int(row["shard"]), "slot": int(row["slot"]),
           "bucket": [int(x) for x in row["bucket"]], "original_size": [int(x) for x in row["original_size"]],
           "crop_top_left": [int(x) for x in row["crop_top_left"]], "caption_count": int(row["captions"])}
    return {**out, **(text or {})}
