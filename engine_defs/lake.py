"""Engine-side helpers for the Dagster definitions (no Dagster imports here, so they test alone).

- `read_log`: the catalog log from a byte offset, line by line with each line's end offset, without
  building the catalog's in-memory index (a sensor tick must stay fast on a 100k-file log);
- `part_stats`: rows, bytes, files, time range, largest gap, silent intervals of one partition;
- `recorded_gaps`: rows of the `gaps` table overlapping one (source, market, day);
- `integrity`: schema, sort order, duplicates (data stored twice), row count and partition bounds of a table;
- `compact_gated`: the core's `compact_partition`, with `integrity` run on the merged file after it
  is written and before it is uploaded or swapped into the catalog, so a bad compaction is blocked.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.timeutil import NS, NS_PER_DAY, NS_PER_HOUR, now_ns, to_ns

if TYPE_CHECKING:  # imported where used: the code server loading the definitions stays light
    import numpy as np
    import polars as pl
    import pyarrow as pa

    from engine.lake.catalog import FileEntry, Op

RAW_TABLES = ("l2", "trades", "gaps")
DATA_TABLES = ("l2", "trades")
SILENCE_S = float(os.environ.get("ENGINE_DAGSTER_SILENCE_S", "300"))  # coverage: silence longer than this is a hole


# ---- catalog log ---------------------------------------------------------------------------------


@dataclass
class LogRead:
    ops: list[tuple[int, Op]]  # (offset just after the line, op)
    offset: int  # where the next read starts
    size: int  # log size when read
    reset: bool = False  # the cursor was past the end (log replaced): read from 0
    bad_lines: int = 0


def read_log(path: Path, offset: int, max_bytes: int = 4 << 20, max_ops: int | None = None) -> LogRead:
    """Complete lines after `offset`, at most `max_bytes` and `max_ops` (the rest is left for later)."""
    from engine.lake.catalog import BadLine, decode_op

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return LogRead([], 0, 0, reset=offset > 0)
    reset = False
    if offset > size:
        offset, reset = 0, True
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(max_bytes)
    out: list[tuple[int, Op]] = []
    pos = 0
    bad = 0
    end = data.rfind(b"\n") + 1
    while pos < end:
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        pos = nl + 1
        if not line.strip():
            continue
        try:
            op = decode_op(line)
        except BadLine:  # torn or incomplete: counted, like the catalog skips it
            bad += 1
            continue
        out.append((offset + pos, op))
        if max_ops is not None and len(out) >= max_ops:
            break
    return LogRead(out, offset + pos, size, reset, bad)


# ---- partition figures ---------------------------------------------------------------------------


def day_bounds(date: str) -> tuple[int, int]:
    start = to_ns(date)
    return start, start + NS_PER_DAY


def is_closed_day(date: str) -> bool:
    return date < dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")


@dataclass
class PartStats:
    table: str
    source: str
    market: str
    date: str
    files: int = 0
    rows: int = 0
    bytes: int = 0
    remote_files: int = 0
    local_files: int = 0
    compacted: bool = False
    min_ts: int | None = None
    max_ts: int | None = None
    min_recv_ts: int | None = None
    max_recv_ts: int | None = None
    largest_gap_s: float | None = None  # longest time between consecutive rows (receive time)
    window: tuple[int, int] | None = None  # the part of the day that should be covered
    silences: list[tuple[int, int]] = field(default_factory=list)  # holes longer than SILENCE_S
    covered_s: float | None = None
    hours_with_data: int = 0
    keys: list[str] = field(default_factory=list)
    instruments: int | None = None  # distinct instruments (Kalshi: contracts) in the files; None: not recorded
    hourly_rows: list[int] | None = None  # rows per UTC hour of the day (receive time), when rows were read

    @property
    def span_hours(self) -> float:
        if self.min_ts is None or self.max_ts is None:
            return 0.0
        return (self.max_ts - self.min_ts) / 3.6e12

    @property
    def lag_s(self) -> float | None:
        """Seconds from the newest row's receive time to now: how far behind this figure is."""
        return None if self.max_recv_ts is None else (now_ns() - self.max_recv_ts) / NS

    @property
    def coverage_pct(self) -> float | None:
        if not self.window or self.window[1] <= self.window[0] or self.covered_s is None:
            return None
        return round(100.0 * self.covered_s / ((self.window[1] - self.window[0]) / NS), 3)


def instrument_names(files: list[FileEntry]) -> set[str] | None:
    """The instruments the files hold, from their catalogued figures (None: a file has none recorded)."""
    from engine.lake import instruments

    names: set[str] = set()
    for e in files:
        st = instruments.figures_of(e)
        if st is None:
            return None
        names.update(n for n in st.names if n is not None)
    return names


def _entry_figures(st: PartStats, files: list[FileEntry]) -> None:
    st.files = len(files)
    names = instrument_names(files)
    st.instruments = None if names is None else len(names)
    st.keys = [e.key for e in files]
    st.rows = sum(e.rows for e in files)
    st.bytes = sum(e.bytes for e in files)
    st.remote_files = sum(1 for e in files if e.remote)
    st.local_files = sum(1 for e in files if e.local)
    st.compacted = len(files) == 1 and files[0].compacted

    def agg(fn, attr):
        vals = [getattr(e, attr) for e in files if getattr(e, attr) is not None]
        return fn(vals) if vals else None

    st.min_ts, st.max_ts = agg(min, "min_ts"), agg(max, "max_ts")
    st.min_recv_ts, st.max_recv_ts = agg(min, "min_recv_ts"), agg(max, "max_recv_ts")


def read_column(eng, files: list[FileEntry], col: str) -> np.ndarray:
    import numpy as np

    from engine.lake.writer import read_parquet

    arrays = []
    for e in files:
        t = read_parquet(eng.local_path(e), e.key, columns=[col])
        arrays.append(t.column(col).to_numpy())
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)


def part_stats(eng, table: str, source: str, market: str, date: str, *, read_rows: bool = True,
               silence_s: float = SILENCE_S) -> PartStats:
    """Figures of one (table, source, market, date) partition from the catalog, plus (when
    `read_rows`) the time between consecutive rows read from the files' receive-time column."""
    import numpy as np

    from engine import schema
    from engine_defs.display import hourly_counts

    eng.catalog.refresh()
    st = PartStats(table, source, market, date)
    files = eng.catalog.files_in((table, source, market, date))
    _entry_figures(st, files)
    if not read_rows or table not in DATA_TABLES:
        return st
    day0, day1 = day_bounds(date)
    sealed = eng.catalog.watermark(source)
    wend = min(day1, max(sealed, st.max_recv_ts + 1 if st.max_recv_ts is not None else day0))
    st.window = (day0, wend)
    recv = np.sort(read_column(eng, files, schema.spec(table).part_col)) if files else np.empty(0, np.int64)
    recv = recv[(recv >= day0) & (recv < day1)]
    st.hourly_rows = hourly_counts(recv, day0)
    if len(recv):
        diffs = np.diff(recv)
        st.largest_gap_s = float(diffs.max()) / NS if len(diffs) else 0.0
        st.hours_with_data = int(len(np.unique((recv - day0) // NS_PER_HOUR)))
    thr = int(silence_s * NS)
    holes: list[tuple[int, int]] = []
    if len(recv) == 0:
        if wend > day0:
            holes.append((day0, wend))
    else:
        if recv[0] - day0 > thr:
            holes.append((day0, int(recv[0])))
        if len(recv) > 1:
            idx = np.nonzero(np.diff(recv) > thr)[0]
            holes += [(int(recv[i]), int(recv[i + 1])) for i in idx]
        if wend - recv[-1] > thr:
            holes.append((int(recv[-1]), wend))
    st.silences = holes
    st.covered_s = max(0.0, (wend - day0) / NS - sum((b - a) for a, b in holes) / NS)
    return st


def recorded_gaps(eng, source: str, market: str, date: str) -> pl.DataFrame:
    """Rows of the `gaps` table for (source, market) overlapping the UTC day `date` (sorted by start)."""
    import polars as pl
    import pyarrow as pa

    from engine import schema
    from engine.lake.writer import read_parquet

    day0, day1 = day_bounds(date)
    prev = (dt.date.fromisoformat(date) - dt.timedelta(days=1)).isoformat()
    tables = []
    for d in (prev, date):
        for e in eng.catalog.files_in(("gaps", source, market, d)):
            tables.append(read_parquet(eng.local_path(e), e.key).select(schema.GAPS_SCHEMA.names))
    cols = ["instrument", "kind", "start_ts", "end_ts", "detail"]
    if not tables:
        return pl.DataFrame(schema={"instrument": pl.String, "kind": pl.String, "start_ts": pl.Int64,
                                    "end_ts": pl.Int64, "detail": pl.String})
    df = pl.from_arrow(pa.concat_tables(tables).unify_dictionaries())
    df = df.with_columns(pl.col(pl.Categorical).cast(pl.String)).select(cols)
    return df.filter((pl.col("end_ts") > day0) & (pl.col("start_ts") < day1)).sort("start_ts")


# ---- integrity -----------------------------------------------------------------------------------


# A trade is identified by its trade_id; a gap by all its columns. An l2 message is the run of
# non-snapshot rows sharing (instrument, seq, ts): an exchange puts many level updates under one
# sequence number and may touch one (side, price) more than once in it (the last size wins), so a
# repeated level inside a message is legitimate. A duplicate is the message stored twice: see
# `_l2_duplicates`.
DUP_KEYS = {
    "l2": ("instrument", "seq", "ts"),
    "trades": ("instrument", "trade_id"),
    "gaps": None,  # all its columns: schema.GAPS_SCHEMA.names (`dup_keys`; the schema is imported when used)
}


def dup_keys(table: str) -> tuple[str, ...]:
    """The columns that identify one event of `table`."""
    if table == "gaps":
        from engine import schema

        return tuple(schema.GAPS_SCHEMA.names)
    return DUP_KEYS[table]
DUP_WHAT = {
    "l2": "l2 message(s) stored more than once (same instrument, seq, ts received again, or its rows repeated)",
    "trades": "trade(s) stored more than once (same instrument, trade_id)",
    "gaps": "gap(s) stored more than once (all columns equal)",
}


@dataclass
class Integrity:
    table: str
    rows: int
    expected_rows: int | None
    schema_ok: bool
    sorted_ok: bool
    duplicates: int
    outside_partition: int
    problems: list[str]
    duplicate_examples: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def duplicate_rows(table: str, t: pa.Table) -> tuple[int, list[dict]]:
    """Rows stored more than once (beyond the first copy) and up to 10 examples."""
    if t.num_rows < 2:
        return 0, []
    if table == "l2":
        return _l2_duplicates(t)
    import polars as pl

    keys = list(dup_keys(table))
    df = pl.from_arrow(t.select(keys)).with_columns(pl.col(pl.Categorical).cast(pl.String))
    if table == "trades":
        df = df.filter(pl.col("trade_id").is_not_null())
    dup = df.filter(df.is_duplicated())
    if dup.height == 0:
        return 0, []
    n = dup.height - dup.unique().height  # rows beyond the first of each duplicated event
    return n, dup.unique(maintain_order=True).head(10).to_dicts()


def _l2_duplicates(t: pa.Table) -> tuple[int, list[dict]]:
    """Rows of l2 messages stored more than once.

    Rows of one message (instrument, seq, ts) are taken in stored order, which is arrival order. The
    message was stored again when (a) some of its rows carry another receive time than its first
    row (the exchange sent it again, e.g. a replay after a reconnect), or (b) its first receipt is
    one block of rows repeated k times (the same receipt written twice, e.g. a capture ingested
    twice). A message that sets, clears and sets a level again is neither. Rows without a sequence
    number and snapshots (book anchors repeat the last message's seq and ts) are not judged here.
    """
    import polars as pl

    msg = list(DUP_KEYS["l2"])
    df = (
        pl.from_arrow(t.select(msg + ["recv_ts", "side", "price", "size", "snapshot"]))
        .filter(~pl.col("snapshot") & pl.col("seq").is_not_null())
        .with_columns(pl.col("instrument").cast(pl.String), (pl.col("side").cast(pl.String) == "ask").alias("ask"))
        .sort(msg, maintain_order=True)  # stable: each message's rows together, in stored order
    )
    if df.height < 2:
        return 0, []
    df = df.with_columns(again=pl.col("recv_ts") != pl.col("recv_ts").first().over(msg))
    first = df.filter(~pl.col("again"))
    new = pl.any_horizontal([(pl.col(c) != pl.col(c).shift(1)).fill_null(True) for c in msg])
    first = first.with_columns(gid=new.cum_sum() - 1)
    heads = first.filter(new).select(msg + ["recv_ts"])
    repeated = _repeat_excess(first["gid"].to_numpy(), [first[c].to_numpy() for c in ("ask", "price", "size")])
    extra = heads.with_columns(rows=pl.Series(repeated, dtype=pl.Int64))
    re_recv = df.filter(pl.col("again")).group_by(msg, maintain_order=True).agg(
        pl.col("recv_ts").first(), pl.len().cast(pl.Int64).alias("rows"))
    dups = pl.concat([extra.filter(pl.col("rows") > 0), re_recv]).group_by(msg, maintain_order=True).agg(
        pl.col("recv_ts").max(), pl.col("rows").sum())
    return int(dups["rows"].sum() or 0), dups.head(10).to_dicts()


def _repeat_excess(gid: np.ndarray, vals: list[np.ndarray]) -> np.ndarray:
    """Per group of contiguous rows (`gid` 0..G-1): rows beyond the shortest block that, repeated, makes the group."""
    import numpy as np

    n = len(gid)
    starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
    length = np.diff(np.r_[starts, n])
    pos = np.arange(n) - starts[gid]
    period = length.copy()

    def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.logical_and.reduce([v[a] == v[b] for v in vals])

    idx = np.arange(n)
    recurs = np.zeros(len(starts), dtype=bool)  # only a group whose first row comes back can repeat
    hit = (pos > 0) & same(idx, starts[gid])
    recurs[gid[hit]] = True
    for k in range(2, int(length[recurs].max(initial=1)) + 1):
        cand = recurs & (length % k == 0)
        if not cand.any():
            continue
        block = length // k
        rows = np.flatnonzero(cand[gid] & (pos >= block[gid]))
        bad = np.zeros(len(starts), dtype=bool)
        bad[gid[rows[~same(rows, rows - block[gid[rows]])]]] = True
        ok = cand & ~bad
        period[ok] = np.minimum(period[ok], block[ok])
    return length - period


def integrity(table: str, t: pa.Table, *, expected_rows: int | None = None, source: str | None = None,
              market: str | None = None, date: str | None = None) -> Integrity:
    """Schema, sort order, duplicate events, row count (against the catalog) and partition bounds."""
    import pyarrow as pa

    from engine import schema
    from engine.lake.writer import is_sorted

    sp = schema.spec(table)
    problems: list[str] = []
    got = [(f.name, str(f.type)) for f in t.schema]
    want = [(f.name, str(f.type)) for f in sp.schema]
    schema_ok = got == want
    if not schema_ok:
        problems.append(f"schema differs from {table}: got {got}, want {want}")
    sorted_ok = bool(schema_ok and is_sorted(table, t))
    if schema_ok and not sorted_ok:
        problems.append(f"rows are not sorted by ({', '.join(sp.sort_keys)})")
    dups, examples = duplicate_rows(table, t) if schema_ok else (0, [])
    if dups:
        problems.append(f"{dups} duplicate row(s): {DUP_WHAT[table]}")
    if expected_rows is not None and t.num_rows != expected_rows:
        problems.append(f"{t.num_rows} rows, the catalog says {expected_rows}")
    outside = 0
    if schema_ok and t.num_rows:
        import pyarrow.compute as pc

        for col, want_v in (("source", source), ("market", market)):
            if want_v is not None:
                outside += t.num_rows - pc.sum(pc.equal(t.column(col).cast(pa.string()), want_v)).as_py() or 0
        if date is not None:
            d0, d1 = day_bounds(date)
            c = t.column(sp.part_col)
            outside += pc.sum(pc.or_(pc.less(c, d0), pc.greater_equal(c, d1))).as_py() or 0
        if outside:
            problems.append(f"{outside} row(s) outside partition {source}:{market} {date}")
    return Integrity(table, t.num_rows, expected_rows, schema_ok, sorted_ok, dups, outside, problems, examples)


def integrity_of_file(table: str, path: Path, key: str | None = None, **kw) -> Integrity:
    from engine.lake.writer import read_parquet

    t = read_parquet(path, key or str(path))
    return integrity(table, t.replace_schema_metadata(None), **kw)


class IntegrityError(RuntimeError):
    def __init__(self, report: Integrity, key: str):
        super().__init__(f"compacted file {key} failed integrity checks: {'; '.join(report.problems)}")
        self.report = report
        self.key = key


def compact_gated(eng, part: tuple[str, str, str, str], publish: bool = True):
    """Compact one partition; the merged file must pass `integrity` before upload and catalog swap.

    Returns (CompactionResult | None, Integrity | None); raises IntegrityError (nothing uploaded,
    catalog unchanged) when the merged file is bad. `publish=False`: the caller republishes the
    manifest once after a series of partitions (as the core's `compact` pass does).
    """
    from engine.lake.compaction import compact_partition, purge_retired

    purge_retired(eng)  # earlier compactions' retired files, once their grace period has passed
    table, source, market, date = part
    expected = sum(e.rows for e in eng.catalog.files_in(part))
    report: list[Integrity] = []

    def gate(path: Path, key: str) -> None:
        r = integrity_of_file(table, path, key, expected_rows=expected, source=source, market=market, date=date)
        report.append(r)
        if not r.passed:
            raise IntegrityError(r, key)

    res = compact_partition(eng, part, validate=gate, publish=publish)
    return res, (report[0] if report else None)


def release_memory() -> None:
    """Hand the memory Arrow's allocator keeps cached back to the OS: between the partitions of a
    ranged run, so the run worker does not hold every partition's peak (nothing when Arrow is not loaded)."""
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        pa.default_memory_pool().release_unused()


def fmt_ts(ns: int | None) -> str:
    if ns is None:
        return "-"
    return dt.datetime.fromtimestamp(ns / NS, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
