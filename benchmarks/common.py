"""Helpers shared by the benchmark scripts: timing, RSS, and a markdown results table."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager


@contextmanager
def timer(out: dict, name: str):
    t0 = time.perf_counter()
    yield
    out[name] = time.perf_counter() - t0


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[tuple], headers: tuple) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
