"""Canonical tables: the one place where columns, types, sort keys and partition rules live.

Every other module asks this one what a table looks like; nothing else spells a column list.

Row order: files are sorted by a table's `sort_keys`, and rows with equal keys keep their arrival
order. That order carries meaning: one l2 message (one instrument, `ts` and `seq`) may touch a
(side, price) level more than once, and the last size wins. So every sort of stored rows is stable
(the writer's lexsort, the append path's split), and compaction merges a partition's files in the
order they were written; readers that re-sort (books, quotes) sort stably too.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.paths import key_part_problem
from engine.timeutil import NS_PER_DAY, NS_PER_HOUR  # noqa: F401  (re-exported: schema.NS_PER_HOUR)

SCHEMA_VERSION = 1
WRITER = "data-engine"
MIN_TS_NS = 10**17  # 1973-03-03 in ns; the present in µs or ms stays below it until the year 5138
MAX_SKEW_NS = NS_PER_DAY  # an exchange time this far from its receive time is not a time of this row
INSTRUMENT_MAX = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Side(str, enum.Enum):
    BID = "bid"
    ASK = "ask"


class TakerSide(str, enum.Enum):
    BUY = "buy"
    SELL = "sell"


class GapKind(str, enum.Enum):
    DISCONNECT = "disconnect"
    SEQUENCE = "sequence"
    RESTART = "restart"
    STALE = "stale"
    CORRUPT = "corrupt"  # a damaged spool record, quarantined at recovery
    CHECKSUM = "checksum"  # the venue's book checksum disagreed with the book kept (resubscribed)


class InstrumentKind(str, enum.Enum):
    SPOT = "spot"
    BINARY = "binary"  # a Kalshi-style yes/no contract


_DICT = pa.dictionary(pa.int32(), pa.string())


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


L2_SCHEMA = pa.schema(
    [
        _f("ts", pa.int64()),
        _f("recv_ts", pa.int64()),
        _f("source", _DICT),
        _f("market", _DICT),
        _f("instrument", _DICT),
        _f("side", _DICT),
        _f("price", pa.float64()),
        _f("size", pa.float64()),
        _f("seq", pa.int64(), nullable=True),
        _f("snapshot", pa.bool_()),
    ]
)

TRADES_SCHEMA = pa.schema(
    [
        _f("ts", pa.int64()),
        _f("recv_ts", pa.int64()),
        _f("source", _DICT),
        _f("market", _DICT),
        _f("instrument", _DICT),
        _f("side", _DICT),
        _f("price", pa.float64()),
        _f("size", pa.float64()),
        _f("trade_id", pa.string()),
        _f("seq", pa.int64(), nullable=True),
    ]
)

GAPS_SCHEMA = pa.schema(
    [
        _f("source", _DICT),
        _f("market", _DICT),
        _f("instrument", _DICT, nullable=True),
        _f("start_ts", pa.int64()),
        _f("end_ts", pa.int64()),
        _f("kind", _DICT),
        _f("detail", pa.string(), nullable=True),
    ]
)

# Derived table (best bid/ask per change), built from l2 by compaction or on demand.
QUOTES_SCHEMA = pa.schema(
    [
        _f("ts", pa.int64()),
        _f("recv_ts", pa.int64()),
        _f("source", _DICT),
        _f("market", _DICT),
        _f("instrument", _DICT),
        _f("bid_price", pa.float64(), nullable=True),
        _f("bid_size", pa.float64(), nullable=True),
        _f("ask_price", pa.float64(), nullable=True),
        _f("ask_size", pa.float64(), nullable=True),
        _f("seq", pa.int64(), nullable=True),
    ]
)


# Reference data: one row per instrument and version (append-only). A version is in force from its
# `valid_from` (the receive time of the message or REST answer it came from) until the next one of
# the same (source, instrument). Contract fields are null for spot instruments.
INSTRUMENTS_SCHEMA = pa.schema(
    [
        _f("valid_from", pa.int64()),
        _f("source", _DICT),
        _f("market", _DICT),
        _f("instrument", _DICT),
        _f("kind", _DICT),  # spot | binary
        _f("base", pa.string(), nullable=True),  # BTC (spot) or the contract's underlying asset
        _f("quote", pa.string(), nullable=True),  # USD
        _f("tick_size", pa.float64(), nullable=True),
        _f("size_increment", pa.float64(), nullable=True),
        _f("min_size", pa.float64(), nullable=True),
        _f("status", pa.string(), nullable=True),  # the venue's word (online, open, settled, ...)
        _f("underlying", pa.string(), nullable=True),  # canonical asset of a contract (BTC)
        _f("strike_type", pa.string(), nullable=True),  # as Kalshi names it: greater, less, between, ...
        _f("floor_strike", pa.float64(), nullable=True),
        _f("cap_strike", pa.float64(), nullable=True),
        _f("open_ts", pa.int64(), nullable=True),
        _f("close_ts", pa.int64(), nullable=True),
        _f("expiration_ts", pa.int64(), nullable=True),
        _f("result", pa.string(), nullable=True),  # yes | no | null (not determined)
        _f("settlement_value", pa.float64(), nullable=True),
        _f("settled_ts", pa.int64(), nullable=True),
        _f("title", pa.string(), nullable=True),
    ]
)


@dataclass(frozen=True)
class TableSpec:
    """How a table is stored: its schema, which column places a row in time, how files sort."""

    name: str
    schema: pa.Schema
    time_col: str  # event time used for range filters and min/max stats
    part_col: str  # time column that decides date partition and hour (recv_ts for raw tables)
    sort_keys: tuple[str, ...]  # ties keep arrival order (see the module docstring)
    enums: dict[str, frozenset[str]]
    seq_col: str | None = "seq"

    @property
    def columns(self) -> list[str]:
        return self.schema.names


TABLES: dict[str, TableSpec] = {
    "l2": TableSpec(
        "l2",
        L2_SCHEMA,
        "ts",
        "recv_ts",
        ("instrument", "ts", "seq"),
        {"side": frozenset(s.value for s in Side)},
    ),
    "trades": TableSpec(
        "trades",
        TRADES_SCHEMA,
        "ts",
        "recv_ts",
        ("instrument", "ts", "seq"),
        {"side": frozenset(s.value for s in TakerSide)},
    ),
    "gaps": TableSpec(
        "gaps",
        GAPS_SCHEMA,
        "start_ts",
        "start_ts",
        ("instrument", "start_ts"),
        {"kind": frozenset(k.value for k in GapKind)},
        seq_col=None,
    ),
    "instruments": TableSpec(
        "instruments",
        INSTRUMENTS_SCHEMA,
        "valid_from",
        "valid_from",
        ("instrument", "valid_from"),
        {"kind": frozenset(k.value for k in InstrumentKind)},
        seq_col=None,
    ),
    "quotes": TableSpec(
        "quotes",
        QUOTES_SCHEMA,
        "ts",
        "recv_ts",
        ("instrument", "ts", "seq"),
        {},
    ),
}

RAW_TABLES = ("l2", "trades", "gaps", "instruments")

# Columns holding int64 ns times, per table and per derived result. Storage and the engine's own
# code keep them int64; the public query API hands them out as Datetime("ns", "UTC") (raw_ns=True: int64).
TIME_COLS: dict[str, tuple[str, ...]] = {
    "l2": ("ts", "recv_ts"),
    "trades": ("ts", "recv_ts"),
    "gaps": ("start_ts", "end_ts"),
    "quotes": ("ts", "recv_ts"),
    "instruments": ("valid_from", "open_ts", "close_ts", "expiration_ts", "settled_ts"),
    "book": ("ts", "snapshot_ts", "book_ts"),  # book() and books()
    "bars": ("ts", "end_ts"),
    "valid": ("start_ts", "end_ts"),  # valid() spans
    "coverage": ("hour",),
    "summary": ("min_ts", "max_ts", "min_recv_ts", "max_recv_ts"),  # catalog.summary(), instruments()
}


def time_cols(kind: str) -> tuple[str, ...]:
    """The time columns of a table or result kind (see TIME_COLS)."""
    try:
        return TIME_COLS[kind]
    except KeyError:
        raise SchemaError(f"no time columns known for {kind!r}; known: {', '.join(TIME_COLS)}") from None


def is_time_name(name: str) -> bool:
    """A result column named like the lake's time columns (`ts`, `*_ts`): how sql() picks them."""
    return name == "ts" or name.endswith("_ts") or name == "valid_from"


class SchemaError(ValueError):
    """Input that does not fit a canonical table; the message names table, column and problem."""


def spec(table: str) -> TableSpec:
    try:
        return TABLES[table]
    except KeyError:
        raise SchemaError(f"unknown table {table!r}; tables are: {', '.join(TABLES)}") from None


def file_metadata(table: str) -> dict[bytes, bytes]:
    """Key-value metadata written into every Parquet file."""
    return {
        b"engine.schema_version": str(SCHEMA_VERSION).encode(),
        b"engine.table": table.encode(),
        b"engine.writer": WRITER.encode(),
    }


def _to_arrow(table: str, data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    mod = type(data).__module__
    if mod.startswith("polars"):
        import polars as pl

        if isinstance(data, pl.LazyFrame):
            data = data.collect()
        return data.to_arrow()
    if mod.startswith("pandas"):
        return pa.Table.from_pandas(data, preserve_index=False)
    raise SchemaError(
        f"table {table}: expected a pyarrow Table/RecordBatch or a polars DataFrame, got {type(data).__name__}"
    )


def _compatible(want: pa.DataType, got: pa.DataType) -> bool:
    if want == got:
        return True
    if pa.types.is_dictionary(want):
        base = got.value_type if pa.types.is_dictionary(got) else got
        return pa.types.is_string(base) or pa.types.is_large_string(base) or pa.types.is_string_view(base)
    if pa.types.is_string(want):
        return pa.types.is_large_string(got) or pa.types.is_string_view(got)
    if pa.types.is_int64(want):
        return pa.types.is_integer(got) or pa.types.is_null(got)
    if pa.types.is_float64(want):
        return pa.types.is_floating(got) or pa.types.is_integer(got)
    return False


def validate(table: str, data: Any) -> pa.Table:
    """Check `data` against the canonical schema and return it cast to exactly that schema.

    Errors name the table, the column and the problem, so a bad batch is fixed at its source.
    """
    ts = spec(table)
    t = _to_arrow(table, data)
    names = set(t.column_names)
    missing = [c for c in ts.columns if c not in names]
    if missing:
        raise SchemaError(f"table {table}: missing column(s) {', '.join(missing)}")
    extra = [c for c in t.column_names if c not in ts.columns]
    if extra:
        raise SchemaError(f"table {table}: unexpected column(s) {', '.join(extra)}; expected {', '.join(ts.columns)}")
    cols = []
    for field in ts.schema:
        col = t.column(field.name)
        if pa.types.is_timestamp(col.type) and field.name in TIME_COLS.get(table, ()):
            col = col.cast(pa.timestamp("ns", col.type.tz)).cast(pa.int64())  # a query result appended back
        if not _compatible(field.type, col.type):
            raise SchemaError(f"table {table}, column {field.name}: expected {field.type}, got {col.type}")
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaError(f"table {table}, column {field.name}: cannot convert {col.type} to {field.type}: {e}") from None
        if not field.nullable and col.null_count:
            raise SchemaError(f"table {table}, column {field.name}: {col.null_count} null value(s) in a non-null column")
        cols.append(col)
    out = pa.Table.from_arrays(cols, schema=ts.schema)
    for name, allowed in ts.enums.items():
        bad = _dict_values(out.column(name)) - allowed
        if bad and _rows_with(out.column(name), bad) is not None:
            bad = set(out.column(name).unique().dictionary_decode().to_pylist()) - allowed - {None}
            raise SchemaError(
                f"table {table}, column {name}: invalid value(s) {sorted(bad)}; allowed: {sorted(allowed)}"
            )
    return out


def check_rows(table: str, t: pa.Table) -> pa.Table:
    """Refuse rows no lake table takes (see `row_faults`); the error names the table, each column
    and how many rows fail it. Run by append on every batch (validated first)."""
    faults = row_faults(table, t)
    if faults:
        raise SchemaError("; ".join(f"table {table}, column {c}: {int(m.sum())} row(s) {what}" for c, what, m in faults))
    return t


def _name_problem(column: str, v: str) -> str | None:
    if column != "instrument":
        return key_part_problem(v)
    if len(v) > INSTRUMENT_MAX:
        return f"longer than {INSTRUMENT_MAX} characters ({len(v)})"
    if not v or _CONTROL.search(v):
        return "empty or with a control character"
    return None


def _dict_values(col: pa.ChunkedArray) -> set[str]:
    """Values of a dictionary column's dictionaries: a superset of the values in use, read
    without touching the rows (the fast path; `_rows_with` confirms any suspect value)."""
    return {v for c in col.chunks for v in c.dictionary.to_pylist() if v is not None}


def _rows_with(col: pa.ChunkedArray, values) -> np.ndarray | None:
    """Mask of the rows holding any of `values`, or None when no row does."""
    if not values:
        return None
    mask = _np(pc.is_in(col.cast(pa.string()), value_set=pa.array(list(values), pa.string()))).astype(bool)
    return mask if mask.any() else None


def _np(col: pa.ChunkedArray) -> np.ndarray:
    return (col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)).to_numpy(zero_copy_only=False)


def row_faults(table: str, t: pa.Table) -> list[tuple[str, str, np.ndarray]]:
    """(column, problem, mask of the rows at fault) for every check rows of `t` fail; [] if none.

    Vectorized (names are checked once per distinct value), so append and the collectors can run
    it on every batch. `t` has the canonical schema of `table`."""
    out: list[tuple[str, str, np.ndarray]] = []
    if not t.num_rows:
        return out
    for name in ("source", "market", "instrument"):
        if name not in t.column_names:
            continue
        col = t.column(name)
        bad = {v: p for v in _dict_values(col) if (p := _name_problem(name, v))}
        mask = _rows_with(col, bad)
        if mask is not None:
            v = next(v for v in bad if v in set(pc.unique(col.filter(pa.array(mask))).dictionary_decode().to_pylist()))
            out.append((name, f"named {v[:80]!r}{'...' if len(v) > 80 else ''}: {bad[v]}", mask))
    for name in ("price", "size"):
        if name in t.column_names:
            x = _np(t.column(name))
            if not ((x >= 0.0) & (x < np.inf)).all():  # one pass in the common case; NaN fails both
                finite = np.isfinite(x)
                if not finite.all():
                    out.append((name, "not finite (NaN or inf)", ~finite))
                if (finite & (x < 0)).any():
                    out.append((name, "negative", finite & (x < 0)))
    times = {c: _np(t.column(c)) for c in ("ts", "recv_ts", "start_ts", "end_ts", "valid_from") if c in t.column_names}
    for name, x in times.items():
        early = x < MIN_TS_NS
        if early.any():
            out.append((name, f"before 1973 (< 10^17 ns, first {int(x[early][0])}): negative, or in ms or µs instead of ns",
                        early))
    if "ts" in times and "recv_ts" in times:
        far = np.abs(times["recv_ts"] - times["ts"]) >= MAX_SKEW_NS
        if far.any():
            out.append(("ts", "a day or more away from recv_ts", far))
    if "start_ts" in times and "end_ts" in times:
        back = times["end_ts"] < times["start_ts"]
        if back.any():
            out.append(("end_ts", "before start_ts", back))
    return out


def drop_faulty_rows(table: str, t: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """`t` without the rows `row_faults` finds, and how many went per `{table}_{column}` of the
    first check each failed (for collectors, which skip such rows and count them)."""
    faults = row_faults(table, t)
    if not faults:
        return t, {}
    seen = np.zeros(t.num_rows, bool)
    counts: dict[str, int] = {}
    for column, _, mask in faults:
        n = int((mask & ~seen).sum())
        if n:
            counts[f"{table}_{column}"] = counts.get(f"{table}_{column}", 0) + n
        seen |= mask
    return t.filter(pa.array(~seen)), counts
