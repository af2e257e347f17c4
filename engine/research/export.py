"""Export a table range to Parquet, CSV or Arrow (IPC) files, streaming through the scan's reader.

Rows come from the reader behind `eng.scan(...)` (`Query.batches`: one file, one row group at a
time, a remote file fetched through the read cache only when reached), pulled one batch at a time
as the writer takes them, so a month of l2 never has to fit in memory or in the cache. Polars'
`collect_batches` and sinks over the same scan read ahead of a slow writer (a ~200 MB plateau
measured); pulling keeps it to about one batch. Each batch is appended to the open writer and dropped.

Types: Parquet and Arrow keep the result's types (times `timestamp[ns, UTC]`, or int64 ns with
`raw_ns=True`); the lake's dictionary columns (source, market, instrument, side, kind) are written
as plain strings, so batches with different dictionaries share one schema. CSV writes times as
ISO-8601 UTC with nanoseconds (`2026-11-25T14:30:00.123456789Z`).

One file by default; `out` an existing directory (or ending in `/`) gives a folder of one file per
(source, market, UTC date of the table's time column): `{table}-{source}-{market}-{date}.{ext}`.
Every file is written under a temporary name and renamed when complete (engine.fsio).

`data-engine export TABLE [--source S] [--market M] [--instrument I] [--start] [--end]
[--format parquet|csv|arrow] [--out PATH]` prints what it wrote; tqdm shows rows on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl
import pyarrow as pa

from engine import schema
from engine.fsio import commit, fsync_dir, tmp_path_for
from engine.log import get_logger

log = get_logger(component="export")

FORMATS = {"parquet": "parquet", "csv": "csv", "arrow": "arrow"}  # format → file extension
CSV_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.9fZ"  # chrono: %.9f is ".123456789"
BATCH_ROWS = 262_144


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the file (or folder), its files, rows and bytes."""

    path: Path
    files: tuple[Path, ...]
    rows: int
    bytes: int
    format: str


class _Sink:
    """One output file being written under its temporary name."""

    def __init__(self, path: Path, fmt: str, arrow_schema: pa.Schema, frame_schema: pl.Schema):
        self.path, self.fmt = path, fmt
        self.tmp = tmp_path_for(path)
        self.arrow_schema, self.frame_schema = arrow_schema, frame_schema
        self.rows = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self.w = pq.ParquetWriter(self.tmp, arrow_schema, compression="zstd")
        elif fmt == "arrow":
            self.f = pa.OSFile(str(self.tmp), "wb")
            self.w = pa.ipc.new_file(self.f, arrow_schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))
        else:
            self.f = open(self.tmp, "wb")

    def write(self, df: pl.DataFrame) -> None:
        if self.fmt == "csv":
            df.write_csv(self.f, include_header=self.rows == 0, datetime_format=CSV_TIME_FORMAT)
        else:
            t = df.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(self.arrow_schema)
            self.w.write_table(t) if self.fmt == "parquet" else self.w.write(t)
        self.rows += df.height

    def close(self) -> None:
        """Finish the file (an empty CSV still gets its header) and move it under its name."""
        if self.fmt == "csv":
            if self.rows == 0:
                pl.DataFrame(schema=self.frame_schema).write_csv(self.f, include_header=True)
            self.f.close()
        elif self.fmt == "arrow":
            self.w.close()
            self.f.close()
        else:
            self.w.close()
        commit(self.tmp, self.path)

    def abort(self) -> None:
        try:
            (self.f if self.fmt != "parquet" else self.w).close()
        except Exception:  # noqa: BLE001 - the export failed already; the temporary file goes
            pass
        self.tmp.unlink(missing_ok=True)


def _plain(sch: pl.Schema) -> list[pl.Expr]:
    """Categorical/Enum columns as strings: one schema for every batch, readable anywhere."""
    return [pl.col(n).cast(pl.String) for n, t in sch.items() if isinstance(t, (pl.Categorical, pl.Enum))]


def default_out(table: str, fmt: str, source=None, market=None) -> Path:
    parts = [table] + [p.replace("*", "x").replace("?", "x") for p in (source, market) if p]
    return Path("-".join(parts) + "." + FORMATS[fmt])


@dataclass
class _Progress:
    """tqdm over rows (total: the catalogued rows of the files read, an upper bound) and/or a callback."""

    total: int
    show: bool
    callback: Callable[[int, int], None] | None
    done: int = 0
    bar: object = field(default=None)

    def __post_init__(self):
        if self.show:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="row", unit_scale=True, desc="export", file=sys.stderr, disable=None)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.total = self.done  # rows outside the range were counted in the estimate
            self.bar.refresh()
            self.bar.close()


def export(eng, table: str, *, source=None, market=None, instrument=None, start=None, end=None,
           format: str = "parquet", out=None, progress: bool | Callable[[int, int], None] = True,
           allow_unsealed: bool = False, raw_ns: bool = False, batch_rows: int = BATCH_ROWS) -> ExportResult:
    """Write the rows `eng.scan(table, ...)` would return to `out` (see the module doc), in bounded memory.

    `progress`: True shows a tqdm bar on stderr (off when stderr is not a terminal), False nothing,
    a callable is called as `progress(rows_done, rows_estimate)` after every batch."""
    fmt = format.lower()
    if fmt not in FORMATS:
        raise ValueError(f"export: unknown format {format!r}; formats: {', '.join(FORMATS)}")
    schema.spec(table)  # unknown table: a SchemaError naming the tables
    if batch_rows < 1:
        raise ValueError("export: batch_rows must be >= 1")
    from engine.research.query import Query

    eng._maybe_refresh()
    reader = Query(eng).batches(table, source, market, instrument, start, end, allow_unsealed, raw_ns)
    cast = _plain(reader.schema)
    frame_schema = pl.DataFrame(schema=reader.schema).with_columns(cast).schema
    arrow_schema = pl.DataFrame(schema=frame_schema).to_arrow(compat_level=pl.CompatLevel.oldest()).schema
    folder = out is not None and (str(out).endswith(("/", os.sep)) or Path(out).is_dir())
    out = Path(out) if out is not None else default_out(table, fmt, source, market)
    estimate = sum(e.rows for e in reader.files)
    prog = _Progress(estimate, progress is True, progress if callable(progress) else None)
    sinks: dict[str, _Sink] = {}

    def sink(name: Path) -> _Sink:
        s = sinks.get(str(name))
        if s is None:
            s = sinks[str(name)] = _Sink(name, fmt, arrow_schema, frame_schema)
        return s

    time_col = schema.spec(table).time_col
    try:
        if not folder:
            sink(out)
        for df in reader(batch_size=batch_rows):  # pulled one at a time: nothing is read ahead
            if df.height == 0:
                continue
            df = df.with_columns(cast)
            if folder:
                for part in _by_partition(df, time_col, raw_ns):
                    s, m, d = part["__s"][0], part["__m"][0], part["__d"][0]
                    sink(out / f"{table}-{s}-{m}-{d}.{FORMATS[fmt]}").write(part.drop("__s", "__m", "__d"))
            else:
                sinks[str(out)].write(df)
            prog.update(df.height)
        for s in sinks.values():
            s.close()
    except BaseException:
        for s in sinks.values():
            s.abort()
        raise
    finally:
        prog.close()
    if folder:
        out.mkdir(parents=True, exist_ok=True)
        fsync_dir(out)
    files = tuple(sorted(Path(p) for p in sinks))
    res = ExportResult(out, files, sum(s.rows for s in sinks.values()), sum(p.stat().st_size for p in files), fmt)
    log.info("exported", table=table, path=str(out), files=len(files), rows=res.rows, bytes=res.bytes, format=fmt)
    return res


def _by_partition(df: pl.DataFrame, time_col: str, raw_ns: bool) -> list[pl.DataFrame]:
    """Rows of one batch split by (source, market, UTC date of `time_col`)."""
    t = pl.col(time_col)
    day = (pl.from_epoch(t, "ns") if raw_ns else t).dt.strftime("%Y-%m-%d")
    keyed = df.with_columns(pl.col("source").alias("__s"), pl.col("market").alias("__m"), day.alias("__d"))
    return keyed.partition_by("__s", "__m", "__d", maintain_order=True)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine export", description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=[t for t in schema.TABLES])
    ap.add_argument("--source")
    ap.add_argument("--market", help="exact name or glob, e.g. 'KX*'")
    ap.add_argument("--instrument", help="exact name or glob")
    ap.add_argument("--start", help="date or ISO time (UTC when no zone)")
    ap.add_argument("--end", help="exclusive")
    ap.add_argument("--format", choices=list(FORMATS), default="parquet")
    ap.add_argument("--out", help="file, or a directory for one file per source/market/date "
                                   "(default ./TABLE[-SOURCE][-MARKET].EXT)")
    ap.add_argument("--allow-unsealed", action="store_true", help="read past the sealed watermark")
    ap.add_argument("--raw-ns", action="store_true", help="times as int64 ns instead of UTC datetimes")
    ap.add_argument("--home", default=None, help="lake home (default $ENGINE_HOME or ./lake)")
    ap.add_argument("--store", default=None, help="object store (default $ENGINE_STORE or HOME/store)")
    a = ap.parse_args(argv)
    from engine import Engine
    from engine.errors import EngineError
    from engine.lake.store import StoreError

    try:
        eng = Engine.open(a.home, a.store, background=False)
        try:
            r = export(eng, a.table, source=a.source, market=a.market, instrument=a.instrument, start=a.start,
                       end=a.end, format=a.format, out=a.out, allow_unsealed=a.allow_unsealed, raw_ns=a.raw_ns)
        finally:
            eng.close()
    except (EngineError, schema.SchemaError, StoreError, LookupError, ValueError, OSError) as e:
        print(f"data-engine export: error: {e}", file=sys.stderr)
        return 2
    where = f"{len(r.files)} file(s) in {r.path}" if len(r.files) != 1 or r.files[0] != r.path else str(r.path)
    print(f"wrote {r.rows:,} {a.table} rows ({r.bytes:,} bytes, {r.format}) to {where}")
    return 0
