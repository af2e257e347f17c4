"""Assets per table: raw_<t> (external, written by the collector) → uploaded_<t> → compacted_<t>,
and `catalog` (publishes the manifest). All are partitioned by date × market and return
`MaterializeResult`s: the engine moves the data, never Dagster. The lake IO manager
(`engine_defs.io`) makes the table assets loadable by name, read through the engine.
"""


import os
import warnings

import dagster as dg

from engine_defs import lake
from engine_defs.display import hourly_markdown
from engine_defs.io import lake_asset, lake_external
from engine_defs.partitions import partitions_def, split_partition_key
from engine_defs.resources import EngineResource

TABLES = lake.RAW_TABLES  # l2, trades, gaps
INTEGRITY = "integrity"
GROUP = "lake"


def raw_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(f"raw_{table}")


def uploaded_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(f"uploaded_{table}")


def compacted_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(f"compacted_{table}")


CATALOG_KEY = dg.AssetKey("catalog")

_DESCR = {
    "l2": "L2 book updates (one row per price-level change)",
    "trades": "trades (one row per trade)",
    "gaps": "known holes in the data (disconnects, sequence jumps, restarts, stale feeds)",
}

raw_specs = [
    dg.AssetSpec(
        raw_key(t),
        description=f"Hourly raw Parquet files of {_DESCR[t]}, written by the collector (outside Dagster) and "
                    "reported by the catalog sensor, one materialization per file.",
        partitions_def=partitions_def,
        group_name=GROUP,
        kinds={"parquet"},
    )
    for t in TABLES
]


def ts_value(ns: int | None):
    return dg.MetadataValue.timestamp(ns / 1e9) if ns is not None else dg.MetadataValue.null()


def file_metadata(e) -> dict:
    """Metadata of one raw file (the sensor's raw materializations)."""
    return {
        "dagster/row_count": dg.MetadataValue.int(e.rows),
        "bytes": dg.MetadataValue.int(e.bytes),
        "key": dg.MetadataValue.text(e.key),
        "min_ts": ts_value(e.min_ts),
        "max_ts": ts_value(e.max_ts),
        "max_recv_ts": ts_value(e.max_recv_ts),
        "span_hours": dg.MetadataValue.float(((e.max_ts - e.min_ts) / 3.6e12) if e.min_ts is not None else 0.0),
        **_instruments_md([e]),
    }


def _instruments_md(es: list) -> dict:
    """Distinct instruments in the files (Kalshi: contracts seen), when their figures were recorded."""
    names = lake.instrument_names(es)
    return {} if names is None else {"instruments": dg.MetadataValue.int(len(names))}


def files_metadata(es: list) -> dict:
    """Metadata summarising several raw files of one partition (sensor catch-up)."""
    lo = [e.min_ts for e in es if e.min_ts is not None]
    hi = [e.max_ts for e in es if e.max_ts is not None]
    mn, mx = (min(lo), max(hi)) if lo and hi else (None, None)
    return {
        "dagster/row_count": dg.MetadataValue.int(sum(e.rows for e in es)),
        "bytes": dg.MetadataValue.int(sum(e.bytes for e in es)),
        "files": dg.MetadataValue.int(len(es)),
        "key": dg.MetadataValue.text(f"{es[0].key} … {es[-1].key}" if len(es) > 1 else es[0].key),
        "min_ts": ts_value(mn),
        "max_ts": ts_value(mx),
        "max_recv_ts": ts_value(max((e.max_recv_ts for e in es if e.max_recv_ts is not None), default=None)),
        "span_hours": dg.MetadataValue.float((mx - mn) / 3.6e12 if mn is not None else 0.0),
        **_instruments_md(es),
    }


def stats_metadata(st: lake.PartStats, store_url: str | None = None) -> dict:
    md = {
        "dagster/row_count": dg.MetadataValue.int(st.rows),
        "bytes": dg.MetadataValue.int(st.bytes),
        "files": dg.MetadataValue.int(st.files),
        "remote_files": dg.MetadataValue.int(st.remote_files),
        "local_files": dg.MetadataValue.int(st.local_files),
        "min_ts": ts_value(st.min_ts),
        "max_ts": ts_value(st.max_ts),
        "span_hours": dg.MetadataValue.float(round(st.span_hours, 4)),
        "lag_s": dg.MetadataValue.float(round(st.lag_s, 3)) if st.lag_s is not None else dg.MetadataValue.null(),
    }
    if st.instruments is not None:
        md["instruments"] = dg.MetadataValue.int(st.instruments)
    if st.largest_gap_s is not None:
        md["largest_gap_s"] = dg.MetadataValue.float(round(st.largest_gap_s, 6))
    if st.hourly_rows is not None:
        md["rows_per_hour"] = dg.MetadataValue.md(hourly_markdown(st.hourly_rows))
    if st.coverage_pct is not None:
        md["coverage_pct"] = dg.MetadataValue.float(st.coverage_pct)
        md["hours_with_data"] = dg.MetadataValue.int(st.hours_with_data)
    if store_url:
        md["store"] = dg.MetadataValue.text(store_url)
    return md


warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

# Backfills run up to this many (date, market) partitions per run: one process, one Engine open and
# one manifest publish for all of them, instead of one of each per partition.
BACKFILL_PARTITIONS = int(os.environ.get("ENGINE_DAGSTER_BACKFILL_PARTITIONS", "30"))
backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=BACKFILL_PARTITIONS)


def partitions_of(context) -> list[tuple[str, str, str]]:
    """(date, source, market) of every partition of this run: one for sensor and schedule runs, up to
    BACKFILL_PARTITIONS for a backfill's ranged runs."""
    return [split_partition_key(pk) for pk in context.partition_keys]


def range_metadata(per_part: list[tuple[str, dict]], sums: tuple[str, ...] = ("dagster/row_count",)) -> dict:
    """The metadata of a run over several partitions (every partition's materialization carries it):
    totals, and one table row per partition with its own figures."""
    if len(per_part) == 1:
        return per_part[0][1]
    md: dict = {"partitions": dg.MetadataValue.int(len(per_part))}
    for k in sums:
        md[k] = dg.MetadataValue.int(sum(m[k].value for _, m in per_part if k in m and m[k].value is not None))
    cols = [k for k in ("dagster/row_count", "files", "bytes", "files_merged", "uploaded_files", "recorded_gaps")
            if any(k in m for _, m in per_part)]
    lines = ["| partition | " + " | ".join(c.replace("dagster/", "") for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for pk, m in per_part:
        lines.append(f"| {pk} | " + " | ".join(str(m[c].value) if c in m else "" for c in cols) + " |")
    md["by_partition"] = dg.MetadataValue.md("\n".join(lines))
    return md


class StepLog:
    """A step's info lines: logged at once for one partition; for a ranged run gathered and logged as
    one message at the end (each log line is an event Dagster stores with its own SQLite commit)."""

    def __init__(self, context, ranged: bool):
        self.context, self.ranged, self.lines = context, ranged, []

    def info(self, line: str) -> None:
        if self.ranged:
            self.lines.append(line)
        else:
            self.context.log.info(line)

    def flush(self) -> None:
        if self.lines:
            self.context.log.info("\n".join(self.lines))
            self.lines = []


def _gaps_figures(eng, source, market, date) -> dict:
    g = lake.recorded_gaps(eng, source, market, date)
    secs = float(((g["end_ts"] - g["start_ts"]).sum() or 0) / 1e9) if g.height else 0.0
    return {"recorded_gaps": dg.MetadataValue.int(g.height), "recorded_gap_s": dg.MetadataValue.float(round(secs, 3))}


def make_uploaded(table: str) -> dg.AssetsDefinition:
    @lake_asset(  # loadable by name through the engine (engine_defs.io); stores nothing
        name=f"uploaded_{table}",
        deps=[raw_key(table)],
        partitions_def=partitions_def,
        group_name=GROUP,
        kinds={"parquet", "s3"},
        backfill_policy=backfill_policy,
        description=f"The partition's raw {table} files copied to the object store and verified (size and "
                    "checksum); local copies stay until the day is compacted.",
    )
    def _uploaded(context: dg.AssetExecutionContext, engine: EngineResource) -> dg.MaterializeResult:
        eng = engine.engine(writer=True)
        per_part, failures = [], []
        parts = partitions_of(context)
        log = StepLog(context, ranged=len(parts) > 1)
        for date, source, market in parts:
            res = eng.upload(table=table, source=source, market=market, date=date)
            st = lake.part_stats(eng, table, source, market, date)
            md = stats_metadata(st, eng.store.url)
            md.update({"uploaded_files": dg.MetadataValue.int(res["uploaded"]),
                       "uploaded_bytes": dg.MetadataValue.int(res["bytes"]),
                       "failed_files": dg.MetadataValue.int(res["failed"])})
            if table != "gaps":
                md.update(_gaps_figures(eng, source, market, date))
            per_part.append((f"{date}|{source}:{market}", md))
            lake.release_memory()
            if res["failed"]:
                failures.append(f"{res['failed']} of {res['failed'] + res['uploaded']} file(s) of {table} "
                                f"{source}:{market} {date} did not upload to {eng.store.url}: " + "; ".join(res["errors"][:5]))
                continue
            log.info(f"uploaded {res['uploaded']} file(s), {res['bytes']} bytes of {table} {source}:{market} "
                             f"{date}; partition now {st.files} file(s), {st.remote_files} remote")
        log.flush()
        md = range_metadata(per_part)
        if failures:
            raise dg.Failure(description="; ".join(failures[:10]) + ". They stay local and the next run retries.",
                             metadata=md)
        return dg.MaterializeResult(metadata=md)

    return _uploaded


def integrity_result(table: str, rep: lake.Integrity, key: str | None) -> dg.AssetCheckResult:
    md = {
        "rows": dg.MetadataValue.int(rep.rows),
        "catalog_rows": dg.MetadataValue.int(rep.expected_rows if rep.expected_rows is not None else -1),
        "schema_ok": dg.MetadataValue.bool(rep.schema_ok),
        "sorted": dg.MetadataValue.bool(rep.sorted_ok),
        "duplicate_rows": dg.MetadataValue.int(rep.duplicates),
        "rows_outside_partition": dg.MetadataValue.int(rep.outside_partition),
    }
    if key:
        md["file"] = dg.MetadataValue.text(key)
    if rep.problems:
        md["problems"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in rep.problems))
    if rep.duplicate_examples:
        cols = list(rep.duplicate_examples[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rep.duplicate_examples]
        md["duplicate_examples"] = dg.MetadataValue.md("\n".join(lines))
    return dg.AssetCheckResult(
        check_name=INTEGRITY,
        asset_key=compacted_key(table),
        passed=rep.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=md,
        description="; ".join(rep.problems) if rep.problems else "schema, sort order, duplicates and row count OK",
    )


def compact_one(log, eng, t: str, date: str, source: str, market: str, changed: list | None = None):
    """Compact one partition: (integrity check result or None, metadata or None, failure text or None).
    A failure leaves that partition unchanged; the others of a ranged run go on. `log`: a StepLog. With `changed`
    (a ranged run), the manifest is not republished here: the partition is appended to `changed`
    and the caller republishes once."""
    part = (t, source, market, date)
    files = eng.catalog.files_in(part)
    if files and not (len(files) == 1 and files[0].compacted):
        from engine.lake.compaction import is_closed

        if not is_closed(eng, part):
            day_end = lake.day_bounds(date)[1]
            wm = eng.sealed_until(source)
            why = ("the UTC day has not ended" if not lake.is_closed_day(date) else
                   f"the sealed watermark of {source} ({lake.fmt_ts(wm)}) is before the day's end "
                   f"({lake.fmt_ts(day_end)}): a collector may still hold rows of that day")
            return None, None, (f"not compacting {t} {source}:{market} {date}: only closed days are compacted and "
                                f"{why}. Nothing was changed; run it again once the day is sealed.")
        try:
            res, rep = lake.compact_gated(eng, part, publish=changed is None)
        except lake.IntegrityError as err:
            return (integrity_result(t, err.report, err.key), None,
                    f"compaction of {t} {source}:{market} {date} blocked: {'; '.join(err.report.problems)}. "
                    "The merged file was deleted before upload; the raw files and the catalog are unchanged.")
        if res is not None and changed is not None:
            changed.append(part)
        st = lake.part_stats(eng, t, source, market, date)
        md = stats_metadata(st, eng.store.url)
        if res is not None:
            md.update({"files_merged": dg.MetadataValue.int(res.files_in), "key": dg.MetadataValue.text(res.key),
                       "compaction_s": dg.MetadataValue.float(round(res.seconds, 3))})
        if t != "gaps":
            md.update(_gaps_figures(eng, source, market, date))
        log.info(f"compacted {t} {source}:{market} {date}: {st.rows} rows into {st.keys}")
        return integrity_result(t, rep, res.key if res else None), md, None
    # Already compacted (idempotent re-run: re-verify the committed file) or no data at all.
    st = lake.part_stats(eng, t, source, market, date)
    md = stats_metadata(st, eng.store.url)
    md["note"] = dg.MetadataValue.text("already compacted; nothing changed" if files else "no data in this partition")
    if t != "gaps":
        md.update(_gaps_figures(eng, source, market, date))
    if not files:
        return integrity_result(t, lake.Integrity(t, 0, 0, True, True, 0, 0, []), None), md, None
    e = files[0]
    rep = lake.integrity_of_file(t, eng.local_path(e), expected_rows=e.rows, source=source, market=market, date=date)
    failure = (None if rep.passed else
               f"the committed compacted file {e.key} fails integrity: {'; '.join(rep.problems)}; "
               "run `data-engine catalog verify`.")
    return integrity_result(t, rep, e.key), md, failure


def range_check(table: str, checks: list) -> dg.AssetCheckResult:
    """One integrity result for a ranged run: passed when every partition's passed, with a table of
    the partitions and their figures."""
    failed = [(pk, c) for pk, c in checks if not c.passed]
    lines = ["| partition | passed | rows | duplicates | problems |", "|---|---|---|---|---|"]
    for pk, c in checks:
        lines.append(f"| {pk} | {c.passed} | {c.metadata['rows'].value} | {c.metadata['duplicate_rows'].value} | "
                     f"{(c.description or '')[:120] if not c.passed else ''} |")
    return dg.AssetCheckResult(
        check_name=INTEGRITY, asset_key=compacted_key(table), passed=not failed, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"partitions": dg.MetadataValue.int(len(checks)), "failed": dg.MetadataValue.int(len(failed)),
                  "rows": dg.MetadataValue.int(sum(c.metadata["rows"].value for _, c in checks)),
                  "by_partition": dg.MetadataValue.md("\n".join(lines))},
        description=(f"{len(failed)} of {len(checks)} partitions failed: " + "; ".join(pk for pk, _ in failed[:10])
                     if failed else f"{len(checks)} partitions: schema, sort order, duplicates and row count OK"),
    )


def make_compacted(table: str) -> dg.AssetsDefinition:
    @lake_asset(  # loadable by name through the engine (engine_defs.io); stores nothing
        name=f"compacted_{table}",
        deps=[uploaded_key(table)],
        partitions_def=partitions_def,
        group_name=GROUP,
        kinds={"parquet", "s3"},
        check_specs=[dg.AssetCheckSpec(
            INTEGRITY, asset=compacted_key(table), blocking=True, partitions_def=partitions_def,
            description="Schema, sort order, duplicates (data stored twice) and row count equal to the catalog, "
                        "checked on the merged file before it is uploaded and swapped in; a failure blocks the upload "
                        "and everything downstream (the catalog manifest).",
        )],
        backfill_policy=backfill_policy,
        description=f"The closed day of {table} merged into one sorted file (0000.parquet), verified, uploaded, "
                    "swapped into the catalog in one entry; replaced raw objects are retired after a grace period.",
    )
    def _compacted(context: dg.AssetExecutionContext, engine: EngineResource):
        eng = engine.engine(writer=True)
        done, parts = [], partitions_of(context)
        changed: list | None = [] if len(parts) > 1 else None  # a ranged run: one manifest publish, at the end
        log = StepLog(context, ranged=len(parts) > 1)
        try:
            for d, s, m in parts:
                done.append((f"{d}|{s}:{m}", *compact_one(log, eng, table, d, s, m, changed)))
                lake.release_memory()  # a ranged run holds one partition's buffers at a time, not the largest's
        finally:
            log.flush()
            if changed:
                from engine.lake.manifest import publish_after_change

                publish_after_change(eng)
        checks = [(pk, c) for pk, c, _, _ in done if c is not None]
        if len(done) == 1:
            if checks:
                yield checks[0][1]
        elif checks:
            yield range_check(table, checks)
        failures = [f for _, _, _, f in done if f]
        if failures:
            raise dg.Failure(description=" | ".join(failures[:10]) + (f" (and {len(failures) - 10} more)"
                                                                       if len(failures) > 10 else ""),
                             allow_retries=False)
        yield dg.MaterializeResult(metadata=range_metadata([(pk, md) for pk, _, md, _ in done]))

    return _compacted


@dg.asset(
    name="catalog",
    deps=[uploaded_key(t) for t in TABLES] + [compacted_key(t) for t in TABLES],
    partitions_def=partitions_def,
    group_name=GROUP,
    kinds={"parquet"},
    backfill_policy=backfill_policy,
    description="Publishes the catalog manifest (one Parquet object listing every remote file and the sealed "
                "watermarks) to the store, so another machine opens the lake with one GET and no LIST. "
                "Materialized per partition after its uploads or compaction.",
)
def catalog(context: dg.AssetExecutionContext, engine: EngineResource) -> dg.MaterializeResult:
    eng = engine.engine(writer=True)
    key = eng.publish_manifest()  # once per run, whatever the number of partitions
    entries = eng.catalog.entries()
    remote = [e for e in entries if e.remote]
    wms = {s: lake.fmt_ts(w) for s, w in sorted(eng.catalog.watermarks.items())}
    md = {
        "manifest": dg.MetadataValue.text(f"{eng.store.url}/{key}"),
        "dagster/row_count": dg.MetadataValue.int(sum(e.rows for e in remote)),
        "listed_files": dg.MetadataValue.int(len(remote)),
        "listed_bytes": dg.MetadataValue.int(sum(e.bytes for e in remote)),
        "local_only_files": dg.MetadataValue.int(len(entries) - len(remote)),
        "watermarks": dg.MetadataValue.json(wms),
    }
    parts = set(partitions_of(context))
    mine = [e for e in entries if (e.date, e.source, e.market) in parts]
    md.update({"partition_files": dg.MetadataValue.int(len(mine)),
               "partition_rows": dg.MetadataValue.int(sum(e.rows for e in mine)),
               "partition_remote_files": dg.MetadataValue.int(sum(1 for e in mine if e.remote))})
    if len(parts) > 1:
        md["partitions"] = dg.MetadataValue.int(len(parts))
    return dg.MaterializeResult(metadata=md)


uploaded_assets = [make_uploaded(t) for t in TABLES]
compacted_assets = [make_compacted(t) for t in TABLES]
raw_assets = [lake_external(s) for s in raw_specs]  # materializations reported by the catalog sensor
all_assets = [*raw_assets, *uploaded_assets, *compacted_assets, catalog]
