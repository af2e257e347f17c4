"""The lake IO manager, the quotes and research assets, partition metadata renderings and pandas
interop, against real Dagster (in-process runs, a test instance) and real lakes generated relative
to now (local store and moto's S3 server)."""

from __future__ import annotations

import datetime as dt
import math
import warnings
from pathlib import Path

import dagster as dg
import pandas as pd
import polars as pl
import pytest

from engine import Engine, schema
from engine.sim import synth
from engine.timeutil import to_ns

warnings.filterwarnings("ignore", category=dg.PreviewWarning) if hasattr(dg, "PreviewWarning") else None

from engine_defs.assets import all_assets  # noqa: E402
from engine_defs.checks import all_checks  # noqa: E402
from engine_defs.derived import derived_assets  # noqa: E402
from engine_defs.display import fmt_duration, hourly_counts, sparkline  # noqa: E402
from engine_defs.io import LOADERS, LakeIOManagerError, lake_asset, load_asset  # noqa: E402
from engine_defs.partitions import MARKETS, partitions_def  # noqa: E402
from engine_defs.reference import reference_assets  # noqa: E402
from engine_defs.research import research_assets  # noqa: E402
from engine_defs.resources import EngineResource  # noqa: E402

H = 3600 * 10**9
M = 60 * 10**9
BTC, KX = "coinbase:BTC-USD", "kalshi:KXBTC"
ALL = [*all_assets, *derived_assets, *research_assets, *reference_assets]
LAKE_ASSETS = sorted(n for n in LOADERS if n != "instruments")  # the partitioned ones: raw_/uploaded_/compacted_ ×
# l2, trades, gaps, and quotes (instruments, not partitioned: test_reference)
TABLE_OF = {name: ("quotes" if name == "quotes" else name.split("_", 1)[1]) for name in LAKE_ASSETS}


def days_ago(n: int) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=n)).strftime("%Y-%m-%d")


def next_day(d: str) -> str:
    return (dt.date.fromisoformat(d) + dt.timedelta(days=1)).isoformat()


D1, D2 = days_ago(3), days_ago(2)
T1 = to_ns(D1)
GAP = (T1 + 10 * H + 20 * M + 15 * 10**9, T1 + 10 * H + 21 * M)  # 10:20:15–10:21:00 on D1


def build_lake(home, store=None) -> Engine:
    """coinbase BTC-USD: l2 (book anchors on) + trades over D1 09:00–11:00, l2 over D1 23:30 → D2 00:30
    (a day boundary inside the data), one recorded gap; kalshi KXBTC: trades only (no l2) on D1."""
    eng = Engine.open(home, store, background=False, writer=True, book_anchors=True)
    eng.append("l2", synth.realistic_l2("coinbase", "BTC-USD", T1 + 9 * H, 12_000, seed=1, rate_per_s=12_000 / 7200))
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", T1 + 9 * H, 1000, 2 * H, seed=1))
    eng.append("l2", synth.realistic_l2("coinbase", "BTC-USD", T1 + 23 * H + 30 * M, 3000, seed=2,
                                        rate_per_s=3000 / 3600))
    eng.append("gaps", synth.gap_rows([{"source": "coinbase", "market": "BTC-USD", "instrument": None,
                                         "start_ts": GAP[0], "end_ts": GAP[1], "kind": "disconnect",
                                         "detail": "socket closed (test)"}]))
    eng.append("trades", synth.trade_rows("kalshi", "KXBTC", T1 + 12 * H, 500, H, seed=2,
                                          instruments=["KXBTC-A-B97500", "KXBTC-A-B98000"]))
    eng.flush()
    return eng


def defs_for(res: EngineResource, extra=()) -> dg.Definitions:
    return dg.Definitions(assets=[*ALL, *extra], asset_checks=all_checks, resources={"engine": res})


def materialize(inst, res, selection, pk, extra=(), raise_on_error=True):
    return dg.materialize([*ALL, *all_checks, *extra], selection=selection, partition_key=pk, instance=inst,
                          resources={"engine": res}, raise_on_error=raise_on_error)


def expected(eng: Engine, name: str, date: str, mk: str) -> pl.DataFrame | None:
    """What the engine returns for the partition (None: the engine knows no such market for the table)."""
    from engine.research.query import UnknownMarketError

    source, market = mk.split(":")
    kw = dict(source=source, market=market, start=date, end=next_day(date))
    try:
        return eng.quotes(**kw) if name == "quotes" else eng.read(TABLE_OF[name], **kw)
    except UnknownMarketError:
        return None


PARTS = ((D1, BTC), (D2, BTC), (D1, KX))
PER_TABLE = ("compacted_l2", "compacted_trades", "compacted_gaps", "quotes")  # one loader per table


def check_loads(eng: Engine, res: EngineResource, inst, stage: str, every_asset: bool = True) -> dict:
    """Every lake asset of D1|BTC (`every_asset`), and one asset per table of every partition, loads
    exactly what the engine's query returns (each load costs Dagster ~0.3 s: the stages of a table
    share one loader, so later stages check one asset per table)."""
    eng.catalog.refresh()
    rows = {}
    todo = [(name, D1, BTC) for name in (LAKE_ASSETS if every_asset else PER_TABLE)]
    todo += [(name, d, mk) for name in PER_TABLE for d, mk in PARTS[1:]]
    with defs_for(res).get_asset_value_loader(instance=inst) as loader:
        for name, date, mk in todo:
            got = loader.load_asset_value(dg.AssetKey(name), partition_key=f"{date}|{mk}")
            assert isinstance(got, pl.DataFrame)
            want = expected(eng, name, date, mk)
            if want is None:  # e.g. l2 of a Kalshi series that only has trades: empty, same shape
                assert got.height == 0 and got.schema == expected(eng, name, D1, BTC).schema, (stage, name, mk)
            else:
                assert got.equals(want), (stage, name, date, mk)
            rows[(name, date, mk)] = got.height
    return rows


def test_load_asset_value_is_the_engine_query(tmp_path):
    eng = build_lake(tmp_path / "h")
    res = EngineResource(home=str(tmp_path / "h"))
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC, KX])
        before = check_loads(eng, res, inst, "raw files")
        assert before[("raw_l2", D1, BTC)] == before[("compacted_l2", D1, BTC)] > 12_000  # book anchors added
        assert before[("compacted_l2", D2, BTC)] > 0 and before[("compacted_trades", D1, KX)] == 500
        assert before[("uploaded_gaps", D1, BTC)] == 1 and before[("quotes", D1, BTC)] > 0
        assert before[("compacted_l2", D1, KX)] == 0
        # the engine calls the upload and compaction assets make (their runs: test_moving_assets_...)
        assert eng.upload()["uploaded"] == len(eng.catalog.entries())
        uploaded = check_loads(eng, res, inst, "uploaded", every_asset=False)
        assert len(eng.compact()) == 5  # l2 D1, D2; trades D1 ×2 markets; gaps D1
        eng.catalog.refresh()
        assert len(eng.catalog.files_in(("quotes", "coinbase", "BTC-USD", D1))) == 1  # stored by the compaction
        assert all(e.compacted for e in eng.catalog.entries() if e.table == "l2")
        compacted = check_loads(eng, res, inst, "compacted", every_asset=False)
    assert {k: before[k] for k in uploaded} == uploaded == compacted  # the same rows at every stage of their life


def test_load_asset_value_through_the_read_cache(tmp_path, s3_env):
    """A bucket store after upload and compaction: no local copies, every load fetched through the cache."""
    eng = build_lake(tmp_path / "h", s3_env)
    eng.upload()
    assert len(eng.compact()) >= 5
    eng.catalog.refresh()
    assert not any(eng.layout.staged(e.key).exists() for e in eng.catalog.entries())
    res = EngineResource(home=str(tmp_path / "h"), store=s3_env)
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC, KX])
        rows = check_loads(eng, res, inst, "s3")
    assert rows[("compacted_trades", D1, BTC)] == 1000 and rows[("quotes", D2, BTC)] > 0
    assert any(Path(tmp_path / "h" / "cache").rglob("*.parquet"))


def test_downstream_asset_gets_the_frame(tmp_path):
    eng = build_lake(tmp_path / "h")
    res = EngineResource(home=str(tmp_path / "h"))
    seen = {}

    @dg.asset(partitions_def=partitions_def, ins={"trades": dg.AssetIn("compacted_trades"),
                                                  "l2": dg.AssetIn("raw_l2")})
    def trade_count(trades: pl.DataFrame, l2: pl.DataFrame) -> dg.MaterializeResult:
        seen.update(trades=trades, l2=l2)
        return dg.MaterializeResult(metadata={"rows": trades.height})

    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC])
        r = materialize(inst, res, [trade_count.key], f"{D1}|{BTC}", extra=[trade_count])
        assert r.success
    window = dict(source="coinbase", market="BTC-USD", start=D1, end=next_day(D1))
    assert seen["trades"].equals(eng.trades(**window)) and seen["trades"].height == 1000
    assert seen["l2"].equals(eng.l2(**window))
    assert seen["trades"].schema["ts"] == pl.Datetime("ns", "UTC")


def test_load_without_a_dagster_home_and_without_a_partition(tmp_path, monkeypatch):
    """`load_asset` works where no instance knows the market keys (a laptop); no partition key is a clear error."""
    eng = build_lake(tmp_path / "h")
    res = EngineResource(home=str(tmp_path / "h"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    got = load_asset("compacted_trades", f"{D1}|{KX}", defs=defs_for(res))
    assert got.equals(eng.trades(source="kalshi", market="KXBTC", start=D1, end=next_day(D1))) and got.height == 500
    with dg.instance_for_test() as inst:
        with pytest.raises(LakeIOManagerError, match="partitioned by date.source:market: give a partition key"):
            defs_for(res).load_asset_value(dg.AssetKey("compacted_l2"), instance=inst)


# ---- the assets that move data write nothing through the IO manager ------------------------------------------


def lake_files(home) -> set[str]:
    return {str(p.relative_to(home)) for sub in ("staging", "store") for p in (home / sub / "data").rglob("*.parquet")}


def test_moving_assets_store_nothing_through_the_io_manager(tmp_path):
    home = tmp_path / "h"
    eng = build_lake(home)
    res = EngineResource(home=str(home))
    pk = f"{D1}|{BTC}"
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC, KX])
        runs = [materialize(inst, res, ["uploaded_l2", "uploaded_trades", "uploaded_gaps", "catalog"], pk),
                materialize(inst, res, ["compacted_l2", "compacted_trades", "compacted_gaps", "quotes", "catalog"], pk)]
        for r in runs:
            assert r.success
            handled = [e.step_key for e in r.all_events if e.event_type_value == "HANDLED_OUTPUT"]
            assert handled == [], handled  # handle_output never ran: nothing was stored by Dagster
        storage = Path(inst.storage_directory())  # where Dagster's default IO manager would pickle values
        assert not {p.name for p in storage.glob("*")} & set(LAKE_ASSETS)
        # every Parquet file in the lake is one the catalog knows (live or retired): the engine wrote them all
        eng.catalog.refresh()
        known = {e.key for e in eng.catalog.entries()} | set(eng.catalog.retired)
        for rel in lake_files(home):
            assert rel.split("/", 1)[1] in known, rel

        up = next(m.materialization for m in runs[0].get_asset_materialization_events()
                  if m.asset_key.to_user_string() == "uploaded_l2")
        spark = up.metadata["rows_per_hour"].value
        line = spark.split("\n")[1]
        assert len(line) == 24 and [i for i, c in enumerate(line) if c != "·"] == [9, 10, 23]  # 09–11h, 23:30
        assert "3/24 hours" in spark and "peak" in spark
        evals = {(e.asset_key.to_user_string(), e.check_name): e for e in runs[0].get_asset_check_evaluations()}
        table = evals[("uploaded_l2", "recorded_gaps")].metadata["gap_table"].value
        assert "| kind | instrument | start | end | duration | detail |" in table
        assert "disconnect" in table and "45.0 s" in table and "socket closed (test)" in table

        # an asset that hands the read-only IO manager a value fails, naming the reason
        @lake_asset(partitions_def=partitions_def)
        def returns_a_frame() -> pl.DataFrame:
            return pl.DataFrame({"x": [1]})

        bad = materialize(inst, res, [returns_a_frame.key], pk, extra=[returns_a_frame], raise_on_error=False)
        assert not bad.success
        err = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
        assert "read-only" in str(err.event_specific_data.error.cause or err.event_specific_data.error)
    with pytest.raises(LakeIOManagerError, match="read-only"):
        from engine_defs.io import LakeIOManager

        LakeIOManager(res).handle_output(dg.build_output_context(asset_key=dg.AssetKey("x")), pl.DataFrame())


# ---- the research asset ------------------------------------------------------------------------------------------


def demo_lake(home) -> tuple[Engine, str, tuple[int, int]]:
    """The demo's generated lake (3 Coinbase products, 2 Kalshi series, book anchors on, ending now), 4 hours,
    plus a recorded 40 s disconnect of BTC-USD in its third hour. Returns the engine, the date with the most
    BTC-USD l2 rows and the gap."""
    from engine.sim.demo import build_lake as demo_build

    eng = demo_build(home, rows_per_hour=6000, hours=4)
    s = eng.catalog.summary(table="l2", source="coinbase", market="BTC-USD", raw_ns=True)
    date = s.sort("rows", descending=True)["date"][0]
    lo = int(s["min_ts"].min())
    g0 = (lo // H + 2) * H + 25 * M + 10 * 10**9  # third hour: the book is anchored (second hour's file)
    gap = (g0, g0 + 40 * 10**9)
    eng.append("gaps", synth.gap_rows([{"source": "coinbase", "market": "BTC-USD", "instrument": None,
                                         "start_ts": gap[0], "end_ts": gap[1], "kind": "disconnect",
                                         "detail": "test: socket closed"}]))
    eng.flush()
    return eng, date, gap


def test_research_asset_on_a_demo_lake(tmp_path):
    eng, date, gap = demo_lake(tmp_path / "h")
    res = EngineResource(home=str(tmp_path / "h"))
    pk = f"{date}|{BTC}"
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(MARKETS, [BTC])
        r = materialize(inst, res, ["quotes", "realized_vol_1m"], pk)
        assert r.success
        out: pl.DataFrame = r.output_for_node("realized_vol_1m")
        m = next(x.materialization for x in r.get_asset_materialization_events()
                 if x.asset_key.to_user_string() == "realized_vol_1m")
        loaded = defs_for(res).load_asset_value("realized_vol_1m", partition_key=pk, instance=inst)
    md = {k: v.value for k, v in m.metadata.items()}
    assert out.equals(loaded)
    assert md["dagster/row_count"] == out.height > 60
    assert out.schema["minute"] == pl.Datetime("ns", "UTC") and out["instrument"].unique().to_list() == ["BTC-USD"]
    q = eng.quotes(source="coinbase", market="BTC-USD", start=date, end=next_day(date))
    assert md["quotes"] == q.height
    # one row per minute from the first quote's minute to the last complete one, mid carried over quiet minutes
    assert out["minute"].diff().drop_nulls().unique().to_list() == [dt.timedelta(minutes=1)]
    assert out["minute"][0] == q["ts"].min().replace(second=0, microsecond=0)
    assert out["mid"].null_count() == 0 and out["ret"].null_count() == 1

    # valid: exactly the minutes whose close lies in a span of eng.valid (trailing minute, no gap, anchored book)
    spans = eng.valid("coinbase", "BTC-USD", out["close_ts"].min(), out["close_ts"].max() + dt.timedelta(seconds=1),
                      window="1m", raw_ns=True)
    closes = out["close_ts"].dt.epoch("ns").to_list()
    want = [any(a <= t < b for a, b in zip(spans["start_ts"], spans["end_ts"])) for t in closes]
    want[0] = False  # no return without a previous close
    assert out["valid"].to_list() == want
    by_close = dict(zip(closes, out["valid"].to_list()))
    gap_minute = gap[0] // M * M + M  # the minute holding the gap start closes here
    assert by_close[gap_minute] is False and by_close.get(gap_minute - 2 * M) is True  # anchored, before the gap
    assert 0 < md["valid_share"] < 1
    assert md["valid_share"] == pytest.approx(out["valid"].sum() / (out.height - 1), abs=1e-6)

    good = out.filter(pl.col("valid"))["ret"]
    vol = math.sqrt(float((good**2).mean()))
    assert md["valid_minutes"] == good.len() and md["vol_1m"] == pytest.approx(vol)
    assert md["vol_day"] == pytest.approx(vol * math.sqrt(1440))
    assert md["vol_annualized"] == pytest.approx(vol * math.sqrt(525_600)) and 0 < vol < 0.01
    assert "| BTC-USD |" in md["by_instrument"] and "(UTC hour)" in md["valid_per_hour"]
    pdf = out.to_pandas()
    assert str(pdf["minute"].dtype) == "datetime64[ns, UTC]" and str(pdf["close_ts"].dtype) == "datetime64[ns, UTC]"


# ---- pandas --------------------------------------------------------------------------------------------------------


def test_to_pandas_times_are_tz_aware(tmp_path):
    """Every result converts with `to_pandas()` to datetime64[ns, UTC] time columns, nanoseconds kept."""
    eng = build_lake(tmp_path / "h")
    w = dict(source="coinbase", market="BTC-USD", start=D1, end=next_day(D1))
    at = T1 + 10 * H + 10 * M  # anchored book (10:00 file), before the recorded gap
    results = {
        "l2": eng.l2(**w), "trades": eng.trades(**w), "gaps": eng.gaps(source="coinbase"),
        "read": eng.read("trades", **w), "scan": eng.scan_l2(**w).collect(),
        "sql": eng.sql("SELECT market, max(ts) AS last_ts, min(recv_ts) AS first_recv_ts FROM trades GROUP BY ALL"),
        "quotes": eng.quotes(**w), "book": eng.book("coinbase", "BTC-USD", "BTC-USD", at=at),
        "books": eng.books("coinbase", "BTC-USD", "BTC-USD", start=at, end=at + 5 * 10**9, every="1s"),
        "bars": eng.bars("trades", "1m", **w), "valid": eng.valid("coinbase", "BTC-USD", D1, next_day(D1)),
        "coverage": eng.coverage(D1, next_day(D1)), "summary": eng.catalog.summary(),
        "instruments": eng.catalog.instruments(source="coinbase"),
        "empty": eng.l2(source="coinbase", market="BTC-USD", start=D2, end=next_day(D2), instrument="nothing"),
    }
    kinds = {"instruments": "summary", "read": "trades", "scan": "l2", "empty": "l2", "books": "book", "sql": None}
    for name, df in results.items():
        kind = kinds.get(name, name)
        cols = {c for c in df.columns if schema.is_time_name(c)}
        cols |= set() if kind is None else {c for c in schema.time_cols(kind) if c in df.columns}
        assert cols, name
        assert cols == {c for c, t in df.schema.items() if isinstance(t, pl.Datetime)}, name  # no stray datetime
        pdf = df.to_pandas()
        for c in cols:
            assert isinstance(pdf[c].dtype, pd.DatetimeTZDtype), (name, c, pdf[c].dtype)
            assert str(pdf[c].dtype) == "datetime64[ns, UTC]", (name, c)
    l2 = results["l2"]
    pdf = l2.to_pandas()
    ns = eng.l2(raw_ns=True, **w)["ts"]
    assert [int(pd.Timestamp(x).value) for x in pdf["ts"].head(100)] == ns.head(100).to_list()  # ns kept
    assert pdf["ts"].iloc[0].tzinfo is not None and pdf["ts"].iloc[0].tz_convert("UTC") == pdf["ts"].iloc[0]


# ---- small renderings --------------------------------------------------------------------------------------------


def test_sparkline_and_durations():
    assert sparkline([0, 1, 4, 8]) == "·▂▅█"
    assert sparkline([None, 0.5, 1.0], top=1.0, empty=" ") == " ▅█"
    assert hourly_counts([5 * H + 1, 5 * H + 2, 23 * H, 24 * H, -1], 0) == [0] * 5 + [2] + [0] * 17 + [1]
    assert [fmt_duration(x) for x in (5 * 10**8, 42 * 10**9, 303 * 10**9, 2 * H + 7 * M, 27 * H)] == [
        "500 ms", "42.0 s", "5 min 03 s", "2 h 07 min", "1 d 03 h"]
