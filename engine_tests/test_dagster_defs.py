"""Dagster definitions against real small lakes: sensor ticks, asset materializations (local store and
moto's S3 server), checks, the nightly schedule and partition keys. In-process, a few seconds each."""

from __future__ import annotations

import datetime as dt
import warnings

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import Engine, schema
from engine.paths import MANIFEST_KEY
from engine.sim import synth
from engine.timeutil import to_ns

warnings.filterwarnings("ignore", category=dg.PreviewWarning) if hasattr(dg, "PreviewWarning") else None

from engine_defs import lake  # noqa: E402
from engine_defs.assets import all_assets  # noqa: E402
from engine_defs.checks import all_checks  # noqa: E402
from engine_defs.definitions import defs  # noqa: E402
from engine_defs.partitions import (  # noqa: E402
    MARKETS, PartitionKeyError, market_key, parse_market_key, partition_key, split_partition_key,
)
from engine_defs.resources import EngineResource  # noqa: E402
from engine_defs.schedules import nightly_compaction  # noqa: E402
from engine_defs.sensors import catalog_sensor  # noqa: E402

H = 3600 * 10**9
D1, D2 = "2026-03-02", "2026-03-03"
T1 = to_ns(D1)
BTC = "coinbase:BTC-USD"
KX = "kalshi:KXBTC"
GAP = (T1 + 10 * H + 5 * 60 * 10**9, T1 + 10 * H + 6 * 60 * 10**9)  # 10:05–10:06 on D1


def build_lake(home, store=None) -> Engine:
    """coinbase BTC-USD: l2 + trades over D1 09:00–11:00 (2 hourly files each) and D2 00:00–01:00, one
    recorded gap on D1; kalshi KXBTC: trades over D1 12:00–13:00."""
    eng = Engine.open(home, store, background=False, writer=True)
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", T1 + 9 * H, 3000, 2 * H, seed=1))
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", T1 + 9 * H, 1000, 2 * H, seed=1))
    eng.append("gaps", synth.gap_rows([{"source": "coinbase", "market": "BTC-USD", "instrument": None,
                                         "start_ts": GAP[0], "end_ts": GAP[1], "kind": "disconnect",
                                         "detail": "socket closed (test)"}]))
    eng.append("trades", synth.trade_rows("kalshi", "KXBTC", T1 + 12 * H, 500, H, seed=2,
                                          instruments=["KXBTC-26MAR0217-B97500", "KXBTC-26MAR0217-B98000"]))
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", T1 + 24 * H, 800, H, seed=3, seq_start=10_000))
    eng.flush()
    return eng


def engine_resource(home, store=None) -> EngineResource:
    return EngineResource(home=str(home), store=store)


def run_sensor(instance, res, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"engine": res}) as ctx:
        return catalog_sensor(ctx)


def apply_partition_requests(instance, result):
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))


def md(mat, name):
    return mat.metadata[name].value


# ---- definitions and keys ------------------------------------------------------------------------------


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    for t in ("l2", "trades", "gaps"):
        assert {f"raw_{t}", f"uploaded_{t}", f"compacted_{t}"} <= keys
    assert "catalog" in keys
    assert {"upload_job", "compact_job", "flush_job"} <= set(repo.job_names)
    assert repo.get_sensor_def("catalog_sensor").job_name == "upload_job"
    assert repo.get_schedule_def("nightly_compaction").cron_schedule == "30 0 * * *"
    checks = {(k.asset_key.to_user_string(), k.name) for k in repo.asset_graph.asset_check_keys}
    assert ("compacted_l2", "integrity") in checks and ("uploaded_trades", "recorded_gaps") in checks
    assert ("uploaded_l2", "coverage") in checks
    assert any(s.blocking for s in repo.assets_defs_by_key[dg.AssetKey("compacted_trades")].check_specs)


def test_partition_keys():
    assert market_key("coinbase", "BTC-USD") == BTC
    assert parse_market_key(KX) == ("kalshi", "KXBTC")
    for bad in ("coinbase|BTC-USD", "coinbase:BTC,USD", "BTC-USD", "a:b:c", "coin base:BTC", ":BTC"):
        with pytest.raises(PartitionKeyError):
            parse_market_key(bad)
    pk = partition_key(D1, "coinbase", "BTC-USD")
    assert str(pk) == f"{D1}|{BTC}"
    assert split_partition_key(pk) == (D1, "coinbase", "BTC-USD")
    assert split_partition_key(f"{D1}|{KX}") == (D1, "kalshi", "KXBTC")


# ---- sensor --------------------------------------------------------------------------------------------


def test_sensor_ticks(tmp_path):
    eng = build_lake(tmp_path / "h")
    raw = [e for e in eng.catalog.entries() if not e.compacted]
    res = engine_resource(tmp_path / "h")
    with dg.instance_for_test() as inst:
        r1 = run_sensor(inst, res)
        assert sorted(k for q in r1.dynamic_partitions_requests for k in q.partition_keys) == [BTC, KX]
        assert len(r1.asset_events) == len(raw) == 7
        by_key = {}
        for ev in r1.asset_events:
            by_key.setdefault((ev.asset_key.to_user_string(), str(ev.partition)), []).append(ev)
        assert len(by_key[("raw_l2", f"{D1}|{BTC}")]) == 2
        assert len(by_key[("raw_gaps", f"{D1}|{BTC}")]) == 1
        ev = by_key[("raw_trades", f"{D1}|{KX}")][0]
        e = next(x for x in raw if x.table == "trades" and x.source == "kalshi")
        assert md(ev, "dagster/row_count") == e.rows == 500
        assert md(ev, "min_ts") == pytest.approx(e.min_ts / 1e9) and md(ev, "max_ts") == pytest.approx(e.max_ts / 1e9)
        parts = {str(q.partition_key): q for q in r1.run_requests}
        assert set(parts) == {f"{D1}|{BTC}", f"{D1}|{KX}", f"{D2}|{BTC}"}
        assert {k.to_user_string() for k in parts[f"{D1}|{KX}"].asset_selection} == {"uploaded_trades", "catalog"}
        assert {k.to_user_string() for k in parts[f"{D1}|{BTC}"].asset_selection} == {
            "uploaded_l2", "uploaded_trades", "uploaded_gaps", "catalog"}
        assert len({q.run_key for q in r1.run_requests}) == 3
        apply_partition_requests(inst, r1)
        assert sorted(inst.get_dynamic_partitions(MARKETS)) == [BTC, KX]

        r2 = run_sensor(inst, res, r1.cursor)  # the same log again: nothing
        assert not r2.run_requests and not r2.asset_events and not r2.dynamic_partitions_requests
        assert r2.skip_reason is not None

        # one more file in one partition, plus non-file lines (upload marks): exactly that partition
        eng.upload(market="KXBTC")
        eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", T1 + 24 * H + H // 2, 10, 1000, seed=9,
                                              id_start=10**6))
        eng.flush()
        r3 = run_sensor(inst, res, r2.cursor)
        assert [str(q.partition_key) for q in r3.run_requests] == [f"{D2}|{BTC}"]
        assert [k.to_user_string() for k in r3.run_requests[0].asset_selection] == ["uploaded_trades", "catalog"]
        assert not r3.dynamic_partitions_requests and len(r3.asset_events) == 1
        assert not run_sensor(inst, res, r3.cursor).run_requests

        # a lost cursor re-reads everything: the same run keys (Dagster de-duplicates them), and none
        # for KXBTC, whose files the log shows uploaded
        again = run_sensor(inst, res, None)
        want = {q.run_key for q in r1.run_requests if q.run_key.startswith(f"upload|{D1}|{BTC}|")}
        assert {q.run_key for q in again.run_requests} == want | {r3.run_requests[0].run_key}
        assert len(again.asset_events) == 8

        # compaction lines are not raw files
        eng.compact(date=D1, market="KXBTC")
        assert not run_sensor(inst, res, r3.cursor).run_requests


def test_sensor_batches_a_backlog(tmp_path):
    eng = build_lake(tmp_path / "h")
    from engine_defs.sensors import evaluate

    with dg.instance_for_test() as inst:
        cursor, events, runs = None, 0, set()
        for _ in range(10):
            ctx = dg.build_sensor_context(instance=inst, cursor=cursor)
            r = evaluate(ctx, eng.layout.catalog_log, max_files=3)
            apply_partition_requests(inst, r)
            assert len(r.asset_events or []) <= 3
            events += len(r.asset_events or [])
            runs |= {str(q.partition_key) for q in r.run_requests or []}
            cursor = r.cursor
            if not r.run_requests:
                break
        assert events == 7 and runs == {f"{D1}|{BTC}", f"{D1}|{KX}", f"{D2}|{BTC}"}


def test_sensor_summarises_a_backlog(tmp_path, monkeypatch):
    import engine_defs.sensors as sensors

    eng = build_lake(tmp_path / "h")
    eng.upload(market="BTC-USD", date=D1)
    monkeypatch.setattr(sensors, "PER_FILE_EVENTS_MAX", 2)
    with dg.instance_for_test() as inst:
        with dg.build_sensor_context(instance=inst) as ctx:
            r = sensors.evaluate(ctx, eng.layout.catalog_log)
        got = {(ev.asset_key.to_user_string(), str(ev.partition)): ev for ev in r.asset_events}
        assert len(got) == 5  # one per (table, date, market) instead of 7 files
        ev = got[("raw_l2", f"{D1}|{BTC}")]
        files = eng.catalog.files_in(("l2", "coinbase", "BTC-USD", D1))
        assert md(ev, "files") == 2 and md(ev, "dagster/row_count") == sum(e.rows for e in files)
        assert md(ev, "min_ts") == pytest.approx(min(e.min_ts for e in files) / 1e9)
        # D1 BTC-USD is already uploaded: only the other partitions need upload runs
        assert {str(q.partition_key) for q in r.run_requests} == {f"{D1}|{KX}", f"{D2}|{BTC}"}


# ---- assets ----------------------------------------------------------------------------------------------


def materialize(instance, res, selection, pk, raise_on_error=True):
    return dg.materialize(
        [*all_assets, *all_checks], selection=selection, partition_key=pk, instance=instance,
        resources={"engine": res}, raise_on_error=raise_on_error,
    )


def mats(result, name):
    return [m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == name]


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_assets_materialize(tmp_path, store_kind, request, monkeypatch):
    store = request.getfixturevalue("s3_env") if store_kind == "s3" else None
    eng = build_lake(tmp_path / "h", store)
    if store_kind == "s3":  # the notebook / Definitions path: everything from the environment
        monkeypatch.setenv("ENGINE_HOME", str(tmp_path / "h"))
        monkeypatch.setenv("ENGINE_STORE", store)
        res = EngineResource.from_env()
        assert isinstance(res.aws_secret_access_key, dg.EnvVar)  # a name, never the value
    else:
        res = engine_resource(tmp_path / "h")
    before = {t: [e for e in eng.catalog.files_in((t, "coinbase", "BTC-USD", D1))] for t in ("l2", "trades")}
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC, KX])
        pk = partition_key(D1, "coinbase", "BTC-USD")
        up = materialize(inst, res, ["uploaded_l2", "uploaded_trades", "uploaded_gaps", "catalog"], pk)
        assert up.success
        m = mats(up, "uploaded_l2")[0].materialization
        files = before["l2"]
        assert md(m, "dagster/row_count") == sum(e.rows for e in files) == 3000
        assert md(m, "files") == 2 and md(m, "remote_files") == 2 and md(m, "uploaded_files") == 2
        assert md(m, "bytes") == sum(e.bytes for e in files)
        assert md(m, "min_ts") == pytest.approx(min(e.min_ts for e in files) / 1e9)
        assert md(m, "max_ts") == pytest.approx(max(e.max_ts for e in files) / 1e9)
        assert 1.9 < md(m, "span_hours") <= 2.0 and md(m, "largest_gap_s") > 0 and md(m, "lag_s") > 0
        assert md(m, "recorded_gaps") == 1 and md(m, "recorded_gap_s") == pytest.approx(60.0)
        assert md(mats(up, "uploaded_trades")[0].materialization, "dagster/row_count") == 1000
        assert all(e.remote for e in eng.catalog.entries() if e.source == "coinbase" and e.date == D1)
        cat = mats(up, "catalog")[0].materialization
        assert md(cat, "listed_files") == 5 and md(cat, "partition_files") == 5
        assert eng.store.get_bytes(MANIFEST_KEY) is not None

        evals = {(e.asset_key.to_user_string(), e.check_name): e for e in up.get_asset_check_evaluations()}
        gap = evals[("uploaded_l2", "recorded_gaps")]
        assert not gap.passed and gap.severity == dg.AssetCheckSeverity.WARN
        table = gap.metadata["gap_table"].value
        assert "disconnect" in table and "socket closed (test)" in table and "10:05:00.000Z" in table
        cov = evals[("uploaded_l2", "coverage")]
        assert not cov.passed and cov.severity == dg.AssetCheckSeverity.WARN  # data only 09:00–11:00
        assert cov.metadata["hours_with_data"].value == 2
        assert "09:0" in cov.metadata["silent_table"].value

        comp = materialize(inst, res, ["compacted_l2", "compacted_trades", "compacted_gaps", "catalog"], pk)
        assert comp.success
        eng.catalog.refresh()
        for t in ("l2", "trades"):
            now = eng.catalog.files_in((t, "coinbase", "BTC-USD", D1))
            assert len(now) == 1 and now[0].compacted and now[0].remote
            cm = mats(comp, f"compacted_{t}")[0].materialization
            assert md(cm, "dagster/row_count") == now[0].rows == sum(e.rows for e in before[t])
            assert md(cm, "files") == 1 and md(cm, "files_merged") == 2 and md(cm, "key") == now[0].key
            assert md(cm, "min_ts") == pytest.approx(now[0].min_ts / 1e9)
            assert eng.store.head(now[0].key) is not None
        ev = {(e.asset_key.to_user_string(), e.check_name): e for e in comp.get_asset_check_evaluations()}
        assert ev[("compacted_l2", "integrity")].passed and ev[("compacted_trades", "integrity")].passed
        assert ev[("compacted_l2", "integrity")].metadata["rows"].value == 3000

        again = materialize(inst, res, ["compacted_l2"], pk)  # idempotent: nothing changes, re-verified
        assert again.success
        assert md(mats(again, "compacted_l2")[0].materialization, "note") == "already compacted; nothing changed"
        assert len(eng.catalog.files_in(("l2", "coinbase", "BTC-USD", D1))) == 1

        empty = materialize(inst, res, ["uploaded_l2", "compacted_l2"], partition_key(D1, "kalshi", "KXBTC"))
        assert empty.success and md(mats(empty, "compacted_l2")[0].materialization, "dagster/row_count") == 0


def test_partition_metadata_counts_the_instruments_seen(tmp_path):
    """Kalshi: the contracts seen that day, from the catalog's per-instrument figures (any source)."""
    eng = build_lake(tmp_path / "h")
    eng.append("trades", synth.trade_rows("kalshi", "KXBTC", T1 + 13 * H, 300, H, seed=4,
                                          instruments=["KXBTC-26MAR0217-B98000", "KXBTC-26MAR0218-B98500"]))
    eng.flush()
    res = engine_resource(tmp_path / "h")
    with dg.instance_for_test() as inst:
        ticks = run_sensor(inst, res)
        raw = [ev for ev in ticks.asset_events if str(ev.partition) == f"{D1}|{KX}"]
        assert sorted(md(ev, "instruments") for ev in raw) == [2, 2]
        apply_partition_requests(inst, ticks)
        up = materialize(inst, res, ["uploaded_trades"], partition_key(D1, "kalshi", "KXBTC"))
        assert md(mats(up, "uploaded_trades")[0].materialization, "instruments") == 3  # 2 + 2, one shared
        up = materialize(inst, res, ["uploaded_l2"], partition_key(D1, "coinbase", "BTC-USD"))
        assert md(mats(up, "uploaded_l2")[0].materialization, "instruments") == 1


def test_compaction_refuses_open_day(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    today = now.strftime("%Y-%m-%d")
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns(today), 50, 60 * 10**9))
    eng.flush()
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC])
        r = materialize(inst, engine_resource(tmp_path / "h"), ["compacted_trades", "catalog"],
                        partition_key(today, "coinbase", "BTC-USD"), raise_on_error=False)
        assert not r.success
        failure = next(e for e in r.all_events if e.is_step_failure)
        assert "only closed days are compacted" in failure.step_failure_data.error.message
    assert not any(e.compacted for e in eng.catalog.entries())


# ---- integrity blocks a bad compaction ---------------------------------------------------------------------


def _blocked(tmp_path, eng, table, market="BTC-USD", source="coinbase"):
    part = (table, source, market, D1)
    before = [e.key for e in eng.catalog.files_in(part)]
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC, KX])
        r = materialize(inst, engine_resource(tmp_path / "h"), [f"compacted_{table}", "catalog"],
                        partition_key(D1, source, market), raise_on_error=False)
        assert not r.success
        ev = [e for e in r.get_asset_check_evaluations() if e.check_name == "integrity"]
        assert len(ev) == 1 and not ev[0].passed and ev[0].severity == dg.AssetCheckSeverity.ERROR
        assert not mats(r, f"compacted_{table}") and not mats(r, "catalog")  # blocked downstream too
    eng.catalog.refresh()
    assert [e.key for e in eng.catalog.files_in(part)] == before  # catalog unchanged
    assert not any(k.endswith("/0000.parquet") for k in eng.store.list_keys("data/"))  # nothing uploaded
    assert not list((tmp_path / "h" / "staging").rglob("0000*.parquet"))
    return ev[0]


def test_integrity_blocks_duplicate_sequence(tmp_path):
    eng = build_lake(tmp_path / "h")
    t = synth.trade_rows("kalshi", "KXBTC", T1 + 12 * H, 500, H, seed=2,
                         instruments=["KXBTC-26MAR0217-B97500", "KXBTC-26MAR0217-B98000"])
    eng.append("trades", t.slice(100, 1))  # the same trade (same seq, same trade_id) written twice
    eng.flush()
    ev = _blocked(tmp_path, eng, "trades", "KXBTC", "kalshi")
    assert ev.metadata["duplicate_rows"].value == 1
    assert "100" in ev.metadata["duplicate_examples"].value


def test_integrity_blocks_unsorted(tmp_path, monkeypatch):
    eng = build_lake(tmp_path / "h")
    import engine.lake.compaction as comp
    from engine.lake.writer import write_parquet

    def buggy_write(table, t, path, **kw):  # a compaction bug: rows written in reverse order
        kw["sort"] = False
        return write_parquet(table, t.take(pa.array(range(t.num_rows - 1, -1, -1))), path, **kw)

    monkeypatch.setattr(comp, "write_parquet", buggy_write)
    ev = _blocked(tmp_path, eng, "l2")
    assert ev.metadata["sorted"].value is False and ev.metadata["duplicate_rows"].value == 0


def test_integrity_function():
    t = synth.l2_rows("coinbase", "BTC-USD", T1, 200, H)
    ok = lake.integrity("l2", t, expected_rows=200, source="coinbase", market="BTC-USD", date=D1)
    assert ok.passed, ok.problems
    bad = lake.integrity("l2", pa.concat_tables([t, t.slice(5, 2)]), expected_rows=200)
    assert not bad.passed and bad.duplicates == 2 and any("202 rows" in p for p in bad.problems)
    assert not lake.integrity("l2", t, date=D2).passed  # rows outside the partition's day


def _l2_msgs(rows) -> pa.Table:
    """l2 rows of BTC-USD from (ts, recv_ts, seq, side, price, size) tuples, in the order given."""
    cols = list(zip(*rows))
    n = len(rows)
    return schema.validate("l2", pa.table({
        "ts": cols[0], "recv_ts": cols[1], "source": ["coinbase"] * n, "market": ["BTC-USD"] * n,
        "instrument": ["BTC-USD"] * n, "side": cols[3], "price": cols[4], "size": cols[5], "seq": cols[2],
        "snapshot": [False] * n,
    }))


def test_integrity_level_touched_twice_in_one_message_is_no_duplicate():
    T, R = T1 + 10 * H, T1 + 10 * H + 2_000_000
    # one message (seq 7) sets a level, clears it, sets it again, and changes an ask twice: last size wins
    msg = [(T, R, 7, "bid", 100.0, 1.0), (T, R, 7, "bid", 100.0, 0.0), (T, R, 7, "bid", 100.0, 1.0),
           (T, R, 7, "ask", 101.0, 2.0), (T, R, 7, "ask", 101.0, 3.0)]
    nxt = [(T + 5, R + 5, 8, "bid", 99.0, 4.0)]
    t = _l2_msgs(msg + nxt)
    assert lake.duplicate_rows("l2", t) == (0, [])
    assert lake.integrity("l2", t, expected_rows=6, source="coinbase", market="BTC-USD", date=D1).passed
    # a new connection restarts sequence numbers: seq 7 at another exchange time is another message
    assert lake.duplicate_rows("l2", _l2_msgs(msg + [(T + H, R + H, 7, "bid", 100.0, 1.0)]))[0] == 0
    # the same message received again later (a replayed frame): every row of the second receipt
    again = [(ts, r + 10**9, s, side, p, q) for ts, r, s, side, p, q in msg]
    n, examples = lake.duplicate_rows("l2", _l2_msgs(msg + nxt + again))
    assert n == 5 and examples[0]["seq"] == 7 and examples[0]["rows"] == 5
    # the same message stored twice with the same receive time (a capture ingested twice)
    assert lake.duplicate_rows("l2", _l2_msgs(msg + msg + nxt))[0] == 5
    assert lake.duplicate_rows("l2", _l2_msgs(msg + msg + msg + nxt))[0] == 10


def _coinbase_capture_lake(tmp_path) -> Engine:
    """A lake ingested from one minute of the generator's Coinbase capture on D1 10:00 (book anchors on)."""
    from engine.collect.ingest import ingest_files
    from engine.sim.capture_gen import generate_coinbase, write_capture

    cap = tmp_path / "cb.jsonl"
    write_capture(generate_coinbase(["BTC-USD"], seconds=60, rate=100, seed=9, start_ns=T1 + 10 * H), cap)
    eng = Engine.open(tmp_path / "h", background=False, writer=True, book_anchors=True)
    ingest_files(eng, [cap], "coinbase", progress=False)
    eng.close()
    return Engine.open(tmp_path / "h", background=False, writer=True)


def test_compact_job_on_generated_coinbase_capture(tmp_path):
    from engine_defs.jobs import compact_job

    eng = _coinbase_capture_lake(tmp_path)
    l2 = eng.l2(source="coinbase", market="BTC-USD", allow_unsealed=True).filter(~pl.col("snapshot"))
    touched_twice = l2.height - l2.select("instrument", "seq", "ts", "side", "price").unique().height
    assert touched_twice > 20  # the capture has messages that touch one level more than once
    rows = {t: sum(e.rows for e in eng.catalog.files_in((t, "coinbase", "BTC-USD", D1))) for t in ("l2", "trades")}
    res = engine_resource(tmp_path / "h")
    job_defs = dg.Definitions(assets=all_assets, asset_checks=all_checks, jobs=[compact_job],
                              resources={"engine": res})
    with dg.instance_for_test() as inst:
        with dg.build_schedule_context(instance=inst, resources={"engine": res}, scheduled_execution_time=dt.datetime(
                2026, 3, 3, 0, 30, tzinfo=dt.timezone.utc)) as ctx:
            (req,) = nightly_compaction(ctx)
        assert str(req.partition_key) == f"{D1}|{BTC}"
        run = job_defs.resolve_job_def("compact_job").execute_in_process(
            instance=inst, partition_key=req.partition_key, asset_selection=req.asset_selection)
        assert run.success
        checks = {e.asset_key.to_user_string(): e for e in run.get_asset_check_evaluations()}
        assert checks["compacted_l2"].passed and checks["compacted_l2"].metadata["duplicate_rows"].value == 0
        assert checks["compacted_trades"].passed
    eng.catalog.refresh()
    for t, n in rows.items():
        (e,) = eng.catalog.files_in((t, "coinbase", "BTC-USD", D1))
        assert e.compacted and e.rows == n > 0


def test_integrity_blocks_replayed_l2_message(tmp_path):
    eng = _coinbase_capture_lake(tmp_path)
    l2 = eng.l2(source="coinbase", market="BTC-USD", allow_unsealed=True, raw_ns=True)
    seq = l2.filter(~pl.col("snapshot"))["seq"][500]
    msg = l2.filter((pl.col("seq") == seq) & ~pl.col("snapshot"))
    # the exchange sends the message again a second later (e.g. after a reconnect) and it is stored again
    eng.append("l2", msg.with_columns(pl.col("recv_ts") + 10**9))
    eng.close()
    ev = _blocked(tmp_path, Engine.open(tmp_path / "h", background=False, writer=True), "l2")
    assert ev.metadata["duplicate_rows"].value == msg.height
    assert str(seq) in ev.metadata["duplicate_examples"].value


# ---- schedule -----------------------------------------------------------------------------------------------


def test_nightly_schedule_yesterday_only(tmp_path):
    build_lake(tmp_path / "h")
    res = engine_resource(tmp_path / "h")
    with dg.instance_for_test() as inst:
        with dg.build_schedule_context(instance=inst, resources={"engine": res}, scheduled_execution_time=dt.datetime(
                2026, 3, 3, 0, 30, tzinfo=dt.timezone.utc)) as ctx:
            reqs = nightly_compaction(ctx)
        got = {str(r.partition_key): {k.to_user_string() for k in r.asset_selection} for r in reqs}
        assert got == {
            f"{D1}|{BTC}": {"compacted_l2", "compacted_trades", "compacted_gaps", "catalog"},
            f"{D1}|{KX}": {"compacted_trades", "catalog"},
        }
        assert all(r.run_key.startswith(f"compact|{D1}|") for r in reqs)
        assert sorted(inst.get_dynamic_partitions(MARKETS)) == [BTC, KX]
        with dg.build_schedule_context(instance=inst, resources={"engine": res}, scheduled_execution_time=dt.datetime(
                2026, 3, 9, 0, 30, tzinfo=dt.timezone.utc)) as ctx2:
            assert isinstance(nightly_compaction(ctx2), dg.SkipReason)


def test_flush_job_without_collector(tmp_path):
    from engine_defs.jobs import flush_job

    res = engine_resource(tmp_path / "h")
    with dg.instance_for_test() as inst:
        r = flush_job.execute_in_process(instance=inst, resources={"engine": res})
        assert r.success and r.output_for_node("request_collector_flush") == 0
    from engine.collect.status import status_dir

    assert (status_dir(tmp_path / "h") / "flush.request").exists()  # left for the next collector


def test_flush_job_signals_running_collector(tmp_path):
    import subprocess
    import sys
    import time

    from engine.collect.status import status_dir
    from engine_defs.jobs import flush_job

    marker = tmp_path / "flushed"
    # a fake collector living 10 s (scenario sleeps); "collector" in its command line (the comment at
    # the end of the code) is what request_flush's check of the pid file looks for
    code = ("import signal,time,pathlib,sys; p=pathlib.Path(sys.argv[1]); "
            "signal.signal(signal.SIGUSR1, lambda *a: p.write_text('x')); "
            "print('ready', flush=True); [time.sleep(0.05) for _ in range(200)]  # fake collector")
    proc = subprocess.Popen([sys.executable, "-c", code, str(marker)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        sd = status_dir(tmp_path / "h")
        sd.mkdir(parents=True, exist_ok=True)
        (sd / "collector-test.pid").write_text(str(proc.pid))
        with dg.instance_for_test() as inst:
            r = flush_job.execute_in_process(instance=inst, resources={"engine": engine_resource(tmp_path / "h")})
            assert r.success and r.output_for_node("request_collector_flush") == 1
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_read_log_offsets(tmp_path):
    eng = build_lake(tmp_path / "h")
    p = eng.layout.catalog_log
    full = lake.read_log(p, 0)
    assert full.offset == p.stat().st_size and len(full.ops) == len(p.read_bytes().splitlines())
    part = lake.read_log(p, 0, max_ops=3)
    assert len(part.ops) == 3 and part.offset == part.ops[-1][0]
    rest = lake.read_log(p, part.offset)
    assert len(rest.ops) == len(full.ops) - 3
    assert lake.read_log(p, 10**9).reset
    with open(p, "ab") as f:
        f.write(b'{"op":"add","fi')  # a torn last line is not read until it is complete
    assert lake.read_log(p, full.offset).ops == []
    assert pq.read_metadata(eng.local_path(eng.catalog.entries()[0])).num_rows > 0


def test_loading_the_definitions_leaves_the_heavy_engine_modules_unimported():
    """Every code server and run worker imports the definitions: the engine's heavy modules
    (pyarrow, numpy, DuckDB, pandas, Polars, the catalog) are imported by the asset bodies, sensors
    and checks that use them, not when the definitions load (the code server stays ~25 MB lighter;
    the research asset's input is unannotated for that)."""
    import os
    import subprocess
    import sys

    from engine_tests.conftest import ROOT

    code = ("import sys, warnings; warnings.simplefilter('ignore'); import engine_defs.definitions as d; "
            "d.defs.get_repository_def(); "
            "heavy = ('pyarrow', 'numpy', 'duckdb', 'pandas', 'polars', 'engine.schema', 'engine.lake.catalog', "
            "'engine.research.query', 'engine.api'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout
