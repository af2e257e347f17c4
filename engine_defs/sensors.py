"""The catalog sensor: one cursor (a byte offset) over the catalog's append-only log.

Each tick reads the log lines written since the cursor and returns one `SensorResult` that
- registers market partitions it has not seen (`coinbase:BTC-USD`, `kalshi:KXBTC`),
- reports every finished raw file (op `add`, not a compaction) as a materialization of
  `raw_<table>` for its (date, market) partition, with row count, bytes and time range,
- requests one upload run per touched (date, market), with a run key made of the partition and
  the log offset of its newest file (a re-read of the same lines asks for the same keys, which
  Dagster de-duplicates),
- and moves the cursor past the lines it handled; the next tick over the same log requests nothing.

A tick handles at most MAX_FILES_PER_TICK files (the rest waits for the next tick), so a backlog
of 100k files never makes a tick slow. Catching up on such a backlog, a tick reports one summary
materialization per (table, date, market) instead of one per file (the daemon stores events one
at a time), and asks for no upload run for a partition whose files the log already shows uploaded.
"""


import json
import os
import time
from pathlib import Path

import dagster as dg

from engine_defs import lake
from engine_defs.event_storage import record_events
from engine_defs.assets import CATALOG_KEY, file_metadata, files_metadata, raw_key, uploaded_key
from engine_defs.jobs import upload_job
from engine_defs.partitions import (
    MARKETS, PartitionKeyError, date_in_range, market_key, market_partitions,
)
from engine_defs.resources import EngineResource

SENSOR_INTERVAL_S = int(os.environ.get("ENGINE_DAGSTER_SENSOR_INTERVAL", "15"))
MAX_FILES_PER_TICK = int(os.environ.get("ENGINE_DAGSTER_MAX_FILES_PER_TICK", "10000"))
MAX_BYTES_PER_TICK = 16 << 20
PER_FILE_EVENTS_MAX = int(os.environ.get("ENGINE_DAGSTER_PER_FILE_EVENTS_MAX", "300"))
# "stopped" leaves the sensor off until it is turned on in the UI (benchmarks, maintenance)
DEFAULT_STATUS = (dg.DefaultSensorStatus.STOPPED if os.environ.get("ENGINE_DAGSTER_SENSOR", "").lower() == "stopped"
                  else dg.DefaultSensorStatus.RUNNING)


def parse_cursor(cursor: str | None) -> dict:
    if not cursor:
        return {"offset": 0, "ino": None}
    try:
        c = json.loads(cursor)
        return {"offset": int(c.get("offset", 0)), "ino": c.get("ino")}
    except (ValueError, AttributeError):
        return {"offset": int(cursor) if cursor.isdigit() else 0, "ino": None}


def raw_events(files: list) -> list[dg.AssetMaterialization]:
    """One materialization per raw file; when catching up on a backlog (more than PER_FILE_EVENTS_MAX
    files in a tick) one per (table, date, market) summarising its files, because the daemon records
    events one SQLite transaction at a time (~75/s measured) and a tick must stay short."""
    if len(files) <= PER_FILE_EVENTS_MAX:
        return [dg.AssetMaterialization(asset_key=raw_key(e.table), partition=dg.MultiPartitionKey(
                    {"date": e.date, "market": mk}), metadata=file_metadata(e),
                    description=f"raw file {e.key} written by the collector") for mk, e in files]
    groups: dict[tuple[str, str, str], list] = {}
    for mk, e in files:
        groups.setdefault((e.table, e.date, mk), []).append(e)
    out = []
    for (table, date, mk), es in groups.items():
        out.append(dg.AssetMaterialization(
            asset_key=raw_key(table), partition=dg.MultiPartitionKey({"date": date, "market": mk}),
            metadata=files_metadata(es),
            description=f"{len(es)} raw files ({es[0].key} … {es[-1].key}) written by the collector, reported "
                        "together while the sensor catches up on a backlog"))
    return out


def evaluate(context, log_path: Path, *, max_files: int = MAX_FILES_PER_TICK) -> dg.SensorResult:
    t0 = time.perf_counter()
    log_path = Path(log_path)
    cur = parse_cursor(context.cursor)
    try:
        ino = log_path.stat().st_ino
    except FileNotFoundError:
        return dg.SensorResult(skip_reason=f"no catalog log at {log_path} yet (no collector has written)",
                               cursor=context.cursor)
    offset = cur["offset"]
    if cur["ino"] is not None and cur["ino"] != ino:
        context.log.warning(f"catalog log {log_path} was replaced (rebuild?): reading it from the start; "
                            "run keys keep upload requests idempotent")
        offset = 0
    lr = lake.read_log(log_path, offset, MAX_BYTES_PER_TICK, max_files * 4)
    if lr.reset:
        context.log.warning(f"cursor {offset} is past the end of {log_path} ({lr.size} bytes): reading from 0")
    known = set(context.instance.get_dynamic_partitions(MARKETS))
    new_markets: list[str] = []
    files: list[tuple[str, object]] = []  # (market key, FileEntry) of raw files, in log order
    touched: dict[tuple[str, str], dict] = {}
    key_part: dict[str, tuple[str, str]] = {}
    skipped: list[str] = []
    end = lr.offset if not lr.ops else offset
    for line_end, op in lr.ops:
        if len(files) >= max_files:
            break
        end = line_end
        if op.op == "remote" and op.key in key_part:  # uploaded already (e.g. an old log being caught up)
            touched[key_part[op.key]]["pending"].discard(op.key)
            continue
        if op.op == "compact":  # replaced by a compaction, which uploads its own file
            for k in op.keys or []:
                if k in key_part:
                    touched[key_part[k]]["pending"].discard(k)
            continue
        if op.op != "add" or op.file is None or op.file.compacted or op.file.table not in lake.RAW_TABLES:
            continue
        e = op.file
        try:
            mk = market_key(e.source, e.market)
        except PartitionKeyError as err:
            skipped.append(f"{e.key}: {err}")
            continue
        if not date_in_range(e.date):
            skipped.append(f"{e.key}: date {e.date} is outside the date partitions (start "
                           f"{os.environ.get('ENGINE_DAGSTER_START_DATE', '2026-01-01')}; set ENGINE_DAGSTER_START_DATE)")
            continue
        if mk not in known:
            known.add(mk)
            new_markets.append(mk)
        files.append((mk, e))
        t = touched.setdefault((e.date, mk), {"tables": set(), "offset": 0, "files": 0, "rows": 0, "pending": set()})
        t["tables"].add(e.table)
        t["offset"] = max(t["offset"], line_end)
        t["files"] += 1
        t["rows"] += e.rows
        if not e.remote:
            t["pending"].add(e.key)
            key_part[e.key] = (e.date, mk)
    else:
        end = lr.offset  # every line read was handled (including trailing non-file lines)
    for s in skipped[:20]:
        context.log.warning(f"not reported: {s}")
    events = raw_events(files)
    runs = []
    for (date, mk), t in sorted(touched.items()):
        if not t["pending"]:
            continue  # every file of this batch is already in the store: nothing to upload
        runs.append(dg.RunRequest(
            run_key=f"upload|{date}|{mk}|{t['offset']}",
            partition_key=dg.MultiPartitionKey({"date": date, "market": mk}),
            asset_selection=[uploaded_key(tb) for tb in sorted(t["tables"])] + [CATALOG_KEY],
            tags={"engine/trigger": "catalog_sensor", "engine/files": str(t["files"]), "engine/rows": str(t["rows"])},
        ))
    new_cursor = json.dumps({"offset": end, "ino": ino})
    dt_s = time.perf_counter() - t0
    if not runs and not events:
        return dg.SensorResult(
            skip_reason=f"no new raw files (log offset {end}/{lr.size}, {len(lr.ops)} line(s) read, {dt_s:.3f} s)",
            cursor=new_cursor,
        )
    context.log.info(f"{len(files)} raw file(s) as {len(events)} event(s), {len(runs)} upload run(s) for "
                     f"{len(touched)} partition(s), {len(new_markets)} new market(s); "
                     f"offset {offset} → {end} of {lr.size}; {dt_s:.3f} s")
    stored = record_events(context.instance, events, new_markets)
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[market_partitions.build_add_request(new_markets)] if new_markets else [],
        asset_events=[] if stored else events,
        cursor=new_cursor,
    )


@dg.sensor(
    name="catalog_sensor",
    job=upload_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DEFAULT_STATUS,
    description="Follows the catalog log: registers markets, reports raw files, requests upload runs.",
)
def catalog_sensor(context: dg.SensorEvaluationContext, engine: EngineResource) -> dg.SensorResult:
    return evaluate(context, engine.catalog_log)
