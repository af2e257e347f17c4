"""Storage core against real files, real DuckDB and moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import Engine, schema
from engine.lake.catalog import Catalog
from engine.lake.writer import is_sorted
from engine.paths import parse_key
from engine.schema import NS_PER_HOUR, SchemaError
from engine.sim import synth
from engine.timeutil import to_ns

DAY = 86_400 * 10**9
START = to_ns("2026-11-01")
MARKETS = ["BTC-USD", "ETH-USD", "SOL-USD"]


def generated(total_rows: int = 1_000_000):
    """3 markets × 2 days × (l2, trades), split into append-sized batches in time order."""
    per = total_rows // (len(MARKETS) * 2)
    batches = []
    for i, m in enumerate(MARKETS):
        l2 = synth.l2_rows("coinbase", m, START, per, 2 * DAY, seed=i)
        tr = synth.trade_rows("coinbase", m, START, per, 2 * DAY, seed=i, id_start=i * 10**7)
        for t, name in ((l2, "l2"), (tr, "trades")):
            for off in range(0, t.num_rows, 50_000):
                batches.append((name, t.slice(off, 50_000)))
    return batches


def canon(df: pl.DataFrame, table: str) -> pl.DataFrame:
    cols = schema.spec(table).columns
    df = df.select(cols).with_columns(pl.col(pl.Categorical).cast(pl.String))
    return df.sort(cols)


def expected(batches, table):
    return canon(pl.from_arrow(pa.concat_tables([t for n, t in batches if n == table])), table)


def check_files(eng: Engine):
    for e in eng.catalog.entries():
        t = pq.read_table(eng.local_path(e))
        assert t.num_rows == e.rows, e.key
        sp = schema.spec(e.table)
        hours = set((v // NS_PER_HOUR) for v in t.column(sp.part_col).to_pylist())
        if not e.compacted:
            assert len(hours) == 1, f"{e.key} spans {len(hours)} hours"
        assert is_sorted(e.table, t), f"{e.key} not sorted"
        md = pq.ParquetFile(eng.local_path(e)).schema_arrow.metadata
        assert md[b"engine.schema_version"] == str(schema.SCHEMA_VERSION).encode()


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_million_rows_roundtrip(tmp_path, store_kind, request):
    store = request.getfixturevalue("s3_env") if store_kind == "s3" else None
    batches = generated()
    eng = Engine.open(tmp_path / "home", store, background=False, writer=True)
    for name, t in batches:
        eng.append(name, t)
    eng.flush()
    up = eng.upload()
    assert up["failed"] == 0 and up["uploaded"] == len(eng.catalog.entries())
    for table in ("l2", "trades"):
        got = canon(eng.read(table), table)
        assert got.height == expected(batches, table).height
        assert got.equals(expected(batches, table))
    check_files(eng)
    summ = eng.catalog.summary()
    assert summ["rows"].sum() == sum(t.num_rows for _, t in batches)
    assert set(summ["date"]) == {"2026-11-01", "2026-11-02"}
    eng.close()
    if store_kind == "s3":
        # another machine: empty home, the store's manifest is the only thing it reads
        Engine.open(tmp_path / "home", store, background=False, writer=True).publish_manifest()
        shutil.rmtree(tmp_path / "home")
        other = Engine.open(tmp_path / "laptop", store, background=False)
        assert other.catalog.summary()["rows"].sum() == sum(t.num_rows for _, t in batches)
        got = canon(other.trades(market="ETH-USD"), "trades")
        assert got.equals(expected([b for b in batches if b[1].column("market")[0].as_py() == "ETH-USD"], "trades"))


def test_summary_without_data_restart_and_torn_tail(tmp_path):
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    for name, t in generated(60_000):
        eng.append(name, t)
    eng.close()
    before = eng.catalog.summary()
    shutil.move(tmp_path / "h" / "staging", tmp_path / "elsewhere")
    shutil.move(tmp_path / "h" / "store", tmp_path / "elsewhere2")
    again = Engine.open(tmp_path / "h", background=False)
    assert again.catalog.summary().equals(before)  # rebuilt from the log alone, no data read
    log = tmp_path / "h" / "catalog" / "log.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"op":"add","file":{"key":"data/l2/sou')  # a writer died mid-line
    torn = Catalog(log)
    assert torn.torn_lines == 1
    assert torn.summary().equals(before)
    torn.set_watermark("coinbase", 10**19)  # next write cuts the torn tail instead of gluing to it
    assert Catalog(log).torn_lines == 0


def test_compaction_idempotent_and_sorted(tmp_path):
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    batches = generated(120_000)
    for name, t in batches:
        eng.append(name, t)
    eng.flush()
    n_before = len(eng.catalog.entries())
    res = eng.compact()
    assert len(res) == 3 * 2 * 2
    entries = [e for e in eng.catalog.entries() if e.table != "quotes"]
    assert len(entries) == 12 < n_before
    quotes = [e for e in eng.catalog.entries() if e.table == "quotes"]
    assert len(quotes) == 3 * 2  # derived per compacted l2 partition
    assert all(parse_key(e.key).name == "0000" and e.compacted for e in entries)
    check_files(eng)
    for table in ("l2", "trades"):
        assert canon(eng.read(table), table).equals(expected(batches, table))
    log_size = (tmp_path / "h" / "catalog" / "log.jsonl").stat().st_size
    assert eng.compact() == []
    assert (tmp_path / "h" / "catalog" / "log.jsonl").stat().st_size == log_size
    # the raw objects are kept for running readers, then purged after the grace period
    assert len(eng.catalog.retired) == n_before
    from engine.lake.compaction import purge_retired

    assert purge_retired(eng, grace_s=0) == n_before
    assert not list((tmp_path / "h" / "store").rglob("0001.parquet"))


def test_compaction_while_appending_open_day(tmp_path):
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    old = generated(60_000)
    for name, t in old:
        eng.append(name, t)
    eng.flush()
    now = time.time_ns()
    today = now - now % DAY
    live = [synth.l2_rows("coinbase", "BTC-USD", today + i * 60 * 10**9, 2_000, 60 * 10**9, seed=100 + i, seq_start=i * 10**6)
            for i in range(int((now - today) // (60 * 10**9)) - 1)][-40:]
    errors = []

    def appender():
        try:
            for t in live:
                eng.append("l2", t)
                if t is live[len(live) // 2]:
                    eng.flush()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=appender)
    th.start()
    res = eng.compact()
    th.join()
    eng.flush()
    assert not errors
    assert res and all(r.date < time.strftime("%Y-%m-%d", time.gmtime()) for r in res)
    got = canon(eng.read("l2", allow_unsealed=True), "l2")
    want = canon(pl.from_arrow(pa.concat_tables([t for n, t in old if n == "l2"] + live)), "l2")
    assert got.height == want.height
    assert got.equals(want)
    assert got.unique().height == got.height


def test_message_touching_a_level_twice_keeps_arrival_order_through_compaction(tmp_path):
    """One message sets a level, clears it and sets it again, and moves an ask then removes it. Rows
    of one (instrument, ts, seq) keep their arrival order through the flush's sort and compaction's
    merge, so the book rebuilds to the last size of each level."""
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    inst = ["BTC-USD", "BTC-USDC"]
    h9, h10 = START + 9 * NS_PER_HOUR, START + 10 * NS_PER_HOUR
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", h9, 5_000, NS_PER_HOUR, seed=1, instruments=inst))
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", h10, 5_000, NS_PER_HOUR, seed=2, instruments=inst,
                                   seq_start=10**6))
    ts = h10 + NS_PER_HOUR // 2
    updates = [("bid", 50_000.0, 1.0), ("bid", 50_000.0, 0.0), ("bid", 50_000.0, 2.5),
               ("ask", 150_000.0, 4.0), ("ask", 150_000.0, 0.0)]
    n = len(updates)
    msg = pa.table({
        "ts": [ts] * n, "recv_ts": [ts + 3_000_000] * n, "source": ["coinbase"] * n, "market": ["BTC-USD"] * n,
        "instrument": ["BTC-USD"] * n, "side": [u[0] for u in updates], "price": [u[1] for u in updates],
        "size": [u[2] for u in updates], "seq": [5 * 10**6] * n, "snapshot": [False] * n,
    })
    eng.append("l2", msg)  # arrives after later rows of its hour: the flush sorts the file
    eng.flush()
    date = time.strftime("%Y-%m-%d", time.gmtime(START // 10**9))

    def stored_sizes(e) -> list[float]:
        t = pl.from_arrow(pq.read_table(eng.local_path(e)))
        return t.filter(pl.col("seq") == 5 * 10**6)["size"].to_list()

    raw = eng.catalog.files_in(("l2", "coinbase", "BTC-USD", date))
    assert [stored_sizes(e) for e in raw] == [[], [u[2] for u in updates]]  # two hourly files
    assert [r.files_in for r in eng.compact(date=date, table="l2")] == [2]
    (c,) = eng.catalog.files_in(("l2", "coinbase", "BTC-USD", date))
    assert c.compacted and stored_sizes(c) == [u[2] for u in updates]
    book = eng.book("coinbase", "BTC-USD", "BTC-USD", at=h10 + NS_PER_HOUR - 1, depth=1_000)
    bids = dict(zip(book["bid_price"].to_list(), book["bid_size"].to_list()))
    asks = dict(zip(book["ask_price"].to_list(), book["ask_size"].to_list()))
    assert bids[50_000.0] == 2.5 and 150_000.0 not in asks


def test_query_planned_before_compaction_reads_after_the_swap(tmp_path):
    """A query resolves its file list, a compaction swaps the partitions, then the query reads: it
    gets the same rows, because retired files stay (staged and in the store) for the grace period.
    A purge before the grace period ends keeps them; after it they are gone, and the compacted
    files answer the same query."""
    from engine.lake.compaction import purge_retired
    from engine.research.query import Query

    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    batches = generated(30_000)
    for name, t in batches:
        eng.append(name, t)
    eng.flush()
    assert eng.upload()["failed"] == 0  # raw files are in the store and still staged
    plan = Query(eng).plan("l2")
    old = [e.key for e in plan.files]
    assert len(old) > 6 and all(p == str(eng.layout.staged(k)) for p, k in zip(plan.paths, old))
    assert len(eng.compact(grace_s=600)) == 3 * 2 * 2
    assert set(old) <= set(eng.catalog.retired)
    assert canon(pl.from_arrow(Query(eng).read(plan)), "l2").equals(expected(batches, "l2"))

    retired_at = max(at for at, _ in eng.catalog.retired.values())
    assert purge_retired(eng, grace_s=600, now=retired_at + 599 * 10**9) == 0
    assert all(eng.layout.staged(k).exists() and eng.store.head(k) for k in old)
    n = len(eng.catalog.retired)
    assert purge_retired(eng, grace_s=600, now=retired_at + 601 * 10**9) == n
    assert not eng.catalog.retired
    assert not any(eng.layout.staged(k).exists() or eng.store.head(k) for k in old)
    assert canon(eng.read("l2"), "l2").equals(expected(batches, "l2"))
    with pytest.raises(FileNotFoundError, match="removed while the query ran"):  # not a false CorruptFileError
        Query(eng).read(plan)


def test_purge_keeps_retired_files_until_the_compacted_file_verifies(tmp_path):
    from engine.lake.compaction import purge_retired

    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", START, 2_000, 2 * NS_PER_HOUR))
    eng.flush()
    old = [e.key for e in eng.catalog.entries()]
    (res,) = eng.compact(grace_s=0)
    assert res.files_in == 2
    eng.store.delete(res.key)  # the compacted object is lost before the purge
    assert purge_retired(eng, grace_s=0) == 0
    assert set(eng.catalog.retired) == set(old) and all(eng.layout.staged(k).exists() for k in old)


CHILD = r"""
import sys, time, json
from engine import Engine
from engine.sim import synth
eng = Engine.open(sys.argv[1], writer=True)
start = int(sys.argv[2])
i = 0
while True:
    t = synth.l2_rows("coinbase", "BTC-USD", start + i * 10**9, 500, 10**9, seed=i, seq_start=i * 500)
    eng.append("l2", t)
    print(json.dumps({"i": i, "t": time.time()}), flush=True)
    i += 1
    if i % 40 == 0:
        eng.flush()
    time.sleep(0.005)  # scenario: a writer appending at a pace, so that batches acked > 1 s before the kill exist
"""


def test_sigkill_recovers_spooled_rows(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    start = to_ns("2026-11-03")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "h"), str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    acked = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(acked) < 300:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(json.loads(line))
    kill_t = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 300
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    got = eng.read("l2", allow_unsealed=True)
    seqs = set(got["seq"].to_list())
    assert len(seqs) == got.height, "duplicates after recovery"
    must = [a["i"] for a in acked if a["t"] < kill_t - 1.0]
    for i in must:
        assert i * 500 in seqs and i * 500 + 499 in seqs, f"batch {i} lost"
    eng.close()
    assert not list((tmp_path / "h" / "spool").glob("*.arrow")), "spool not cleaned after recovery"


def test_s3_outage_mid_upload(tmp_path, monkeypatch):
    from engine_tests.conftest import MotoServer

    srv = MotoServer().start()
    try:
        for k, v in srv.env().items():
            monkeypatch.setenv(k, v)
        srv.make_bucket("outage")
        eng = Engine.open(tmp_path / "h", "s3://outage/x", background=False, writer=True)
        eng.store.attempts = 2
        for name, t in generated(60_000):
            eng.append(name, t)
        eng.flush()
        total = len(eng.catalog.entries())
        done = []

        def killer(n, _t):
            done.append(n)
            if n == 5:
                srv.stop()

        r = eng.upload(progress=killer)
        assert r["uploaded"] == 5 and r["failed"] == total - 5
        assert all((tmp_path / "h" / "staging" / e.key).exists() for e in eng.catalog.entries())
        assert sum(e.remote for e in eng.catalog.entries()) == 5
        srv.start()  # same port, but moto keeps nothing: the store lost its objects too
        srv.make_bucket("outage")
        eng2 = Engine.open(tmp_path / "h", "s3://outage/x", background=False, writer=True)
        r2 = eng2.upload()
        assert r2["failed"] == 0 and r2["uploaded"] == total - 5
        assert all(e.remote for e in eng2.catalog.entries())
        assert all(eng2.store.head(e.key) is not None for e in eng2.catalog.entries() if e.key not in _first(eng2, 5))
    finally:
        srv.stop()


def _first(eng, n):
    return {e.key for e in sorted(eng.catalog.entries(), key=lambda e: e.key)[:n]}


def test_watermark_clamp_prefix_filters_and_errors(tmp_path):
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    t = synth.l2_rows("kalshi", "KXBTC", START, 1000, 2 * NS_PER_HOUR, instruments=["KXBTC-A", "KXBTC-B"])
    eng.append("l2", t.slice(0, 600))
    eng.append("l2", synth.l2_rows("kalshi", "KXETH", START, 100, NS_PER_HOUR, instruments=["KXETH-A"]))
    eng.flush()
    eng.append("l2", t.slice(600))  # buffered: not yet sealed
    wm = eng.catalog.watermark("kalshi")
    sealed = eng.l2(source="kalshi", raw_ns=True)
    assert sealed.height == 700 and sealed["recv_ts"].max() < wm
    assert eng.l2(allow_unsealed=True).height == 700  # buffered rows are not in files yet
    eng.flush()
    assert eng.l2(market="KX*").height == 1100
    assert eng.l2(market="KXB*", instrument="KXBTC-A").height == (t.column("instrument").to_pylist().count("KXBTC-A"))
    assert set(eng.l2(instrument="KX*-B")["instrument"].cast(pl.String)) == {"KXBTC-B"}
    half = START + NS_PER_HOUR
    assert eng.l2(start=half).height + eng.l2(end=half).height == 1100
    assert eng.sql("SELECT count(*) AS n FROM l2 WHERE market = 'KXBTC'")["n"][0] == 1000
    with pytest.raises(LookupError, match="unknown market 'KXSOL'.*KXBTC, KXETH"):
        eng.l2(market="KXSOL")
    with pytest.raises(SchemaError, match="unknown table"):
        eng.append("quotez", t)
    with pytest.raises(SchemaError, match="table l2: missing column.*snapshot"):
        eng.append("l2", t.drop(["snapshot"]))
    with pytest.raises(SchemaError, match="table l2, column price: expected double, got string"):
        eng.append("l2", t.set_column(6, "price", t.column("price").cast(pa.string())))
    with pytest.raises(SchemaError, match="column side: invalid value"):
        eng.append("l2", t.set_column(5, "side", pa.array(["buy"] * t.num_rows)))
    with pytest.raises(ValueError, match="end .* must be after start"):
        eng.l2(start="2026-11-02", end="2026-11-01")
    for bad in ("COPY (SELECT 1) TO '/tmp/x.csv'", "ATTACH '/tmp/x.db'", "SELECT * FROM read_csv('/etc/passwd')",
                "INSTALL httpfs", "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')"):
        with pytest.raises(ValueError):
            eng.sql(bad)
    eng.close()


def test_bad_credentials_and_unreachable_endpoint(tmp_path, monkeypatch, moto_server):
    from engine.lake.store import StoreConfigError, StoreError

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    with pytest.raises(StoreConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        Engine.open(tmp_path / "h", "s3://b/p")
    from engine_tests.conftest import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreError, match="manifest.*did not answer.*Could not connect"):
        Engine.open(tmp_path / "fresh", "s3://nowhere/p")  # a fresh home asks the store for its manifest
    Engine.open(tmp_path / "h2", background=False).close()  # a home with a catalog needs no store to open
    eng = Engine.open(tmp_path / "h2", "s3://nowhere/p", background=False, writer=True)
    eng.store.attempts = 2
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", START, 10, 1000))
    eng.flush()
    r = eng.upload()
    assert r["failed"] == 1 and "did not answer" in r["errors"][0]
    assert all(eng.layout.staged(e.key).exists() for e in eng.catalog.entries())


def test_corrupt_file_named_by_query_and_verify(tmp_path):
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", START, 1000, NS_PER_HOUR))
    eng.flush()
    (e,) = eng.catalog.entries()
    p = eng.layout.staged(e.key)
    data = bytearray(p.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    data[-8:-4] = b"\xff\xff\xff\x7f"  # break the footer length too
    p.write_bytes(bytes(data))
    problems = eng.verify()
    assert [x.key for x in problems] == [e.key]
    with pytest.raises(IOError, match=e.key.replace("=", "=")):
        eng.trades()


def test_rebuild_from_store(tmp_path):
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    batches = generated(30_000)
    for name, t in batches:
        eng.append(name, t)
    eng.flush()
    eng.upload()
    eng.compact()  # leaves retired raw objects in the store within the grace period
    before = eng.catalog.summary()
    (tmp_path / "h" / "catalog" / "log.jsonl").unlink()
    from engine.lake.verify import rebuild_from_store

    rebuild_from_store(Engine.open(tmp_path / "h", background=False, writer=True))
    after = Engine.open(tmp_path / "h", background=False)
    cols = ["table", "source", "market", "date", "rows", "files", "min_ts", "max_ts"]
    assert after.catalog.summary().select(cols).equals(before.select(cols))
    assert canon(after.read("trades"), "trades").equals(expected(batches, "trades"))


# ------------------------------------------------------------------------------------------ streamed files

def _rows_of(eng: Engine, table: str = "l2") -> pl.DataFrame:
    return canon(pl.concat([pl.from_arrow(pq.read_table(eng.local_path(e))) for e in eng.catalog.files(table)]), table)


def test_in_order_feed_is_streamed_and_late_rows_fall_back_to_a_sort(tmp_path):
    """Rows in file order are encoded as they arrive (full row groups, no re-sort); a late batch
    after several streamed row groups switches the buffer to a sorted write: same rows, sorted."""
    eng = Engine.open(tmp_path / "h", background=False, flush_rows=10**9, writer=True)
    hour = START + 5 * NS_PER_HOUR
    t = synth.l2_rows("coinbase", "BTC-USD", hour, 400_000, NS_PER_HOUR - 10**9)
    for off in range(0, t.num_rows, 30_000):
        eng.append("l2", t.slice(off, 30_000))
    eng.flush()
    (e,) = eng.catalog.files("l2")
    md = pq.ParquetFile(eng.local_path(e)).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [131072, 131072, 131072, 6784]
    assert _rows_of(eng).equals(canon(pl.from_arrow(t), "l2"))
    check_files(eng)

    # next hour: 300k rows in order (two streamed row groups), then a batch from earlier in the hour
    nxt = synth.l2_rows("coinbase", "BTC-USD", hour + NS_PER_HOUR, 300_000, NS_PER_HOUR - 10**9, seed=1,
                        seq_start=10**6)
    late = synth.l2_rows("coinbase", "BTC-USD", hour + NS_PER_HOUR, 5_000, 10**9, seed=2, seq_start=0)
    for off in range(0, nxt.num_rows, 50_000):
        eng.append("l2", nxt.slice(off, 50_000))
    buf = next(iter(eng._buffers.values()))
    assert buf.ordered and len(buf._futures) == 2, "two in-order row groups should be with the encoder"
    for f in buf._futures:
        f.result()
    assert buf.stream is not None and buf.stream.rows == 2 * 131072
    eng.append("l2", late)
    assert not buf.ordered
    eng.flush()
    assert _rows_of(eng).equals(canon(pl.from_arrow(pa.concat_tables([t, nxt, late])), "l2"))
    check_files(eng)
    assert not [p for p in eng.layout.staging.rglob(".*")], "temporary stream files left behind"
    eng.close()


def test_failed_stream_is_rebuilt_from_the_spool(tmp_path):
    """The stream file cannot be written (here: a directory is in its way): the flush reads the
    buffer's rows back from the write-ahead spool and writes them sorted. Nothing is lost."""
    eng = Engine.open(tmp_path / "h", background=False, flush_rows=10**9, writer=True)
    t = synth.l2_rows("coinbase", "BTC-USD", START, 300_000, NS_PER_HOUR - 10**9)
    eng.append("l2", t.slice(0, 1000))
    buf = next(iter(eng._buffers.values()))
    buf._stream_tmp.mkdir(parents=True)  # the encoder's ParquetWriter will fail to open it
    for off in range(1000, t.num_rows, 50_000):
        eng.append("l2", t.slice(off, 50_000))
    eng._encoder.submit(lambda: None).result()  # the encoder (one thread) has run every job queued before
    assert buf._error is not None
    assert eng.flush() == 1
    assert _rows_of(eng).equals(canon(pl.from_arrow(t), "l2"))
    check_files(eng)
    buf._stream_tmp.rmdir()
    eng.close()
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    assert eng.catalog.files("l2")[0].rows == t.num_rows and not list(eng.layout.spool.glob("*.arrow"))
    eng.close()


def _stored_in_order(eng: Engine, table: str = "l2") -> pl.DataFrame:
    """Every row of the table's files, in file order (not re-sorted), dictionaries as strings."""
    cols = schema.spec(table).columns
    return pl.concat([pl.from_arrow(pq.read_table(eng.local_path(e))).select(cols) for e in eng.catalog.files(table)]
                     ).with_columns(pl.col(pl.Categorical).cast(pl.String))


@pytest.mark.parametrize("instruments", [["BTC-USD"], ["BTC-USD", "BTC-USD-INTX"]], ids=["in-order", "sorted-at-flush"])
def test_small_appends_are_compacted_and_store_the_same_rows(tmp_path, monkeypatch, instruments):
    """A quiet market appended a few rows at a time (live: every 0.25 s). Each arrival is a slice
    holding KBs of C++ objects, so the buffer copies its arrivals into a few tables as they come;
    the file holds the same rows in the same order as without that. Each arrival has its own
    dictionaries (values in a different order), as separate appends do."""
    from engine.lake import buffer

    t = synth.l2_rows("coinbase", "BTC-USD", START, 5_000, NS_PER_HOUR - 10**9, instruments=instruments)
    sizes, off = [], 0
    rng = np.random.default_rng(3)
    while off < t.num_rows:
        sizes.append(int(rng.integers(1, 12)))
        off += sizes[-1]
    arrivals, off = [], 0
    for n in sizes:
        arrivals.append(pa.Table.from_pylist(t.slice(off, n).to_pylist(), schema=t.schema))
        off += n
    stored = {}
    for compact in (True, False):
        if not compact:
            monkeypatch.setattr(buffer, "HOT_COMPACT", 10**9)
        eng = Engine.open(tmp_path / f"h{compact}", background=False, flush_rows=10**9, writer=True)
        most = 0
        for a in arrivals:
            eng.append("l2", a)
            most = max(most, len(next(iter(eng._buffers.values())).hot))
        buf = next(iter(eng._buffers.values()))
        assert buf.ordered == (len(instruments) == 1)
        if compact:  # a binary counter of compacted tables plus the loose arrivals
            assert most <= buffer.HOT_COMPACT + int(np.log2(len(arrivals))) + 1, most
        else:
            assert most == len(arrivals)
        eng.flush()
        stored[compact] = _stored_in_order(eng)
        check_files(eng)
        eng.close()
    assert stored[True].height == t.num_rows
    assert stored[True].equals(stored[False])
    assert canon(stored[True], "l2").equals(canon(pl.from_arrow(t), "l2"))
