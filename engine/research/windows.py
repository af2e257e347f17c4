"""Gap-aware windows: may a feature use the trailing `window` of data ending at t?

A trailing window [t - window, t] is valid for an instrument when no gap of its market (whole
market or that instrument; any kind: disconnect, sequence, restart, stale) overlaps it and the
book it sees was started by a snapshot taken at or before t - window with no gap since.

For a snapshot S (time s) let e(S) = the earliest start of a gap ending after s (infinity when
none). Windows ending at t in [s + window, e(S)) are valid; `valid` returns the union of these
spans per instrument. With require_snapshot=False (trades-only features) the candidate starts are
the query start and every gap end instead of snapshots.

    eng.valid("coinbase", "BTC-USD", start, end, window="30s")  -> spans (start_ts, end_ts)
    mark_valid(eng, trades_df, window="30s")                    -> trades_df + boolean `valid`
"""

from __future__ import annotations

import numpy as np
import polars as pl

from engine import schema
from engine.research import parse_duration
from engine.timeutil import result_times, to_ns

SNAPSHOT_LOOKBACK_NS = schema.NS_PER_DAY  # hourly anchors: a snapshot is never far back
_INF = np.iinfo(np.int64).max
SPAN_SCHEMA = {"source": pl.String, "market": pl.String, "instrument": pl.String, "start_ts": pl.Int64,
               "end_ts": pl.Int64}


def _gaps(eng, source, market, end) -> pl.DataFrame:
    from engine.research.query import UnknownMarketError

    try:
        g = eng.gaps(source=source, market=market, end=end, allow_unsealed=True, raw_ns=True)
    except UnknownMarketError:
        return pl.DataFrame(schema={"instrument": pl.String, "start_ts": pl.Int64, "end_ts": pl.Int64})
    return g.select(pl.col("instrument").cast(pl.String), "start_ts", "end_ts")


def _snapshots(eng, source, market, instrument, lo, end, allow_unsealed) -> pl.DataFrame:
    """One row per snapshot message: instrument, ts (latest ts of its rows)."""
    import pyarrow.dataset as pads

    from engine.research import clamp_for, read_entries
    from engine.research.query import UnknownMarketError

    try:
        eng._q()._check_names("l2", source, market)
    except UnknownMarketError:
        return pl.DataFrame(schema={"instrument": pl.String, "ts": pl.Int64})
    ents = eng.catalog.files("l2", source, market, lo, end, instrument=instrument)
    plain = None if instrument is None or "*" in instrument else instrument
    t = read_entries(eng, "l2", ents, instrument=plain, start=lo, end=end, clamp=clamp_for(eng, "l2", ents, allow_unsealed),
                     columns=["ts", "recv_ts", "instrument", "seq"], filter_expr=pads.field("snapshot") == True)  # noqa: E712
    df = pl.from_arrow(t).with_columns(pl.col("instrument").cast(pl.String))
    return df.group_by(["instrument", "recv_ts", "seq"]).agg(pl.col("ts").max()).select("instrument", "ts")


def _spans(starts: np.ndarray, gs: np.ndarray, ge: np.ndarray, w: int) -> list[tuple[int, int]]:
    """Union of [s + w, e(s)) over candidate starts s, e(s) = min gap start among gaps ending after s."""
    if len(starts) == 0:
        return []
    order = np.argsort(ge, kind="stable")
    ge_s, gs_s = ge[order], gs[order]
    e = np.full(len(starts), _INF, dtype=np.int64)
    if len(ge_s):
        suffix_min = np.minimum.accumulate(gs_s[::-1])[::-1]
        k = np.searchsorted(ge_s, starts, side="right")  # gaps ending after s are ge_s[k:]
        has = k < len(ge_s)
        e[has] = suffix_min[k[has]]
    lo = starts + w
    keep = lo < e
    cand = sorted(zip(lo[keep].tolist(), e[keep].tolist()))
    merged: list[list[int]] = []
    for a, b in cand:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def valid(eng, source, market: str | None = None, start=None, end=None, window="30s", *,
          instrument: str | None = None, require_snapshot: bool = True, allow_unsealed: bool = False,
          on: str = "ts", col: str = "valid", raw_ns: bool = False) -> pl.DataFrame:
    """Spans [start_ts, end_ts) of window-end times t whose trailing `window` is valid (module doc),
    as Datetime("ns", "UTC") (int64 ns with `raw_ns=True`).

    Given a DataFrame instead of a source (`eng.valid(trades, window="30s")`), returns it with the
    boolean column `col` from `mark_valid` — the one-liner for features.
    """
    if isinstance(source, pl.DataFrame):
        return mark_valid(eng, source, window=window, on=on, require_snapshot=require_snapshot, col=col,
                          allow_unsealed=allow_unsealed)
    if market is None:
        raise ValueError("valid: give source and market (or a DataFrame of rows to mark)")
    w = parse_duration(window, name="window")
    start, end = to_ns(start, name="start"), to_ns(end, name="end")
    g = _gaps(eng, source, market, end)
    rows = []
    if require_snapshot:
        lo = None if start is None else start - w - SNAPSHOT_LOOKBACK_NS
        snaps = _snapshots(eng, source, market, instrument, lo, end, allow_unsealed)
        if instrument is not None and "*" not in instrument:
            snaps = snaps.filter(pl.col("instrument") == instrument)
        groups = snaps.group_by("instrument").agg(pl.col("ts")).sort("instrument").iter_rows()
    else:
        base = np.array([(start if start is not None else -(2**62)) - w], dtype=np.int64)
        groups = [(instrument, None)]
    for inst, ts in groups:
        gi = g.filter(pl.col("instrument").is_null() | (pl.col("instrument") == inst)) if inst is not None else g
        gs, ge = gi["start_ts"].to_numpy(), gi["end_ts"].to_numpy()
        cand = np.asarray(sorted(ts), dtype=np.int64) if ts is not None else np.concatenate([base, ge]).astype(np.int64)
        for a, b in _spans(cand, gs, ge, w):
            a = max(a, start) if start is not None else a
            b = min(b, end) if end is not None else b
            if a < b:
                rows.append((source, market, inst, int(a), int(b)))
    return result_times(pl.DataFrame(rows, schema=SPAN_SCHEMA, orient="row"), schema.time_cols("valid"), raw_ns=raw_ns)


def mark_valid(eng, df: pl.DataFrame, window="30s", *, on: str = "ts", require_snapshot: bool = True,
               col: str = "valid", allow_unsealed: bool = False) -> pl.DataFrame:
    """`df` (rows with source, market[, instrument] and `on`) plus a boolean column `col`: True when
    the trailing `window` ending at the row's time is valid. Row order is kept."""
    from engine.research.asof import asof

    if df.height == 0:
        return df.with_columns(pl.lit(False).alias(col))
    keys = ["source", "market"] + (["instrument"] if require_snapshot else [])
    for k in keys:
        if k not in df.columns:
            raise ValueError(f"mark_valid: column {k!r} missing (needed to find the market's gaps and snapshots)")
    t = result_times(df.select(pl.col(on).alias("__t")), ["__t"], raw_ns=True).to_series()  # Datetime or int ns
    lo, hi = int(t.min()), int(t.max()) + 1
    spans = []
    for s, m in df.select(pl.col("source").cast(pl.String), pl.col("market").cast(pl.String)).unique().iter_rows():
        spans.append(valid(eng, s, m, lo, hi, window, require_snapshot=require_snapshot, allow_unsealed=allow_unsealed,
                           raw_ns=True))
    sp = pl.concat(spans) if spans else pl.DataFrame(schema=SPAN_SCHEMA)
    if not require_snapshot:
        sp = sp.drop("instrument")
    # a key with one value in df (one market, one instrument) is a filter on the spans, not a join key
    one = {k: v[0] for k in keys if len(v := df[k].cast(pl.String).unique().to_list()) == 1 and v[0] is not None}
    sp = sp.filter(*(pl.col(k) == v for k, v in one.items())) if one else sp
    keys = [k for k in keys if k not in one]
    sp = sp.rename({"start_ts": "__vs", "end_ts": "__ve"}).with_columns(pl.col("__vs").alias("__t")).sort(keys + ["__t"])
    left = df.with_columns(*(pl.col(k).cast(pl.String).alias(f"__k_{k}") for k in keys), t)
    right = sp.select(*(pl.col(k).alias(f"__k_{k}") for k in keys), "__t", "__vs", "__ve")
    j = asof(eng, left, right, on="__t", by=[f"__k_{k}" for k in keys], keep_right_on=False, raw_ns=True)
    j = j.with_columns(((pl.col("__ve").is_not_null()) & (pl.col("__t") < pl.col("__ve"))).alias(col))
    return j.drop([c for c in j.columns if c.startswith("__")])
