"""The catalog knows instruments: per-contract rows and time ranges, and instrument pruning, from the
catalog alone, on a lake ingested from a generated Kalshi capture whose 30-minute contracts rotate
within the day (raw hourly files, after compaction, through the manifest on a fresh home)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import unquote

import msgspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import structlog
from polars.testing import assert_frame_equal

from engine import Engine, schema
from engine.lake import catalog, instruments
from engine.sim import synth
from engine.sim.capture_gen import generate_kalshi, write_capture
from engine.lake.catalog import Catalog, FileEntry
from engine.collect.ingest import ingest_files
from engine.timeutil import to_ns

START = to_ns("2025-03-04T09:00")  # 04:00 US Eastern: contracts KXBTC-25MAR040430-* … -0830-*
H = 3600 * 10**9
FIGS = ["rows", "files", "min_ts", "max_ts", "min_recv_ts", "max_recv_ts"]
KEYS = ["table", "source", "market", "instrument"]
EARLY = "KXBTC-25MAR040430-B96500"  # trades 09:00–09:30 UTC, then only carried in l2 book anchors


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cap") / "kalshi.jsonl"
    # book and trade data only (no lifecycle events, hence no reference data): the figures of l2 and trades files
    write_capture(generate_kalshi(series=["KXBTC"], seconds=4 * 3600, rate=2, seed=4, start_ns=START,
                                  contract_minutes=30, strikes=4, lifecycle=False), path)
    return path


def build(home: Path, capture: Path, store: str | None = None) -> Engine:
    eng = Engine.open(home, store, background=False, writer=True, book_anchors=True)
    ingest_files(eng, [capture], "kalshi", progress=False)
    return eng


def file_figures(eng: Engine, entries) -> pl.DataFrame:
    """Per (file, instrument): the figures read from the data files themselves."""
    frames = []
    for e in entries:
        sp = schema.spec(e.table)
        df = pl.from_arrow(pq.read_table(eng.local_path(e), columns=list({"instrument", sp.time_col, sp.part_col})))
        frames.append(df.group_by(pl.col("instrument").cast(pl.String)).agg(
            pl.len().cast(pl.Int64).alias("rows"), pl.col(sp.time_col).min().alias("min_ts"),
            pl.col(sp.time_col).max().alias("max_ts"), pl.col(sp.part_col).min().alias("min_recv_ts"),
            pl.col(sp.part_col).max().alias("max_recv_ts"),
        ).with_columns(key=pl.lit(e.key), table=pl.lit(e.table), source=pl.lit(e.source), market=pl.lit(e.market)))
    return pl.concat(frames)


def data_summary(eng: Engine, entries) -> pl.DataFrame:
    """summary(raw_ns=True, by="instrument") computed from the data files."""
    return (file_figures(eng, entries).group_by(KEYS)
            .agg(pl.col("rows").sum(), pl.len().cast(pl.Int64).alias("files"), pl.col("min_ts").min(),
                 pl.col("max_ts").max(), pl.col("min_recv_ts").min(), pl.col("max_recv_ts").max())
            .sort(KEYS, nulls_last=False).select(KEYS + FIGS))


def holding(eng: Engine, entries, instrument: str, start=None, end=None) -> set[str]:
    """Keys of the files whose rows include `instrument` (glob) with ts in [start, end), from the data."""
    f = file_figures(eng, entries).filter(pl.col("instrument").str.contains(
        "^" + instrument.replace("*", ".*") + "$"))
    if start is not None:
        f = f.filter(pl.col("max_ts") >= start)
    if end is not None:
        f = f.filter(pl.col("min_ts") < end)
    return set(f["key"].to_list())


def _plain(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col(pl.Categorical).cast(pl.String))


def check_catalog_equals_data(eng: Engine) -> pl.DataFrame:
    entries = eng.catalog.entries()
    got = eng.catalog.summary(raw_ns=True, by="instrument")
    want = data_summary(eng, entries)
    assert_frame_equal(got.select(KEYS + FIGS), want)
    for e in entries:  # each file's own figures, as recorded
        st = instruments.decode(e.instruments)
        f = file_figures(eng, [e]).sort("instrument", nulls_last=False)
        assert st.names == f["instrument"].to_list()
        assert np.array_equal(st.m, np.stack([f[c].to_numpy() for c in instruments.FIGURES]))
    inst = eng.catalog.instruments(raw_ns=True)
    per = want.filter(pl.col("instrument").is_not_null()).group_by("source", "market", "instrument").agg(
        pl.col("min_ts").min().alias("first_ts"), pl.col("max_ts").max().alias("last_ts")).sort("instrument")
    assert_frame_equal(inst.select("source", "market", "instrument", "first_ts", "last_ts"), per)
    return got


def test_raw_files_figures_equal_the_data_and_survive_checkpoint_and_reopen(tmp_path, capture, monkeypatch):
    eng = build(tmp_path / "h", capture)
    got = check_catalog_equals_data(eng)
    trades = eng.catalog.files("trades")
    assert len(trades) == 4  # hourly files 09:00–13:00
    contracts = got.filter(table="trades")["instrument"].to_list()
    assert len(contracts) == 36 and max(len(instruments.decode(e.instruments)) for e in trades) >= 12
    # contracts rotate: the first hour's early contract is gone from later trades files
    early = got.filter(table="trades", instrument=EARLY)
    assert early["files"].item() == 1 and early["max_ts"].item() < START + H // 2
    # filters: market/table/time/instrument glob, on (partition, instrument) figures
    ev = eng.catalog.summary(raw_ns=True, by="instrument", table="trades", instrument="KXBTC-25MAR0406*")
    assert ev["instrument"].to_list() == [c for c in sorted(contracts) if c.startswith("KXBTC-25MAR0406")]
    assert eng.catalog.instruments(table="trades", start=START + 3 * H, raw_ns=True)["first_ts"].min() >= START + 2 * H
    assert eng.catalog.summary(raw_ns=True, by="instrument", market="KXETH").height == 0
    with pytest.raises(ValueError, match="by="):
        eng.catalog.summary(by="hour")
    eng.close()
    # a snapshot of the previous format (no figures) is ignored with a warning: the log is replayed
    log = tmp_path / "h" / "catalog" / "log.jsonl"
    monkeypatch.setattr(catalog, "_SNAP_FORMAT", 1)
    assert Catalog(log).checkpoint()
    monkeypatch.undo()
    with structlog.testing.capture_logs() as logs:
        old = Catalog(log)
    assert old._base is None and any(e["event"] == "catalog_snapshot_unreadable" for e in logs)
    assert_frame_equal(old.summary(raw_ns=True, by="instrument"), got)
    # a checkpoint stores per-(partition, instrument) figures; a reopened catalog answers the same
    cat = Catalog(tmp_path / "h" / "catalog" / "log.jsonl")
    assert cat.checkpoint() and cat._base is not None and not cat._live
    again = Catalog(tmp_path / "h" / "catalog" / "log.jsonl")
    assert again._base is not None and not again._live
    assert_frame_equal(again.summary(raw_ns=True, by="instrument"), got)
    assert_frame_equal(Catalog(cat.path, snapshot=False).summary(raw_ns=True, by="instrument"), got)


def test_figures_after_staging_adoption_compaction_and_rebuild(tmp_path, capture):
    eng = build(tmp_path / "h", capture)
    # staging adoption: an uncatalogued complete file is inspected, and catalogued with its figures
    from engine.lake.writer import write_parquet

    t = synth.trade_rows("kalshi", "KXBTC", START + 12 * H, 500, H, seed=9, instruments=["KXBTC-A", "KXBTC-B"])
    part = tmp_path / "h" / "staging" / "data/trades/source=kalshi/market=KXBTC/date=2025-03-04"
    write_parquet("trades", t, part / "0009.parquet")
    eng.close()
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    eng._writer()  # the writer role is taken on the first append: staging is settled first
    adopted = eng.catalog.by_key["data/trades/source=kalshi/market=KXBTC/date=2025-03-04/0009.parquet"]
    assert instruments.decode(adopted.instruments).names == ["KXBTC-A", "KXBTC-B"]
    before = check_catalog_equals_data(eng)

    res = eng.compact()
    assert {(r.table, r.files_in) for r in res} == {("l2", 4), ("trades", 5)}
    assert all(e.compacted for e in eng.catalog.entries())
    after = check_catalog_equals_data(eng)
    assert after.filter(table="quotes").height == 36  # derived from l2 by compaction, with its figures too
    # one file per partition now: the same rows and ranges per contract, each in one file
    assert_frame_equal(after.filter(pl.col("table") != "quotes").drop("files"), before.drop("files"))
    assert set(after["files"].to_list()) == {1}

    from engine.lake.verify import rebuild_from_store

    rebuild_from_store(eng)
    eng.close()
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    assert_frame_equal(check_catalog_equals_data(eng), after)


@pytest.mark.parametrize("prefilter", [False, True])
def test_instrument_query_reads_only_the_files_holding_it(tmp_path, capture, prefilter, monkeypatch):
    """`prefilter`: partitions are first picked by their per-instrument figures (done for queries
    over many partitions; forced here on one) before files are checked one by one."""
    if prefilter:
        monkeypatch.setattr(catalog, "_PARTS_BEFORE_PRUNING", 0)
    eng = build(tmp_path / "h", capture)
    q = eng._q()
    every = eng.catalog.entries()
    for table in ("l2", "trades"):
        files = eng.catalog.files(table)
        for inst, start, end in [(EARLY, None, None), (EARLY, START + H, None), (EARLY, START, START + H),
                                 ("KXBTC-25MAR0406*", None, None), ("KXBTC-25MAR0406*", START + 2 * H, START + 3 * H),
                                 ("KXBTC-25MAR040830-B97000", None, None), ("NOPE-*", None, None)]:
            p = q.plan(table, instrument=inst, start=start, end=end, allow_unsealed=True)
            want = holding(eng, files, inst, start, end)
            assert {e.key for e in p.files} == want, (table, inst, start, end)
            # the rows are those a read of every file finds
            full = eng.read(table, start=start, end=end, allow_unsealed=True, raw_ns=True).filter(
                pl.col("instrument").cast(pl.String).str.contains("^" + inst.replace("*", ".*") + "$"))
            assert_frame_equal(_plain(pl.from_arrow(q.read(p))), _plain(full))
            lazy = eng.scan(table, instrument=inst, start=start, end=end, allow_unsealed=True).collect()
            assert lazy.height == full.height
    # a contract that ended before `start` costs no reads, in any table
    assert q.plan("trades", instrument=EARLY, start=START + H, allow_unsealed=True).files == []
    assert q.plan("l2", instrument=EARLY, start=START + H, allow_unsealed=True).files == []
    assert len(q.plan("trades", instrument=EARLY, allow_unsealed=True).files) == 1
    assert len(every) == 8 and len(q.plan("trades", instrument="KXBTC-25MAR0406*").files) == 2  # of 4

    # files catalogued before per-instrument figures existed are always read
    log = tmp_path / "h" / "catalog" / "log.jsonl"
    eng.close()
    lines = []
    for line in log.read_bytes().splitlines():
        op = json.loads(line)
        if op.get("file"):
            op["file"].pop("instruments", None)  # the line an older engine wrote
        lines.append(json.dumps(op).encode())
    log.write_bytes(b"\n".join(lines) + b"\n")
    (log.parent / "snapshot.arrow").unlink(missing_ok=True)
    old = Engine.open(tmp_path / "h", background=False)
    assert all(e.instruments is None for e in old.catalog.entries())
    assert len(old._q().plan("trades", instrument=EARLY, start=START + H, allow_unsealed=True).files) == 3
    s = old.catalog.summary(raw_ns=True, by="instrument")  # their rows are counted under a null instrument
    assert s["instrument"].to_list() == [None] * s.height and s["rows"].sum() == sum(e.rows for e in every)
    assert old.catalog.instruments(raw_ns=True).height == 0


def test_summary_by_instrument_answers_with_the_data_files_moved_away(tmp_path, capture, capsys):
    eng = build(tmp_path / "h", capture)
    got = eng.catalog.summary(raw_ns=True, by="instrument")
    listed = eng.catalog.instruments(raw_ns=True)
    eng.close()
    for d in ("staging", "store"):
        shutil.move(tmp_path / "h" / d, tmp_path / f"away-{d}")
    r = Engine.open(tmp_path / "h", background=False)
    with pytest.raises(Exception):
        r.trades(allow_unsealed=True)  # the data really is gone
    assert_frame_equal(r.catalog.summary(raw_ns=True, by="instrument"), got)
    assert_frame_equal(r.catalog.instruments(raw_ns=True), listed)
    assert_frame_equal(r.catalog.summary(raw_ns=True, by="instrument", instrument=EARLY, table="trades"),
                       got.filter(table="trades", instrument=EARLY))
    # the command line answers the same, from the catalog alone
    from engine.cli import main

    assert main(["catalog", "summary", "--by", "instrument", "--home", str(tmp_path / "h"), "--table", "trades",
                 "--instrument", "KXBTC-25MAR0406*"]) == 0
    out = capsys.readouterr().out
    want = got.filter(table="trades").filter(pl.col("instrument").str.starts_with("KXBTC-25MAR0406"))
    assert f"shape: ({want.height}, 10)" in out and all(i in out for i in want["instrument"])
    assert str(want["rows"][0]) in out
    assert main(["catalog", "instruments", "--home", str(tmp_path / "h"), "--start", "2025-03-04T12:00"]) == 0
    out = capsys.readouterr().out
    assert EARLY not in out and "KXBTC-25MAR040830-B97000" in out


def test_a_fresh_home_has_the_figures_through_the_manifest(tmp_path, capture, s3_env):
    w = build(tmp_path / "vps", capture, s3_env)
    w.upload()  # publishes the manifest
    want = w.catalog.summary(raw_ns=True, by="instrument")
    r = Engine.open(tmp_path / "laptop", s3_env)
    assert r.remote_reader
    assert_frame_equal(r.catalog.summary(raw_ns=True, by="instrument"), want)
    assert_frame_equal(r.catalog.instruments(raw_ns=True), w.catalog.instruments(raw_ns=True))
    part = ("trades", "kalshi", "KXBTC", "2025-03-04")
    assert [e.key for e in r.catalog.files_in(part)] == [e.key for e in w.catalog.files_in(part)]
    assert_frame_equal(r.catalog.summary(raw_ns=True, by="instrument", market="KX*", instrument="KXBTC-25MAR0406*",
                                         start=START + 2 * H),
                       w.catalog.summary(raw_ns=True, by="instrument", market="KX*", instrument="KXBTC-25MAR0406*",
                                         start=START + 2 * H))

    gets: list[str] = []
    r.store.client.meta.events.register(
        "before-send.s3.*", lambda request, **_: gets.append(request.url) if request.method == "GET" else None)

    def fetched(**kw) -> set[str]:
        gets.clear()
        r.trades(allow_unsealed=True, **kw)
        return {unquote(u.split("/lake/", 1)[1].split("?")[0]) for u in gets if "/data/" in u}

    files = w.catalog.files("trades")
    assert fetched(instrument=EARLY, start=START + H) == set()  # an expired contract: no request at all
    assert fetched(instrument=EARLY) == holding(w, files, EARLY) and len(holding(w, files, EARLY)) == 1
    assert fetched(instrument="KXBTC-25MAR0406*") == holding(w, files, "KXBTC-25MAR0406*") != {e.key for e in files}

    w.compact()  # republishes: the compacted files carry their figures to the reader too
    r.refresh()
    assert all(e.compacted for e in r.catalog.entries())
    raw_tables = pl.col("table") != "quotes"  # quotes: derived by compaction
    assert_frame_equal(r.catalog.summary(raw_ns=True, by="instrument").filter(raw_tables).drop("files"), want.drop("files"))
    assert_frame_equal(r.catalog.summary(raw_ns=True, by="instrument"), w.catalog.summary(raw_ns=True, by="instrument"))
    assert fetched(instrument=EARLY, start=START + H) == set()


def test_a_streamed_file_merges_its_chunks_figures(tmp_path):
    """One instrument in order is written row group by row group as it arrives (StreamWriter):
    the figures of its chunks are merged once at the end."""
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    t = synth.l2_rows("coinbase", "BTC-USD", START, 300_000, H - 10**9, seed=1)
    for i in range(0, t.num_rows, 50_000):
        eng.append("l2", t.slice(i, 50_000))
    eng.flush()
    (e,) = eng.catalog.entries()
    st = instruments.decode(e.instruments)
    assert pq.ParquetFile(eng.local_path(e)).metadata.num_row_groups >= 3  # written in chunks
    assert st.names == ["BTC-USD"] and st.m[:, 0].tolist() == [300_000, e.min_ts, e.max_ts, e.min_recv_ts,
                                                                   e.max_recv_ts]
    check_catalog_equals_data(eng)


def test_encoding_round_trips_and_old_log_lines_load(tmp_path):
    rng = np.random.default_rng(0)
    k = 50
    m = np.stack([rng.integers(1, 10**6, k), *(START + np.sort(rng.integers(0, H, (4, k)), axis=0))])
    st = instruments.InstrumentStats([None] + [f"KXBTC-26DEC0417-B{97000 + 250 * i}" for i in range(k - 1)], m)
    s = instruments.encode(st)
    back = instruments.decode(s)
    assert back.names == st.names and np.array_equal(back.m, st.m)
    as_json = msgspec.json.encode([st.names, st.m.tolist()])
    assert len(s) < 0.5 * len(as_json)  # random ns offsets (the worst case): ~40 bytes a contract, JSON ~110
    empty = instruments.decode(instruments.encode(instruments.InstrumentStats([], np.zeros((5, 0), np.int64))))
    assert empty.names == [] and empty.m.shape == (5, 0)
    # whole-market gap rows have no instrument: a null name, first
    gaps = synth.gap_rows([{"source": "s", "market": "m", "instrument": i, "start_ts": START + j, "end_ts": START + H,
                            "kind": "disconnect", "detail": None} for j, i in enumerate([None, "X", None])])
    g = instruments.decode(instruments.encode(instruments.of_table("gaps", gaps)))
    assert g.names == [None, "X"] and g.m[:, 0].tolist() == [2, START, START + 2, START, START + 2]
    # a log line without the field (an older engine's) loads with no figures
    line = b'{"op":"add","at":1,"file":{"key":"data/trades/source=s/market=m/date=2025-03-04/0001.parquet",' \
           b'"table":"trades","source":"s","market":"m","date":"2025-03-04","rows":5,"bytes":9,"sha256":"x",' \
           b'"min_ts":1,"max_ts":2}}\n'
    (tmp_path / "log.jsonl").write_bytes(line)
    cat = Catalog(tmp_path / "log.jsonl")
    (e,) = cat.entries()
    assert e.instruments is None
    assert cat.summary(raw_ns=True, by="instrument").row(0) == ("trades", "s", "m", None, 5, 1, 1, 2, None, None)
    assert msgspec.json.decode(msgspec.json.encode(e), type=FileEntry) == e
    # a damaged figures string counts as none: the file is always read, its rows under a null instrument
    (tmp_path / "log.jsonl").write_bytes(line.replace(b'"max_ts":2}', b'"max_ts":2,"instruments":"AAAA"}'))
    cat = Catalog(tmp_path / "log.jsonl")
    assert cat.entries()[0].instruments == "AAAA"
    assert cat.summary(raw_ns=True, by="instrument").row(0) == ("trades", "s", "m", None, 5, 1, 1, 2, None, None)
    assert len(cat.files("trades", instrument="X")) == 1
