"""Exchange timestamps as int ns since the epoch: RFC 3339 text parsed one at a time (cached per
minute: the hot path) or in bulk (Arrow), and the fallback of absurd ones to envelope or receive time."""

from __future__ import annotations

import calendar

import numpy as np
import pyarrow as pa

from engine.schema import MAX_SKEW_NS
from engine.timeutil import NS

DEFAULT_MAX_SKEW_NS = MAX_SKEW_NS  # an exchange timestamp further than this from recv is absurd
_NULL_TS = np.iinfo(np.int64).min  # an absent or unparseable time in bulk results

_HOUR_CACHE: dict[str, int] = {}


def _hour_base(prefix: str) -> int:
    base = _HOUR_CACHE.get(prefix)
    if base is None:
        if len(prefix) != 13 or prefix[4] != "-" or prefix[7] != "-" or prefix[10] not in "Tt ":
            raise ValueError(f"bad timestamp prefix {prefix!r}")
        y, mo, d, h = int(prefix[0:4]), int(prefix[5:7]), int(prefix[8:10]), int(prefix[11:13])
        if not (1 <= mo <= 12 and 1 <= d <= 31 and 0 <= h <= 23):
            raise ValueError(f"bad timestamp prefix {prefix!r}")
        base = calendar.timegm((y, mo, d, h, 0, 0)) * NS
        if len(_HOUR_CACHE) > 100_000:
            _HOUR_CACHE.clear()
        _HOUR_CACHE[prefix] = base
    return base


_MIN_CACHE: dict[str, int] = {}


def parse_ts(s: str) -> int:
    """RFC 3339 (UTC 'Z' or numeric offset, 0-9 fractional digits) -> ns since the epoch."""
    if s[-1:] == "Z" and s[16:17] == ":":  # fast path: cached minute, then seconds and fraction
        base = _MIN_CACHE.get(s[:16])
        if base is not None:
            body = s[17:-1]
            if len(body) > 3 and body[2] == "." and len(body) <= 12 and body[3:].isdigit() and body[:2].isdigit():
                return base + int(body[:2]) * NS + int((body[3:] + "00000000")[:9])
            if len(body) == 2 and body.isdigit():
                return base + int(body) * NS
    t = _parse_ts_slow(s)
    if s[-1:] == "Z" and len(s) >= 20:
        if len(_MIN_CACHE) > 100_000:
            _MIN_CACHE.clear()
        _MIN_CACHE[s[:16]] = _hour_base(s[:13]) + int(s[14:16]) * 60 * NS
    return t


def _parse_ts_slow(s: str) -> int:
    base = _hour_base(s[:13])
    if s[13] != ":" or s[16] != ":":
        raise ValueError(f"bad timestamp {s!r}")
    t = base + (int(s[14:16]) * 60 + int(s[17:19])) * NS
    rest = s[19:]
    if rest[-1:] in ("Z", "z"):
        body, off = rest[:-1], 0
    elif len(rest) >= 6 and rest[-6] in "+-" and rest[-3] == ":":
        body = rest[:-6]
        off = (int(rest[-5:-3]) * 60 + int(rest[-2:])) * 60 * NS
        if rest[-6] == "-":
            off = -off
    else:
        raise ValueError(f"bad timestamp {s!r}")
    if body:
        if body[0] != "." or len(body) > 10 or not body[1:].isdigit():
            raise ValueError(f"bad timestamp {s!r}")
        t += int((body[1:] + "000000000")[:9])
    return t - off



def bulk_ts(strings: list[str | None] | pa.Array) -> np.ndarray:
    """RFC 3339 strings -> int64 ns (vectorized by Arrow); unparseable or None -> _NULL_TS."""
    try:
        arr = strings if isinstance(strings, pa.Array) else pa.array(strings, pa.string())
        arr = arr.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64())
        return np.array(arr.fill_null(_NULL_TS).to_numpy(zero_copy_only=False), np.int64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # one bad string: parse one by one
        if isinstance(strings, pa.Array):
            strings = strings.to_pylist()
        out = np.empty(len(strings), np.int64)
        for i, v in enumerate(strings):
            try:
                out[i] = parse_ts(v) if v else _NULL_TS
            except (ValueError, IndexError, TypeError):
                out[i] = _NULL_TS
        return out


def settle_ts(ts: np.ndarray, recv: np.ndarray, envelope, max_skew_ns: int) -> int:
    """Exchange times that are unparseable (_NULL_TS) or `max_skew_ns` or more from the receive time
    fall back to the envelope time, then to the receive time. `ts` is fixed in place; `envelope(bad)`
    gives the envelope times (ns, _NULL_TS when absent) for a row mask, only called when a row is bad.
    Returns the number of rows that fell back."""
    bad = (ts == _NULL_TS) | (np.abs(recv - ts) >= max_skew_ns)
    if not bad.any():
        return 0
    env = envelope(bad)
    env_ok = bad & (env != _NULL_TS) & (np.abs(recv - env) < max_skew_ns)
    ts[env_ok] = env[env_ok]
    rest = bad & ~env_ok
    ts[rest] = recv[rest]
    return int(bad.sum())

