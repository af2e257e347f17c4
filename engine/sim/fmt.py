"""Wire formats shared by the generators and the replay protocols: times and decimal strings."""

from __future__ import annotations

import calendar
import datetime as dt

DEFAULT_START_NS = 1795712400 * 10**9  # 2026-11-26T17:00:00Z: generated captures start here unless told


def fmt_rfc3339(ns: int, digits: int) -> str:
    """RFC 3339 UTC with up to `digits` fractional digits, trailing zeros trimmed (Coinbase style)."""
    sec, frac = divmod(ns, 10**9)
    base = dt.datetime.fromtimestamp(sec, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    f = f"{frac:09d}"[:digits].rstrip("0")
    return f"{base}.{f}Z" if f else f"{base}Z"


def fmt_iso_seconds(ns: int) -> str:
    """RFC 3339 with whole seconds (Kalshi REST times)."""
    return dt.datetime.fromtimestamp(ns // 10**9, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_fixed(units: int, scale: int) -> str:
    """Integer `units` of 10**-scale as a decimal string with trailing zeros trimmed ("65062.5", "0")."""
    neg = units < 0
    units = abs(units)
    ip, fp = divmod(units, 10**scale)
    s = str(ip)
    if fp:
        s += "." + f"{fp:0{scale}d}".rstrip("0")
    return "-" + s if neg else s


def fmt_dp(units: int, scale: int) -> str:
    """Integer units of 10**-scale with exactly `scale` decimals ("0.2100", "-100.00")."""
    neg = units < 0
    ip, fp = divmod(abs(units), 10**scale)
    return f"{'-' if neg else ''}{ip}.{fp:0{scale}d}"


def parse_start(s: str | None) -> int:
    """A start time for a generator: ISO 8601 (UTC unless it says otherwise) or Unix s / ns."""
    if not s:
        return DEFAULT_START_NS
    if s.isdigit():
        v = int(s)
        return v if v > 10**15 else v * 10**9
    t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return calendar.timegm(t.utctimetuple()) * 10**9 + t.microsecond * 1000


def parse_time_ns(s) -> int:
    """A REST time (ISO 8601, or Unix s / ns) as Unix ns."""
    if isinstance(s, (int, float)):
        return int(s * 10**9) if s < 10**12 else int(s)
    t = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000
