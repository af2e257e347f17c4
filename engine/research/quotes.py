"""Quotes: the best bid/ask (price and size) series of `l2`, one row per change.

The derivation and the stored `quotes` table are the lake's (`engine.lake.derived`); `quotes()`
reads stored partitions that are current and derives the others on the fly.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engine import schema
from engine.lake.derived import L2_COLS, derive
from engine.paths import is_pattern, pattern_regex
from engine.research import clamp_for, read_entries
from engine.timeutil import result_times, to_ns


# ---- stored partitions -----------------------------------------------------------------------
def _is_current(eng, source: str, market: str, date: str) -> bool:
    """A stored quotes partition is current when written after every l2 file of its partition."""
    q = eng.catalog.files_in(("quotes", source, market, date))
    if not q:
        return False
    l2 = eng.catalog.files_in(("l2", source, market, date))
    if not l2:
        return True
    return min(e.created_ns for e in q) >= max(e.created_ns for e in l2)


# ---- query -------------------------------------------------------------------------------------
def filter_instrument(t: pa.Table, instrument) -> pa.Table:
    if not is_pattern(instrument):
        return t
    return t.filter(pc.match_substring_regex(t.column("instrument").cast(pa.string()), pattern_regex(instrument)))


def quotes(eng, source=None, market=None, instrument=None, start=None, end=None, *, allow_unsealed: bool = False,
           derive_missing: bool = True, raw_ns: bool = False) -> pl.DataFrame:
    """Best bid/ask per change for (source, market[, instrument]) with `ts` in [start, end).

    Stored partitions that are current are read; the others are derived from their l2 day
    partition (whole day up to `end`, so the book state at `start` is right). Sorted like the
    stored table: (instrument, ts, seq) within each partition, partitions in date order.
    `ts`/`recv_ts` are Datetime("ns", "UTC"); int64 ns with `raw_ns=True`.
    """
    return result_times(_quotes(eng, source, market, instrument, start, end, allow_unsealed, derive_missing),
                        schema.time_cols("quotes"), raw_ns=raw_ns)


def _quotes(eng, source, market, instrument, start, end, allow_unsealed: bool, derive_missing: bool) -> pl.DataFrame:
    from engine.research.query import Query

    start, end = to_ns(start, name="start"), to_ns(end, name="end")
    qy = Query(eng)
    if start is not None and end is not None and end <= start:
        from engine.research.query import QueryError

        raise QueryError("end must be after start; end is exclusive")
    qy._check_names("l2", source, market)
    parts = eng.catalog.partitions("l2", source, market, start, end)
    plain_inst = None if instrument is None or "*" in instrument or "?" in instrument else instrument
    out = []
    for (_, src, mkt, date) in parts:
        if _is_current(eng, src, mkt, date):
            ents = eng.catalog.files_in(("quotes", src, mkt, date))
            t = read_entries(eng, "quotes", ents, instrument=plain_inst, start=start, end=end,
                             clamp=clamp_for(eng, "quotes", ents, allow_unsealed))
            out.append(filter_instrument(t, instrument))
            continue
        if not derive_missing:
            continue
        ents = [e for e in eng.catalog.files_in(("l2", src, mkt, date)) if end is None or e.min_ts is None or e.min_ts < end]
        # whole files (not cut at `end`): the same rows the stored partition is derived from
        t = read_entries(eng, "l2", ents, instrument=plain_inst,
                         clamp=clamp_for(eng, "l2", ents, allow_unsealed), columns=L2_COLS)
        t = filter_instrument(t, instrument)
        q = derive(t).to_arrow()
        if q.num_rows and (start is not None or end is not None):
            tsc = q.column("ts")
            m = None
            if start is not None:
                m = pc.greater_equal(tsc, start)
            if end is not None:
                e = pc.less(tsc, end)
                m = e if m is None else pc.and_(m, e)
            q = q.filter(m)
        out.append(q)
    if not out:
        return pl.from_arrow(schema.QUOTES_SCHEMA.empty_table())
    t = pa.concat_tables([schema.validate("quotes", x) for x in out]).unify_dictionaries()
    return pl.from_arrow(t)
