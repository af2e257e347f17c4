"""The lake as Apache Iceberg tables: pyiceberg and Polars read back exactly what the engine reads,
before and after a compaction, on a local store and on moto's S3 server; publishing is incremental
and idempotent; a configured REST catalog that does not answer is a clear, bounded error."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

from engine import Engine, schema
from engine.lake import iceberg
from engine.lake.compaction import purge_retired
from engine.lake.iceberg import IcebergConfig, IcebergError
from engine.sim import synth
from engine.timeutil import NS_PER_DAY, NS_PER_HOUR, now_ns

ROOT = Path(__file__).resolve().parents[1]
DAY0 = (now_ns() // NS_PER_DAY - 3) * NS_PER_DAY  # a closed day three days ago: compaction takes it
MARKETS = ("BTC-USD", "ETH-USD")


@pytest.fixture(autouse=True)
def _polars_planner(monkeypatch):
    # Polars plans Iceberg scans with the optional polars_iceberg plugin, else (with a warning) pyiceberg
    monkeypatch.setenv("POLARS_ICEBERG_PLANNER", "pyiceberg")


def _hours(eng: Engine, hours: range, seed: int = 0) -> None:
    """l2 and trades of both markets, one flushed file per table, market and hour."""
    for h in hours:
        for i, m in enumerate(MARKETS):
            t0 = DAY0 + h * NS_PER_HOUR
            eng.append("l2", synth.l2_rows("coinbase", m, t0, 400, NS_PER_HOUR - 10**9, seed=seed + 10 * h + i,
                                           seq_start=h * 10**6))
            eng.append("trades", synth.trade_rows("coinbase", m, t0, 150, NS_PER_HOUR - 10**9, seed=seed + 10 * h + i,
                                                  id_start=(10 * h + i) * 10**6))
        eng.flush()


def _lake(tmp_path: Path, store: str | None = None, hours: range = range(3)) -> Engine:
    eng = Engine.open(tmp_path / "home", store, background=False, writer=True)
    _hours(eng, hours)
    eng.append("gaps", synth.gap_rows([{"source": "coinbase", "market": "BTC-USD", "instrument": None,
                                         "start_ts": DAY0 + 3600 * 10**9, "end_ts": DAY0 + 3660 * 10**9,
                                         "kind": "disconnect", "detail": "test"}]))
    eng.flush()
    assert eng.upload()["failed"] == 0
    return eng


def canon(df: pl.DataFrame, table: str) -> pl.DataFrame:
    cols = schema.spec(table).columns
    return df.select(cols).with_columns(pl.col(pl.Categorical).cast(pl.String)).sort(cols, nulls_last=True)


def engine_rows(eng: Engine, table: str) -> pl.DataFrame:
    return canon(eng.read(table, raw_ns=True, allow_unsealed=True), table)


def assert_reads_equal(eng: Engine, tables=("l2", "trades", "gaps")) -> None:
    for t in tables:
        tbl = iceberg.load_table(eng, t)
        want = engine_rows(eng, t)
        assert want.height > 0
        via_polars = canon(pl.scan_iceberg(tbl).collect(), t)
        assert via_polars.equals(want), f"{t}: polars.scan_iceberg differs from eng.read"
        via_pyiceberg = canon(pl.from_arrow(tbl.scan().to_arrow()), t)
        assert via_pyiceberg.equals(want), f"{t}: pyiceberg scan differs from eng.read"
        # times stay int64 ns (`long`), exactly as stored
        assert via_polars.schema[schema.spec(t).time_col] == pl.Int64


def registered_keys(eng: Engine, table: str) -> set[str]:
    root = iceberg.store_uri(eng.store) + "/"
    return {p.removeprefix(root) for p in iceberg.registered(iceberg.load_table(eng, table))}


def uploaded_keys(eng: Engine, table: str) -> set[str]:
    return {e.key for e in eng.catalog.files(table) if e.remote}


def test_reads_equal_before_and_after_compaction_one_snapshot(tmp_path):
    eng = _lake(tmp_path)
    res = {r.table: r for r in iceberg.publish(eng)}
    assert res["l2"].added == res["l2"].files == 6 and res["trades"].files == 6 and res["gaps"].files == 1
    assert res["quotes"].files == 0 and res["quotes"].snapshot_id is None
    assert_reads_equal(eng)
    l2 = iceberg.load_table(eng, "l2")
    assert [f.name for f in l2.spec().fields] == ["source", "market"]
    assert str(l2.schema().find_field("ts").field_type) == "long"
    assert str(l2.schema().find_field("instrument").field_type) == "string"
    # a market filter plans only that market's files (identity partition), a time filter by file bounds
    eth = list(l2.scan(row_filter="market == 'ETH-USD'").plan_files())
    assert len(eth) == 3 and all("market=ETH-USD" in t.file.file_path for t in eth)
    second_hour = list(l2.scan(row_filter=f"recv_ts >= {DAY0 + NS_PER_HOUR} and recv_ts < {DAY0 + 2 * NS_PER_HOUR}")
                       .plan_files())
    assert len(second_hour) == 2
    # registered in place: the store's own objects, no copy
    assert all(t.file.file_path.startswith(eng.store.root.as_uri() + "/data/l2/") for t in eth)
    before = {t: len(iceberg.load_table(eng, t).snapshots()) for t in ("l2", "trades")}

    # compaction (this home publishes Iceberg: the pass republishes once, replacing 3 files by 1 per partition)
    done = eng.compact()
    assert {(r.table, r.files_in) for r in done} == {("l2", 3), ("trades", 3), ("gaps", 1)}
    for t in ("l2", "trades"):
        tbl = iceberg.load_table(eng, t)
        assert len(tbl.snapshots()) == before[t] + 1  # ONE new snapshot
        snap = tbl.current_snapshot()
        assert snap.summary.operation.value == "overwrite"
        assert snap.summary["deleted-data-files"] == "6" and snap.summary["added-data-files"] == "2"
        assert snap.summary["total-data-files"] == "2"
        assert registered_keys(eng, t) == uploaded_keys(eng, t)
        assert all(k.endswith("/0000.parquet") for k in registered_keys(eng, t))
    assert_reads_equal(eng, ("l2", "trades", "gaps", "quotes"))  # quotes: derived by the compaction
    # the raw objects go after the grace period; the tables no longer list them
    assert purge_retired(eng, grace_s=0) > 0
    assert not list((eng.store.root / "data" / "l2").rglob("0001.parquet"))
    assert_reads_equal(eng)
    assert all(not s.unregistered and not s.stale for s in iceberg.status(eng))


def test_incremental_publish_registers_only_new_files_and_twice_is_idempotent(tmp_path):
    eng = _lake(tmp_path)
    first = {r.table: r for r in iceberg.publish(eng, ["l2", "trades"], follow=False)}
    assert first["l2"].added == 6 and first["l2"].committed
    l2 = iceberg.load_table(eng, "l2")
    meta, snaps = l2.metadata_location, len(l2.snapshots())
    old = iceberg.registered(l2)

    again = iceberg.publish(eng, ["l2", "trades"])  # nothing new: nothing written
    assert all(not r.committed and r.added == r.removed == 0 for r in again)
    l2 = iceberg.load_table(eng, "l2")
    assert l2.metadata_location == meta and len(l2.snapshots()) == snaps

    _hours(eng, range(3, 5), seed=100)  # two more hours: 4 new l2 files, of which 2 uploaded
    eng.upload(date=None, market="BTC-USD")  # follow=False: the upload does not republish
    assert iceberg.load_table(eng, "l2").metadata_location == meta
    st = {s.table: s for s in iceberg.status(eng, ["l2", "trades"])}
    assert st["l2"].unregistered == 2 and st["l2"].stale == 0 and st["l2"].files == 6
    r = {r.table: r for r in iceberg.publish(eng, ["l2", "trades"])}["l2"]
    assert (r.added, r.removed, r.files) == (2, 0, 8)  # only the new uploaded files; local-only ones wait
    l2 = iceberg.load_table(eng, "l2")
    assert l2.current_snapshot().summary.operation.value == "append"
    assert l2.current_snapshot().summary["added-data-files"] == "2"
    now = iceberg.registered(l2)
    assert old.keys() < now.keys()
    assert all(now[p].record_count == old[p].record_count for p in old)  # earlier entries untouched
    assert registered_keys(eng, "l2") == uploaded_keys(eng, "l2")
    assert json.loads((eng.home / "iceberg" / "state.json").read_text())["follow"] is False
    # the published rows are the uploaded ones
    tbl = iceberg.load_table(eng, "l2")
    want = canon(pl.concat([pl.read_parquet(eng.local_path(e)) for e in eng.catalog.files("l2") if e.remote]), "l2")
    assert canon(pl.scan_iceberg(tbl).collect(), "l2").equals(want)


def test_cli_publish_and_status(tmp_path, capsys):
    from engine.cli import main

    eng = _lake(tmp_path)
    home = ["--home", str(eng.home)]
    assert main(["iceberg", "status", *home]) == 0
    out = capsys.readouterr().out
    assert "lake.l2: not published (6 uploaded file(s)" in out and "run `data-engine iceberg publish`" in out
    eng.close()
    assert main(["iceberg", "publish", *home]) == 0
    out = capsys.readouterr().out
    assert "lake.l2: 6 file(s), 2400 rows; +6 -0 file(s)" in out and "catalog: SQLite" in out
    assert main(["iceberg", "publish", *home]) == 0
    assert "lake.l2: 6 file(s), 2400 rows; unchanged" in capsys.readouterr().out
    assert main(["iceberg", "status", *home]) == 0
    assert "in step with the lake" in capsys.readouterr().out
    assert (tmp_path / "home" / "iceberg" / "catalog.db").exists()


class _SilentServer:
    """Accepts connections on 127.0.0.1 and never answers (a hung REST catalog)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self):
        self.stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


def test_rest_catalog_unreachable_is_a_clear_bounded_error(tmp_path, monkeypatch, capsys):
    from engine.cli import main
    from engine_tests.conftest import free_port

    eng = _lake(tmp_path, hours=range(1))
    secret = "s3cr3t-never-shown"
    monkeypatch.setenv("ENGINE_ICEBERG_CREDENTIAL", f"client:{secret}")
    dead = f"http://127.0.0.1:{free_port()}/catalog"  # nothing listens there: refused at once
    t0 = time.monotonic()
    with pytest.raises(IcebergError) as err:
        iceberg.publish(eng, config=IcebergConfig.from_env(rest_uri=dead))
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert dead in msg and "did not answer" in msg and "ENGINE_ICEBERG_REST_URI" in msg and secret not in msg
    assert not (tmp_path / "home" / "iceberg" / "state.json").exists()  # nothing published

    silent = _SilentServer()  # a server that accepts and never answers: the timeout bounds the wait
    try:
        monkeypatch.setenv("ENGINE_ICEBERG_TIMEOUT_S", "1")
        t0 = time.monotonic()
        with pytest.raises(IcebergError, match="did not answer within 1 s"):
            iceberg.status(eng, config=IcebergConfig.from_env(rest_uri=f"http://127.0.0.1:{silent.port}"))
        assert time.monotonic() - t0 < 10
    finally:
        silent.close()

    eng.close()
    monkeypatch.setenv("ENGINE_ICEBERG_REST_URI", dead)
    assert main(["iceberg", "publish", "--home", str(eng.home)]) == 2
    cap = capsys.readouterr()
    assert "data-engine iceberg publish: error: the Iceberg REST catalog at" in cap.err
    assert secret not in cap.err + cap.out
    with pytest.raises(IcebergError, match="not an http"):
        IcebergConfig.from_env(rest_uri="thrift://metastore:9083")
    assert secret not in repr(IcebergConfig.from_env())


def test_s3_store_publish_compact_and_read(tmp_path, s3_env):
    eng = _lake(tmp_path, s3_env, hours=range(2))
    res = {r.table: r for r in iceberg.publish(eng, ["l2", "trades", "gaps"])}
    assert res["l2"].files == 4
    tbl = iceberg.load_table(eng, "trades")
    assert tbl.metadata_location.startswith(f"{s3_env}/iceberg/lake/trades/metadata/")
    assert all(p.startswith(f"{s3_env}/data/trades/") for p in iceberg.registered(tbl))
    assert_reads_equal(eng)
    eng.compact()
    for t in ("l2", "trades"):
        assert registered_keys(eng, t) == uploaded_keys(eng, t)
        assert iceberg.load_table(eng, t).current_snapshot().summary.operation.value == "overwrite"
    assert_reads_equal(eng)
    # no credential in what the store holds
    keys = eng.store.client.list_objects_v2(Bucket=eng.store.bucket, Prefix="lake/iceberg/")["Contents"]
    meta = [o["Key"] for o in keys if o["Key"].endswith(".metadata.json")]
    body = eng.store.client.get_object(Bucket=eng.store.bucket, Key=meta[-1])["Body"].read().decode()
    assert "testing-secret-key" not in body and "testing-key-id" not in body


def test_duckdb_reads_the_iceberg_table(tmp_path):
    """DuckDB on the table's current file set (its own Parquet reader), and through pyiceberg's
    scan; its iceberg extension directly when it is installed or can be downloaded."""
    eng = _lake(tmp_path, hours=range(2))
    iceberg.publish(eng, ["trades"])
    tbl = iceberg.load_table(eng, "trades")
    want = engine_rows(eng, "trades")
    con = duckdb.connect()
    paths = [t.file.file_path.removeprefix("file://") for t in tbl.scan().plan_files()]
    got = pl.from_arrow(con.read_parquet(paths).to_arrow_table())
    assert canon(got, "trades").equals(want)
    tbl.scan(row_filter="market == 'BTC-USD'").to_duckdb("btc", connection=con)
    assert con.execute("SELECT count(*) FROM btc").fetchone()[0] == want.filter(market="BTC-USD").height
    try:
        con.execute("LOAD iceberg")
    except duckdb.Error:
        try:
            con.execute("INSTALL iceberg")
            con.execute("LOAD iceberg")
        except duckdb.Error as e:
            pytest.skip(f"DuckDB's iceberg extension is not installed and cannot be downloaded here: {str(e)[:120]}")
    n = con.execute("SELECT count(*) FROM iceberg_scan($m)", {"m": tbl.metadata_location}).fetchone()[0]
    assert n == want.height


def test_dagster_asset_publishes_with_metadata(tmp_path):
    import dagster as dg

    from engine_defs.definitions import defs
    from engine_defs.iceberg import iceberg_tables
    from engine_defs.resources import EngineResource

    eng = _lake(tmp_path, hours=range(2))
    eng.close()
    assert "iceberg_tables" in {k.to_user_string() for k in defs.get_repository_def().asset_graph.get_all_asset_keys()}
    res = EngineResource(home=str(tmp_path / "home"))
    with dg.instance_for_test() as inst:
        out = dg.materialize([iceberg_tables], instance=inst, resources={"engine": res})
        assert out.success
        md = out.get_asset_materialization_events()[0].materialization.metadata
        assert md["files_registered"].value == 4 + 4 + 1
        assert md["files_added"].value == 9 and md["files_removed"].value == 0
        assert md["dagster/row_count"].value == 4 * 400 + 4 * 150 + 1
        snaps = md["snapshot_ids"].value
        assert set(snaps) == set(schema.TABLES) and snaps["quotes"] is None and isinstance(snaps["l2"], int)
        assert "lake.l2" in md["tables"].value
        again = dg.materialize([iceberg_tables], instance=inst, resources={"engine": res})
        md2 = again.get_asset_materialization_events()[0].materialization.metadata
        assert md2["files_added"].value == 0 and md2["snapshot_ids"].value == snaps


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv-spark" / "bin" / "python").exists(),
                    reason="PySpark lives in .venv-spark: run scripts/bench_spark once to create it")
def test_spark_reads_the_hive_layout_with_partition_discovery(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.spark_read import compare

    eng = _lake(tmp_path)
    eng.compact(table="trades")  # compacted trades beside raw hourly l2 files
    purge_retired(eng, grace_s=0)  # until its purge a retired raw file is still in the directories
    rep = compare(eng, ("l2", "trades"))
    assert rep["ok"], rep
    assert rep["tables"]["l2"]["partitions"] == 2 and rep["tables"]["l2"]["rows"] == 6 * 400
