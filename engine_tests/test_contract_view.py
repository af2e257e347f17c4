"""contract_view against a brute-force join (plain Python loops) on a generated contract lake with
known strikes, closes and results: tolerance, gaps on either side, settled and open contracts, a
close-time change taken when it was received, reference data recorded late."""

from __future__ import annotations

import math
import random
import time
import warnings

import polars as pl
import pytest

from engine import Engine
from engine.research.contracts import ReferenceDataWarning
from engine.sim import contracts as C
from engine.sim import synth

S = 10**9
H = 3600 * S
W = 5 * S  # window and default tolerance


def _times():
    now = time.time_ns()
    start = (now // H - 4) * H  # 4-5 hours ending 2 minutes ago: an event wholly inside has its close moved
    return start, now - 120 * S


@pytest.fixture(scope="module")
def clake(tmp_path_factory):
    start, end = _times()
    kw = dict(seed=5, spot_rate=1.0, contract_rate=0.1, trade_rate=0.02, buckets=4)
    probe = C.plan(start, end, **kw)
    by_open = sorted(probe.contracts, key=lambda c: (c.open_ts, c.ticker))
    gap_c = next(c for c in by_open if c.open_ts >= start + 30 * 60 * S)  # a contract gap an hour after it opens
    late_c = next(c for c in by_open if c.open_ts >= start + 90 * 60 * S and c.changed_at is None)
    stale_c = next(c for c in by_open if c.open_ts >= start + H and c not in (gap_c, late_c)
                   and c.open_ts + 45 * 60 * S < end)
    spec = {
        "quiet": [("spot", start + int(2.5 * H) + 17 * S, start + int(2.5 * H) + 107 * S)],
        "gaps": [("spot", start + 3 * H + 5 * S, start + 3 * H + 45 * S),
                 (gap_c.ticker, gap_c.open_ts + H, gap_c.open_ts + H + 60 * S)],
    }
    lake = C.plan(start, end, **kw, **spec)
    assert [c.ticker for c in lake.contracts] == [c.ticker for c in probe.contracts]
    # reference data of one contract first recorded 20 minutes after it opened
    late_from = late_c.open_ts + 20 * 60 * S
    ref = pl.from_arrow(lake.tables["instruments"][0]).with_columns(
        pl.when((pl.col("instrument").cast(pl.String) == late_c.ticker) & (pl.col("valid_from") <= late_c.open_ts))
        .then(pl.col("valid_from") + late_from - (late_c.open_ts - 600 * S)).otherwise("valid_from").alias("valid_from"))
    lake.tables["instruments"][0] = ref.to_arrow()
    versions = {}
    for r in ref.with_columns(pl.col(c).cast(pl.String) for c in ("source", "market", "instrument", "kind")).to_dicts():
        versions.setdefault(r["instrument"], []).append(r)
    eng = Engine.open(tmp_path_factory.mktemp("contracts"), background=False, writer=True, book_anchors=True)
    C.write(eng, lake)
    # a series with books but no reference data
    eng.append("l2", synth.l2_rows("kalshi", "KXETH", start + H, 200, 600 * S, seed=3, instruments=["KXETH-X-B3400"]))
    # a gap recorded over one contract's data that went on (a stale feed): no snapshot follows it
    stale = (stale_c.ticker, stale_c.open_ts + 40 * 60 * S, stale_c.open_ts + 42 * 60 * S)
    eng.append("gaps", synth.gap_rows([{"source": "kalshi", "market": "KXBTC", "instrument": stale[0], "start_ts": stale[1],
                                        "end_ts": stale[2], "kind": "stale", "detail": "test: no update"}]))
    eng.flush()
    yield {"eng": eng, "lake": lake, "gap_c": gap_c, "late_c": late_c, "late_from": late_from, "spec": spec, "stale": stale,
           "versions": {k: sorted(v, key=lambda r: r["valid_from"]) for k, v in versions.items()}}
    eng.close()


# ---- brute force ---------------------------------------------------------------------------------
def _snapshots(eng, source, market):
    """instrument -> times of its snapshot messages (the latest ts of each message's rows)."""
    out: dict[str, dict] = {}
    for r in eng.l2(source=source, market=market, raw_ns=True).filter(pl.col("snapshot")).iter_rows(named=True):
        k = (r["recv_ts"], r["seq"])
        d = out.setdefault(str(r["instrument"]), {})
        d[k] = max(d.get(k, r["ts"]), r["ts"])
    return {i: sorted(d.values()) for i, d in out.items()}


def _valid(t, snaps, gaps, w):
    """A trailing window [t - w, t] is valid when some snapshot s <= t - w has no gap overlapping (s, t]."""
    for s in snaps:
        if s + w > t:
            continue
        if not any(g_end > s and g_start <= t for g_start, g_end in gaps):
            return True
    return False


def brute(rows, spot_q, versions, spot_snaps, contract_snaps, spot_gaps, contract_gaps, tol, w, of):
    out = []
    for r in rows:
        vs = versions.get(r["instrument"], [])
        v = None
        for x in vs:
            if x["valid_from"] <= r["recv_ts"]:
                v = x
        if v is None and vs:
            v = vs[0]
        final = vs[-1] if vs else {}
        best = None
        for q in spot_q:
            if q["ts"] <= r["ts"] and (best is None or q["ts"] >= best["ts"]):
                best = q
        if best is not None and tol is not None and r["ts"] - best["ts"] > tol:
            best = None
        mid = None if best is None or best["bid_price"] is None or best["ask_price"] is None else \
            (best["bid_price"] + best["ask_price"]) / 2
        if of == "quotes":
            prob = None if r["bid_price"] is None or r["ask_price"] is None else (r["bid_price"] + r["ask_price"]) / 2
        else:
            prob = r["price"]
        st = v["strike_type"] if v else None
        lo, hi = (v["floor_strike"], v["cap_strike"]) if v else (None, None)
        strike = dist = None
        if st == "greater":
            strike, dist = lo, None if mid is None else mid - lo
        elif st == "less":
            strike, dist = hi, None if mid is None else hi - mid
        elif st == "between":
            strike, dist = (lo + hi) / 2, None if mid is None else min(mid - lo, hi - mid)
        close = (v["close_ts"] if v["close_ts"] is not None else v["expiration_ts"]) if v else None
        inst_gaps = [(a, b) for i, a, b in contract_gaps if i is None or i == r["instrument"]]
        cv = _valid(r["ts"], contract_snaps.get(r["instrument"], []), inst_gaps, w) if of == "quotes" else \
            not any(a <= r["ts"] and b > r["ts"] - w for _, a, b in contract_gaps)
        sv = _valid(r["ts"], spot_snaps, spot_gaps, w)
        out.append({"strike_type": st, "floor_strike": lo, "cap_strike": hi, "strike": strike,
                    "close_ts": v["close_ts"] if v else None, "time_to_expiry": None if close is None else close - r["ts"],
                    "spot_mid": mid, "spot_ts": None if best is None else best["ts"], "distance": dist, "prob": prob,
                    "result": final.get("result"), "settled_ts": final.get("settled_ts"),
                    "contract_valid": cv, "spot_valid": sv, "valid": cv and sv})
    return out


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)
    return a == b


def _inputs(eng, lake):
    spot_q = eng.quotes(source="coinbase", market="BTC-USD", raw_ns=True).to_dicts()
    g = eng.gaps(raw_ns=True).with_columns(pl.col(c).cast(pl.String) for c in ("source", "market", "instrument"))
    spot_gaps = [(r["start_ts"], r["end_ts"]) for r in g.filter(pl.col("source") == "coinbase").to_dicts()]
    contract_gaps = [(r["instrument"], r["start_ts"], r["end_ts"]) for r in
                     g.filter(pl.col("market") == "KXBTC").to_dicts()]
    return (spot_q, _snapshots(eng, "coinbase", "BTC-USD")["BTC-USD"], _snapshots(eng, "kalshi", "KXBTC"), spot_gaps,
            contract_gaps)


def _check(view, rows_df, clake, tol, of, pick):
    eng = clake["eng"]
    spot_q, spot_snaps, c_snaps, spot_gaps, c_gaps = _inputs(eng, clake["lake"])
    rows = rows_df.with_columns(pl.col("instrument").cast(pl.String)).to_dicts()
    idx = pick(rows)
    want = brute([rows[i] for i in idx], spot_q, clake["versions"], spot_snaps, c_snaps, spot_gaps, c_gaps, tol, W, of)
    got = view.to_dicts()
    cols = list(want[0])
    bad = [(i, c, got[i][c], w[c]) for i, w in zip(idx, want) for c in cols if not _same(got[i][c], w[c])]
    assert not bad, bad[:10]
    return [got[i] for i in idx]


def _sample(clake, n=400):
    """A random sample plus every row near the quiet spell, the gaps, the close change and the late reference."""
    spec, gc, lc = clake["spec"], clake["gap_c"], clake["late_c"]
    changed = [c for c in clake["lake"].contracts if c.changed_at is not None]
    spans = [(a - 10 * S, b + 10 * S) for _, a, b in spec["quiet"] + spec["gaps"]]
    spans += [(c.changed_at - 60 * S, c.changed_at + 60 * S) for c in changed[:1]]
    spans += [(lc.open_ts, clake["late_from"] + 30 * S)]
    tk, a, b = clake["stale"]
    spans += [(a - 10 * S, (b // H + 1) * H + 60 * S)]  # until after the next file's book anchor

    def pick(rows):
        rng = random.Random(1)
        near = [i for i, r in enumerate(rows) if any(a <= r["ts"] < b for a, b in spans)]
        rest = [i for i in range(len(rows)) if i not in set(near)]
        return sorted(set(near) | set(rng.sample(rest, min(n, len(rest)))))
    return pick


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tol", ["5s", "30s"])
def test_quotes_equal_brute_force(clake, tol):
    eng = clake["eng"]
    v = eng.contract_view("KXBTC", "coinbase:BTC-USD", tolerance=tol, window="5s", raw_ns=True)
    rows = eng.quotes(source="kalshi", market="KXBTC", raw_ns=True)
    assert v.height == rows.height and v["seq"].to_list() == rows["seq"].to_list()  # the quotes, in their order
    assert v["instrument"].to_list() == rows["instrument"].cast(pl.String).to_list()
    got = _check(v, rows, clake, int(tol[:-1]) * S, "quotes", _sample(clake))
    assert len(got) > 800
    assert {g["result"] for g in got} >= {"yes", "no", None}  # settled and open contracts
    assert sum(g["spot_mid"] is None for g in got) > 0 and sum(g["valid"] for g in got) > 0


def test_trades_equal_brute_force(clake):
    eng = clake["eng"]
    v = eng.contract_view("kalshi:KXBTC", "coinbase:BTC-USD", of="trades", raw_ns=True)
    rows = eng.trades(source="kalshi", market="KXBTC", raw_ns=True)
    assert v["trade_id"].to_list() == rows["trade_id"].to_list()
    _check(v, rows, clake, W, "trades", _sample(clake, 300))
    assert (v["prob"] == v["price"]).all()


def test_tolerance_respected(clake):
    eng = clake["eng"]
    (_, q0, q1), = clake["spec"]["quiet"]  # no spot update in [q0, q1), and no gap recorded
    inside = pl.col("ts").is_between(q0 + W + S, q1 - S, closed="left")
    v = eng.contract_view("KXBTC", "coinbase:BTC-USD", tolerance="5s", raw_ns=True).filter(inside)
    assert v.height > 10
    assert v["spot_mid"].null_count() == v.height and v["distance"].null_count() == v.height
    assert v["spot_valid"].all()  # quiet is not a gap: the data is valid, the spot just too old
    wide = eng.contract_view("KXBTC", "coinbase:BTC-USD", tolerance="5m", raw_ns=True).filter(inside)
    assert wide["spot_mid"].null_count() == 0 and (wide["spot_ts"] < q0).all()
    assert ((wide["ts"] - wide["spot_ts"]) <= 300 * S).all()


def test_gaps_flagged(clake):
    eng = clake["eng"]
    v = eng.contract_view("KXBTC", "coinbase:BTC-USD", raw_ns=True)
    (_, g0, g1), _ = clake["spec"]["gaps"]
    in_spot_gap = v.filter(pl.col("ts").is_between(g0, g1 + W, closed="left"))
    assert in_spot_gap.height > 10 and not in_spot_gap["spot_valid"].any() and not in_spot_gap["valid"].any()
    after = v.filter(pl.col("ts").is_between(g1 + W + S, g1 + 60 * S))
    assert after.height and after["spot_valid"].all()
    tk, a, b = clake["stale"]  # a contract's gap over data that went on
    during = v.filter(pl.col("ts").is_between(a, b, closed="left"))
    mine, others = during.filter(pl.col("instrument") == tk), during.filter(pl.col("instrument") != tk)
    assert mine.height > 0 and not mine["contract_valid"].any() and not mine["valid"].any()
    assert others.height > 0 and others["contract_valid"].all()
    before = v.filter(pl.col("instrument") == tk, pl.col("ts").is_between(a - 120 * S, a, closed="left"))
    assert before.height > 0 and before["contract_valid"].all()


def test_results_settled_and_open(clake):
    eng, lake = clake["eng"], clake["lake"]
    v = eng.contract_view("KXBTC", "coinbase:BTC-USD", raw_ns=True)
    res = dict(v.group_by("instrument").agg(pl.col("result").unique()).iter_rows())
    for c in lake.contracts:
        if c.ticker in res:
            assert res[c.ticker] == [c.result], c.ticker
    assert {c.result for c in lake.contracts if c.ticker in res} == {"yes", "no", None}
    # a contract settles yes iff the spot at its close was in its region: a check of the generator
    for c in lake.contracts:
        if c.result is not None:
            x = round(float(lake.spot_at(c.close_ts)), 2)
            inside = (c.floor_strike is None or x >= c.floor_strike) and (c.cap_strike is None or x <= c.cap_strike)
            assert (c.result == "yes") == inside or c.strike_type != "between"
    # settled ones carry their settlement time; open ones none
    s = v.filter(pl.col("result").is_null())
    assert s.height and s["settled_ts"].null_count() == s.height


def test_close_change_taken_when_received(clake):
    eng, lake = clake["eng"], clake["lake"]
    c = next(c for c in lake.contracts if c.changed_at is not None)
    v = eng.contract_view("KXBTC", "coinbase:BTC-USD", instrument=c.ticker, raw_ns=True)
    before = v.filter(pl.col("recv_ts") < c.changed_at)
    after = v.filter(pl.col("recv_ts") >= c.changed_at)
    assert before.height and after.height
    assert (before["close_ts"] == c.first_close_ts).all() and (after["close_ts"] == c.close_ts).all()
    assert (before["time_to_expiry"] == c.first_close_ts - before["ts"]).all()
    assert (after["time_to_expiry"] == c.close_ts - after["ts"]).all()
    assert c.close_ts > c.first_close_ts


def test_reference_recorded_late_labels_earlier_rows(clake):
    eng, lc = clake["eng"], clake["late_c"]
    v = eng.contract_view("KXBTC", "coinbase:BTC-USD", instrument=lc.ticker, raw_ns=True)
    early = v.filter(pl.col("recv_ts") < clake["late_from"])
    assert early.height > 0
    n = early.height
    assert early["strike_type"].to_list() == [lc.strike_type] * n
    assert early["floor_strike"].to_list() == [lc.floor_strike] * n and early["cap_strike"].to_list() == [lc.cap_strike] * n
    assert (early["close_ts"] == lc.first_close_ts).all()


def test_time_types_and_spot_default(clake):
    eng = clake["eng"]
    v = eng.contract_view("KXBTC", start=clake["lake"].start + 2 * H, end=clake["lake"].start + 2 * H + 600 * S)
    for c in ("ts", "recv_ts", "open_ts", "close_ts", "expiration_ts", "spot_ts", "settled_ts"):
        assert v.schema[c] == pl.Datetime("ns", "UTC"), c
    assert v.schema["time_to_expiry"] == pl.Duration("ns")
    raw = eng.contract_view("KXBTC", "coinbase:BTC-USD", start=clake["lake"].start + 2 * H,
                            end=clake["lake"].start + 2 * H + 600 * S, raw_ns=True)
    assert raw.schema["ts"] == pl.Int64 and raw.schema["time_to_expiry"] == pl.Int64
    assert v.height == raw.height > 0
    assert v["ts"].dt.epoch("ns").to_list() == raw["ts"].to_list()
    assert v["time_to_expiry"].dt.total_nanoseconds().to_list() == raw["time_to_expiry"].to_list()
    assert raw["ts"].min() >= clake["lake"].start + 2 * H and raw["ts"].max() < clake["lake"].start + 2 * H + 600 * S
    assert v["spot_mid"].to_list() == raw["spot_mid"].to_list()  # spot=None found coinbase:BTC-USD via related("BTC")
    bare = eng.contract_view("KXBTC", "coinbase:BTC-USD", start=clake["lake"].start + 2 * H,
                             end=clake["lake"].start + 2 * H + 600 * S, validity=False, raw_ns=True)
    assert bare.columns == [c for c in raw.columns if c not in ("contract_valid", "spot_valid", "valid")]
    assert bare.equals(raw.drop("contract_valid", "spot_valid", "valid"))


def test_no_reference_data_warns(clake):
    eng = clake["eng"]
    with pytest.warns(ReferenceDataWarning, match="KXETH"):
        v = eng.contract_view("KXETH", "coinbase:BTC-USD", raw_ns=True)
    assert v.height > 0 and v["strike_type"].null_count() == v.height and v["result"].null_count() == v.height
    assert v["prob"].drop_nulls().is_between(0, 1).all()
    with pytest.raises(ValueError, match="spot="), pytest.warns(ReferenceDataWarning):
        eng.contract_view("KXETH")  # no underlying known: the spot must be named


def test_empty_window_and_errors(clake):
    eng = clake["eng"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = eng.contract_view("KXBTC", "coinbase:BTC-USD", start=clake["lake"].start - 10 * H,
                              end=clake["lake"].start - 9 * H)
    assert v.height == 0 and "distance" in v.columns and v.schema["ts"] == pl.Datetime("ns", "UTC")
    with pytest.raises(ValueError, match="of must be"):
        eng.contract_view("KXBTC", of="book")
    from engine.research.query import UnknownMarketError

    with pytest.raises(UnknownMarketError, match="KXNOPE"):
        eng.contract_view("KXNOPE", "coinbase:BTC-USD")


def test_asof_right_columns_and_empty_left(clake):
    from engine.research.asof import asof

    left = pl.DataFrame({"ts": [10, 20, 30], "bid_price": [1.0, 2.0, 3.0]})
    right = pl.DataFrame({"ts": [9, 25], "bid_price": [0.5, 0.7], "other": ["a", "b"]})
    j = asof(None, left, right, by=None, right_columns={"ts": "r_ts", "bid_price": "r_bid"})
    assert sorted(j.columns) == ["bid_price", "r_bid", "r_ts", "ts"]
    assert j["r_bid"].to_list() == [0.5, 0.5, 0.7] and j["r_ts"].to_list() == [9, 9, 25]
    j = asof(None, left, right, by=None, right_columns=["other"])
    assert sorted(j.columns) == ["bid_price", "other", "ts", "ts_right"]
    with pytest.raises(ValueError, match="right_columns"):
        asof(None, left, right, by=None, right_columns=["nope"])
    # an empty left side: the lake is not read, and the columns are those of the table
    eng = clake["eng"]
    empty = left.clear()
    j = asof(eng, empty, ("quotes", {"source": "coinbase"}), by=None, raw_ns=True)
    assert j.height == 0 and "ask_price" in j.columns


def test_plot(clake, tmp_path):
    pytest.importorskip("matplotlib")
    from engine.research.plot_contracts import plot

    v = clake["eng"].contract_view("KXBTC", "coinbase:BTC-USD")
    ok = v.filter(pl.col("valid") & pl.col("prob").is_not_null() & pl.col("distance").is_not_null())
    out = plot(v, tmp_path / "cv.png", max_points=500)
    assert (tmp_path / "cv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    want = ok.group_by(pl.col("result").fill_null("open")).len()
    assert out["points"] == {r: dict(want.iter_rows()).get(r, 0) for r in ("open", "no", "yes")}
    assert sum(out["drawn"].values()) == min(500, ok.height) and out["xlim"][0] < 0 < out["xlim"][1]
