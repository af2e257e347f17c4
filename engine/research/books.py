"""Order books at an instant (`book`) and as a sampled series (`books`), rebuilt from `l2`.

The book at `at` is the arrival-order prefix of the instrument's rows whose effective ts (running
max of `ts`, see `engine.lake.derived.effective_ts`) is <= `at`, replayed from the nearest
earlier snapshot. Hourly book anchors put a snapshot at the start of every raw file, so only the
last hour is normally read (then the last day, then everything, if no snapshot is found).

A gap (gaps table, this market or instrument) that starts before `at` and ends after that
snapshot means the book at `at` is unknown: `book` raises `BookGapError`; `books` marks the
samples `valid = False` (with empty levels).
"""

from __future__ import annotations

import bisect

import numpy as np
import polars as pl
import pyarrow as pa

from engine import schema
from engine.lake.derived import as_numpy, is_sorted_keys, ordered_codes
from engine.log import get_logger
from engine.research import clamp_for, parse_duration, read_entries
from engine.timeutil import iso, result_times, to_ns

log = get_logger(component="books")

COLS = ["ts", "recv_ts", "instrument", "side", "price", "size", "seq", "snapshot"]
LOOKBACKS = ("hour", schema.NS_PER_HOUR, schema.NS_PER_DAY, None)
ANCHOR_SLACK_NS = 120 * 10**9
TS_SLACK_NS = 60 * 10**9  # rows with ts up to this much after `at` are read to compute effective ts


class BookGapError(ValueError):
    """The book at the requested instant cannot be known: a gap without a later snapshot."""


class NoBookError(LookupError):
    pass


def _read_window(eng, source, market, instrument, lo, hi, allow_unsealed) -> pa.Table:
    ents = eng.catalog.files("l2", source, market, lo, hi, instrument=instrument)
    return read_entries(eng, "l2", ents, instrument=instrument, start=lo, end=hi,
                        clamp=clamp_for(eng, "l2", ents, allow_unsealed), columns=COLS)


def _arrays(t: pa.Table) -> dict:
    """Columns of one instrument's rows as numpy arrays, in arrival order (recv_ts, ts, seq; stable)."""
    n = t.num_rows
    side_codes, side_names = ordered_codes(t.column("side")) if n else (np.zeros(0, np.int64), [])
    r = {
        "ts": as_numpy(t.column("ts")).astype(np.int64, copy=False),
        "recv": as_numpy(t.column("recv_ts")).astype(np.int64, copy=False),
        "seq": as_numpy(t.column("seq").fill_null(np.iinfo(np.int64).min)).astype(np.int64, copy=False),
        "snap": as_numpy(t.column("snapshot")).astype(bool, copy=False),
        "ask": side_codes == (side_names.index("ask") if "ask" in side_names else -1),
        "price": as_numpy(t.column("price")).astype(np.float64, copy=False),
        "size": as_numpy(t.column("size")).astype(np.float64, copy=False),
    }
    if n > 1 and not is_sorted_keys(r["recv"], r["ts"], r["seq"]):
        order = np.argsort(r["recv"], kind="stable")  # nearly sorted already: timsort is ~linear
        if not is_sorted_keys(r["recv"][order], r["ts"][order], r["seq"][order]):
            order = np.lexsort((r["seq"], r["ts"], r["recv"]))  # lexsort is stable: ties keep stored order
        r = {k: v[order] for k, v in r.items()}
    r["eff"] = np.maximum.accumulate(r["ts"]) if n else r["ts"]
    return r


def _slice(r: dict, a: int, b: int | None = None) -> dict:
    return {k: v[a:b] for k, v in r.items()}


def _begins(r: dict) -> np.ndarray:
    """Positions (arrival order) where a snapshot message starts (one instrument)."""
    snap, recv, seq = r["snap"], r["recv"], r["seq"]
    n = len(snap)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    cont = np.zeros(n, dtype=bool)
    cont[1:] = snap[:-1] & (recv[1:] == recv[:-1]) & (seq[1:] == seq[:-1])
    return np.flatnonzero(snap & ~cont)


def _prepared(eng, source, market, instrument, at, allow_unsealed, lookbacks=LOOKBACKS):
    """(rows from the nearest snapshot with effective ts <= at, in arrival order; that snapshot's ts)."""
    for lb in lookbacks:
        if lb == "hour":  # anchors start every hourly file: the current hour (plus slack) usually suffices
            lo = at - at % schema.NS_PER_HOUR - ANCHOR_SLACK_NS
        else:
            lo = None if lb is None else at - lb
        t = _read_window(eng, source, market, instrument, lo, at + TS_SLACK_NS + 1, allow_unsealed)
        if t.num_rows == 0 and lb is not None:
            continue
        r = _arrays(t)
        r = _slice(r, 0, int(np.searchsorted(r["eff"], at, side="right")))
        b = _begins(r)
        if len(b):
            p = int(b[-1])
            return _slice(r, p), int(r["eff"][p])
        if lb is None:
            return r, None
    return None, None


def _gaps(eng, source, market, instrument, lo, hi) -> pl.DataFrame:
    """Gaps of (source, market) for `instrument` (or the whole market) with start < hi and end > lo."""
    from engine.research.query import UnknownMarketError

    try:
        g = eng.gaps(source=source, market=market, end=hi, allow_unsealed=True, raw_ns=True)
    except UnknownMarketError:
        return pl.DataFrame(schema={"start_ts": pl.Int64, "end_ts": pl.Int64, "kind": pl.String, "detail": pl.String})
    g = g.with_columns(pl.col(c).cast(pl.String) for c in ("instrument", "kind"))
    g = g.filter(pl.col("instrument").is_null() | (pl.col("instrument") == instrument))
    if lo is not None:
        g = g.filter(pl.col("end_ts") > lo)
    return g.filter(pl.col("start_ts") < hi).sort("start_ts")


def _levels(r: dict, depth: int) -> tuple[list, list]:
    """Top `depth` bids (price desc) and asks (price asc) after replaying `r` (from its snapshot)."""
    df = pl.DataFrame({"a": r["ask"], "p": r["price"], "s": r["size"]})
    last = df.unique(subset=["a", "p"], keep="last", maintain_order=False).filter(pl.col("s") > 0)
    bids = last.filter(~pl.col("a")).sort("p", descending=True).head(depth)
    asks = last.filter(pl.col("a")).sort("p").head(depth)
    return (list(zip(bids["p"].to_list(), bids["s"].to_list())), list(zip(asks["p"].to_list(), asks["s"].to_list())))


def _frame(instrument, at, bids, asks, depth, *, snapshot_ts, book_ts, valid=True) -> pl.DataFrame:
    n = max(len(bids), len(asks)) if valid else 0
    crossed = bool(bids and asks and bids[0][0] >= asks[0][0])
    pad = lambda xs, i: xs[i] if i < len(xs) else (None, None)  # noqa: E731
    return pl.DataFrame(
        {
            "instrument": [instrument] * n,
            "ts": [at] * n,
            "level": list(range(n)),
            "bid_price": [pad(bids, i)[0] for i in range(n)],
            "bid_size": [pad(bids, i)[1] for i in range(n)],
            "ask_price": [pad(asks, i)[0] for i in range(n)],
            "ask_size": [pad(asks, i)[1] for i in range(n)],
            "crossed": [crossed] * n,
            "snapshot_ts": [snapshot_ts] * n,
            "book_ts": [book_ts] * n,
        },
        schema={"instrument": pl.String, "ts": pl.Int64, "level": pl.Int32, "bid_price": pl.Float64,
                "bid_size": pl.Float64, "ask_price": pl.Float64, "ask_size": pl.Float64, "crossed": pl.Boolean,
                "snapshot_ts": pl.Int64, "book_ts": pl.Int64},
    )


def book(eng, source: str, market: str, instrument: str, at, depth: int = 10, *, allow_unsealed: bool = False,
         check_gaps: bool = True, raw_ns: bool = False) -> pl.DataFrame:
    """The book of `instrument` at `at`: one row per level (0 = best) with bid/ask price and size.

    Columns: instrument, ts (= at), level, bid_price, bid_size, ask_price, ask_size, crossed (best
    bid >= best ask), snapshot_ts (effective ts of the snapshot replayed from; null when the data
    hold none and the book is built from the first row), book_ts (ts of the last row applied); times
    are Datetime("ns", "UTC"), int64 ns with `raw_ns=True`. Raises BookGapError when a gap lies between that snapshot and `at`, NoBookError without data.
    """
    at = to_ns(at, name="at")
    if depth < 1:
        raise ValueError("depth must be >= 1")
    r, snap_ts = _prepared(eng, source, market, instrument, at, allow_unsealed)
    if r is None or len(r["ts"]) == 0:
        raise NoBookError(f"no l2 rows for {source}/{market}/{instrument} at or before {iso(at)}")
    if check_gaps:
        g = _gaps(eng, source, market, instrument, snap_ts, at)
        if g.height:
            gr = g.row(0, named=True)
            since = f"the snapshot at {iso(snap_ts)}" if snap_ts is not None else "the first stored row (no snapshot)"
            raise BookGapError(
                f"book of {source}/{market}/{instrument} at {iso(at)} is unknown: a {gr['kind']} gap "
                f"{iso(gr['start_ts'])} .. {iso(gr['end_ts'])} ({gr['detail']}) lies between {since} and {iso(at)}, "
                f"with no snapshot after it; ask for a time after the next snapshot"
            )
    bids, asks = _levels(r, depth)
    if bids and asks and bids[0][0] >= asks[0][0]:
        log.warning("crossed_book", instrument=instrument, at=iso(at), bid=bids[0][0], ask=asks[0][0])
    out = _frame(instrument, at, bids, asks, depth, snapshot_ts=snap_ts, book_ts=int(r["eff"][-1]))
    return result_times(out, schema.time_cols("book"), raw_ns=raw_ns)


def books(eng, source: str, market: str, instrument: str, start, end, every="1s", depth: int = 10, *,
          allow_unsealed: bool = False, raw_ns: bool = False) -> pl.DataFrame:
    """Book snapshots every `every` (UTC-aligned multiples) in [start, end): one row per (ts, level).

    Same columns as `book` plus `valid`; a sample inside a gap (no snapshot since) has valid = False
    and a single row with null levels; an empty but valid book also gives one row of nulls.
    """
    start, end = to_ns(start, name="start"), to_ns(end, name="end")
    step = parse_duration(every, name="every")
    if start is None or end is None or end <= start:
        raise ValueError("books() needs start < end")
    first = -(-start // step) * step
    samples = np.arange(first, end, step, dtype=np.int64)
    if len(samples) == 0:
        out = _frame(instrument, 0, [], [], depth, snapshot_ts=None, book_ts=None).with_columns(valid=pl.lit(True))
        return result_times(out, schema.time_cols("book"), raw_ns=raw_ns)
    r0, _ = _prepared(eng, source, market, instrument, int(samples[0]), allow_unsealed)
    lo = int(r0["ts"].min()) if r0 is not None and len(r0["ts"]) else None
    hi = int(samples[-1]) + TS_SLACK_NS + 1
    ents = eng.catalog.files("l2", source, market, lo, hi, instrument=instrument)
    t = read_entries(eng, "l2", ents, instrument=instrument, start=lo, end=hi,
                     clamp=clamp_for(eng, "l2", ents, allow_unsealed), columns=COLS)
    r = _arrays(t)
    b = _begins(r)  # start the replay at the last snapshot known by the first sample
    cand = b[r["eff"][b] <= samples[0]] if len(b) else b
    r = _slice(r, int(cand[-1]) if len(cand) else 0)
    g = _gaps(eng, source, market, instrument, None, int(samples[-1]) + 1)
    gs, ge = g["start_ts"].to_numpy(), g["end_ts"].to_numpy()
    frames = _replay_samples(r, samples, depth, gs, ge)
    out = pl.DataFrame(frames, schema={"ts": pl.Int64, "level": pl.Int32, "bid_price": pl.Float64,
                                       "bid_size": pl.Float64, "ask_price": pl.Float64, "ask_size": pl.Float64,
                                       "crossed": pl.Boolean, "snapshot_ts": pl.Int64, "book_ts": pl.Int64,
                                       "valid": pl.Boolean}, orient="row")
    out = out.select(pl.lit(instrument).alias("instrument"), pl.all())
    return result_times(out, schema.time_cols("book"), raw_ns=raw_ns)


def _replay_samples(r: dict, samples: np.ndarray, depth: int, gs, ge) -> list[tuple]:
    """Replay rows with plain dicts and sorted price lists; record the top `depth` at each sample."""
    side = r["ask"].tolist()
    price = r["price"].tolist()
    size = r["size"].tolist()
    eff = r["eff"]
    begins = set(_begins(r).tolist())
    cut = np.searchsorted(eff, samples, side="right").tolist()  # rows applied before each sample
    levels = ({}, {})  # bid, ask: price -> size
    sorted_px = ([], [])  # ascending prices
    snap_ts = None
    book_ts = None
    out = []
    i = 0
    for k, smp in enumerate(samples.tolist()):
        stop = cut[k]
        while i < stop:
            if i in begins:
                levels = ({}, {})
                sorted_px = ([], [])
                snap_ts = int(eff[i])
            a = side[i]
            lv, px = levels[a], sorted_px[a]
            p, q = price[i], size[i]
            if q > 0:
                if p not in lv:
                    bisect.insort(px, p)
                lv[p] = q
            elif p in lv:
                del lv[p]
                del px[bisect.bisect_left(px, p)]
            book_ts = int(eff[i])
            i += 1
        lo = snap_ts if snap_ts is not None else (-(2**63))
        valid = book_ts is not None and not bool(np.any((gs < smp) & (ge > lo)))
        if not valid:
            out.append((smp, 0, None, None, None, None, False, snap_ts, book_ts, False))
            continue
        bids = [(p, levels[0][p]) for p in sorted_px[0][::-1][:depth]]
        asks = [(p, levels[1][p]) for p in sorted_px[1][:depth]]
        crossed = bool(bids and asks and bids[0][0] >= asks[0][0])
        m = max(len(bids), len(asks))
        if m == 0:
            out.append((smp, 0, None, None, None, None, False, snap_ts, book_ts, True))
        for lvl in range(m):
            b = bids[lvl] if lvl < len(bids) else (None, None)
            s = asks[lvl] if lvl < len(asks) else (None, None)
            out.append((smp, lvl, b[0], b[1], s[0], s[1], crossed, snap_ts, book_ts, True))
    return out
