"""Small text renderings for the Dagster UI (no Dagster imports): an hourly sparkline of a day and
human durations, so a partition's metadata shows its shape at a glance."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.timeutil import NS, NS_PER_HOUR

if TYPE_CHECKING:
    import numpy as np

BLOCKS = "▁▂▃▄▅▆▇█"
EMPTY = "·"  # an hour without rows: visibly different from a quiet one (▁)


def hourly_counts(ns: np.ndarray, day0: int, hours: int = 24) -> list[int]:
    """Rows per UTC hour of the day starting at `day0` (int64 ns times; rows outside are ignored)."""
    import numpy as np

    ns = np.asarray(ns, dtype=np.int64)
    h = (ns - day0) // NS_PER_HOUR
    h = h[(h >= 0) & (h < hours)]
    return np.bincount(h, minlength=hours).astype(int).tolist()


RULER = "0     6     12    18    "  # under a 24-hour sparkline


def sparkline(values, empty: str = EMPTY, top: float | None = None) -> str:
    """One block character per value, scaled to `top` (default the largest); zero or None is
    `empty`, any positive value at least ▁."""
    vals = [float(v) if v is not None else None for v in values]
    if top is None:
        top = max((v for v in vals if v is not None), default=0.0)
    out = []
    for v in vals:
        if v is None or v <= 0 or top <= 0:
            out.append(empty)
        else:
            out.append(BLOCKS[min(len(BLOCKS) - 1, int(v / top * (len(BLOCKS) - 1) + 0.5))])
    return "".join(out)


def hourly_markdown(counts: list[int], what: str = "rows") -> str:
    """Markdown for a day's hourly counts: the sparkline over an hour ruler, with the peak and the total."""
    peak = max(range(len(counts)), key=lambda i: counts[i]) if counts else 0
    covered = sum(1 for c in counts if c)
    return (f"```\n{sparkline(counts)}\n{RULER}(UTC hour)\n```\n"
            f"{what} per hour: peak {counts[peak] if counts else 0:,} at {peak:02d}:00, total {sum(counts):,}, "
            f"{covered}/{len(counts)} hours with {what} (· = none)")


def fmt_duration(ns: int | float) -> str:
    """`950 ms`, `42.0 s`, `5 min 03 s`, `2 h 07 min`, `1 d 03 h`: readable at a glance."""
    s = float(ns) / NS
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600):02d} h"
