"""Keeping a long-running collector's memory flat.

A collector allocates and frees the same few hundred MB over and over (Arrow chunks, a buffer's
rows read back and sorted at each flush, spool records) from several threads. Freed memory stays
with the allocator unless it is told to give it back: glibc makes one arena per thread (up to 8 per
core) and keeps their free pages; Arrow's mimalloc keeps freed pages for reuse. RSS then climbs
towards the sum of every thread's peak and stays there. So, once at start, glibc gets at most
`ARENAS` arenas; and every `RELEASE_EVERY_S` the housekeeping asks Arrow's pool and glibc to return
free pages to the system (a few ms; nothing in use is touched).

The peak is read from /proc (VmHWM: this process since its exec), not from getrusage: Linux keeps a
process's `ru_maxrss` across fork and exec, so a collector started by a large parent would report
the parent's peak as its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import pyarrow as pa

from engine.log import get_logger

ARENAS = 2
RELEASE_EVERY_S = 10.0
_M_ARENA_MAX = -8  # mallopt parameter number (glibc malloc.h)
log = get_logger(component="memory")


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mallopt  # noqa: B018 - glibc only (musl has neither mallopt nor malloc_trim)
        libc.malloc_trim
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def tune() -> dict:
    """At most `ARENAS` glibc arenas (unless MALLOC_ARENA_MAX is set: the operator's choice), and
    Arrow's pool as `ENGINE_ARROW_POOL` names it (mimalloc, jemalloc or system; default: Arrow's).
    Call before the threads start. Returns what was set, for the log."""
    out: dict = {"arrow_pool": pa.default_memory_pool().backend_name}
    if _LIBC is not None and "MALLOC_ARENA_MAX" not in os.environ:
        out["malloc_arena_max"] = ARENAS if _LIBC.mallopt(_M_ARENA_MAX, ARENAS) == 1 else None
    want = os.environ.get("ENGINE_ARROW_POOL", "").strip().lower()
    if want:
        pools = {"mimalloc": getattr(pa, "mimalloc_memory_pool", None), "jemalloc": getattr(pa, "jemalloc_memory_pool", None),
                 "system": pa.system_memory_pool}
        try:
            pool = pools[want]()
            pa.set_memory_pool(pool)
            if want == "jemalloc":
                pa.jemalloc_set_decay_ms(0)  # return freed pages at once
            out["arrow_pool"] = pool.backend_name
        except (KeyError, TypeError, NotImplementedError, pa.ArrowException) as e:
            log.warning("arrow_pool_unavailable", pool=want, error=str(e)[:200])
    return out


def release() -> None:
    """Return free pages to the system: Arrow's pool, then glibc's arenas."""
    try:
        pa.default_memory_pool().release_unused()
    except (AttributeError, pa.ArrowException):
        pass
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def peak_rss_mb() -> float | None:
    """This process's peak resident set since its exec (VmHWM), in MB; None where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
