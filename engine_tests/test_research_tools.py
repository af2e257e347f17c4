"""asof vs brute force, bars vs a reference, gap-aware windows, coverage numbers and its PNG."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from engine import Engine, schema
from engine.sim import synth
from engine.timeutil import to_ns

S = 10**9
T0 = to_ns("2026-11-03T10:00:00")


# ---- asof ----------------------------------------------------------------------------------------
def brute_asof(left, right, by, tol, direction):
    out = []
    for lr in left:
        cands = [(i, r) for i, r in enumerate(right) if all(r[b] == lr[b] for b in by)]
        best = None
        for i, r in cands:
            d = lr["ts"] - r["ts"]
            if direction == "backward" and d >= 0:
                if best is None or r["ts"] >= best[1]["ts"]:  # ties: the last one
                    best = (i, r)
            elif direction == "forward" and d <= 0:
                if best is None or r["ts"] < best[1]["ts"]:  # ties: the first one
                    best = (i, r)
        if best is not None and tol is not None and abs(lr["ts"] - best[1]["ts"]) > tol:
            best = None
        out.append(None if best is None else best[1]["v"])
    return out


def _rand(rng, n, groups, span, unique_ts=False):
    ts = rng.choice(span, n, replace=False) if unique_ts else rng.integers(0, span, n)
    return pl.DataFrame({"instrument": rng.choice(groups, n), "ts": ts.astype(np.int64),
                         "v": np.arange(n, dtype=np.int64)})


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize("tol", [None, 7])
@pytest.mark.parametrize("by", [None, "instrument"])
@pytest.mark.parametrize("seed", [0, 1])
def test_asof_equals_brute_force(tmp_path, direction, tol, by, seed):
    from engine.research.asof import asof

    rng = np.random.default_rng(seed)
    left = _rand(rng, 300, ["a", "b", "c"], 2000)  # unsorted, duplicate times
    right = _rand(rng, 400, ["a", "b", "d"], 2000)
    got = asof(None, left, right, by=by, tolerance=tol, direction=direction)
    assert got.height == left.height and got["v"].to_list() == left["v"].to_list()  # left order kept
    want = brute_asof(left.to_dicts(), right.to_dicts(), [by] if by else [], tol, direction)
    assert got["v_right"].to_list() == want
    # the matched right time is kept and within tolerance
    m = got.filter(pl.col("v_right").is_not_null())
    if tol is not None:
        assert ((m["ts"] - m["ts_right"]).abs() <= tol).all()
    # sorted inputs (the lake's order) take the direct path and agree
    ls = left.sort(["instrument", "ts"]) if by else left.sort("ts")
    rs = right.sort(["instrument", "ts"], maintain_order=True) if by else right.sort("ts", maintain_order=True)
    got2 = asof(None, ls, rs, by=by, tolerance=tol, direction=direction)
    want2 = brute_asof(ls.to_dicts(), rs.to_dicts(), [by] if by else [], tol, direction)
    assert got2["v_right"].to_list() == want2


def test_sorted_within():
    from engine.research.asof import sorted_within

    df = pl.DataFrame({"g": ["a", "a", "b", "b"], "ts": [5, 9, 1, 3]})
    assert sorted_within(df, "ts", ["g"]) and not sorted_within(df, "ts", [])
    assert not sorted_within(pl.DataFrame({"g": ["a", "b", "a"], "ts": [1, 2, 3]}).with_columns(ts=pl.Series([5, 1, 3])), "ts", ["g"])
    assert not sorted_within(pl.DataFrame({"g": ["a", "a"], "ts": [2, 1]}), "ts", ["g"])


@pytest.fixture(scope="module")
def xlake(tmp_path_factory):
    """Coinbase BTC-USD l2 (-> quotes) and Kalshi KXBTC trades in one lake."""
    eng = Engine.open(tmp_path_factory.mktemp("x"), background=False, writer=True)
    l2 = synth.l2_rows("coinbase", "BTC-USD", T0, 20_000, 600 * S, seed=1)
    tr = synth.trade_rows("kalshi", "KXBTC", T0 + 30 * S, 500, 500 * S, seed=2,
                          instruments=["KXBTC-26NOV0311-B97500", "KXBTC-26NOV0311-B98000"])
    eng.append("l2", l2)
    eng.append("trades", tr)
    eng.flush()
    yield eng
    eng.close()


def test_asof_cross_source_kalshi_trades_vs_coinbase_quotes(xlake):
    eng = xlake
    j = eng.asof(("trades", {"source": "kalshi", "market": "KXBTC"}), ("quotes", {"source": "coinbase", "market": "BTC-USD"}),
                 by=None, tolerance="5s")
    trades = eng.trades(source="kalshi")
    q = eng.quotes("coinbase", "BTC-USD", raw_ns=True)
    assert j.height == trades.height
    assert {"instrument", "instrument_right", "bid_price", "ask_price", "ts_right"} <= set(j.columns)
    assert set(j["instrument_right"].drop_nulls().cast(pl.String)) == {"BTC-USD"}
    # spot-check against the quotes: the latest quote at or before each trade
    qts, qbid = q["ts"].to_numpy(), q["bid_price"].to_numpy()
    for r in j.with_columns(pl.col("ts").dt.epoch("ns")).sample(40, seed=3).iter_rows(named=True):
        i = np.searchsorted(qts, r["ts"], side="right") - 1
        want = qbid[i] if i >= 0 and r["ts"] - qts[i] <= 5 * S else None
        assert r["bid_price"] == want
    # the same through SQL: DuckDB ASOF JOIN over the views, quotes included once stored
    from engine.lake.derived import derive_partition

    derive_partition(eng, "coinbase", "BTC-USD", "2026-11-03")
    s = eng.sql("SELECT t.ts, t.trade_id, q.bid_price FROM trades t ASOF LEFT JOIN quotes q ON t.ts >= q.ts "
                "WHERE t.source = 'kalshi' ORDER BY t.ts, t.trade_id")
    pj = j.sort(["ts", "trade_id"])
    nearest = eng.asof(("trades", {"source": "kalshi"}), "quotes", by=None, right_filter={"source": "coinbase"})
    assert s["bid_price"].to_list() == nearest.sort(["ts", "trade_id"])["bid_price"].to_list()
    assert pj.height == s.height


# ---- bars ----------------------------------------------------------------------------------------
def ref_time_bars(trades, step, lo, hi):
    out = {}
    for inst in sorted({t["instrument"] for t in trades}):
        rows = sorted((t for t in trades if t["instrument"] == inst), key=lambda t: (t["ts"], t["seq"]))
        b = lo - lo % step
        while b < hi:
            xs = [t for t in rows if b <= t["ts"] < b + step]
            if xs:
                vol = sum(t["size"] for t in xs)
                out[(inst, b)] = (xs[0]["price"], max(t["price"] for t in xs), min(t["price"] for t in xs), xs[-1]["price"],
                                  vol, sum(t["price"] * t["size"] for t in xs) / vol, len(xs))
            else:
                out[(inst, b)] = (None, None, None, None, 0.0, None, 0)
            b += step
    return out


def _trades(seed=0, n=2000):
    rng = np.random.default_rng(seed)
    ts = np.sort(T0 + rng.integers(0, 3600 * S, n))
    ts[100:400] = ts[99]  # a burst with equal times
    mask = (ts > T0 + 1000 * S) & (ts < T0 + 1300 * S)  # a silent stretch: empty bars
    ts = np.where(mask, T0 + 1000 * S, ts)
    return pl.DataFrame({
        "ts": ts, "source": "src", "market": "M", "instrument": rng.choice(["X", "Y"], n),
        "side": rng.choice(["buy", "sell"], n), "price": np.round(100 + rng.normal(0, 1, n), 2),
        "size": rng.integers(1, 40, n) / 8.0, "seq": np.arange(n, dtype=np.int64),
    })


@pytest.mark.parametrize("every", ["1m", "30s", "5m"])
def test_time_bars_equal_reference_with_empty_intervals(every):
    from engine.research import parse_duration
    from engine.research.bars import bars

    df = _trades()
    step = parse_duration(every)
    lo, hi = T0 - 90 * S, T0 + 3700 * S
    got = bars(None, data=df, every=every, start=lo, end=hi, raw_ns=True)
    want = ref_time_bars(df.to_dicts(), step, lo, hi)
    assert got.height == len(want)
    assert (got["ts"] % step == 0).all()  # aligned to UTC multiples
    assert (got["count"] == 0).sum() > 0  # empty intervals visible
    for r in got.iter_rows(named=True):
        w = want[(r["instrument"], r["ts"])]
        g = (r["open"], r["high"], r["low"], r["close"], r["volume"], r["vwap"], r["count"])
        assert g[:5] == w[:5] and g[6] == w[6], (r, w)
        assert (g[5] is None and w[5] is None) or math.isclose(g[5], w[5], rel_tol=1e-12)
        assert r["end_ts"] == r["ts"] + step
        if r["count"]:
            assert math.isclose(r["buy_volume"] + r["sell_volume"], r["volume"])


def test_volume_and_tick_bars_equal_reference():
    from engine.research.bars import bars

    df = _trades(1)
    V = 25.0
    got = bars(None, data=df, volume=V, raw_ns=True)
    for inst in ("X", "Y"):
        rows = sorted((t for t in df.to_dicts() if t["instrument"] == inst), key=lambda t: (t["ts"], t["seq"]))
        groups, cum = {}, 0.0
        for t in rows:
            groups.setdefault(int(cum // V), []).append(t)
            cum += t["size"]
        g = got.filter(pl.col("instrument") == inst)
        assert g.height == len(groups)
        for r, (k, xs) in zip(g.iter_rows(named=True), sorted(groups.items())):
            assert (r["open"], r["close"], r["count"], r["ts"], r["end_ts"]) == (xs[0]["price"], xs[-1]["price"], len(xs), xs[0]["ts"], xs[-1]["ts"])
            assert r["volume"] == sum(t["size"] for t in xs)
        # every bar but the last closes with the trade that takes the running volume past a multiple of V
        ends = np.cumsum(g["volume"].to_numpy())[:-1]
        assert (np.floor(ends / V) > np.floor((ends - g["volume"].to_numpy()[:-1]) / V)).all()
        tb = bars(None, data=df, ticks=50).filter(pl.col("instrument") == inst)
        assert tb["count"].to_list() == [50] * (len(rows) // 50) + ([len(rows) % 50] if len(rows) % 50 else [])
        assert tb["open"][1] == rows[50]["price"]


def test_bars_from_the_lake(xlake):
    b = xlake.bars(every="1m", source="kalshi", market="KXBTC")
    tr = xlake.trades(source="kalshi")
    assert b["count"].sum() == tr.height
    assert math.isclose(b["volume"].sum(), tr["size"].sum())
    with pytest.raises(ValueError):
        xlake.bars(every="1m", volume=3)


# ---- gap-aware windows ---------------------------------------------------------------------------
def _book_rows(ts, snapshot, inst="BTC-USD", recv=None, seq=0):
    return dict(ts=ts, recv_ts=recv or ts, source="coinbase", market="BTC-USD", instrument=inst, side="bid",
                price=100.0, size=1.0, seq=seq, snapshot=snapshot)


def test_windows_across_restart_invalid_after_fresh_snapshot_valid(tmp_path):
    from engine.research.windows import mark_valid

    eng = Engine.open(tmp_path / "w", background=False, writer=True)
    rows = [_book_rows(T0, True, seq=1)] + [_book_rows(T0 + k * S, False, seq=1 + k) for k in range(1, 100)]
    # restart: nothing between T0+100s and T0+160s, then a fresh snapshot at T0+161s
    rows += [_book_rows(T0 + 161 * S, True, seq=500)] + [_book_rows(T0 + (161 + k) * S, False, seq=500 + k) for k in range(1, 200)]
    eng.append("l2", schema.validate("l2", pa.Table.from_pylist(rows)))
    eng.append("gaps", synth.gap_rows([dict(source="coinbase", market="BTC-USD", instrument=None, start_ts=T0 + 100 * S,
                                            end_ts=T0 + 160 * S, kind="restart", detail="collector restart")]))
    tr = synth.trade_rows("coinbase", "BTC-USD", T0, 3000, 400 * S, seed=4)
    eng.append("trades", tr)
    eng.flush()
    spans = eng.valid("coinbase", "BTC-USD", T0, T0 + 400 * S, window="30s", raw_ns=True)
    assert spans.select("start_ts", "end_ts").rows() == [(T0 + 30 * S, T0 + 100 * S), (T0 + 191 * S, T0 + 400 * S)]
    trades = eng.trades(source="coinbase", raw_ns=True)
    m = mark_valid(eng, trades, window="30s")
    assert m.height == trades.height and m["trade_id"].to_list() == trades["trade_id"].to_list()
    t = m["ts"].to_numpy()
    want = ((t >= T0 + 30 * S) & (t < T0 + 100 * S)) | ((t >= T0 + 191 * S) & (t < T0 + 400 * S))
    assert m["valid"].to_list() == want.tolist()
    assert eng.valid(trades, window="30s")["valid"].to_list() == want.tolist()  # the Engine one-liner
    dated = eng.valid(eng.trades(source="coinbase"), window="30s")  # Datetime times: same answer, types kept
    assert dated["valid"].to_list() == want.tolist() and dated.schema["ts"] == pl.Datetime("ns", "UTC")
    # a window straddling the restart is invalid even though both of its ends hold data
    assert not m.filter((pl.col("ts") > T0 + 170 * S) & (pl.col("ts") < T0 + 190 * S))["valid"].any()
    # without the snapshot requirement only the gap matters
    spans2 = eng.valid("coinbase", "BTC-USD", T0, T0 + 400 * S, window="30s", require_snapshot=False, raw_ns=True)
    assert spans2.select("start_ts", "end_ts").rows() == [(T0, T0 + 100 * S), (T0 + 190 * S, T0 + 400 * S)]
    eng.close()


# ---- coverage ------------------------------------------------------------------------------------
def test_coverage_numbers_and_png(tmp_path):
    from engine.research import coverage as cov_mod

    eng = Engine.open(tmp_path / "c", background=False, writer=True)
    # BTC-USD: 3 hours of l2 with a 15-minute disconnect; ETH-USD: trades in the middle hour only
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", T0, 30_000, 3 * 3600 * S, seed=1))
    eng.append("trades", synth.trade_rows("coinbase", "ETH-USD", T0 + 3600 * S, 5_000, 3600 * S, seed=2))
    eng.append("gaps", synth.gap_rows([dict(source="coinbase", market="BTC-USD", instrument=None, start_ts=T0 + 3600 * S + 600 * S,
                                            end_ts=T0 + 3600 * S + 1500 * S, kind="disconnect", detail="x")]))
    eng.flush()
    cov = eng.coverage(T0, T0 + 3 * 3600 * S, raw_ns=True)
    got = {(m, (h - T0) // (3600 * S)): c for m, h, c in cov.select("market", "hour", "covered").iter_rows()}
    assert got[("BTC-USD", 1)] == pytest.approx(0.75, abs=1e-3)
    assert got[("BTC-USD", 0)] == pytest.approx(1.0, abs=1e-3) and got[("BTC-USD", 2)] == pytest.approx(1.0, abs=1e-3)
    assert got[("ETH-USD", 0)] == 0.0 and got[("ETH-USD", 2)] == 0.0 and got[("ETH-USD", 1)] == pytest.approx(1.0, abs=1e-3)
    assert cov.filter(pl.col("market") == "BTC-USD")["gaps"].to_list() == [0, 1, 0]
    # the picture shows these numbers: each cell's pixel has the colour of its value
    png = tmp_path / "cov.png"
    drawn = cov_mod.plot(eng.coverage(T0, T0 + 3 * 3600 * S), png, eng.gaps())  # takes Datetime frames too
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    cmap = plt.get_cmap(drawn["cmap"])
    pivot = {(f"{s}:{m}", h): c for s, m, h, c in cov.select("source", "market", "hour", "covered").iter_rows()}
    for i, r in enumerate(drawn["rows"]):
        for j, h in enumerate(drawn["hours"]):
            assert drawn["matrix"][i, j] == pivot[(r, h)]
            x, y = drawn["centers"][i, j]
            px = img[int(round(y)), int(round(x))][:3]
            assert np.allclose(px, cmap(pivot[(r, h)])[:3], atol=0.02), (r, h)
    # CLI: table and PNG
    from engine.research.coverage import cli

    eng.close()
    out = tmp_path / "cli.png"
    assert cli(["--home", str(tmp_path / "c"), "--start", "2026-11-03T10:00:00", "--end", "2026-11-03T13:00:00",
                "--png", str(out)]) == 0
    assert out.stat().st_size > 1000
