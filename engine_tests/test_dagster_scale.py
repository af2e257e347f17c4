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
