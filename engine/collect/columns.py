"""Column builders: normalized rows accumulated column-wise and converted to Arrow tables of the
canonical schemas (`l2`, `trades`, `gaps`).

Per-row values (price, size, side, ts) go into plain Python lists that are extended once per message
with C-level iterators; per-message constants (receive time, market, instrument, sequence number,
snapshot flag) are stored once per message as a "run" and expanded with numpy at conversion.
"""

from __future__ import annotations

import gc
import struct

import numpy as np
import pyarrow as pa

from engine.collect.timestamps import _NULL_TS, DEFAULT_MAX_SKEW_NS, bulk_ts, settle_ts
from engine.schema import GAPS_SCHEMA, L2_SCHEMA, TRADES_SCHEMA

DICT_T = pa.dictionary(pa.int32(), pa.string())
SIDE_MAP = {"bid": "bid", "ask": "ask", "offer": "ask", "buy": "bid", "sell": "ask"}


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

