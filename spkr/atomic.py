"""Atomic file writes whose files get the mode a plain ``open(path, "w")`` would give.

``tempfile.mkstemp`` creates its files 0600 whatever the umask, and a temp file renamed into place
keeps that mode, so shards, manifests and checkpoints made that way could not be read by another
user or a web server. Every temp-file + rename writer in spkr uses this module instead:

    mkstemp(suffix, prefix, dir)         tempfile.mkstemp, but created 0666 & ~umask -> (fd, path)
    mkdtemp(suffix, prefix, dir)         tempfile.mkdtemp, but created 0777 & ~umask (staging dirs)
    write_bytes(path, data)              temp file in path's directory, write, fsync, os.replace
    current_umask()                      the process umask, read without changing it

The kernel applies the umask (and a directory's default ACL) when the file is created, exactly as for
``open``: 0644 under umask 022, 0664 under 002, 0600 under 077.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
from pathlib import Path

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_FLAGS |= getattr(os, "O_BINARY", 0)
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask: the ``Umask:`` line of /proc/self/status (Linux >= 4.7), else set and
    restored under a lock (os.umask only returns the old value by replacing it)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def mkstemp(suffix: str = "", prefix: str = ".tmp-", dir: str | os.PathLike | None = None) -> tuple[int, str]:
    """``tempfile.mkstemp`` (same arguments; returns (fd open for writing, absolute path)), except that
    the file is created with mode 0o666, so the umask applies as for any new file."""

    def make(path: str) -> tuple[int, str]:
        return os.open(path, _FLAGS, 0o666), path

    return _create(make, suffix, prefix, dir)


def mkdtemp(suffix: str = "", prefix: str = ".tmp-", dir: str | os.PathLike | None = None) -> str:
    """``tempfile.mkdtemp`` (a staging directory to rename into place), created 0o777 & ~umask
    instead of 0700."""

    def make(path: str) -> str:
        os.mkdir(path, 0o777)
        return path

    return _create(make, suffix, prefix, dir)


def _create(make, suffix: str, prefix: str, dir: str | os.PathLike | None):
    """``make(path)`` for a fresh random name in ``dir`` (retried while the name exists)."""
    directory = os.path.abspath(dir if dir else tempfile.gettempdir())
    for _ in range(100):
        try:
            return make(os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}"))
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free temporary name with prefix {prefix!r}")


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``path`` so that it is either absent/old or complete: a temp file next to it, fsync
    (unless ``fsync=False``), then ``os.replace``. The temp file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


__all__ = ["current_umask", "mkdtemp", "mkstemp", "write_bytes"]
