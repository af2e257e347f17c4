"""Types researchers expect: every query result carries its time columns as Datetime("ns", "UTC"),
`raw_ns=True` gives the stored int64 ns with the same values; zone-less time arguments are UTC."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from engine import Engine, schema
from engine.sim import synth
from engine.timeutil import result_times, to_ns

S = 10**9
T0 = to_ns("2026-11-03T10:00:00")
UTC_NS = pl.Datetime("ns", "UTC")


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    """Two hours of one Coinbase market: a book snapshot, updates, trades and a recorded disconnect."""
    e = Engine.open(tmp_path_factory.mktemp("types"), background=False, writer=True, book_anchors=True)
    snap = [dict(ts=T0 + 7, recv_ts=T0 + 7, source="coinbase", market="BTC-USD", instrument="BTC-USD",
                 side=side, price=97_000.0 + sign * k, size=1.0 + k, seq=0, snapshot=True)
            for side, sign in (("bid", -1), ("ask", 1)) for k in range(1, 6)]
    e.append("l2", schema.validate("l2", pa.Table.from_pylist(snap)))
    e.append("l2", synth.l2_rows("coinbase", "BTC-USD", T0 + S, 6_000, 2 * 3600 * S - S, seed=5, seq_start=1))
    e.append("trades", synth.trade_rows("coinbase", "BTC-USD", T0, 1_500, 2 * 3600 * S, seed=6))
    e.append("gaps", synth.gap_rows([dict(source="coinbase", market="BTC-USD", instrument=None, start_ts=T0 + 3000 * S,
                                          end_ts=T0 + 3060 * S, kind="disconnect", detail="test")]))
    e.flush()
    yield e
    e.close()


Q = dict(source="coinbase", market="BTC-USD")
CALLS = {  # name -> (call(eng, raw_ns), time columns)
    "l2": (lambda e, r: e.l2(**Q, raw_ns=r), ["ts", "recv_ts"]),
    "trades": (lambda e, r: e.trades(**Q, raw_ns=r), ["ts", "recv_ts"]),
    "gaps": (lambda e, r: e.gaps(**Q, raw_ns=r), ["start_ts", "end_ts"]),
    "read": (lambda e, r: e.read("trades", start=T0 + 600 * S, raw_ns=r), ["ts", "recv_ts"]),
    "quotes": (lambda e, r: e.quotes(**Q, raw_ns=r), ["ts", "recv_ts"]),
    "book": (lambda e, r: e.book("coinbase", "BTC-USD", "BTC-USD", at=T0 + 600 * S, raw_ns=r),
             ["ts", "snapshot_ts", "book_ts"]),
    "books": (lambda e, r: e.books("coinbase", "BTC-USD", "BTC-USD", T0 + 60 * S, T0 + 120 * S, every="10s",
                                   raw_ns=r), ["ts", "snapshot_ts", "book_ts"]),
    "bars": (lambda e, r: e.bars(every="1m", **Q, raw_ns=r), ["ts", "end_ts"]),
    "asof": (lambda e, r: e.asof(("trades", Q), ("quotes", Q), tolerance="10s", raw_ns=r),
             ["ts", "recv_ts", "ts_right", "recv_ts_right"]),
    "sql": (lambda e, r: e.sql("SELECT ts, recv_ts, min(ts) OVER () AS first_ts, price FROM trades ORDER BY ts, seq",
                               raw_ns=r), ["ts", "recv_ts", "first_ts"]),
    "scan": (lambda e, r: e.scan("l2", **Q, raw_ns=r).collect(), ["ts", "recv_ts"]),
    "scan_l2": (lambda e, r: e.scan_l2(start=T0 + 3600 * S, raw_ns=r).collect(), ["ts", "recv_ts"]),
    "scan_trades": (lambda e, r: e.scan_trades(raw_ns=r).collect(), ["ts", "recv_ts"]),
    "coverage": (lambda e, r: e.coverage(T0, T0 + 2 * 3600 * S, raw_ns=r), ["hour"]),
    "valid": (lambda e, r: e.valid("coinbase", "BTC-USD", T0, T0 + 2 * 3600 * S, window="30s", raw_ns=r),
              ["start_ts", "end_ts"]),
    "catalog.summary": (lambda e, r: e.catalog.summary(raw_ns=r), ["min_ts", "max_ts"]),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_time_columns_are_utc_datetimes_and_raw_ns_gives_the_same_ints(eng, name):
    call, cols = CALLS[name]
    dated, raw = call(eng, False), call(eng, True)
    assert raw.height > 0 and dated.height == raw.height, name
    for c in cols:
        assert dated.schema[c] == UTC_NS, (name, c, dated.schema[c])
        assert raw.schema[c] == pl.Int64, (name, c, raw.schema[c])
        assert dated[c].dt.epoch("ns").equals(raw[c], check_dtypes=True), (name, c)  # same instants, ns kept
    others = [c for c in raw.columns if c not in cols]
    assert dated.select(others).equals(raw.select(others)) and dated.columns == raw.columns
    assert not any(isinstance(t, pl.Datetime) for c, t in dated.schema.items() if c not in cols), name


def test_sql_leaves_other_integer_columns_alone(eng):
    df = eng.sql("SELECT count(*) AS n, max(ts) AS last_ts, max(ts) AS mx FROM trades")
    assert df.schema["n"] == pl.Int64 and df.schema["mx"] == pl.Int64 and df.schema["last_ts"] == UTC_NS
    assert df["last_ts"].dt.epoch("ns")[0] == df["mx"][0]


def test_scan_filters_on_datetimes_match_the_range_query(eng):
    a = dt.datetime(2026, 11, 3, 10, 30, tzinfo=dt.timezone.utc)
    b = a + dt.timedelta(minutes=20)
    lazy = eng.scan_trades().filter((pl.col("ts") >= a) & (pl.col("ts") < b)).collect()
    ranged = eng.trades(start=a, end=b)
    assert lazy.height == ranged.height > 0 and lazy.sort("ts", "seq").equals(ranged.sort("ts", "seq"))


@pytest.fixture
def new_york(monkeypatch):
    """A machine not on UTC: a zone-less time read as local time would shift by hours here."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_zone_less_times_are_utc(eng, new_york):
    aware_a = dt.datetime(2026, 11, 3, 10, 30, tzinfo=dt.timezone.utc)
    aware_b = dt.datetime(2026, 11, 3, 11, 10, tzinfo=dt.timezone.utc)
    want = eng.trades(start=aware_a, end=aware_b, raw_ns=True)
    raw = eng.trades(raw_ns=True)
    lo, hi = to_ns(aware_a), to_ns(aware_b)
    assert want.height == raw.filter((pl.col("ts") >= lo) & (pl.col("ts") < hi)).height
    assert 0 < want.height < raw.height  # the window cuts the data: a shifted window would differ
    forms = {
        "naive datetime": (aware_a.replace(tzinfo=None), aware_b.replace(tzinfo=None)),
        "ISO string without zone": ("2026-11-03T10:30:00", "2026-11-03 11:10:00"),
        "numpy datetime64": (np.datetime64("2026-11-03T10:30:00"), np.datetime64("2026-11-03T11:10:00.000000000")),
        "naive pandas Timestamp": (pd.Timestamp("2026-11-03 10:30"), pd.Timestamp("2026-11-03 11:10")),
        "other zone": (aware_a.astimezone(dt.timezone(dt.timedelta(hours=-5))), pd.Timestamp(aware_b).tz_convert("Asia/Tokyo")),
        "polars datetime value": (pl.Series([aware_a.replace(tzinfo=None)])[0], pl.Series([aware_b])[0]),
        "int ns": (lo, np.int64(hi)),
    }
    for name, (a, b) in forms.items():
        assert to_ns(a) == lo and to_ns(b) == hi, name
        assert eng.trades(start=a, end=b, raw_ns=True).equals(want), name
    assert to_ns(np.datetime64("2026-11-03T10:30:00.000000001")) == lo + 1  # ns precision kept
    assert to_ns(pd.Timestamp("2026-11-03T10:30:00.000000001")) == lo + 1
    with pytest.raises(ValueError, match="NaT"):
        to_ns(np.datetime64("NaT"))


def test_to_pandas_gives_tz_aware_datetimes_and_appends_back(eng, tmp_path):
    df = eng.trades(**Q)
    raw = eng.trades(**Q, raw_ns=True)
    pdf = df.to_pandas()
    assert str(pdf["ts"].dtype) == "datetime64[ns, UTC]" and str(pdf["recv_ts"].dtype) == "datetime64[ns, UTC]"
    assert pdf["ts"].iloc[0] == pd.Timestamp(raw["ts"][0], unit="ns", tz="UTC")
    assert [t.value for t in pdf["ts"].iloc[:50]] == raw["ts"][:50].to_list()  # nanoseconds kept
    q = eng.quotes(**Q).to_pandas()
    assert str(q["ts"].dtype) == "datetime64[ns, UTC]"
    # a result (Polars or pandas) is valid input for append: storage stays int64 ns
    for frame in (df, pdf):
        t = schema.validate("trades", frame)
        assert t.schema.field("ts").type == pa.int64()
        assert t.column("ts").to_pylist() == raw["ts"].to_list()
    w = Engine.open(tmp_path / "again", background=False, writer=True)
    w.append("trades", df)
    w.flush()
    assert w.trades(raw_ns=True).sort("ts", "seq").equals(raw.sort("ts", "seq"))
    w.close()


def test_asof_joins_frames_of_either_kind(eng):
    lake = eng.asof(("trades", Q), ("quotes", Q), tolerance="10s")
    dated = eng.asof(eng.trades(**Q), ("quotes", Q), tolerance="10s")  # a Datetime frame against the lake
    assert dated.equals(lake) and dated.schema == lake.schema
    ints = eng.asof(eng.trades(**Q, raw_ns=True), "quotes", right_filter=Q, tolerance="10s", raw_ns=True)
    assert ints.schema["ts"] == pl.Int64 and ints.schema["ts_right"] == pl.Int64
    assert ints["bid_price"].equals(lake["bid_price"]) and lake["bid_price"].null_count() < lake.height
    mixed = eng.asof(eng.trades(**Q), eng.quotes(**Q, raw_ns=True), tolerance="10s")  # Datetime left, int right
    assert mixed["bid_price"].equals(lake["bid_price"]) and mixed.schema["ts"] == UTC_NS


def test_bars_from_a_datetime_frame_equal_the_int_one(eng):
    dated = eng.bars(every="5m", data=eng.trades(**Q), start=T0, end=T0 + 3600 * S)
    ints = eng.bars(every="5m", data=eng.trades(**Q, raw_ns=True), start=T0, end=T0 + 3600 * S, raw_ns=True)
    assert dated.schema["ts"] == UTC_NS and dated.height == 12
    assert result_times(dated, ["ts", "end_ts"], raw_ns=True).equals(ints)


def test_result_times_normalizes_any_datetime_to_ns_utc():
    ns = [T0 + 123_456_789, T0 + 3600 * S]
    naive_us = pl.DataFrame({"ts": ns}).with_columns(pl.col("ts").cast(pl.Datetime("ns")).dt.cast_time_unit("us"))
    paris = pl.DataFrame({"ts": ns}).with_columns(pl.col("ts").cast(UTC_NS).dt.convert_time_zone("Europe/Paris"))
    assert result_times(naive_us, ["ts"], raw_ns=True)["ts"].to_list() == [n // 1000 * 1000 for n in ns]
    assert result_times(paris, ["ts"])["ts"].dtype == UTC_NS
    assert result_times(paris, ["ts"], raw_ns=True)["ts"].to_list() == ns
    assert result_times(pl.DataFrame({"ts": [1]}, schema={"ts": pl.Int32}), ["ts"])["ts"].dt.epoch("ns").to_list() == [1]
