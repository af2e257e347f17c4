"""Research toolkit over the lake: quotes, books, as-of joins, bars, gap-aware windows, coverage.

Every function takes an `Engine` first and returns Polars; `Engine` delegates to them
(`eng.quotes`, `eng.book`, `eng.books`, `eng.asof`, `eng.bars`, `eng.valid`, `eng.coverage`,
`eng.contract_view`).
Times are computed on int64 ns: a function reading through the engine (`eng.gaps`, `eng.trades`,
another research function) asks for `raw_ns=True`, and only its own result is converted to
`Datetime("ns", "UTC")` (unless its caller passed `raw_ns=True`), so no arithmetic sees datetimes.

Book semantics shared by quotes and books (see `engine.research.quotes`):
rows of one instrument are applied in arrival order — (`recv_ts`, `ts`, `seq`), ties in stored
order; a run of `snapshot` rows from one message (same `recv_ts` and `seq`) replaces the book;
size 0 removes a level; a quote is emitted after each event (rows sharing instrument, `recv_ts`,
`ts`, `seq`; a whole snapshot is one event) whose best bid/ask differs from the previous one.
Time is the effective ts: the running max of `ts` in arrival order per instrument, so the book
"at t" is the arrival-order prefix of rows with effective ts <= t (quotes, book and books agree).

This module holds the small helpers the submodules share (durations, reading catalogued files).
"""

from __future__ import annotations


import polars as pl
import pyarrow as pa

from engine.timeutil import parse_duration  # noqa: F401  (re-exported for the toolkit)

_META: dict = {}


def _metadata(path: str):
    """Parquet footer of a lake file, cached by (path, size, mtime): lake files never change in place."""
    import os

    import pyarrow.parquet as pq

    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    md = _META.get(key)
    if md is None:
        if len(_META) > 4096:
            _META.clear()
        pf = pq.ParquetFile(path)
        md = _META[key] = (pf.metadata, pf.schema_arrow.names)
    return md


def _row_groups(path: str, instrument, start, end) -> list[int]:
    """Row groups whose statistics may hold rows of `instrument` with time in [start, end)."""
    md, names = _metadata(path)
    ii = names.index("instrument") if "instrument" in names else None
    ti = names.index("ts") if "ts" in names else (names.index("start_ts") if "start_ts" in names else None)
    out = []
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        ok = True
        if instrument is not None and ii is not None:
            st = rg.column(ii).statistics
            if st is not None and st.has_min_max and not (st.min <= instrument <= st.max):
                ok = False
        if ok and ti is not None and (start is not None or end is not None):
            st = rg.column(ti).statistics
            if st is not None and st.has_min_max:
                if (start is not None and st.max < start) or (end is not None and st.min >= end):
                    ok = False
        if ok:
            out.append(i)
    return out


def _sorted_slice(t: pa.Table, instrument: str, time_col: str, start, end) -> pa.Table | None:
    """Lake files are sorted by (instrument, time): the rows of one instrument in [start, end) are
    one contiguous slice, found with vector ops and binary search instead of a row filter.
    Returns None when the rows turn out not to be laid out that way (then the caller filters)."""
    import numpy as np

    col = t.column("instrument")
    parts = []
    for ch in col.chunks:
        if pa.types.is_dictionary(ch.type):
            d = ch.dictionary.to_pylist()
            if instrument not in d:
                parts.append(np.zeros(len(ch), dtype=bool))
                continue
            code = d.index(instrument)
            parts.append(ch.indices.fill_null(-1).to_numpy(zero_copy_only=False) == code)
        else:
            parts.append(ch.to_numpy(zero_copy_only=False) == instrument)
    m = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
    hit = np.flatnonzero(m)
    if len(hit) == 0:
        return t.slice(0, 0)
    a, b = int(hit[0]), int(hit[-1]) + 1
    if b - a != len(hit):
        return None
    ts = t.column(time_col).slice(a, b - a)
    ts = (ts.combine_chunks() if ts.num_chunks != 1 else ts.chunk(0)).to_numpy(zero_copy_only=False)
    if len(ts) > 1 and np.any(ts[1:] < ts[:-1]):
        return None
    lo = int(np.searchsorted(ts, start, side="left")) if start is not None else 0
    hi = int(np.searchsorted(ts, end, side="left")) if end is not None else len(ts)
    return t.slice(a + lo, max(0, hi - lo))


def read_entries(eng, table: str, entries, *, instrument=None, start=None, end=None, clamp=None, columns=None,
                 filter_expr=None) -> pa.Table:
    """Rows of the given catalogued files, in file order then stored order (no re-sorting).

    Row groups are pruned with the files' statistics (cached footers), so a narrow time window
    of one instrument in a compacted day reads only the row groups that can hold it.
    """
    import pyarrow.parquet as pq

    from engine import schema
    from engine.research.query import Query

    sp = schema.spec(table)
    if not entries:
        t = sp.schema.empty_table()
        return t.select(columns) if columns else t
    plain = None if instrument is None or "*" in instrument or "?" in instrument else instrument
    expr = Query(eng)._filter_expr(table, plain, start, end, clamp or {})
    if filter_expr is not None:
        expr = filter_expr if expr is None else expr & filter_expr
    need = list(sp.columns) if columns is None else list(dict.fromkeys(
        list(columns) + [c for c in ("ts", "recv_ts", "instrument", "source", "snapshot", sp.time_col) if c in sp.columns]))
    parts = []
    for e in entries:
        path = str(eng.local_path(e))
        try:
            rgs = _row_groups(path, plain, start, end)
            if not rgs:
                continue
            t = pq.ParquetFile(path, page_checksum_verification=True).read_row_groups(rgs, columns=need)
        except (pa.ArrowInvalid, OSError) as err:
            raise eng.corrupt(e.key, path, str(err)) from None
        t = t.replace_schema_metadata(None)
        fast = None
        if plain is not None and filter_expr is not None:
            fast = None
        elif plain is not None and not (clamp and e.source in clamp and (e.max_recv_ts is None or e.max_recv_ts >= clamp[e.source])):
            fast = _sorted_slice(t, plain, sp.time_col, start, end)
        if fast is not None:
            t = fast
        elif expr is not None:
            t = t.filter(expr)
        parts.append(t)
    if not parts:
        t = sp.schema.empty_table()
        return t.select(columns) if columns else t
    t = pa.concat_tables(parts).unify_dictionaries() if len(parts) > 1 else parts[0]
    return t.select(columns) if columns else t


def to_polars(t) -> pl.DataFrame:
    return t if isinstance(t, pl.DataFrame) else pl.from_arrow(t)


def clamp_for(eng, table: str, entries, allow_unsealed: bool) -> dict:
    """Per-source sealed watermark to clamp reads of `entries` to (empty when unsealed is allowed)."""
    from engine import schema

    if allow_unsealed or schema.spec(table).part_col != "recv_ts":
        return {}
    return {s: eng.catalog.watermark(s) for s in sorted({e.source for e in entries})}
