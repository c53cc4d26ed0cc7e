"""A fast structural check of a .gguf file before transformers parses it.

transformers reads a truncated GGUF for many seconds and then fails with a numpy reshape error that names
neither the file nor the cause. Walking the header (key/value table and tensor table, per the GGUF spec)
takes milliseconds and tells whether every tensor's bytes are present.
"""

from __future__ import annotations

import mmap
import os
import struct

_MAGIC = b"GGUF"
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
_U64 = struct.Struct("<Q")


class GGUFFileError(ValueError):
    """A .gguf file that is not GGUF, or whose header or tensor data is cut short."""


class _Reader:
    def __init__(self, buf, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFileError(f"{self.path} is truncated inside its GGUF header (at byte {self.pos} of "
                                f"{len(self.buf)}): the download or copy was interrupted; fetch the file again")
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> bytes:
        length = self.take("Q")
        if self.pos + length > len(self.buf):
            self.take(f"{min(length, 1 << 20)}s")  # raises the truncation error
        value = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return value

    def value(self, kind: int):
        if kind in _SCALAR:
            return self.take(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("I"), self.take("Q")
            if item_kind in _SCALAR:  # skip the block in one step
                self.take(f"{count * struct.calcsize(_SCALAR[item_kind])}s")
                return None
            if item_kind == _STRING:  # vocabularies: 10^5 strings, skipped with a tight loop
                pos, end, length_at = self.pos, len(self.buf), _U64.unpack_from
                for _ in range(count):
                    if pos + 8 > end:
                        pos = end + 1
                        break
                    pos += 8 + length_at(self.buf, pos)[0]
                if pos > end:
                    self.pos = end
                    self.take("Q")  # raises the truncation error
                self.pos = pos
                return None
            for _ in range(count):
                self.value(item_kind)
            return None
        raise GGUFFileError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}: the file is corrupt")


def check_gguf_file(path: str | os.PathLike) -> None:
    """Raise GGUFFileError naming `path` unless its header parses and all tensor data is present."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # transformers' own GGUF dependency

    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise GGUFFileError(f"{path} has {size} bytes: not a GGUF file (an interrupted download?)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, path)
        if buf[:4] != _MAGIC:
            raise GGUFFileError(f"{path} does not start with the GGUF magic bytes: not a GGUF file")
        r.pos = 4
        version = r.take("I")
        if version not in (2, 3):
            raise GGUFFileError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = r.take("Q"), r.take("Q")
        alignment = _DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = r.string()
            value = r.value(r.take("I"))
            if key == b"general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        end = 0
        for _ in range(n_tensors):
            name = r.string().decode(errors="replace")
            dims = [r.take("Q") for _ in range(r.take("I"))]
            kind, offset = r.take("I"), r.take("Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise GGUFFileError(f"{path}: tensor {name!r} has unknown GGML type {kind}") from None
            count = 1
            for d in dims:
                count *= d
            end = max(end, offset + count // block * type_size)
        data_start = -(-r.pos // alignment) * alignment
        if data_start + end > size:
            raise GGUFFileError(
                f"{path} is truncated: its header describes {n_tensors} tensors ending at byte {data_start + end} "
                f"but the file has {size} bytes; the download or copy was interrupted, fetch the file again")
