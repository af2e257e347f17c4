"""Queries: catalog → exact file list (no LIST) → Arrow/DuckDB → Polars, clamped to the sync boundary."""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from polars.io.plugins import register_io_source

from engine import schema
from engine.errors import QueryError, QueryMemoryError, QueryTimeoutError
from engine.lake.catalog import FileEntry
from engine.lake.writer import CorruptFileError, parquet_format
from engine.log import get_logger
from engine.paths import is_pattern, match, pattern_regex
from engine.timeutil import iso, result_times, to_ns

log = get_logger(component="query")
DEFAULT_SQL_TIMEOUT_S = 60.0


class UnknownMarketError(LookupError):
    pass


@dataclass
class ReadPlan:
    """A resolved table read: catalogued files, the local paths fixed when it was planned, the row filter."""

    table: str
    files: list[FileEntry]
    paths: list[str]
    expr: pads.Expression | None
    instrument: str | None
    columns: list[str] | None


class Query:
    def __init__(self, engine):
        self.eng = engine
        self.cat = engine.catalog

    # ---- file selection ------------------------------------------------------------------
    def _check_names(self, table: str, source, market) -> None:
        known = self.cat.markets(table)
        if not known:
            return
        if source is not None and not is_pattern(source) and source not in {s for s, _ in known}:
            raise UnknownMarketError(
                f"unknown source {source!r} for table {table}; sources: {', '.join(sorted({s for s, _ in known}))}"
            )
        if market is not None and not is_pattern(market):
            ms = sorted({m for s, m in known if source is None or match(s, source)})
            if market not in ms:
                raise UnknownMarketError(f"unknown market {market!r} for table {table}; markets: {', '.join(ms)}")

    def select(self, table: str, source=None, market=None, start=None, end=None, allow_unsealed=False,
               instrument=None):
        """The catalogued files to read and, per source, the sealed watermark to clamp to. With
        `instrument`, only files whose recorded figures hold a matching instrument in the range
        (an expired contract costs no reads; a file without figures is always read)."""
        sp = schema.spec(table)
        start, end = to_ns(start, name="start"), to_ns(end, name="end")
        if start is not None and end is not None and end <= start:
            raise QueryError(f"end ({iso(end)}) must be after start ({iso(start)}); end is exclusive")
        self._check_names(table, source, market)
        files = self.cat.files(table, source, market, start, end, instrument=instrument)
        clamp: dict[str, int] = {}
        if not allow_unsealed and sp.part_col == "recv_ts":
            for src in sorted({f.source for f in files}):
                wm = self.cat.watermark(src)
                clamp[src] = wm
                past = any(f.source == src and f.max_recv_ts is not None and f.max_recv_ts >= wm for f in files)
                # a reader: the writer has sealed more than it uploaded, and the window reaches past that
                behind = self.cat.writer_watermarks.get(src, 0) > wm and (end is None or end > wm)
                if past or behind:
                    self.eng.warn_clamped(table, src, wm)
        return files, start, end, clamp

    def _filter_expr(self, table: str, instrument, start, end, clamp):
        sp = schema.spec(table)
        f = pads.field
        expr = None

        def and_(e):
            nonlocal expr
            expr = e if expr is None else expr & e

        if start is not None:
            and_(f(sp.time_col) >= start)
        if end is not None:
            and_(f(sp.time_col) < end)
        if instrument is not None:
            if is_pattern(instrument):
                pass  # applied after read (pattern on a dictionary column)
            else:
                and_(f("instrument") == instrument)
        if clamp:
            sub = None
            for src, wm in clamp.items():
                e = (f("source") == src) & (f(sp.part_col) < wm)
                sub = e if sub is None else sub | e
            and_(sub)
        return expr

    # ---- table reads ---------------------------------------------------------------------
    def plan(self, table: str, source=None, market=None, instrument=None, start=None, end=None, columns=None,
             allow_unsealed=False) -> ReadPlan:
        """Resolve a read: the catalogued files, their local paths and the row filter. `read` runs it;
        the files stay readable for the compaction grace period even if a compaction retires them."""
        sp = schema.spec(table)
        if columns is not None:
            bad = [c for c in columns if c not in sp.columns]
            if bad:
                raise QueryError(f"table {table}: unknown column(s) {', '.join(bad)}; columns: {', '.join(sp.columns)}")
        files, start, end, clamp = self.select(table, source, market, start, end, allow_unsealed, instrument)
        self._fetch_remote(files, f"this {table} query")
        paths = [str(self.eng.local_path(e)) for e in files]
        inside = all(
            (start is None or (e.min_ts is not None and e.min_ts >= start))
            and (end is None or (e.max_ts is not None and e.max_ts < end))
            and (e.source not in clamp or (e.max_recv_ts is not None and e.max_recv_ts < clamp[e.source]))
            for e in files
        )  # whole files selected: skip the row filter, read at raw Parquet speed
        expr = self._filter_expr(table, instrument, None if inside else start, None if inside else end,
                                 {} if inside else clamp)
        return ReadPlan(table, files, paths, expr, instrument, columns)

    def _fetch_remote(self, files, what: str) -> None:
        """The files that can only come through the read cache: refused up front if they cannot all
        be held at once, else fetched several at a time (one stat of each staged path)."""
        if self.eng.store.is_local:
            return
        remote = [e for e in files if not self.eng.layout.staged(e.key).exists()]
        self.eng.cache.check_fits(sum(e.bytes for e in remote), what)
        self.eng.cache.prefetch([(e.key, e.sha256) for e in remote])

    def read(self, p: ReadPlan) -> pa.Table:
        sp = schema.spec(p.table)
        if not p.files:
            t = sp.schema.empty_table()
            return t.select(p.columns) if p.columns else t
        try:
            ds = pads.dataset(p.paths, schema=sp.schema, format=parquet_format())
            t = ds.to_table(filter=p.expr, columns=None if is_pattern(p.instrument) else p.columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise self._name_corrupt(p.files, p.paths, e) from None
        if is_pattern(p.instrument):
            import pyarrow.compute as pc

            t = t.filter(pc.match_substring_regex(t.column("instrument").cast(pa.string()), pattern_regex(p.instrument)))
            if p.columns:
                t = t.select(p.columns)
        return t

    def arrow(self, table: str, source=None, market=None, instrument=None, start=None, end=None, columns=None,
              allow_unsealed=False) -> pa.Table:
        with self.eng.cache.pinned():  # the cache keeps every file this read resolved until it is done
            return self.read(self.plan(table, source, market, instrument, start, end, columns, allow_unsealed))

    def _name_corrupt(self, files, paths, err) -> Exception:
        """Find which file failed (each re-read with page checksums; only on this error path)."""
        import pyarrow.parquet as pq

        for e, p in zip(files, paths):
            if not os.path.exists(p):  # not damaged: removed after the query resolved it
                return FileNotFoundError(
                    f"lake file {e.key} was removed while the query ran (a compaction replaced it and its grace "
                    "period has passed); run the query again")
            try:
                pq.read_table(p, page_checksum_verification=True)
            except Exception as why:  # noqa: BLE001 - any failure here identifies the culprit
                return self.eng.corrupt(e.key, p, str(why))
        return err

    def table(self, table: str, **kw) -> pl.DataFrame:
        return pl.from_arrow(self.arrow(table, **kw))

    def scan(self, table: str, source=None, market=None, instrument=None, start=None, end=None,
             allow_unsealed=False, raw_ns: bool = True) -> pl.LazyFrame:
        """A LazyFrame over the exact catalogued files, read one file at a time when collected: a
        remote file is fetched through the cache only when the scan reaches it, and released after,
        so a month of l2 can be filtered and aggregated in bounded memory. Time columns are cast per
        file (`raw_ns=False`: Datetime), so predicates on them still reach each file's read."""
        r = self.batches(table, source, market, instrument, start, end, allow_unsealed, raw_ns)
        return register_io_source(r, schema=r.schema, explain_name=f"engine.{table}",
                                  explain_detail=f"{len(r.files)} catalogued file(s)")

    def batches(self, table: str, source=None, market=None, instrument=None, start=None, end=None,
                allow_unsealed=False, raw_ns: bool = True) -> "BatchReader":
        """The reader behind `scan`: called, it yields Polars frames row group by row group, each
        read only when the caller asks for it (a plain generator: no read-ahead)."""
        sp = schema.spec(table)
        files, start, end, clamp = self.select(table, source, market, start, end, allow_unsealed, instrument)
        expr = self._filter_expr(table, None if is_pattern(instrument) else instrument, start, end, clamp)
        tcols = schema.time_cols(table)
        polars_schema = result_times(pl.from_arrow(sp.schema.empty_table()), tcols, raw_ns=raw_ns).schema
        return BatchReader(self.eng, table, files, expr, pattern_regex(instrument) if is_pattern(instrument) else None,
                           instrument is not None, raw_ns, polars_schema)

    # ---- SQL -----------------------------------------------------------------------------
    def sql(self, query: str, source=None, market=None, start=None, end=None, allow_unsealed=False,
            timeout_s: float = DEFAULT_SQL_TIMEOUT_S, memory_limit: int | str | None = None) -> pl.DataFrame:
        """Run one read-only SELECT over views of the catalogued files (l2, trades, gaps, quotes).

        The DuckDB connection is in-memory, may read only the exact files of the views, and has
        external access locked off: no COPY, ATTACH, INSTALL, HTTP or other files. It is bounded:
        interrupted after `timeout_s`, limited to `memory_limit` (bytes or a DuckDB size such as
        '4GB'; default a quarter of RAM, not DuckDB's 80%) and spilling only inside the lake home.
        Every failure is an engine error (QueryError, QueryTimeoutError, QueryMemoryError, CorruptFileError).
        """
        if not timeout_s or timeout_s <= 0:
            raise QueryError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        limit = default_memory_limit() if memory_limit is None else memory_limit
        con = duckdb.connect(":memory:")
        tmp = self.eng.layout.tmp / f"sql-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            try:
                stmts = con.extract_statements(query)
            except duckdb.Error as e:
                raise QueryError(f"SQL does not parse: {e}") from None
            if len(stmts) != 1 or stmts[0].type != duckdb.StatementType.SELECT:
                raise QueryError("sql() runs exactly one SELECT statement (the lake is read-only here)")
            with self.eng.cache.pinned():  # files resolved for the views stay cached until the end
                return self._run_sql(con, tmp, query, source, market, start, end, allow_unsealed, timeout_s, limit)
        finally:
            con.close()
            shutil.rmtree(tmp, ignore_errors=True)

    def _run_sql(self, con, tmp, query, source, market, start, end, allow_unsealed, timeout_s, limit) -> pl.DataFrame:
        views, by_path = self._views(query, source, market, start, end, allow_unsealed)
        try:
            con.execute("SET memory_limit=?", [f"{limit}B" if isinstance(limit, int) else str(limit)])
            con.execute("SET temp_directory=?", [str(tmp)])
            if by_path:
                con.execute("SET allowed_paths=[" + ", ".join(_lit(p) for p in by_path) + "]")
            con.execute("SET enable_external_access=false")
            con.execute("SET autoinstall_known_extensions=false")
            con.execute("SET autoload_known_extensions=false")
            con.execute("SET lock_configuration=true")
            for v in views:
                con.execute(v)
        except duckdb.Error as e:
            raise QueryError(f"sql() could not set up its connection: {e}") from None
        return pl.from_arrow(_run_bounded(con, query, timeout_s, limit, by_path))

    def _views(self, query: str, source, market, start, end, allow_unsealed) -> tuple[list[str], dict[str, str]]:
        """CREATE VIEW statements for the tables the statement names, and their files (path → key)."""
        views, by_path, selected = [], {}, []
        used = _referenced_tables(query)
        for table in schema.TABLES:
            if table in used:  # a table the statement never names cannot be read by it: no files to open
                selected.append((table, *self.select(table, source, market, start, end, allow_unsealed)))
        self._fetch_remote([f for _, files, *_ in selected for f in files], "this sql() statement")
        for table, files, s, e, clamp in selected:
            sp = schema.spec(table)
            paths = [str(self._checked_path(f)) for f in files]
            by_path.update(zip(paths, (f.key for f in files)))
            conds = []
            if s is not None:
                conds.append(f"{sp.time_col} >= {int(s)}")
            if e is not None:
                conds.append(f"{sp.time_col} < {int(e)}")
            if clamp:
                conds.append("(" + " OR ".join(f"(source = {_lit(src)} AND {sp.part_col} < {int(w)})" for src, w in clamp.items()) + ")")
            where = f" WHERE {' AND '.join(conds)}" if conds else ""
            if paths:
                views.append(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{', '.join(_lit(p) for p in paths)}]){where}")
            else:
                cols = ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}" for f in sp.schema)
                views.append(f"CREATE VIEW {table} AS SELECT {cols} WHERE false")
        return views, by_path


    def _checked_path(self, e):
        """DuckDB ignores Parquet page checksums: the files it reads are SHA-256-checked against the
        catalog first (once per file per process, see engine.lake.integrity)."""
        from engine.lake import integrity

        path = self.eng.local_path(e)  # a cached copy is checked (and fetched again if damaged) here
        integrity.check_once(path, e.key, e.sha256)
        return path


@dataclass
class BatchReader:
    """A table read as a sequence of Polars frames: the catalogued `files`, one row group at a time,
    filtered by the engine's own expression (time range, sync-boundary clamp) and the caller's
    (`with_columns`, `predicate`, `n_rows`: the `register_io_source` protocol)."""

    eng: object
    table: str
    files: list
    expr: pads.Expression | None
    regex: str | None
    has_instrument: bool
    raw_ns: bool
    schema: pl.Schema

    def __call__(self, with_columns=None, predicate=None, n_rows=None, batch_size=None):
        eng, sp = self.eng, schema.spec(self.table)
        tcols = schema.time_cols(self.table)
        left = n_rows
        need = None
        if with_columns is not None:  # read only the columns the plan uses (filters included)
            cols = set(with_columns) | set(predicate.meta.root_names() if predicate is not None else ())
            if self.has_instrument:
                cols.add("instrument")
            if self.expr is not None:  # the engine's own filter: time range and sync-boundary clamp
                cols |= {"source", sp.time_col, sp.part_col}
            need = [c for c in sp.schema.names if c in cols]
        for e in self.files:
            with eng.cache.pinned():  # the open file stays readable even if the cache drops it later
                path = str(eng.local_path(e))
                try:
                    pf = pq.ParquetFile(path, page_checksum_verification=True)
                except (pa.ArrowInvalid, OSError) as err:
                    raise eng.corrupt(e.key, path, str(err)) from None
            try:  # row group by row group: a compacted day file is never held whole
                for b in pf.iter_batches(batch_size=batch_size or 262_144, columns=need):
                    if left is not None and left <= 0:
                        return
                    t = pa.Table.from_batches([b])
                    t = t.filter(self.expr) if self.expr is not None else t
                    df = result_times(pl.from_arrow(t.cast(_schema_of(sp.schema, t.column_names))), tcols,
                                      raw_ns=self.raw_ns)
                    if self.regex is not None:
                        df = df.filter(pl.col("instrument").cast(pl.Utf8).str.contains(self.regex))
                    if predicate is not None:
                        df = df.filter(predicate)
                    if with_columns is not None:
                        df = df.select(with_columns)
                    if left is not None:
                        df = df.head(left)
                        left -= df.height
                    yield df
            except (pa.ArrowInvalid, OSError) as err:
                raise eng.corrupt(e.key, path, str(err)) from None


def _schema_of(schema_: pa.Schema, names: list[str]) -> pa.Schema:
    """The table schema's fields for `names`: a file read column by column keeps the lake's types."""
    return pa.schema([schema_.field(n) for n in names])


def _referenced_tables(query: str) -> set[str]:
    """The lake tables a statement names. DuckDB's parser answers; where it cannot (its binder
    rejects some ASOF joins here), any whole-word mention counts: fetching too much is safe."""
    try:
        names = {n.rsplit(".", 1)[-1].lower() for n in duckdb.get_table_names(query)}
    except duckdb.Error:
        names = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", query)}
    return names & set(schema.TABLES)


def default_memory_limit() -> int:
    """A quarter of physical RAM: a research query must not starve the collector on the same machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _run_bounded(con, query: str, timeout_s: float, limit, by_path: dict[str, str]) -> pa.Table:
    """Execute on `con`, interrupted from a timer thread after `timeout_s`; DuckDB errors → engine errors."""
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        return con.sql(query).to_arrow_table()
    except duckdb.InterruptException:
        if fired.is_set():
            raise QueryTimeoutError(f"sql() stopped after its time limit of {timeout_s:g} s "
                                    "(raise timeout_s, CLI --timeout, for a longer query)") from None
        raise QueryError("sql() was interrupted") from None
    except duckdb.OutOfMemoryException as e:
        raise QueryMemoryError(f"sql() needed more than its memory_limit of {limit} "
                               f"(raise memory_limit, CLI --memory-limit): {_first_line(e)}") from None
    except duckdb.Error as e:
        for path, key in by_path.items():
            if path in str(e):  # DuckDB names the file it failed to read
                raise CorruptFileError(key, _first_line(e)) from None
        raise QueryError(f"SQL failed: {e}") from None
    finally:
        timer.cancel()


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    return "VARCHAR"
