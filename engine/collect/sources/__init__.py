"""Shared pieces of the per-exchange normalizers (one module per exchange beside this one).

A normalizer turns raw text frames into canonical rows. The live collector and the offline
`ingest` call exactly the same methods (`on_connect`, `on_disconnect`, `feed`, `take`), so the
same capture always gives the same rows.

Rows are appended column-wise: per-row values (price, size, side, ts) go into plain Python
lists that are extended once per message with C-level iterators; per-message constants
(receive time, market, instrument, sequence number, snapshot flag) are stored once per
message as a "run" and expanded with numpy when the chunk is converted to Arrow.
"""

from __future__ import annotations

import calendar
import gc
import math
import struct
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from engine.log import get_logger
from engine.schema import GAPS_SCHEMA, L2_SCHEMA, MAX_SKEW_NS, TRADES_SCHEMA, drop_faulty_rows
from engine.timeutil import NS

CHUNK_ROWS = 65_536
DEFAULT_MAX_SKEW_NS = MAX_SKEW_NS  # an exchange timestamp further than this from recv is absurd
DICT_T = pa.dictionary(pa.int32(), pa.string())
SIDE_MAP = {"bid": "bid", "ask": "ask", "offer": "ask", "buy": "bid", "sell": "ask"}

# ----------------------------------------------------------------------------------------------
# RFC 3339 timestamps -> int ns, with a cache of the "YYYY-MM-DDTHH" prefix


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


def fixed_units(s: str, digits: int) -> int:
    """Exact decimal string -> integer in units of 10**-digits ("0.2100", 4 -> 2100; "-1.5", 2 -> -150).

    Raises ValueError on anything that is not a plain decimal or has nonzero digits beyond `digits`.
    """
    neg = s[:1] == "-"
    if neg or s[:1] == "+":
        s = s[1:]
    whole, dot, frac = s.partition(".")
    if not (whole.isdigit() or (whole == "" and dot and frac)):
        raise ValueError(f"bad decimal {s!r}")
    if frac:
        if not frac.isdigit():
            raise ValueError(f"bad decimal {s!r}")
        if len(frac) > digits:
            if frac[digits:].strip("0"):
                raise ValueError(f"too many decimals in {s!r}")
            frac = frac[:digits]
    v = int(whole or "0") * 10**digits + (int(frac.ljust(digits, "0")) if frac else 0)
    return -v if neg else v


def finite_sum_ok(xs: list[float]) -> bool:
    s = math.fsum(xs) if len(xs) < 4 else sum(xs)
    return s == s and s not in (math.inf, -math.inf)


# ----------------------------------------------------------------------------------------------
# Column builders


def _rep(a: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    """Expand per-run values to rows (counts None: every run is one row)."""
    return a if counts is None else np.repeat(a, counts)


def dict_runs(values: list[str], counts: np.ndarray | None) -> pa.DictionaryArray:
    enc = pa.array(values, DICT_T)
    if counts is None and enc.null_count == 0:
        return enc
    idx = _rep(enc.indices.to_numpy(zero_copy_only=False).astype(np.int32), counts)
    return pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), enc.dictionary)


def const_dict(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32), pa.int32()), pa.array([value], pa.string()))


def _side_dict(values: list[str], counts: np.ndarray | None) -> pa.DictionaryArray:
    enc = pa.array(values, DICT_T)
    raw = enc.dictionary.to_pylist()
    mapped = [SIDE_MAP[v] for v in raw]  # KeyError -> bulk conversion fails -> slow path
    uniq = sorted(set(mapped))
    remap = np.array([uniq.index(m) for m in mapped], np.int32)
    idx = remap[enc.indices.to_numpy(zero_copy_only=False)] if len(raw) else np.zeros(0, np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(_rep(idx, counts), pa.int32()), pa.array(uniq, pa.string()))


def _opt_int_runs(values: list[int | None], counts: np.ndarray | None) -> pa.Array:
    arr = pa.array(values, pa.int64())
    if arr.null_count == 0:
        return arr if counts is None else pa.array(np.repeat(arr.to_numpy(), counts), pa.int64())
    mask = _rep(np.array([v is None for v in values], bool), counts)
    filled = _rep(arr.fill_null(0).to_numpy(), counts)
    return pa.array(filled, pa.int64(), mask=mask)


_NULL_TS = np.iinfo(np.int64).min


def float_array(values: list) -> np.ndarray:
    """Floats, or decimal strings kept raw from the wire (converted here in bulk by Arrow).

    A chunk mixing floats and raw strings raises (the caller then converts it run by run, each
    run being all floats or all strings)."""
    if values and type(values[0]) is str:
        return pa.array(values, pa.string()).cast(pa.float64()).to_numpy(zero_copy_only=False)
    try:  # struct.pack reads the floats in one C loop: half the time of array.array or np.array
        return np.frombuffer(struct.pack(f"{len(values)}d", *values), np.float64)
    except struct.error:  # not a float (a raw string) among them
        if any(type(v) is str for v in values):
            raise ValueError("raw decimal strings among parsed floats") from None
        return np.array(values, np.float64)


def int_array(values) -> np.ndarray:
    """Python ints -> int64 array (np.fromiter: faster than np.array for ints of any size)."""
    return np.fromiter(values, np.int64, len(values))


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


def absurd_runs(pr: np.ndarray, sz: np.ndarray, counts: np.ndarray):
    """Runs (of `counts` rows each) holding a NaN/inf price or size, a negative size or a
    non-positive price: (their indices, run mask to keep, row mask to keep), or None if there are none."""
    ok = np.isfinite(pr) & np.isfinite(sz) & (pr > 0.0) & (sz >= 0.0)
    if ok.all():
        return None
    run_of_row = np.repeat(np.arange(len(counts)), counts)
    bad = np.unique(run_of_row[~ok])
    keep_run = np.ones(len(counts), bool)
    keep_run[bad] = False
    return bad.tolist(), keep_run, keep_run[run_of_row]


class L2Cols:
    """Columnar accumulator for l2 rows of one source.

    Per row only price and size are stored (lists extended once per message). Everything constant
    over a run of rows of one message is one tuple per run:
        (n, recv_ns, ts_ns | None, event_time_str | None, envelope_time_str | None,
         market, instrument, side, seq, snapshot)
    Timestamp strings are parsed in bulk by Arrow at conversion; an event time that is unparseable
    or further than `max_skew_ns` from the receive time falls back to the envelope time, then to
    the receive time (counted in `ts_fallbacks`). Rows with a NaN/inf price or size, a negative size
    or a non-positive price are found in bulk too: their runs are dropped and reported through
    `on_bad_run`, never the chunk.
    """

    __slots__ = ("source", "price", "size", "runs", "rows", "max_skew_ns", "ts_fallbacks", "last_lag")

    def __init__(self, source: str, max_skew_ns: int = DEFAULT_MAX_SKEW_NS):
        self.source = source
        self.max_skew_ns = max_skew_ns
        self.ts_fallbacks = 0
        self.last_lag: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.price: list[float] = []
        self.size: list[float] = []
        self.runs: list[tuple] = []
        self.rows = 0

    def run(self, n: int, recv: int, ts: int, market: str, instrument: str, side: str, seq: int | None, snap: bool) -> None:
        """The last `n` appended price/size values share these values (ts already in ns)."""
        self.runs.append((n, recv, ts, None, None, market, instrument, side, seq, snap))
        self.rows += n

    def _resolve_ts(self, recv: np.ndarray, ts_: tuple, et_: tuple, env_: tuple) -> np.ndarray:
        if not any(et_):
            return np.array(ts_, np.int64)
        ts = bulk_ts(list(et_))
        given = np.array([t if t is not None else _NULL_TS for t in ts_], np.int64)
        has = given != _NULL_TS
        ts[has] = given[has]
        self.ts_fallbacks += settle_ts(
            ts, recv, lambda bad: bulk_ts([v if b else None for v, b in zip(env_, bad)]), self.max_skew_ns)
        return ts

    def _build(self, runs: list[tuple], price: list[float], size: list[float], on_bad=None) -> pa.Table | None:
        n_, recv_, ts_, et_, env_, mkt_, inst_, side_, seq_, snap_ = zip(*runs)
        counts = int_array(n_)
        n = int(counts.sum())
        if n != len(price) or n != len(size):
            raise ValueError("run/row count mismatch")
        pr = float_array(price)
        sz = float_array(size)
        absurd = absurd_runs(pr, sz, counts)
        if absurd is not None:  # drop the runs holding absurd values, keep the rest
            bad_runs, keep_run, keep_row = absurd
            if on_bad is not None:
                for i in bad_runs:
                    on_bad(runs[i], "absurd price or size")
            runs = [r for r, k in zip(runs, keep_run.tolist()) if k]
            if not runs:
                return None
            return self._build(runs, pr[keep_row].tolist(), sz[keep_row].tolist(), on_bad)
        recv = int_array(recv_)
        ts = self._resolve_ts(recv, ts_, et_, env_)
        self.last_lag = int(recv[-1] - ts[-1])
        if n == len(runs) and (counts == 1).all():
            counts = None  # one row per run (Kalshi deltas): nothing to expand
        mkt_arr = dict_runs(list(mkt_), counts)
        cols = [
            pa.array(_rep(ts, counts), pa.int64()),
            pa.array(_rep(recv, counts), pa.int64()),
            const_dict(self.source, n),
            mkt_arr,
            mkt_arr if inst_ == mkt_ else dict_runs(list(inst_), counts),  # Coinbase: instrument == market
            _side_dict(list(side_), counts),
            pa.array(pr, pa.float64()),
            pa.array(sz, pa.float64()),
            _opt_int_runs(list(seq_), counts),
            pa.array(_rep(np.array(snap_, bool), counts), pa.bool_()),
        ]
        return pa.Table.from_arrays(cols, schema=L2_SCHEMA)

    def take(self, on_bad=None) -> pa.Table | None:
        if not self.runs:
            return None
        runs, price, size = self.runs, self.price, self.size
        self._reset()
        gc_was = gc.isenabled()
        gc.disable()  # the conversion allocates many short-lived tuples and creates no cycles
        try:
            return self._build(runs, price, size, on_bad)
        except Exception:  # noqa: BLE001 - one bad message must not cost the chunk: redo run by run
            parts, row = [], 0
            for r in runs:
                k = r[0]
                try:
                    t = self._build([r], price[row:row + k], size[row:row + k], on_bad)
                    if t is not None:
                        parts.append(t)
                except Exception as e1:  # noqa: BLE001
                    if on_bad is not None:
                        on_bad(r, f"conversion failed: {e1!r}"[:200])
                row += k
            return pa.concat_tables(parts).unify_dictionaries() if parts else None
        finally:
            if gc_was:
                gc.enable()


class TradeCols:
    __slots__ = ("source", "ts", "recv", "mkt", "inst", "side", "price", "size", "tid", "seq")

    def __init__(self, source: str):
        self.source = source
        self._reset()

    def _reset(self) -> None:
        self.ts: list[int] = []
        self.recv: list[int] = []
        self.mkt: list[str] = []
        self.inst: list[str] = []
        self.side: list[str] = []
        self.price: list[float] = []
        self.size: list[float] = []
        self.tid: list[str] = []
        self.seq: list[int | None] = []

    @property
    def rows(self) -> int:
        return len(self.ts)

    def add(self, ts, recv, market, instrument, side, price, size, trade_id, seq) -> None:
        self.ts.append(ts)
        self.recv.append(recv)
        self.mkt.append(market)
        self.inst.append(instrument)
        self.side.append(side)
        self.price.append(price)
        self.size.append(size)
        self.tid.append(trade_id)
        self.seq.append(seq)

    def take(self) -> pa.Table | None:
        if not self.ts:
            return None
        n = len(self.ts)
        ones = np.ones(n, np.int64)
        t = pa.Table.from_arrays(
            [
                pa.array(self.ts, pa.int64()),
                pa.array(self.recv, pa.int64()),
                const_dict(self.source, n),
                dict_runs(self.mkt, ones),
                dict_runs(self.inst, ones),
                pa.array(self.side, pa.string()).dictionary_encode(),
                pa.array(self.price, pa.float64()),
                pa.array(self.size, pa.float64()),
                pa.array(self.tid, pa.string()),
                pa.array(self.seq, pa.int64()),
            ],
            schema=TRADES_SCHEMA,
        )
        self._reset()
        return t


class GapCols:
    def __init__(self, source: str):
        self.source = source
        self.rows_: list[tuple] = []

    @property
    def rows(self) -> int:
        return len(self.rows_)

    def add(self, market: str, instrument: str | None, start_ts: int, end_ts: int, kind: str, detail: str | None) -> None:
        self.rows_.append((market, instrument, int(start_ts), int(max(end_ts, start_ts)), kind, detail))

    def take(self) -> pa.Table | None:
        if not self.rows_:
            return None
        cols = list(zip(*self.rows_))
        t = pa.Table.from_arrays(
            [
                pa.array([self.source] * len(self.rows_), pa.string()).dictionary_encode(),
                pa.array(cols[0], pa.string()).dictionary_encode(),
                pa.array(cols[1], pa.string()).dictionary_encode(),
                pa.array(cols[2], pa.int64()),
                pa.array(cols[3], pa.int64()),
                pa.array(cols[4], pa.string()).dictionary_encode(),
                pa.array(cols[5], pa.string()),
            ],
            schema=GAPS_SCHEMA,
        )
        self.rows_ = []
        return t


# ----------------------------------------------------------------------------------------------
# Counters and the normalizer base


@dataclass(slots=True)  # slots: `frames` and `bytes` are bumped on every frame
class Counters:
    frames: int = 0
    bytes: int = 0
    rows_l2: int = 0
    rows_trades: int = 0
    skipped_frames: int = 0
    ignored_frames: int = 0
    skipped_rows: int = 0
    dup_trades: int = 0
    gaps: int = 0
    reconnects: int = 0
    errors: int = 0
    ts_fallbacks: int = 0
    feed_lag_ns: int | None = None
    last_recv_ns: int | None = None
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["skip_reasons"] = dict(self.skip_reasons)
        return d


class Action:
    """A request from the normalizer to the live runtime (ignored offline)."""

    __slots__ = ("kind", "args")

    def __init__(self, kind: str, **args):
        self.kind = kind  # "reconnect" | "get_snapshot" | "resubscribe" | "error"
        self.args = args

    def __repr__(self) -> str:
        return f"Action({self.kind}, {self.args})"


class BaseNormalizer:
    source = "?"

    def __init__(self, max_skew_ns: int = DEFAULT_MAX_SKEW_NS, log=None):
        self.l2 = L2Cols(self.source, max_skew_ns)
        self.trades = TradeCols(self.source)
        self.gaps = GapCols(self.source)
        self.c = Counters()
        self.max_skew_ns = max_skew_ns
        self.actions: list[Action] = []
        self.log = log or get_logger(source=self.source)
        self._skip_logged = 0
        self._skip_log_window = 0.0
        self.conn: int | None = None
        self._implicit_conn = 0
        self.last_frame_recv: int | None = None
        self.pending_gap: tuple[str, int, str] | None = None  # (kind, start_ts, detail) awaiting reconnect

    # -- bad input ------------------------------------------------------------------------------
    def skip(self, frame: Any, reason: str, exc: BaseException | None = None) -> None:
        c = self.c
        c.skipped_frames += 1
        key = reason.split(":", 1)[0]
        c.skip_reasons[key] = c.skip_reasons.get(key, 0) + 1
        if self._may_log():
            head = frame[:200] if isinstance(frame, (str, bytes)) else repr(frame)[:200]
            if isinstance(head, bytes):
                head = head.decode("utf-8", "replace")
            self.log.warning("frame_skipped", reason=reason, error=repr(exc)[:200] if exc else None, frame_head=head)

    def _may_log(self) -> bool:
        """At most 20 skip lines a minute (then one saying so); the counters keep every skip."""
        now = time.monotonic()
        if now - self._skip_log_window > 60.0:
            self._skip_log_window, self._skip_logged = now, 0
        self._skip_logged += 1
        if self._skip_logged == 21:
            self.log.warning("frame_skipped_suppressed", note="more skipped frames this minute; see counters")
        return self._skip_logged <= 20

    def admit(self, table: str, t: pa.Table | None) -> pa.Table | None:
        """`t` without the rows append would refuse (a name no partition takes, a value no table
        takes), each counted as a skipped row with its reason: one bad row never costs its chunk.
        One vectorized pass per chunk; the per-message checks stay the fast first line."""
        if t is None or not t.num_rows:
            return t
        t, dropped = drop_faulty_rows(table, t)
        for what, n in dropped.items():
            key = f"refused_{what}"
            self.c.skip_reasons[key] = self.c.skip_reasons.get(key, 0) + n
            self.c.skipped_rows += n
            if table == "trades":
                self.c.rows_trades -= n  # counted when parsed; never stored
            if self._may_log():
                self.log.warning("rows_skipped", reason=key, rows=n, table=table)
        return t

    def bad_run(self, run: tuple, reason: str) -> None:
        """A message whose rows failed the bulk checks at conversion: counted as a skipped frame."""
        self.c.skipped_frames += 1
        key = "bad_rows"
        self.c.skip_reasons[key] = self.c.skip_reasons.get(key, 0) + 1
        self.log.warning("frame_skipped", reason=f"{key}: {reason}", instrument=run[6], recv_ns=run[1], seq=run[8])

    # -- gaps -----------------------------------------------------------------------------------
    def gap(self, market: str, instrument: str | None, start: int, end: int, kind: str, detail: str) -> None:
        self.gaps.add(market, instrument, start, end, kind, detail)
        self.c.gaps += 1
        self.log.warning("gap", market=market, instrument=instrument, kind=kind, start_ts=start, end_ts=end, detail=detail)

    def markets(self) -> Iterable[str]:  # markets known on the current connection
        return ()

    def emit_pending_gap(self, end_ns: int) -> None:
        if self.pending_gap is None:
            return
        kind, start, detail = self.pending_gap
        self.pending_gap = None
        for m in sorted(self.markets()):
            self.gap(m, None, start, end_ns, kind, detail)

    # -- connection lifecycle (meta lines) -------------------------------------------------------
    def on_connect(self, recv_ns: int, conn: int | None = None, **meta) -> None:
        if conn is None:
            self._implicit_conn += 1
            conn = -self._implicit_conn
        self.conn = conn
        self.reset_connection(recv_ns, **meta)
        self.emit_pending_gap(recv_ns)

    def on_disconnect(self, recv_ns: int, reason: str = "") -> None:
        kind = "stale" if reason.startswith("stale") else "disconnect"
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        if self.pending_gap is None:
            self.pending_gap = (kind, start, f"{kind}: {reason}"[:500])
        self.invalidate_all()
        self.conn = None

    def reset_connection(self, recv_ns: int, **meta) -> None:  # per-connection state
        pass

    def invalidate_all(self) -> None:
        pass

    # -- output ---------------------------------------------------------------------------------
    def rows_pending(self) -> int:
        return self.l2.rows + self.trades.rows + self.gaps.rows

    def take(self) -> dict[str, pa.Table]:
        out = {}
        self.c.last_recv_ns = self.last_frame_recv
        l2 = self.l2.take(self.bad_run)  # first: a bad run found here can add a gap row
        self.c.ts_fallbacks = self.l2.ts_fallbacks
        if self.l2.last_lag is not None:
            self.c.feed_lag_ns = self.l2.last_lag
        g = self.admit("gaps", self.gaps.take())
        if g is not None and g.num_rows:
            out["gaps"] = g
        l2 = self.admit("l2", l2)
        if l2 is not None and l2.num_rows:
            out["l2"] = l2
            self.c.rows_l2 += l2.num_rows
        t = self.admit("trades", self.trades.take())
        if t is not None and t.num_rows:
            out["trades"] = t
        return out

    def pop_actions(self) -> list[Action]:
        a, self.actions = self.actions, []
        return a

    def restart_gaps(self, markets: Iterable[str], start_ns: int, end_ns: int, detail: str = "collector restart") -> None:
        for m in sorted(set(markets)):
            self.gap(m, None, start_ns, end_ns, "restart", detail)


def tune_gc() -> None:
    """Long-lived allocation-heavy process: freeze start-up objects and collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def make_normalizer(source: str, **kw) -> BaseNormalizer:
    if source == "coinbase":
        from engine.collect.sources.coinbase import CoinbaseNormalizer

        return CoinbaseNormalizer(**kw)
    if source == "kalshi":
        from engine.collect.sources.kalshi import KalshiNormalizer

        return KalshiNormalizer(**kw)
    raise ValueError(f"unknown source {source!r}; sources are coinbase, kalshi")
