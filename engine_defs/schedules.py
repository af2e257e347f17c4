"""Nightly compaction: yesterday's (date, market) partitions that had data, and only those."""


import datetime as dt

import dagster as dg

from engine_defs.assets import CATALOG_KEY, compacted_key
from engine_defs.jobs import compact_job
from engine_defs.lake import RAW_TABLES
from engine_defs.partitions import MARKETS, PartitionKeyError, market_key
from engine_defs.resources import EngineResource

NIGHTLY_CRON = "30 0 * * *"  # 00:30 UTC: the hour-close flushes of 23:00 have sealed yesterday


def partitions_with_data(eng, date: str) -> dict[str, list[str]]:
    """market key → tables with files on `date` (from the catalog index; no data read)."""
    out: dict[str, set[str]] = {}
    for table, source, market, d in eng.catalog.partitions():
        if d != date or table not in RAW_TABLES:
            continue
        try:
            mk = market_key(source, market)
        except PartitionKeyError:
            continue
        out.setdefault(mk, set()).add(table)
    return {k: sorted(v) for k, v in sorted(out.items())}


def nightly_requests(eng, date: str, instance=None) -> list[dg.RunRequest]:
    parts = partitions_with_data(eng, date)
    if instance is not None:  # the sensor registers markets; make sure (e.g. after a reset) they exist
        missing = sorted(set(parts) - set(instance.get_dynamic_partitions(MARKETS)))
        if missing:
            instance.add_dynamic_partitions(MARKETS, missing)
    return [
        dg.RunRequest(
            run_key=f"compact|{date}|{mk}",
            partition_key=dg.MultiPartitionKey({"date": date, "market": mk}),
            asset_selection=[compacted_key(t) for t in tables] + [CATALOG_KEY],
            tags={"engine/trigger": "nightly_compaction"},
        )
        for mk, tables in parts.items()
    ]


@dg.schedule(
    name="nightly_compaction",
    cron_schedule=NIGHTLY_CRON,
    execution_timezone="UTC",
    job=compact_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Compacts yesterday (UTC) for the markets that had data.",
)
def nightly_compaction(context: dg.ScheduleEvaluationContext, engine: EngineResource):
    when = context.scheduled_execution_time or dt.datetime.now(dt.timezone.utc)
    date = (when.astimezone(dt.timezone.utc) - dt.timedelta(days=1)).strftime("%Y-%m-%d")
    reqs = nightly_requests(engine.engine(), date, context.instance)
    if not reqs:
        return dg.SkipReason(f"no data on {date}: nothing to compact")
    return reqs
