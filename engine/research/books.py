"""Order books at an instant (`book`) and as a sampled series (`books`), rebuilt from `l2`.

The book at `at` is the arrival-order prefix of the instrument's rows whose effective ts (running
max of `ts`, see `engine.research.quotes.effective_ts`) is <= `at`, replayed from the nearest
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
import pyarrow.compute as pc

from engine import schema
from engine.log import get_logger
from engine.research import clamp_for, parse_duration, read_entries
from engine.research.quotes import _codes, _np, arrival_order, effective_ts
from engine.timeutil import iso, to_ns

log = get_logger(component="books")

COLS = ["ts", "recv_ts", "instrument", "side", "price", "size", "seq", "snapshot"]
LOOKBACKS = (schema.NS_PER_HOUR, schema.NS_PER_DAY, None)
TS_SLACK_NS = 60 * 10**9  # rows with ts up to this much after `at` are read to compute effective ts


class BookGapError(ValueError):
    """The book at the requested instant cannot be known: a gap without a later snapshot."""


class NoBookError(LookupError):
    pass


def _read_window(eng, source, market, instrument, lo, hi, allow_unsealed) -> pa.Table:
    ents = eng.catalog.files("l2", source, market, lo, hi)
    return read_entries(eng, "l2", ents, instrument=instrument, start=lo, end=hi,
                        clamp=clamp_for(eng, "l2", ents, allow_unsealed), columns=COLS)


def _begins(t: pa.Table) -> np.ndarray:
    """Positions (in arrival order) where a snapshot message starts (single instrument)."""
    n = t.num_rows
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    recv = _np(t.column("recv_ts"))
    seq = _np(t.column("seq").fill_null(np.iinfo(np.int64).min))
    snap = _np(t.column("snapshot")).astype(bool)
    cont = np.zeros(n, dtype=bool)
    cont[1:] = snap[:-1] & (recv[1:] == recv[:-1]) & (seq[1:] == seq[:-1])
    return np.flatnonzero(snap & ~cont)


def _prepared(eng, source, market, instrument, at, allow_unsealed, lookbacks=LOOKBACKS):
    """(rows in arrival order with effective ts <= at, position of the replay start, snapshot ts)."""
    for lb in lookbacks:
        lo = None if lb is None else at - lb
        t = _read_window(eng, source, market, instrument, lo, at + TS_SLACK_NS + 1, allow_unsealed)
        if t.num_rows == 0 and lb is not None:
            continue
        t, inst = arrival_order(t)
        eff = effective_ts(_np(t.column("ts")).astype(np.int64), inst)
        cut = int(np.searchsorted(eff, at, side="right"))
        t = t.slice(0, cut)
        eff = eff[:cut]
        b = _begins(t)
        if len(b):
            p = int(b[-1])
            return t.slice(p), eff[p:], int(eff[p])
        if lb is None:
            return t, eff, None
    return None, None, None


def _gaps(eng, source, market, instrument, lo, hi) -> pl.DataFrame:
    """Gaps of (source, market) for `instrument` (or the whole market) with start < hi and end > lo."""
    from engine.query import UnknownMarketError

    try:
        g = eng.gaps(source=source, market=market, end=hi, allow_unsealed=True)
    except UnknownMarketError:
        return pl.DataFrame(schema={"start_ts": pl.Int64, "end_ts": pl.Int64, "kind": pl.String, "detail": pl.String})
    g = g.with_columns(pl.col(c).cast(pl.String) for c in ("instrument", "kind"))
    g = g.filter(pl.col("instrument").is_null() | (pl.col("instrument") == instrument))
    if lo is not None:
        g = g.filter(pl.col("end_ts") > lo)
    return g.filter(pl.col("start_ts") < hi).sort("start_ts")


def _levels(t: pa.Table, depth: int) -> tuple[list, list]:
    """Top `depth` bids (price desc) and asks (price asc) after replaying `t` (from its snapshot)."""
    if t.num_rows == 0:
        return [], []
    df = pl.from_arrow(t.select(["side", "price", "size"])).with_columns(pl.col("side").cast(pl.String))
    last = df.group_by(["side", "price"], maintain_order=False).agg(pl.col("size").last())
    last = last.filter(pl.col("size") > 0)
    bids = last.filter(pl.col("side") == "bid").sort("price", descending=True).head(depth)
    asks = last.filter(pl.col("side") == "ask").sort("price").head(depth)
    return list(zip(bids["price"].to_list(), bids["size"].to_list())), list(zip(asks["price"].to_list(), asks["size"].to_list()))


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
         check_gaps: bool = True) -> pl.DataFrame:
    """The book of `instrument` at `at`: one row per level (0 = best) with bid/ask price and size.

    Columns: instrument, ts (= at), level, bid_price, bid_size, ask_price, ask_size, crossed (best
    bid >= best ask), snapshot_ts (effective ts of the snapshot replayed from; null when the data
    hold none and the book is built from the first row), book_ts (ts of the last row applied).
    Raises BookGapError when a gap lies between that snapshot and `at`, NoBookError without data.
    """
    at = to_ns(at, name="at")
    if depth < 1:
        raise ValueError("depth must be >= 1")
    t, eff, snap_ts = _prepared(eng, source, market, instrument, at, allow_unsealed)
    if t is None or t.num_rows == 0:
        raise NoBookError(f"no l2 rows for {source}/{market}/{instrument} at or before {iso(at)}")
    if check_gaps:
        g = _gaps(eng, source, market, instrument, snap_ts, at)
        if g.height:
            r = g.row(0, named=True)
            since = f"the snapshot at {iso(snap_ts)}" if snap_ts is not None else "the first stored row (no snapshot)"
            raise BookGapError(
                f"book of {source}/{market}/{instrument} at {iso(at)} is unknown: a {r['kind']} gap "
                f"{iso(r['start_ts'])} .. {iso(r['end_ts'])} ({r['detail']}) lies between {since} and {iso(at)}, "
                f"with no snapshot after it; ask for a time after the next snapshot"
            )
    bids, asks = _levels(t, depth)
    if bids and asks and bids[0][0] >= asks[0][0]:
        log.warning("crossed_book", instrument=instrument, at=iso(at), bid=bids[0][0], ask=asks[0][0])
    return _frame(instrument, at, bids, asks, depth, snapshot_ts=snap_ts, book_ts=int(eff[-1]))


def books(eng, source: str, market: str, instrument: str, start, end, every="1s", depth: int = 10, *,
          allow_unsealed: bool = False) -> pl.DataFrame:
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
        return _frame(instrument, 0, [], [], depth, snapshot_ts=None, book_ts=None).with_columns(valid=pl.lit(True))
    t0, _, _ = _prepared(eng, source, market, instrument, int(samples[0]), allow_unsealed)
    # rows from that snapshot to the last sample, in arrival order
    lo = None
    if t0 is not None and t0.num_rows:
        lo = int(pc.min(t0.column("ts")).as_py())
    ents = eng.catalog.files("l2", source, market, lo, int(samples[-1]) + TS_SLACK_NS + 1)
    t = read_entries(eng, "l2", ents, instrument=instrument, start=lo, end=int(samples[-1]) + TS_SLACK_NS + 1,
                     clamp=clamp_for(eng, "l2", ents, allow_unsealed), columns=COLS)
    t, inst = arrival_order(t)
    eff = effective_ts(_np(t.column("ts")).astype(np.int64), inst)
    b = _begins(t)  # start the replay at the last snapshot known by the first sample
    cand = b[eff[b] <= samples[0]] if len(b) else b
    p = int(cand[-1]) if len(cand) else 0
    t, eff = t.slice(p), eff[p:]
    g = _gaps(eng, source, market, instrument, None, int(samples[-1]) + 1)
    gs, ge = g["start_ts"].to_numpy(), g["end_ts"].to_numpy()
    frames = _replay_samples(t, eff, samples, depth, gs, ge)
    out = pl.DataFrame(frames, schema={"ts": pl.Int64, "level": pl.Int32, "bid_price": pl.Float64,
                                       "bid_size": pl.Float64, "ask_price": pl.Float64, "ask_size": pl.Float64,
                                       "crossed": pl.Boolean, "snapshot_ts": pl.Int64, "book_ts": pl.Int64,
                                       "valid": pl.Boolean}, orient="row")
    return out.select(pl.lit(instrument).alias("instrument"), pl.all())


def _replay_samples(t: pa.Table, eff: np.ndarray, samples: np.ndarray, depth: int, gs, ge) -> list[tuple]:
    """Replay rows with plain dicts and sorted price lists; record the top `depth` at each sample."""
    n = t.num_rows
    side = [s == "ask" for s in t.column("side").cast(pa.string()).to_pylist()] if n else []
    price = _np(t.column("price")).tolist() if n else []
    size = _np(t.column("size")).tolist() if n else []
    begins = set(_begins(t).tolist()) if n else set()
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
