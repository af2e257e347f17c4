"""Dagster's SQLite storage with one change: a batch of asset events is written in one
transaction per database instead of two engines, connections and commits per event (~5 ms each).

Three places hand it batches:
- the catalog sensor (`record_events`): a catch-up tick of 432 raw-file events cost the daemon
  2–4 s stored one at a time (`report_runless_asset_event`); it falls back to the daemon's path
  on any other storage;
- run creation (daemon, webserver): one `ASSET_MATERIALIZATION_PLANNED` event per asset and
  partition, 120 for a ranged backfill run of 4 assets × 30 partitions;
- a ranged run's materializations, one per asset and partition.
Dagster sends the last two as batches only when `DAGSTER_EVENT_BATCH_SIZE` is set, so this storage
sets it (`BATCH_SIZE`, unless the environment has it) in every process that opens it. The rows
written are exactly those `store_event` writes (the run shard, the index shard, the asset tables
and tags), through the same statements, in the same order; other events keep Dagster's own path.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Sequence

from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._time import get_current_timestamp

_BATCHABLE = {DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_OBSERVATION,
              DagsterEventType.ASSET_MATERIALIZATION_PLANNED}
BATCH_SIZE = "1000"  # events per write: a ranged run's planned events or one step's materializations


def _batchable(e: EventLogEntry) -> bool:
    return e.is_dagster_event and e.dagster_event_type in _BATCHABLE and e.dagster_event.asset_key is not None


class BatchedSqliteEventLogStorage(SqliteEventLogStorage):
    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """Runs of asset events in one transaction each, anything else one by one, in order."""
        run: list[EventLogEntry] = []
        for e in events:
            if _batchable(e):
                run.append(e)
                continue
            self._store_asset_batch(run)
            run = []
            self.store_event(e)
        self._store_asset_batch(run)

    def _store_asset_batch(self, events: Sequence[EventLogEntry]) -> None:
        if len(events) < 2:
            for e in events:
                self.store_event(e)
            return
        by_run: dict[str, list[EventLogEntry]] = defaultdict(list)
        for e in events:
            by_run[e.run_id].append(e)
        for run_id, evs in by_run.items():
            with self.run_connection(run_id) as conn:
                for e in evs:
                    conn.execute(self.prepare_insert_event(e))
        with self.index_transaction() as conn:
            ids = []
            for e in events:
                res = conn.execute(self.prepare_insert_event(e))
                ids.append(res.inserted_primary_key[0])
            self._store_asset_event_tags(conn, list(events), ids)
            for e, i in zip(events, ids):
                self._store_asset_event(conn, e, i)


class EngineSqliteStorage(DagsterSqliteStorage):
    """`storage: sqlite:` with the batched event log (same files, same schema)."""

    def __init__(self, base_dir: str, inst_data=None):
        super().__init__(base_dir, inst_data=inst_data)
        os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", BATCH_SIZE)  # Dagster's switch: hand us batches
        self._event_log_storage = BatchedSqliteEventLogStorage(_event_logs_directory(base_dir))

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)


def batched_storage(instance) -> BatchedSqliteEventLogStorage | None:
    """The instance's batched event log, also where Dagster wraps it (an instance rebuilt from its
    ref, as in code servers, holds `LegacyEventLogStorage` around the unified storage)."""
    s = getattr(instance, "event_log_storage", None)
    inner = getattr(s, "_storage", None)  # LegacyEventLogStorage
    if inner is not None:
        s = getattr(inner, "event_log_storage", None)
    return s if isinstance(s, BatchedSqliteEventLogStorage) else None


def record_events(instance, events: list, new_partitions: list[str] = (), partitions_def: str = "markets") -> bool:
    """Store runless asset events (AssetMaterialization) in one batch if this instance's storage
    can; True when stored, False when the caller must hand them to the daemon instead. Dynamic
    partitions the events name are added first (the daemon would add them after the events)."""
    storage = batched_storage(instance)
    if not events or storage is None:
        return False
    if new_partitions:
        instance.add_dynamic_partitions(partitions_def, list(new_partitions))
    now = get_current_timestamp()
    entries = []
    for ev in events:
        de = DagsterEvent(event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
                          job_name=RUNLESS_JOB_NAME, message="", event_specific_data=StepMaterializationData(ev))
        entries.append(EventLogEntry(user_message="", level=20, job_name=RUNLESS_JOB_NAME, run_id=RUNLESS_RUN_ID,
                                     error_info=None, timestamp=now, step_key=None, dagster_event=de))
    storage.store_event_batch(entries)
    return True
