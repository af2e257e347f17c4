"""Whole-file SHA-256 checks against the catalog, once per file per process.

Page checksums (verified by every pyarrow read) cover page data only; DuckDB ignores them (measured
with duckdb 2.0.1: a flipped byte in a page changed `sum(price)` silently). So a file is hashed the
first time a process hands it to DuckDB or opens it from the read cache. A file that rots after that
check, while the same process keeps using it, is caught by pyarrow reads (page checksums) and by
the next process, not by DuckDB in this one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from engine.errors import CorruptFileError
from engine.fsio import sha256_file

_lock = threading.Lock()
_checked: set[tuple] = set()


def _ident(path: Path, sha256: str) -> tuple:
    """The file as it is now: replacing or rewriting it (new inode, size or mtime) checks it again."""
    st = os.stat(path)
    return str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256


def mark_checked(path: Path, sha256: str) -> None:
    """Record a file this process has just hashed itself (a verified download)."""
    with _lock:
        _checked.add(_ident(path, sha256))


def check_once(path: Path, key: str, sha256: str) -> None:
    """Raise CorruptFileError naming `key` unless `path` hashes to the catalog's `sha256`."""
    ident = _ident(path, sha256)
    with _lock:
        if ident in _checked:
            return
    got = sha256_file(path)
    if got != sha256:
        raise CorruptFileError(key, f"SHA-256 of {path} is {got[:12]}…, the catalog says {sha256[:12]}…")
    with _lock:
        _checked.add(ident)


def forget(path: Path) -> None:
    """Drop what is known about `path` (it was deleted or found damaged)."""
    p = str(path)
    with _lock:
        _checked.difference_update({i for i in _checked if i[0] == p})
