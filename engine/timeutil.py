"""Time arguments as users write them (dates, ISO strings, datetimes, int ns) → int ns UTC, and result
time columns from int ns (storage, engine code) to Datetime("ns", "UTC") (what researchers get)."""

from __future__ import annotations

import datetime as dt
import numbers
import re
import time
from zoneinfo import ZoneInfo

NS = 1_000_000_000  # the time units, defined here once (engine.schema re-exports the hour and the day)
NS_PER_HOUR = 3600 * NS
NS_PER_DAY = 24 * NS_PER_HOUR
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
US_EASTERN = ZoneInfo("America/New_York")  # Kalshi's tickers and close times are US Eastern (EST/EDT)


def to_ns(value, *, name: str = "time") -> int | None:
    """Int ns UTC of a time argument; a time without a zone (naive datetime, ISO string without
    offset, NumPy datetime64) is read as UTC, never as the machine's local time."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a date, datetime, ISO string or int ns, got bool")
    if isinstance(value, numbers.Integral):  # int, NumPy integers
        return int(value)
    if type(value).__name__ == "Timestamp" and isinstance(getattr(value, "value", None), int):
        return value.value  # pandas: ns since the epoch (UTC when aware, the wall time as UTC when naive)
    if type(value).__name__ == "datetime64":  # NumPy scalar (zone-less by definition)
        import numpy as np

        if np.isnat(value):
            raise ValueError(f"{name}: NaT is not a time")
        return int(value.astype("datetime64[ns]").astype(np.int64))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        # exact integer arithmetic: int(timestamp()) truncates towards zero, wrong before 1970
        return (value - _EPOCH) // dt.timedelta(microseconds=1) * 1000
    if isinstance(value, dt.date):
        return to_ns(dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc))
    if isinstance(value, str):
        s = value.strip()
        try:
            if len(s) == 10:
                return to_ns(dt.date.fromisoformat(s))
            return to_ns(dt.datetime.fromisoformat(s.replace("Z", "+00:00")))
        except ValueError:
            raise ValueError(f"{name}: cannot parse {value!r}; use YYYY-MM-DD, an ISO datetime, a datetime or int ns") from None
    raise TypeError(f"{name}: expected a date, datetime, ISO string or int ns, got {type(value).__name__}")


def result_times(frame, cols, *, raw_ns: bool = False):
    """`frame` (Polars DataFrame or LazyFrame) with its time columns `cols` as Datetime("ns", "UTC"),
    what researchers expect (int64 ns → Datetime ns is a free reinterpretation), or as int64 ns with
    `raw_ns=True`, what the engine computes with. Either form is accepted; zone-less datetimes are UTC."""
    import polars as pl  # lazily: collectors import this module and never need Polars here

    want = pl.Datetime("ns", "UTC")
    sch = frame.collect_schema() if isinstance(frame, pl.LazyFrame) else frame.schema
    exprs = []
    for c in cols:
        t = sch.get(c)
        if t is None:
            continue
        if isinstance(t, pl.Datetime):
            e = pl.col(c) if t.time_zone else pl.col(c).dt.replace_time_zone("UTC")
            if raw_ns:
                exprs.append(e.dt.epoch("ns"))
            elif t != want:
                exprs.append(e.dt.convert_time_zone("UTC").dt.cast_time_unit("ns"))
        elif t.is_integer():
            if not raw_ns:
                exprs.append(pl.col(c).cast(pl.Int64).cast(want))
            elif t != pl.Int64:
                exprs.append(pl.col(c).cast(pl.Int64))
    return frame.with_columns(exprs) if exprs else frame


def now_ns() -> int:
    return time.time_ns()


def us_eastern(ns: int) -> dt.datetime:
    """The US Eastern wall-clock time (EST or EDT, as the date has it) at `ns`, to the second."""
    return dt.datetime.fromtimestamp(ns // NS, US_EASTERN)


def iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / NS, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": NS, "m": 60 * NS, "min": 60 * NS,
          "h": NS_PER_HOUR, "d": NS_PER_DAY, "w": 7 * NS_PER_DAY}
_DUR = re.compile(r"(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|min|s|m|h|d|w)")


def parse_duration(value, *, name: str = "duration") -> int | None:
    """'30s', '1m' (minute), '1h30m', '250ms', a timedelta or int ns → int ns (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a duration like '30s', got bool")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name}: must be positive, got {value}")
        return value

    if isinstance(value, dt.timedelta):
        ns = value.days * NS_PER_DAY + value.seconds * NS + value.microseconds * 1000
        if ns <= 0:
            raise ValueError(f"{name}: must be positive, got {value}")
        return ns
    if isinstance(value, str):
        s = value.strip().lower()
        pos, total = 0, 0
        for m in _DUR.finditer(s):
            if m.start() != pos:
                break
            total += int(float(m.group(1)) * _UNITS[m.group(2)])
            pos = m.end()
        if pos == len(s) and total > 0:
            return total
    raise ValueError(f"{name}: cannot parse {value!r}; use e.g. '500ms', '30s', '1m', '1h', '1d' or int nanoseconds")
