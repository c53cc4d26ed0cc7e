"""The mode of files written atomically: what a plain `open(path, "w")` would give under the user's umask.

`tempfile.mkstemp` creates its file with mode 0600 whatever the umask, so a file written through it and
renamed into place (connectors, checkpoints, cache shards) would be unreadable for a ComfyUI running as
another user of the same group. Every atomic writer calls `match_umask` on its temporary file before the
rename.
"""

from __future__ import annotations

import os
import threading

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask. Read from /proc where it is listed (no change to process state), else set and
    restored under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0o666 less the umask: the mode `open()` gives a new file."""
    return 0o666 & ~current_umask()


def match_umask(fd_or_path: int | str | os.PathLike) -> None:
    """Gives a file made by mkstemp (mode 0600) the mode a plain `open()` would have given it."""
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, default_file_mode())
    else:
        os.chmod(fd_or_path, default_file_mode())
