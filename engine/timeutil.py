"""Time arguments as users write them (dates, ISO strings, datetimes, int ns) → int ns UTC."""

from __future__ import annotations

import datetime as dt
import time

NS = 1_000_000_000


def to_ns(value, *, name: str = "time") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a date, datetime, ISO string or int ns, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp()) * NS + value.microsecond * 1000
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


def now_ns() -> int:
    return time.time_ns()


def iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / NS, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")
