"""As-of joins of any two tables (or DataFrames), across sources and markets.

`asof(eng, left, right, on="ts", by="instrument", tolerance=None, direction="backward")`:
for every left row, the right row of the same `by` group whose `on` is the nearest at or before
(backward), at or after (forward) or either (nearest), within `tolerance`. Ties: backward takes
the last of equal right times (the latest state), forward the first. Left row order is kept.

`left`/`right` are Polars (or Arrow) frames, a table name ("trades", "quotes", "l2", "gaps"), or
(table name, filter dict); `left_filter`/`right_filter` go with plain names. When the right side
is read from the lake without a time range, the range that can match the left rows is used
(from left's min/max `on` and `tolerance`), so only the files needed are read.

`right_columns` keeps only some of right's columns (a mapping also renames them, e.g.
`{"bid_price": "spot_bid"}`), so columns of the same name on both sides need no suffix; the join
keys (`on`, `by`) are always kept, and renaming `on` names the kept copy of right's time.
An empty left side reads nothing from the lake.

Speed: Polars' `join_asof` is used directly when each side is sorted by `on` within its `by`
groups (the lake's own order, checked in O(n)); otherwise the sides are sorted first.
The right side's `on` is kept as `{on}{suffix}` so the age of each match is visible.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl
import pyarrow as pa

from engine import schema
from engine.research import parse_duration
from engine.timeutil import result_times, to_ns

DIRECTIONS = ("backward", "forward", "nearest")


def _frame(x) -> pl.DataFrame:
    if isinstance(x, pl.DataFrame):
        return x
    if isinstance(x, pl.LazyFrame):
        return x.collect()
    if isinstance(x, (pa.Table, pa.RecordBatch)):
        return pl.from_arrow(x)
    mod = type(x).__module__
    if mod.startswith("pandas"):
        return pl.from_pandas(x)
    raise TypeError(f"asof: expected a table name, (name, filters), or a Polars/Arrow frame, got {type(x).__name__}")


def _spec(x, filters):
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str):
        return x[0], dict(x[1] or {}), True
    if isinstance(x, str):
        return x, dict(filters or {}), True
    return x, None, False


def _read(eng, table: str, filters: dict, raw_ns: bool) -> pl.DataFrame:
    if table == "quotes":
        return eng.quotes(**{**filters, "raw_ns": raw_ns})
    if table not in schema.TABLES:
        raise ValueError(f"asof: unknown table {table!r}; tables: {', '.join(schema.TABLES)}")
    return eng.read(table, **{**filters, "raw_ns": raw_ns})


def _empty(table: str, raw_ns: bool) -> pl.DataFrame:
    """No rows, the columns and types a read of `table` would have: what an empty left side needs."""
    if table not in schema.TABLES:
        raise ValueError(f"asof: unknown table {table!r}; tables: {', '.join(schema.TABLES)}")
    return result_times(pl.from_arrow(schema.spec(table).schema.empty_table()), schema.time_cols(table), raw_ns=raw_ns)


def _keep(r_df: pl.DataFrame, right_columns, on: str, by: list[str]) -> tuple[pl.DataFrame, str | None]:
    """Right's columns narrowed (and renamed) to `right_columns`; the join keys stay. Returns the
    frame and the name asked for right's `on` (None: the default `{on}{suffix}`)."""
    ren = dict(right_columns) if isinstance(right_columns, Mapping) else {c: c for c in right_columns}
    missing = [c for c in ren if c not in r_df.columns]
    if missing:
        raise ValueError(f"asof: right_columns {missing} not on the right side; it has {', '.join(r_df.columns)}")
    on_name = ren.pop(on, None)
    keys = list(dict.fromkeys([on, *by]))
    return r_df.select([*keys, *(pl.col(c).alias(n) for c, n in ren.items() if c not in keys)]), on_name


def _window(left: pl.DataFrame, on: str, tol: int | None, direction: str) -> dict:
    """Time filter for a right side read from the lake: the rows that can match left's [lo, hi]."""
    if left.height == 0:
        return {}
    t = result_times(left.select(on), [on], raw_ns=True).to_series()  # Datetime or int ns
    lo, hi = int(t.min()), int(t.max())
    back = direction in ("backward", "nearest")
    fwd = direction in ("forward", "nearest")
    start = (lo - tol if tol is not None else None) if back else lo
    end = (hi + 1 + tol if tol is not None else None) if fwd else hi + 1
    return {k: v for k, v in (("start", start), ("end", end)) if v is not None}


def sorted_within(df: pl.DataFrame, on: str, by: list[str]) -> bool:
    """True when `on` is non-decreasing within each `by` group and each group is one contiguous run
    (or `on` is globally sorted) — what `join_asof` needs."""
    if df.height < 2 or df[on].is_sorted():
        return True
    if not by:
        return False
    same = pl.all_horizontal([pl.col(b).eq_missing(pl.col(b).shift()) for b in by])
    r = df.select(
        bad=(same & (pl.col(on).diff() < 0)).any(),
        runs=(~same).sum(),
        groups=pl.struct(by).n_unique() if len(by) > 1 else pl.col(by[0]).n_unique(),
    ).row(0)
    return (not r[0]) and r[1] == r[2]


def _align_by(l: pl.DataFrame, r: pl.DataFrame, by: list[str]):
    """Give the `by` columns one dtype on both sides (Categorical/Enum vs String → String)."""
    casts_l, casts_r = [], []
    for b in by:
        if b not in l.columns or b not in r.columns:
            raise ValueError(f"asof: by column {b!r} missing on the {'left' if b not in l.columns else 'right'}")
        if l.schema[b] != r.schema[b]:
            casts_l.append(pl.col(b).cast(pl.String))
            casts_r.append(pl.col(b).cast(pl.String))
    if casts_l:
        l, r = l.with_columns(casts_l), r.with_columns(casts_r)
    return l, r


def asof(eng, left, right, on: str = "ts", by="instrument", tolerance=None, direction: str = "backward", *,
         left_filter: dict | None = None, right_filter: dict | None = None, suffix: str = "_right",
         keep_right_on: bool = True, right_columns=None, raw_ns: bool = False) -> pl.DataFrame:
    """As-of join (see module doc). Returns left's rows in left's order with right's columns added.

    Sides read from the lake carry Datetime("ns", "UTC") times (int64 ns with `raw_ns=True`); a time
    `on` column is brought to that same type on both sides, so frames of either kind join; other
    columns of a frame passed in keep their types."""
    if direction not in DIRECTIONS:
        raise ValueError(f"asof: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    tol = parse_duration(tolerance, name="tolerance")
    by = [by] if isinstance(by, str) else list(by or [])
    lx, lf, l_lake = _spec(left, left_filter)
    rx, rf, r_lake = _spec(right, right_filter)
    l_df = _read(eng, lx, lf, raw_ns) if l_lake else _frame(lx)
    if r_lake and l_df.height == 0 and not ("start" in rf or "end" in rf):
        r_df = _empty(rx, raw_ns)  # nothing can match: no read (an unbounded one, without this)
    elif r_lake:
        win = {} if ("start" in rf or "end" in rf) else _window(l_df, on, tol, direction)
        r_df = _read(eng, rx, {**win, **rf}, raw_ns)
    else:
        r_df = _frame(rx)
    for name, df in (("left", l_df), ("right", r_df)):
        if on not in df.columns:
            raise ValueError(f"asof: column {on!r} missing on the {name} side")
    lake_times = {c for x, lake in ((lx, l_lake), (rx, r_lake)) if lake for c in schema.time_cols(x)}
    if on in lake_times or any(isinstance(df.schema[on], pl.Datetime) for df in (l_df, r_df)):
        l_df, r_df = (result_times(df, [on], raw_ns=raw_ns) for df in (l_df, r_df))  # one type; ns: int tolerance is ns
    l_df, r_df = _align_by(l_df, r_df, by)
    on_name = None
    if right_columns is not None:
        r_df, on_name = _keep(r_df, right_columns, on, by)
    if keep_right_on:
        r_df = r_df.with_columns(pl.col(on).alias(on_name or f"{on}{suffix}"))
    r_sorted = sorted_within(r_df, on, by)
    l_sorted = sorted_within(l_df, on, by)
    if not r_sorted:
        r_df = r_df.sort(on, maintain_order=True)
    restore = None
    if not l_sorted:
        restore = "__asof_row"
        l_df = l_df.with_row_index(restore).sort(on, maintain_order=True)
    out = l_df.join_asof(
        r_df, on=on, by=by or None, strategy=direction, tolerance=tol, suffix=suffix, check_sortedness=False,
    )
    if restore:
        out = out.sort(restore).drop(restore)
    return out


__all__ = ["asof", "sorted_within", "to_ns"]
