"""Reading tar shards as a stream, strictly: a shard cut short is an error, not a shorter shard.

Python's tarfile (and webdataset through it) takes a stream that stops on a member boundary for a complete
archive, so the samples after the cut vanish unseen. Here the end-of-archive block is required, every
header's checksum is verified, and the members come out as (name, bytes) in order. Handles POSIX ustar
(name prefix), GNU long names and pax `path` records, which is what tar, tarfile and webdataset's writers
produce.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

class TruncatedTar(Exception):
    """The archive ends before its end-of-archive marker (inside a header or a member)."""


class CorruptTar(Exception):
    """A header whose checksum does not match: the rest of the archive cannot be located."""


def _read_exact(stream: Any, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _tar_number(field_bytes: bytes) -> int:
    if field_bytes[:1] and field_bytes[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise CorruptTar(f"not a tar header (field {text[:12]!r})") from None


def tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a POSIX/GNU/pax tar stream, in order. Raises TruncatedTar when
    the stream stops before the end-of-archive marker, CorruptTar on a damaged header. (tarfile treats a
    stream that stops at a member boundary as complete, which would lose the samples after it unseen.)"""
    offset = 0
    long_name: Optional[str] = None
    pax_name: Optional[str] = None
    while True:
        header = _read_exact(stream, 512)
        if len(header) < 512:
            raise TruncatedTar(f"ends at byte {offset + len(header)}, inside a header or before the end marker")
        if header == b"\0" * 512:
            return
        if _tar_number(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise CorruptTar(f"bad header checksum at byte {offset}")
        size = _tar_number(header[124:136])
        kind = header[156:157]
        data = _read_exact(stream, size)
        padding = _read_exact(stream, -size % 512)
        if len(data) < size or len(padding) < -size % 512:
            raise TruncatedTar(f"ends at byte {offset + 512 + len(data) + len(padding)}, inside a member")
        offset += 512 + size + len(padding)
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":
            pax_name = _pax_path(data)
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = pax_name = None
            continue  # folders, links, global headers
        yield pax_name or long_name or name.decode("utf-8", "surrogateescape"), data
        long_name = pax_name = None


def _pax_path(data: bytes) -> Optional[str]:
    """The `path` record of a pax extended header ("<len> path=<name>\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space] or 0)
        if length <= 0:
            break
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None
