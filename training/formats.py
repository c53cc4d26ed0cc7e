"""The one rule that tells a source's format from data.format and data.path, used both by the config check
(before torch is imported: this module imports neither torch nor the readers) and by the data readers, so
the settings and the loop cannot disagree on what a path is (and so on whether a run streams)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

FORMATS = ("folder", "jsonl", "csv", "webdataset")


def resolve_format(fmt: str, path: Any) -> Optional[str]:
    """data.format itself unless "auto"; else from data.path: a list of shards, a .jsonl or .csv manifest,
    a .tar name/brace pattern or a URL, a folder holding .tar files (webdataset), another folder (images).
    None when the path says nothing (a missing file with another name): callers say what to do."""
    if fmt != "auto":
        return fmt
    if isinstance(path, (list, tuple)):
        return "webdataset"
    p = str(path)
    if p.endswith(".jsonl"):
        return "jsonl"
    if p.endswith(".csv"):
        return "csv"
    if ".tar" in p or p.startswith(("http://", "https://", "pipe:")):
        return "webdataset"
    folder = Path(p).expanduser()
    if folder.is_dir():
        return "webdataset" if any(folder.glob("*.tar")) else "folder"
    return None
