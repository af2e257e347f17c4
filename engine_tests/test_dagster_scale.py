"""Dagster at the scale of months: backfills run many partitions per run (BackfillPolicy), jobs run
in one process, and the catalog sensor stores its raw-file events in one batch on the project's
storage. Real Dagster instances (the project's SQLite DAGSTER_HOME and Dagster's test instance)."""

from __future__ import annotations

import warnings

import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

warnings.filterwarnings("ignore", category=dg.PreviewWarning) if hasattr(dg, "PreviewWarning") else None

from engine_defs.assets import all_assets, backfill_policy  # noqa: E402
from engine_defs.checks import all_checks  # noqa: E402
from engine_defs.definitions import defs  # noqa: E402
from engine_defs.event_storage import BatchedSqliteEventLogStorage, batched_storage  # noqa: E402
from engine_defs.instance import ensure_instance  # noqa: E402
from engine_defs.partitions import MARKETS  # noqa: E402
from engine_defs.sensors import evaluate  # noqa: E402
from engine_tests.test_dagster_defs import BTC, D1, D2, KX, build_lake, engine_resource  # noqa: E402


def _events(inst, key: str) -> list:
    recs = inst.fetch_materializations(dg.AssetKey(key), limit=1000).records
    return [r.asset_materialization for r in recs]


def test_jobs_share_one_backfill_policy_and_run_in_process():
    repo = defs.get_repository_def()
    for name in ("compact_job", "upload_job"):
        job = repo.get_job(name)
        assert job.backfill_policy == backfill_policy and backfill_policy.max_partitions_per_run > 1
        assert job.executor_def is dg.in_process_executor


def test_ranged_compaction_run_compacts_every_partition(tmp_path):
    eng = build_lake(tmp_path / "h")
    res = engine_resource(tmp_path / "h")
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC, KX])
        job = defs.resolve_job_def("compact_job")
        r = job.execute_in_process(instance=inst, resources={"engine": res}, tags={
            ASSET_PARTITION_RANGE_START_TAG: f"{D1}|{BTC}", ASSET_PARTITION_RANGE_END_TAG: f"{D2}|{KX}"})
        assert r.success
        want = {f"{d}|{m}" for d in (D1, D2) for m in (BTC, KX)}
        for t in ("l2", "trades", "gaps"):
            got = {str(m.partition) for m in r.asset_materializations_for_node(f"compacted_{t}")}
            assert got == want
        # one check result per table for the whole run, passed, with a row per partition holding data
        evals = [e for e in r.get_asset_check_evaluations() if e.check_name == "integrity"]
        assert len(evals) == 3 and all(e.passed for e in evals)
        # every partition with files is now one compacted file, row counts unchanged
        eng2 = type(eng).open(tmp_path / "h", writer=True, background=False)
        for part in [("l2", "coinbase", "BTC-USD", D1), ("trades", "coinbase", "BTC-USD", D1),
                     ("trades", "kalshi", "KXBTC", D1), ("l2", "coinbase", "BTC-USD", D2)]:
            files = eng2.catalog.files_in(part)
            assert len(files) == 1 and files[0].compacted, part
        assert eng2.trades(market="KXBTC").height == 500
        mds = r.asset_materializations_for_node("catalog")
        assert len(mds) == 4 and mds[0].metadata["partitions"].value == 4


def test_ranged_run_reports_a_blocked_partition_and_compacts_the_others(tmp_path):
    eng = build_lake(tmp_path / "h")
    import datetime as dt

    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    from engine.sim import synth
    from engine.timeutil import now_ns

    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", now_ns() - 10**9, 5, 10**8, seed=4, id_start=10**7))
    eng.flush()
    res = engine_resource(tmp_path / "h")
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC])
        job = defs.resolve_job_def("compact_job").get_subset(asset_selection={dg.AssetKey("compacted_trades")})
        r = job.execute_in_process(instance=inst, resources={"engine": res}, raise_on_error=False, tags={
            ASSET_PARTITION_RANGE_START_TAG: f"{D1}|{BTC}", ASSET_PARTITION_RANGE_END_TAG: f"{today}|{BTC}"})
        assert not r.success
        failure = [e for e in r.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert f"{today}" in failure.step_failure_data.error.message and "not compacting" in \
            failure.step_failure_data.error.message
        eng2 = type(eng).open(tmp_path / "h", writer=True, background=False)
        assert [f.compacted for f in eng2.catalog.files_in(("trades", "coinbase", "BTC-USD", D1))] == [True]
        assert not any(f.compacted for f in eng2.catalog.files_in(("trades", "coinbase", "BTC-USD", today)))


def test_sensor_stores_its_events_in_one_batch(tmp_path):
    eng = build_lake(tmp_path / "h")
    raw = [e for e in eng.catalog.entries() if not e.compacted]
    home = ensure_instance(tmp_path / "dh")
    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert isinstance(inst.event_log_storage, BatchedSqliteEventLogStorage)
        # as a code server or run worker sees it: rebuilt from the instance ref, wrapped by Dagster
        with dg.DagsterInstance.from_ref(inst.get_ref()) as again:
            assert batched_storage(again) is not None
        with dg.build_sensor_context(instance=inst) as ctx:
            r = evaluate(ctx, eng.layout.catalog_log)
        assert not r.asset_events  # stored by the sensor itself
        assert sorted(inst.get_dynamic_partitions(MARKETS)) == [BTC, KX]
        stored = {t: _events(inst, f"raw_{t}") for t in ("l2", "trades", "gaps")}
        assert sum(len(v) for v in stored.values()) == len(raw) == 7
        by_key = {}
        for m in stored["l2"] + stored["trades"] + stored["gaps"]:
            by_key.setdefault(m.metadata["key"].value, m)
        for e in raw:
            m = by_key[e.key]
            assert m.metadata["dagster/row_count"].value == e.rows
            assert m.partition == f"{e.date}|{e.source}:{e.market}"
        # the partition status Dagster derives from them
        keys = inst.get_materialized_partitions(dg.AssetKey("raw_trades"))
        assert keys == {f"{e.date}|{e.source}:{e.market}" for e in raw if e.table == "trades"}


def test_other_storages_get_the_events_back(tmp_path):
    eng = build_lake(tmp_path / "h")
    with dg.instance_for_test() as inst:  # Dagster's own test storage: the daemon stores them
        with dg.build_sensor_context(instance=inst) as ctx:
            r = evaluate(ctx, eng.layout.catalog_log)
        assert len(r.asset_events) == 7 and r.dynamic_partitions_requests


@pytest.mark.parametrize("n", [432])
def test_batch_equals_one_by_one(tmp_path, n):
    """The batch writes what Dagster's one-by-one path writes: same events, same partitions, same tags."""
    from engine_defs.event_storage import record_events

    evs = [dg.AssetMaterialization(asset_key="raw_l2", partition=dg.MultiPartitionKey(
        {"date": f"2026-03-{1 + i % 28:02d}", "market": BTC}), metadata={"rows": i}) for i in range(n)]
    out = {}
    for mode in ("batch", "single"):
        with dg.DagsterInstance.from_config(str(ensure_instance(tmp_path / mode))) as inst:
            inst.add_dynamic_partitions(MARKETS, [BTC])
            if mode == "batch":
                assert record_events(inst, evs)
            else:
                for e in evs:
                    inst.report_runless_asset_event(e)
            got = _events(inst, "raw_l2")
            out[mode] = sorted((m.partition, m.metadata["rows"].value) for m in got)
            out[mode + "_parts"] = inst.get_materialized_partitions(dg.AssetKey("raw_l2"))
    assert out["batch"] == out["single"] and len(out["batch"]) == n
    assert out["batch_parts"] == out["single_parts"]


def _ranged_compaction(home, dh, res=None):
    """A ranged compact_job run over D1..D2 × BTC..KX on the project's storage at `dh`; (result, instance)."""
    inst = dg.DagsterInstance.from_config(str(ensure_instance(dh)))
    inst.add_dynamic_partitions(MARKETS, [BTC, KX])
    job = defs.resolve_job_def("compact_job")
    r = job.execute_in_process(instance=inst, resources={"engine": res or engine_resource(home)}, tags={
        ASSET_PARTITION_RANGE_START_TAG: f"{D1}|{BTC}", ASSET_PARTITION_RANGE_END_TAG: f"{D2}|{KX}"})
    return r, inst


def _stored(inst) -> dict:
    """What a run left in the storage, without ids and timestamps: planned and done materializations
    per asset and partition (with their row counts), partition status, check evaluations."""
    from dagster._core.events import DagsterEventType

    out = {}
    for t in ("compacted_l2", "compacted_trades", "compacted_gaps", "catalog"):
        key = dg.AssetKey(t)
        planned = inst.event_log_storage.get_event_records(
            dg.EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION_PLANNED, key), limit=1000)
        out[t, "planned"] = sorted(str(r.event_log_entry.dagster_event.event_specific_data.partition) for r in planned)
        out[t, "done"] = sorted((str(m.partition), m.metadata["dagster/row_count"].value if "dagster/row_count" in
                                 m.metadata else None) for m in _events(inst, t))
        out[t, "status"] = inst.get_materialized_partitions(key)
        latest = inst.get_latest_materialization_event(key)
        out[t, "latest_run"] = latest is not None
    checks = inst.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("compacted_l2"), "integrity"), limit=10)
    out["checks"] = [c.status.value for c in checks]
    return out


def test_a_ranged_run_stores_its_events_in_batches_equal_to_one_by_one(tmp_path, monkeypatch):
    """Run creation (one planned event per asset and partition) and a ranged step's materializations
    reach the project's storage in one transaction per batch; what is stored is what Dagster's
    one-event-at-a-time path stores (DAGSTER_EVENT_BATCH_SIZE=0 turns Dagster's batching off)."""
    batches: list[int] = []
    orig = BatchedSqliteEventLogStorage._store_asset_batch

    def spy(self, events):
        if len(events) > 1:
            batches.append(len(events))
        return orig(self, events)

    monkeypatch.setattr(BatchedSqliteEventLogStorage, "_store_asset_batch", spy)
    out = {}
    for mode in ("batch", "single"):
        build_lake(tmp_path / mode / "h")
        if mode == "single":
            monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "0")
        else:
            monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)  # the storage sets it
        n0 = len(batches)
        r, inst = _ranged_compaction(tmp_path / mode / "h", tmp_path / mode / "dh")
        assert r.success
        out[mode] = _stored(inst)
        out[mode + "_batches"] = batches[n0:]
        inst.dispose()
    assert out["batch"] == out["single"]
    want = sorted(f"{d}|{m}" for d in (D1, D2) for m in (BTC, KX))
    assert out["batch"]["compacted_l2", "planned"] == want and len(out["batch"]["compacted_l2", "done"]) == 4
    # run creation: 4 assets × 4 partitions planned in one batch; then each step's 4 materializations
    assert 16 in out["batch_batches"] and out["batch_batches"].count(4) >= 4, out["batch_batches"]
    assert out["single_batches"] == []


def test_a_ranged_compaction_publishes_the_manifest_once_per_step(tmp_path, monkeypatch):
    """Each compacted step of a ranged run republishes the store's manifest once, after its last
    partition, not once per partition; the manifest then lists every compacted file."""
    import engine.lake.manifest as manifest

    calls = []
    orig = manifest.publish
    monkeypatch.setattr(manifest, "publish", lambda eng: calls.append(1) or orig(eng))
    eng = build_lake(tmp_path / "h")
    r, inst = _ranged_compaction(tmp_path / "h", tmp_path / "dh")
    assert r.success
    eng2 = type(eng).open(tmp_path / "h", writer=True, background=False)
    compacted = {e.key for e in eng2.catalog.entries() if e.compacted}
    assert len(compacted) >= 5  # l2 BTC D1, D2; trades BTC D1, KX D1; gaps BTC D1
    # steps that compacted something (l2, trades, gaps) once each, then the catalog asset once
    assert len(calls) == 4, len(calls)
    part = manifest.read_part(eng2.store.get_bytes(manifest.MANIFEST_KEY), eng2.store.url)
    assert compacted <= set(part.df["key"].to_list())
    inst.dispose()


def test_run_output_is_captured_in_files_without_tail_processes(tmp_path):
    """The project's compute log manager keeps a run's stdout and stderr in the files the UI shows,
    and starts no `tail` / watcher processes to mirror them (Dagster's local manager starts four)."""
    import sys
    from pathlib import Path

    from engine_defs.compute_logs import FileComputeLogManager

    @dg.op
    def speak() -> list:
        print("to-stdout-1234", flush=True)
        print("to-stderr-5678", file=sys.stderr, flush=True)
        kids = [k for task in Path("/proc/self/task").iterdir() for k in (task / "children").read_text().split()]
        return [Path(f"/proc/{k}/cmdline").read_bytes() for k in kids if Path(f"/proc/{k}").exists()]

    @dg.job
    def talk():
        speak()

    with dg.DagsterInstance.from_config(str(ensure_instance(tmp_path / "dh"))) as inst:
        assert isinstance(inst.compute_log_manager, FileComputeLogManager)
        r = talk.execute_in_process(instance=inst)
        assert r.success
        assert not [c for c in r.output_for_node("speak") if b"tail" in c or b"watch_orphans" in c]
        (cap,) = [e for e in inst.all_logs(r.run_id) if e.dagster_event and e.dagster_event.event_type_value ==
                  "LOGS_CAPTURED"]
        cm = inst.compute_log_manager
        data = cm.get_log_data(cm.build_log_key_for_run(r.run_id, cap.dagster_event.logs_captured_data.file_key))
        assert b"to-stdout-1234" in data.stdout and b"to-stderr-5678" in data.stderr


def test_the_daemon_entry_point_is_dagster_daemon_with_a_short_backfill_loop(tmp_path):
    """`python -m engine_defs.daemon` is dagster-daemon's CLI; it shortens the constant the backfill
    daemon's loop sleeps on (Dagster has no setting for it), and the asset daemon keeps its 30 s."""
    import subprocess
    import sys

    from dagster._daemon import controller

    from engine_defs import daemon
    from engine_tests.conftest import ROOT

    before = controller.DEFAULT_DAEMON_INTERVAL_SECONDS
    try:
        daemon.set_backfill_interval(2)
        assert controller.DEFAULT_DAEMON_INTERVAL_SECONDS == 2
    finally:
        controller.DEFAULT_DAEMON_INTERVAL_SECONDS = before
    import inspect

    from dagster._daemon import backfill

    # the loop reads the constant from the controller module when it starts: what the patch relies on
    assert "from dagster._daemon.controller import DEFAULT_DAEMON_INTERVAL_SECONDS" in \
        inspect.getsource(backfill.execute_backfill_iteration_loop)
    p = subprocess.run([*daemon.daemon_cmd("w.yaml")[:3], "--version"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and dg.__version__ in p.stdout, p.stderr[-2000:]
    with dg.DagsterInstance.from_config(str(ensure_instance(tmp_path / "dh"))) as inst:
        assert inst.auto_materialize_minimum_interval_seconds == 30
