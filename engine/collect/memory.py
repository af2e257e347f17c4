"""Keeping a long-running collector's memory flat.

A collector allocates and frees the same few hundred MB over and over (Arrow chunks, a buffer's
rows read back and sorted at each flush, spool records) from several threads. Freed memory stays
with the allocator unless it is told to give it back: glibc makes one arena per thread (up to 8 per
core) and keeps their free pages; Arrow's mimalloc keeps freed pages for reuse. RSS then climbs
towards the sum of every thread's peak and stays there. So, once at start, glibc gets at most
`ARENAS` arenas; and every `RELEASE_EVERY_S` the housekeeping asks Arrow's pool and glibc to return
free pages to the system (a few ms; nothing in use is touched).

Between those releases glibc keeps what it frees: blocks up to `MMAP_THRESHOLD` come from its
arenas (not a fresh mmap each) and up to `TRIM_THRESHOLD` of free memory stays mapped. Otherwise
every chunk's few-MB arrays were mapped, zeroed by the kernel page by page and unmapped again: a
third of the collector's CPU was kernel time, half of it page faults. Arrow's mimalloc likewise
keeps a freed page `MIMALLOC_PURGE_DELAY_MS` before giving it back (its default, 10 ms, gave back
and faulted in again the same 2 MB pages for every chunk); it reads that option once, when pyarrow
loads, so `before_arrow` sets it first. And the process uses no transparent huge pages: numpy and
mimalloc ask for them, and each first touch then makes the kernel zero 2 MB, of which a chunk's
arrays use a part before they are freed again; with 4 kB pages the collector's kernel time halved
and its RSS fell by ~25 MB.

The peak is read from /proc (VmHWM: this process since its exec), not from getrusage: Linux keeps a
process's `ru_maxrss` across fork and exec, so a collector started by a large parent would report
the parent's peak as its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from engine.log import get_logger  # no pyarrow at import: `before_arrow` must run before it loads

ARENAS = 2
RELEASE_EVERY_S = 10.0
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 64 << 20
MIMALLOC_PURGE_DELAY_MS = 5000
_M_ARENA_MAX = -8  # mallopt parameter numbers (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
_PR_SET_THP_DISABLE = 41  # prctl option (linux/prctl.h)
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


def before_arrow() -> None:
    """Arrow's mimalloc keeps freed pages `MIMALLOC_PURGE_DELAY_MS` (unless MIMALLOC_PURGE_DELAY is
    set). Effective only before pyarrow is first imported: `data-engine collect` calls it first."""
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", str(MIMALLOC_PURGE_DELAY_MS))


def tune() -> dict:
    """At most `ARENAS` glibc arenas, freed blocks kept up to the thresholds above (each unless its
    MALLOC_*_ variable is set: the operator's choice), no transparent huge pages for this process,
    and Arrow's pool as `ENGINE_ARROW_POOL` names it (mimalloc, jemalloc or system; default:
    Arrow's). Call before the threads start. Returns what was set, for the log."""
    import pyarrow as pa

    out: dict = {"arrow_pool": pa.default_memory_pool().backend_name,
                 "mimalloc_purge_delay_ms": os.environ.get("MIMALLOC_PURGE_DELAY")}
    if _LIBC is not None:
        for key, param, value in (("MALLOC_ARENA_MAX", _M_ARENA_MAX, ARENAS),
                                  ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                  ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
            if key not in os.environ:
                out[key.strip("_").lower()] = value if _LIBC.mallopt(param, value) == 1 else None
        out["thp_disabled"] = _LIBC.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
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
    import pyarrow as pa

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
