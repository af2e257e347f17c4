"""Gap and coverage checks (WARN, non-blocking) per (date, market) partition.

The blocking integrity check lives with the compaction (`assets.make_compacted`): it must run on the
merged file after it is written and before it is uploaded, so it is declared as a check spec of the
compacted asset and evaluated inside it.

Both checks here carry a Markdown table of the partition's gaps, so the UI is where gaps are
inspected: open an asset, pick a partition, look at its check results.
"""


import dagster as dg

from engine_defs import lake
from engine_defs.assets import uploaded_key
from engine_defs.display import fmt_duration
from engine_defs.partitions import partitions_def, split_partition_key
from engine_defs.resources import EngineResource

MAX_TABLE_ROWS = 200


def _md_table(header: list[str], rows: list[list], total: int | None = None) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows[:MAX_TABLE_ROWS]]
    total = len(rows) if total is None else total
    if total > MAX_TABLE_ROWS:
        lines.append(f"\n… {total - MAX_TABLE_ROWS} more")
    return "\n".join(lines)


def gaps_table(g) -> str:
    """One line per gap, in time order: kind, instrument, start, end, duration (readable), detail."""
    rows = [[r["kind"], r["instrument"] or "(whole market)", lake.fmt_ts(r["start_ts"]), lake.fmt_ts(r["end_ts"]),
             fmt_duration(r["end_ts"] - r["start_ts"]), (r["detail"] or "")[:120]]
            for r in g.iter_rows(named=True)]
    return _md_table(["kind", "instrument", "start", "end", "duration", "detail"], rows)


def silences_table(holes) -> str:
    rows = [[lake.fmt_ts(a), lake.fmt_ts(b), fmt_duration(b - a)] for a, b in holes]
    return _md_table(["from", "to", "duration"], rows)


def make_gap_check(table: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=uploaded_key(table),
        name="recorded_gaps",
        partitions_def=partitions_def,
        blocking=False,
        description="Warns when the gaps table records holes (disconnects, sequence jumps, restarts, stale feeds) "
                    "for this market on this day, and lists them.",
    )
    def _check(context: dg.AssetCheckExecutionContext, engine: EngineResource) -> dg.AssetCheckResult:
        return per_partition(context, engine, gap_result)

    return _check


def gap_result(eng, date: str, source: str, market: str) -> dg.AssetCheckResult:
    g = lake.recorded_gaps(eng, source, market, date)
    secs = float((g["end_ts"] - g["start_ts"]).sum() or 0) / 1e9 if g.height else 0.0
    md = {
        "gaps": dg.MetadataValue.int(g.height),
        "gap_seconds": dg.MetadataValue.float(round(secs, 3)),
        "by_kind": dg.MetadataValue.json(dict(g.group_by("kind").len().iter_rows()) if g.height else {}),
    }
    if g.height:
        md["gap_table"] = dg.MetadataValue.md(gaps_table(g))
    return dg.AssetCheckResult(
        passed=g.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=md,
        description=(f"{g.height} recorded gap(s), {secs:.1f} s in total" if g.height else "no recorded gaps"),
    )


def make_coverage_check(table: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=uploaded_key(table),
        name="coverage",
        partitions_def=partitions_def,
        blocking=False,
        description=f"Warns when the day (up to the sealed watermark) has silent stretches longer than "
                    f"{lake.SILENCE_S:g} s in the {table} receive times, and lists them with the recorded gaps.",
    )
    def _check(context: dg.AssetCheckExecutionContext, engine: EngineResource) -> dg.AssetCheckResult:
        return per_partition(context, engine, lambda eng, *part: coverage_result(eng, table, *part))

    return _check


def coverage_result(eng, table: str, date: str, source: str, market: str) -> dg.AssetCheckResult:
    st = lake.part_stats(eng, table, source, market, date)
    g = lake.recorded_gaps(eng, source, market, date)
    silent = sum(b - a for a, b in st.silences) / 1e9
    md = {
        "coverage_pct": dg.MetadataValue.float(st.coverage_pct if st.coverage_pct is not None else 0.0),
        "hours_with_data": dg.MetadataValue.int(st.hours_with_data),
        "silent_intervals": dg.MetadataValue.int(len(st.silences)),
        "silent_s": dg.MetadataValue.float(round(silent, 3)),
        "largest_gap_s": dg.MetadataValue.float(round(st.largest_gap_s or 0.0, 6)),
        "window": dg.MetadataValue.text(f"{lake.fmt_ts(st.window[0])} → {lake.fmt_ts(st.window[1])}"
                                        if st.window else "-"),
        "threshold_s": dg.MetadataValue.float(lake.SILENCE_S),
    }
    if st.silences:
        md["silent_table"] = dg.MetadataValue.md(silences_table(st.silences))
    if g.height:
        md["gap_table"] = dg.MetadataValue.md(gaps_table(g))
    return dg.AssetCheckResult(
        passed=not st.silences,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=md,
        description=(f"{len(st.silences)} silent stretch(es) > {lake.SILENCE_S:g} s, {silent:.0f} s in total; "
                     f"coverage {md['coverage_pct'].value:.2f} %" if st.silences else
                     f"covered up to the sealed watermark ({md['coverage_pct'].value:.2f} %)"),
    )


def per_partition(context, engine, result) -> dg.AssetCheckResult:
    """The check's result for its run: the partition's own, or for a backfill's ranged run one result
    that fails when any partition's does, with a row per partition."""
    eng = engine.engine()
    keys = list(context.partition_keys)
    rs = [(pk, result(eng, *split_partition_key(pk))) for pk in keys]
    if len(rs) == 1:
        return rs[0][1]
    failed = [pk for pk, r in rs if not r.passed]
    rows = [[pk, r.passed, r.description or ""] for pk, r in rs]
    return dg.AssetCheckResult(
        passed=not failed, severity=dg.AssetCheckSeverity.WARN,
        metadata={"partitions": dg.MetadataValue.int(len(rs)), "failed": dg.MetadataValue.int(len(failed)),
                  "by_partition": dg.MetadataValue.md(_md_table(["partition", "passed", "result"], rows))},
        description=(f"{len(failed)} of {len(rs)} partitions warn: " + ", ".join(failed[:10]) if failed
                     else f"{len(rs)} partitions pass"),
    )


all_checks = [make(t) for t in lake.DATA_TABLES for make in (make_gap_check, make_coverage_check)]
