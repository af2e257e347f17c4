"""Reference data in Dagster: the `instruments` asset, its settlement check, and what refreshes it.

- `instruments` (one asset, not partitioned: a small table read whole): materializing it uploads the
  table's new raw files, compacts its closed days and reports the table as Dagster sees it: versions,
  instruments per source and kind, contracts resolved, the latest `valid_from`.
- `settlement` (check, WARN): every binary contract whose expiration lies more than
  `ENGINE_SETTLEMENT_GRACE` (default 6h) in the past has a result; the late ones are listed. Any
  venue's binary contracts: nothing here names a venue.
- `reference_sensor` follows the catalog log from its own byte cursor (the catalog sensor handles
  the date × market partitions; this table has none) and asks for one `instruments_job` run when
  new `instruments` raw files were written; `instruments_hourly` runs it anyway every hour, so the
  check also notices contracts that stop sending anything.
"""


import json
import os
from pathlib import Path

import dagster as dg

from engine_defs import lake
from engine_defs.io import lake_asset
from engine_defs.resources import EngineResource

TABLE = "instruments"
INSTRUMENTS_KEY = dg.AssetKey(TABLE)
GROUP = "reference"
SETTLEMENT_GRACE = os.environ.get("ENGINE_SETTLEMENT_GRACE", "6h")
SENSOR_INTERVAL_S = int(os.environ.get("ENGINE_DAGSTER_SENSOR_INTERVAL", "15"))
MAX_LISTED = 200


def _ts(ns):
    return dg.MetadataValue.timestamp(ns / 1e9) if ns is not None else dg.MetadataValue.null()


@lake_asset(  # loadable by name: defs.load_asset_value("instruments") is every version
    name=TABLE,
    group_name=GROUP,
    kinds={"parquet"},
    description="Reference data: one row per instrument and version (spot products, binary contracts with strikes, "
                "expiry, result and settlement), from the venues' REST answers and lifecycle messages. Materializing "
                "it uploads the table's new raw files, compacts its closed days and reports its figures.",
)
def instruments(context: dg.AssetExecutionContext, engine: EngineResource) -> dg.MaterializeResult:
    from engine.research.reference import summary

    eng = engine.engine(writer=True)
    up = eng.upload(table=TABLE)
    compacted = eng.compact(table=TABLE)
    s = summary(eng)
    md = {
        "dagster/row_count": dg.MetadataValue.int(s["versions"]),
        "versions": dg.MetadataValue.int(s["versions"]),
        "instruments": dg.MetadataValue.int(sum(s["instruments"].values())),
        "instruments_per_source": dg.MetadataValue.json(s["instruments"]),
        "instruments_per_kind": dg.MetadataValue.json(s["by_kind"]),
        "resolved_contracts": dg.MetadataValue.int(s["resolved"]),
        "latest_valid_from": _ts(s["latest_valid_from"]),
        "uploaded_files": dg.MetadataValue.int(up["uploaded"]),
        "compacted_days": dg.MetadataValue.int(len(compacted)),
    }
    if up["failed"]:
        raise dg.Failure(description=f"{up['failed']} instruments file(s) did not upload to {eng.store.url}; they "
                                     "stay local and the next run retries: " + "; ".join(up["errors"][:5]),
                         metadata=md)
    context.log.info(f"instruments: {s['versions']} versions of {sum(s['instruments'].values())} instruments; "
                     f"uploaded {up['uploaded']} file(s), compacted {len(compacted)} day(s)")
    return dg.MaterializeResult(metadata=md)


def _late_table(df) -> str:
    head = ["source", "market", "instrument", "status", "expiration", "hours late"]
    rows = [[r["source"], r["market"], r["instrument"], r["status"] or "", lake.fmt_ts(r["expiration_ts"]),
             round(r["hours_late"], 2)] for r in df.head(MAX_LISTED).iter_rows(named=True)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    if df.height > MAX_LISTED:
        lines.append(f"\n… {df.height - MAX_LISTED} more")
    return "\n".join(lines)


@dg.asset_check(
    asset=INSTRUMENTS_KEY,
    name="settlement",
    blocking=False,
    description=f"Warns when a binary contract whose expiration is more than {SETTLEMENT_GRACE} past has no result "
                "in the reference data, and lists those contracts.",
)
def settlement_check(context: dg.AssetCheckExecutionContext, engine: EngineResource) -> dg.AssetCheckResult:
    from engine.research.reference import unsettled

    late = unsettled(engine.engine(), grace=SETTLEMENT_GRACE, raw_ns=True)
    md = {"unsettled": dg.MetadataValue.int(late.height), "grace": dg.MetadataValue.text(SETTLEMENT_GRACE)}
    if late.height:
        md["unsettled_contracts"] = dg.MetadataValue.md(_late_table(late))
        md["oldest_expiration"] = _ts(int(late["expiration_ts"].min()))
    return dg.AssetCheckResult(
        passed=late.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=md,
        description=(f"{late.height} contract(s) past expiration + {SETTLEMENT_GRACE} without a result"
                     if late.height else f"every contract past expiration + {SETTLEMENT_GRACE} has a result"),
    )


instruments_job = dg.define_asset_job(
    "instruments_job",
    selection=dg.AssetSelection.assets(INSTRUMENTS_KEY),
    description="Upload and compact the reference table and run its settlement check.",
)


def new_reference_files(log_path: Path, cursor: str | None) -> tuple[int, int, str]:
    """(instruments raw files added since the cursor, log offset after the newest one or 0, new cursor)."""
    try:
        c = json.loads(cursor) if cursor else {}
    except ValueError:
        c = {}
    offset, ino = int(c.get("offset", 0)), c.get("ino")
    try:
        cur_ino = Path(log_path).stat().st_ino
    except FileNotFoundError:
        return 0, 0, cursor or ""
    if ino is not None and ino != cur_ino:
        offset = 0  # the log was replaced (rebuild): read it again; run keys keep this idempotent
    lr = lake.read_log(Path(log_path), offset, 16 << 20)
    n, newest = 0, 0
    for end, op in lr.ops:
        if op.op == "add" and op.file is not None and op.file.table == TABLE and not op.file.compacted:
            n, newest = n + 1, end
    return n, newest, json.dumps({"offset": lr.offset, "ino": cur_ino})


@dg.sensor(
    name="reference_sensor",
    job=instruments_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=(dg.DefaultSensorStatus.STOPPED if os.environ.get("ENGINE_DAGSTER_SENSOR", "").lower() == "stopped"
                    else dg.DefaultSensorStatus.RUNNING),
    description="Follows the catalog log: one instruments run when new reference data (instruments raw files) arrived.",
)
def reference_sensor(context: dg.SensorEvaluationContext, engine: EngineResource):
    n, newest, cursor = new_reference_files(engine.catalog_log, context.cursor)
    if not n:
        return dg.SensorResult(skip_reason="no new instruments files", cursor=cursor)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"instruments|{newest}",
                                    tags={"engine/trigger": "reference_sensor", "engine/files": str(n)})],
        cursor=cursor,
    )


instruments_hourly = dg.ScheduleDefinition(
    name="instruments_hourly",
    cron_schedule="15 * * * *",
    execution_timezone="UTC",
    job=instruments_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="The instruments asset and its settlement check every hour, new files or not.",
)

reference_assets = [instruments]
reference_checks = [settlement_check]
reference_jobs = [instruments_job]
reference_sensors = [reference_sensor]
reference_schedules = [instruments_hourly]
