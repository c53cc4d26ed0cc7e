"""Connector outputs kept across sampling runs, so re-queuing a graph with a new seed runs no connector forward.

A `ContextCache` (ella_core.conditioning) lives for one sampling run. ComfyUI hands a re-queued graph the
same prompt objects and the same connector, and the same schedule gives the same timesteps, so that run's
contexts are exactly the previous run's. This store keeps them between runs:

- keyed by the identity of the objects a context is a function of (the prompt, the connector module), held
  weakly: dropping a prompt or a connector drops its entries and never keeps it alive; the rest of the key
  (row, t, device, dtype, weight versions) is plain values, so nothing else can ever match;
- bounded in bytes (`$ELLA_TSC_CONTEXT_STORE_MB`, 256 by default, 0 = off; read in `budget_from_env`), least
  recently used contexts dropped first; contexts stay on the device and in the dtype they were computed in;
- one store per process (`shared_store`), so one budget bounds every patched model ComfyUI keeps cached, and
  a re-executed ELLA Timestep Conditioning (a LoRA or checkpoint changed upstream) still finds the contexts.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Mapping, Optional

import torch

STORE_ENV = "ELLA_TSC_CONTEXT_STORE_MB"
DEFAULT_STORE_MB = 256.0
MIB = 2**20


def budget_from_env(environ: Optional[Mapping[str, str]] = None) -> int:
    """The store's budget in bytes from $ELLA_TSC_CONTEXT_STORE_MB (MiB; unset or empty: 256; 0: off)."""
    raw = (os.environ if environ is None else environ).get(STORE_ENV, "").strip()
    if not raw:
        return int(DEFAULT_STORE_MB * MIB)
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    if not mib >= 0 or mib == float("inf"):
        raise ValueError(f"${STORE_ENV} must be a number of MiB >= 0 (0 turns the ELLA context store off), "
                         f"got {raw!r}")
    return int(mib * MIB)


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's version counter (bumped by every in-place change); -1 for inference tensors (made under
    torch.inference_mode, as ComfyUI loads models), which have none."""
    return -1 if t.is_inference() else t._version


def weights_signature(module: torch.nn.Module) -> tuple:
    """Identity and version counter of every parameter and buffer: changes when weights are replaced or
    modified in place (load_state_dict, copy_), not when the module only moves between devices. Of inference
    tensors only a replacement shows."""
    return tuple((id(t), tensor_version(t)) for t in (*module.parameters(), *module.buffers()))


class ContextStore:
    """Tensors keyed by (identities of `owners`, key), LRU-evicted to stay within `budget_bytes`.

    owners: objects the value is a function of (held by weak reference; when one is collected, its entries
    go). key: hashable plain values that complete the description (never objects that could be reused).
    Thread-safe; a weakref callback that fires during a store operation defers its purge to the next one.
    """

    def __init__(self, budget_bytes: int = int(DEFAULT_STORE_MB * MIB)) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict = OrderedDict()  # full key -> tensor, least recently used first
        self._owners: dict = {}  # id(owner) -> (weakref, set of full keys it is part of)
        self._dead: list = []  # ids of collected owners whose entries are still to be dropped
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, owners: tuple, key: tuple) -> Optional[torch.Tensor]:
        """The stored tensor (now most recently used), or None."""
        with self._lock:
            self._purge_dead()
            if not self._alive(owners):
                return None
            full = self._full_key(owners, key)
            value = self._entries.get(full)
            if value is not None:
                self._entries.move_to_end(full)
            return value

    def put(self, owners: tuple, key: tuple, value: torch.Tensor) -> torch.Tensor:
        """Store `value` (compacted if it is a view of a larger tensor) and return what is stored, so callers
        can share it. A value larger than the whole budget is returned unstored."""
        if value.untyped_storage().nbytes() > value.nbytes or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        size = value.untyped_storage().nbytes()
        with self._lock:
            self._purge_dead()
            full = self._full_key(owners, key)
            if full in self._entries:
                self._drop(full)
            if size > self.budget_bytes:
                return value
            for owner in owners:
                self._watch(owner)[1].add(full)
            self._entries[full] = value
            self.nbytes += size
            self._evict()
        return value

    def resize(self, budget_bytes: int) -> None:
        """A new budget; least recently used entries go until the store fits."""
        with self._lock:
            self.budget_bytes = budget_bytes
            self._purge_dead()
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._owners.clear()
            self._dead.clear()
            self.nbytes = 0

    # -- internals (called with the lock held) ---------------------------------------------------------------
    @staticmethod
    def _full_key(owners: tuple, key: tuple) -> tuple:
        return tuple(id(o) for o in owners), key

    def _alive(self, owners: tuple) -> bool:
        """Every owner is the object registered under its id (an id can be reused after a collection)."""
        for owner in owners:
            record = self._owners.get(id(owner))
            if record is None or record[0]() is not owner:
                return False
        return True

    def _watch(self, owner) -> tuple:
        record = self._owners.get(id(owner))
        if record is None or record[0]() is not owner:
            if record is not None:  # a collected object's id, its entries not purged yet
                self._forget(id(owner))
            store = weakref.ref(self)
            ident = id(owner)
            record = (weakref.ref(owner, lambda _ref: _collected(store, ident)), set())
            self._owners[ident] = record
        return record

    def _forget(self, ident: int) -> None:
        record = self._owners.pop(ident, None)
        for full in list(record[1]) if record is not None else ():
            self._drop(full)

    def _drop(self, full: tuple) -> None:
        value = self._entries.pop(full, None)
        if value is None:
            return
        self.nbytes -= value.untyped_storage().nbytes()
        for ident in full[0]:
            record = self._owners.get(ident)
            if record is not None:
                record[1].discard(full)
                if not record[1]:
                    del self._owners[ident]

    def _evict(self) -> None:
        while self.nbytes > self.budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _purge_dead(self) -> None:
        while self._dead:
            ident = self._dead.pop()
            record = self._owners.get(ident)
            if record is not None and record[0]() is None:
                self._forget(ident)


def _collected(store_ref: "weakref.ref[ContextStore]", ident: int) -> None:
    """Weakref callback: drop a collected owner's entries now, or at the store's next operation when one is in
    progress (the callback may fire inside it, on this thread or another)."""
    store = store_ref()
    if store is None:
        return
    store._dead.append(ident)
    if store._lock.acquire(blocking=False):
        try:
            store._purge_dead()
        finally:
            store._lock.release()


_SHARED = ContextStore()


def shared_store() -> Optional[ContextStore]:
    """The process's store with the budget $ELLA_TSC_CONTEXT_STORE_MB asks for now; None (and emptied) when 0."""
    budget = budget_from_env()
    if budget == 0:
        _SHARED.clear()
        return None
    if budget != _SHARED.budget_bytes:
        _SHARED.resize(budget)
    return _SHARED
