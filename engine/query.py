"""Queries: catalog → exact file list (no LIST) → Arrow/DuckDB → Polars, clamped to the sync boundary."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads

from engine import schema
from engine.catalog import FileEntry
from engine.log import get_logger
from engine.paths import is_pattern, match, pattern_regex
from engine.timeutil import iso, to_ns
from engine.writer import CorruptFileError

log = get_logger(component="query")


class UnknownMarketError(LookupError):
    pass


class QueryError(ValueError):
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

    def select(self, table: str, source=None, market=None, start=None, end=None, allow_unsealed=False):
        """The catalogued files to read and, per source, the sealed watermark to clamp to."""
        sp = schema.spec(table)
        start, end = to_ns(start, name="start"), to_ns(end, name="end")
        if start is not None and end is not None and end <= start:
            raise QueryError(f"end ({iso(end)}) must be after start ({iso(start)}); end is exclusive")
        self._check_names(table, source, market)
        files = self.cat.files(table, source, market, start, end)
        clamp: dict[str, int] = {}
        if not allow_unsealed and sp.part_col == "recv_ts":
            for src in sorted({f.source for f in files}):
                wm = self.cat.watermark(src)
                clamp[src] = wm
                if any(f.source == src and f.max_recv_ts is not None and f.max_recv_ts >= wm for f in files):
                    log.warning("query_clamped", table=table, source=src, watermark=iso(wm),
                                hint="rows received after the sealed watermark are left out; pass allow_unsealed=True")
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
        files, start, end, clamp = self.select(table, source, market, start, end, allow_unsealed)
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

    def read(self, p: ReadPlan) -> pa.Table:
        sp = schema.spec(p.table)
        if not p.files:
            t = sp.schema.empty_table()
            return t.select(p.columns) if p.columns else t
        try:
            ds = pads.dataset(p.paths, schema=sp.schema, format="parquet")
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
        return self.read(self.plan(table, source, market, instrument, start, end, columns, allow_unsealed))

    def _name_corrupt(self, files, paths, err) -> Exception:
        import os

        import pyarrow.parquet as pq

        for e, p in zip(files, paths):
            if not os.path.exists(p):  # not damaged: removed after the query resolved it
                return FileNotFoundError(
                    f"lake file {e.key} was removed while the query ran (a compaction replaced it and its grace "
                    "period has passed); run the query again")
            try:
                pq.ParquetFile(p).metadata
            except Exception:  # noqa: BLE001 - any failure here identifies the culprit
                return CorruptFileError(e.key, str(err))
        return err

    def table(self, table: str, **kw) -> pl.DataFrame:
        return pl.from_arrow(self.arrow(table, **kw))

    # ---- SQL -----------------------------------------------------------------------------
    def sql(self, query: str, source=None, market=None, start=None, end=None, allow_unsealed=False) -> pl.DataFrame:
        """Run one read-only SELECT over views of the catalogued files (l2, trades, gaps, quotes).

        The DuckDB connection is in-memory, may read only the exact files of the views, and has
        external access locked off: no COPY, ATTACH, INSTALL, HTTP or other files.
        """
        con = duckdb.connect(":memory:")
        try:
            stmts = con.extract_statements(query)
        except duckdb.Error as e:
            raise QueryError(f"SQL does not parse: {e}") from None
        if len(stmts) != 1 or stmts[0].type != duckdb.StatementType.SELECT:
            raise QueryError("sql() runs exactly one SELECT statement (the lake is read-only here)")
        views, allowed = [], []
        for table in schema.TABLES:
            sp = schema.spec(table)
            files, s, e, clamp = self.select(table, source, market, start, end, allow_unsealed)
            paths = [str(self.eng.local_path(f)) for f in files]
            allowed += paths
            conds = []
            if s is not None:
                conds.append(f"{sp.time_col} >= {int(s)}")
            if e is not None:
                conds.append(f"{sp.time_col} < {int(e)}")
            if clamp:
                conds.append("(" + " OR ".join(f"(source = '{src}' AND {sp.part_col} < {int(w)})" for src, w in clamp.items()) + ")")
            where = f" WHERE {' AND '.join(conds)}" if conds else ""
            if paths:
                lst = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
                views.append(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{lst}]){where}")
            else:
                cols = ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}" for f in sp.schema)
                views.append(f"CREATE VIEW {table} AS SELECT {cols} WHERE false")
        if allowed:
            con.execute("SET allowed_paths=[" + ", ".join("'" + p.replace("'", "''") + "'" for p in allowed) + "]")
        con.execute("SET enable_external_access=false")
        con.execute("SET autoinstall_known_extensions=false")
        con.execute("SET autoload_known_extensions=false")
        con.execute("SET lock_configuration=true")
        for v in views:
            con.execute(v)
        try:
            return pl.from_arrow(con.sql(query).to_arrow_table())
        except duckdb.Error as e:
            raise QueryError(f"SQL failed: {e}") from None
        finally:
            con.close()


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    return "VARCHAR"
