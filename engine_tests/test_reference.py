"""Reference data (the `instruments` table): Kalshi market objects and lifecycle events parsed exactly,
Coinbase products, versions in force at a time, live == offline through the replay exchange's real
sockets, the Dagster asset and its settlement check, and generated captures whose contracts settle."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow as pa
import pytest

from engine import Engine
from engine.collect import registry
from engine.collect.capture import CaptureWriter
from engine.collect.coinbase.normalize import CoinbaseNormalizer
from engine.collect.ingest import ingest_files
from engine.collect.kalshi.normalize import KalshiNormalizer
from engine.collect.kalshi.reference import underlying_of
from engine.schema import INSTRUMENTS_SCHEMA
from engine.sim.capture_gen import generate_coinbase, generate_kalshi
from engine.sim.replay import ReplayServer
from engine_tests.exchange_fixtures import _shared
from engine_tests.test_collector import ROOT, _cmd, _env, _status, _wait_read_all

S = 10**9
H = 3600 * S
NOW = time.time_ns() // S * S
REF_COLS = INSTRUMENTS_SCHEMA.names


def rows(norm) -> list[dict]:
    t = norm.take().get("instruments")
    return t.to_pylist() if t is not None else []


def lifecycle(tk: str, event: str, **fields) -> str:
    return json.dumps({"type": "market_lifecycle_v2", "sid": 3, "msg": {"market_ticker": tk, "event_type": event,
                                                                        **fields}})


def iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // S))


# ---- Kalshi: market objects ------------------------------------------------------------------------------


def test_kalshi_market_objects_parsed_exactly():
    ev = "KXBTC-26NOV2617"
    page = {"cursor": "", "markets": [
        {"ticker": f"{ev}-B97250", "event_ticker": ev, "market_type": "binary", "title": "Bitcoin 97,000 to 97,499.99",
         "status": "active", "open_time": "2026-11-26T21:00:00Z", "close_time": "2026-11-26T22:00:00Z",
         "expected_expiration_time": "2026-11-26T22:05:00Z", "expiration_time": "2026-12-03T22:00:00Z",
         "strike_type": "between", "floor_strike": 97000, "cap_strike": 97499.99, "result": "",
         "price_level_structure": "linear_cent",
         "price_ranges": [{"start": "0.0000", "end": "1.0000", "step": "0.0100"}], "yes_bid_dollars": "0.4100"},
        {"ticker": f"{ev}-T99999.99", "event_ticker": ev, "status": "active", "strike_type": "greater",
         "floor_strike": 99999.99, "open_time": "2026-11-26T21:00:00Z", "close_time": "2026-11-26T22:00:00Z",
         "expected_expiration_time": "2026-11-26T22:00:00Z", "result": "",
         "price_ranges": [{"start": "0.0000", "end": "0.1000", "step": "0.0010"},
                          {"start": "0.1000", "end": "0.9000", "step": "0.0100"}]},
        {"ticker": f"{ev}-T90000", "event_ticker": ev, "status": "finalized", "strike_type": "less", "cap_strike": 90000,
         "open_time": "2026-11-26T21:00:00Z", "close_time": "2026-11-26T22:00:00Z",
         "expiration_time": "2026-11-26T22:00:00Z", "result": "no", "settlement_value_dollars": "0.0000",
         "settlement_ts": "2026-11-26T22:02:31Z", "expiration_value": "97123.45", "tick_size": 1},
        {"ticker": f"{ev}-B97750", "floor_strike": "not a number"},  # one bad object costs only itself
        {"ticker": "KXETHD-26NOV2617-T3500", "status": "determined", "strike_type": "greater", "floor_strike": 3500,
         "result": "yes", "settlement_value": 100, "tick_size": 1},
    ]}
    n = KalshiNormalizer()
    n.rest(NOW, "markets", json.dumps(page))
    got = {r["instrument"]: r for r in rows(n)}
    assert n.c.rest_answers == 1 and n.c.skip_reasons == {"bad_rest_markets": 1}
    assert set(got) == {f"{ev}-B97250", f"{ev}-T99999.99", f"{ev}-T90000", "KXETHD-26NOV2617-T3500"}
    ns = lambda s: int(time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone) * S  # noqa: E731
    b = got[f"{ev}-B97250"]
    assert b == {**dict.fromkeys(REF_COLS), "valid_from": NOW, "source": "kalshi", "market": "KXBTC",
                 "instrument": f"{ev}-B97250", "kind": "binary", "quote": "USD", "underlying": "BTC",
                 "tick_size": 0.01, "status": "active", "strike_type": "between", "floor_strike": 97000.0,
                 "cap_strike": 97499.99, "open_ts": ns("2026-11-26T21:00:00Z"), "close_ts": ns("2026-11-26T22:00:00Z"),
                 "expiration_ts": ns("2026-11-26T22:05:00Z"), "title": "Bitcoin 97,000 to 97,499.99"}
    t_up = got[f"{ev}-T99999.99"]  # open-ended above: a floor, no cap; the smallest price step
    assert (t_up["strike_type"], t_up["floor_strike"], t_up["cap_strike"], t_up["tick_size"]) == ("greater", 99999.99, None, 0.001)
    t_dn = got[f"{ev}-T90000"]  # open-ended below: a cap, no floor; settled
    assert (t_dn["strike_type"], t_dn["floor_strike"], t_dn["cap_strike"]) == ("less", None, 90000.0)
    assert (t_dn["status"], t_dn["result"], t_dn["settlement_value"], t_dn["settled_ts"], t_dn["tick_size"]) == (
        "finalized", "no", 0.0, ns("2026-11-26T22:02:31Z"), 0.01)
    assert t_dn["expiration_ts"] == ns("2026-11-26T22:00:00Z")  # expiration_time when no expected time
    eth = got["KXETHD-26NOV2617-T3500"]  # legacy cents
    assert (eth["market"], eth["underlying"], eth["result"], eth["settlement_value"]) == ("KXETHD", "ETH", "yes", 1.0)
    # the same answer again is no new version; a changed one is
    n.rest(NOW + S, "markets", json.dumps(page))
    assert rows(n) == []
    page["markets"][0]["close_time"] = "2026-11-26T22:30:00Z"
    n.rest(NOW + 2 * S, "market", json.dumps({"market": page["markets"][0]}))
    (v,) = rows(n)
    assert v["valid_from"] == NOW + 2 * S and v["close_ts"] == ns("2026-11-26T22:30:00Z")
    n.rest(NOW, "markets", "{not json")
    n.rest(NOW, "orders", "{}")
    assert n.c.skip_reasons == {"bad_rest_markets": 3, "unknown_rest": 1}  # the bad object twice, the bad page


def test_discovery_pages_keep_the_reference_fields_only():
    from engine.collect.kalshi.discovery import reference_page

    m = {"ticker": "KXBTC-X-B1", "status": "active", "floor_strike": 1, "yes_bid_dollars": "0.41", "yes_ask_size_fp": "3.00",
         "no_bid_dollars": "0.5", "last_price_dollars": "0.4", "previous_price_dollars": "0.3", "volume_fp": "9.00",
         "volume_24h_fp": "1.00", "open_interest_fp": "2.00", "liquidity_dollars": "5", "updated_time": "x",
         "settlement_value_dollars": "1.0000", "notional_value_dollars": "1.0000", "title": "t"}
    page = reference_page(json.dumps({"cursor": "", "markets": [m]}))
    assert json.loads(page)["markets"] == [{"ticker": "KXBTC-X-B1", "status": "active", "floor_strike": 1,
                                            "settlement_value_dollars": "1.0000", "notional_value_dollars": "1.0000",
                                            "title": "t"}]
    assert reference_page("{oops") == "{oops"


def test_underlying_of_series():
    assert [underlying_of(s) for s in ("KXBTC", "KXBTCD", "KXBTC15M", "KXETH", "KXETHD", "KXSOLD", "KXDOGE", "INXD")] == [
        "BTC", "BTC", "BTC", "ETH", "ETH", "SOL", "DOGE", None]


# ---- Kalshi: market_lifecycle_v2 -------------------------------------------------------------------------


def test_kalshi_lifecycle_versions_exact():
    tk = "KXBTC-26NOV2617-T99999.99"
    n = KalshiNormalizer()
    n.on_connect(NOW, conn=1, use_yes_price=False, series=["KXBTC"])
    t_open, t_close = NOW - 600 * S, NOW + 3000 * S
    n.feed(NOW, lifecycle(tk, "created", open_ts=t_open // S, close_ts=t_close // S, price_level_structure="linear_cent",
                          additional_metadata={"event_ticker": "KXBTC-26NOV2617", "title": "BTC above 99,999.99?",
                                               "strike_type": "greater", "floor_strike": 99999.99,
                                               "expected_expiration_ts": t_close // S + 300, "can_close_early": True}))
    n.feed(NOW + S, lifecycle("KXETH-26NOV2617-B3400", "determined", result="yes"))  # not a collected series
    moved = t_close - 1200 * S
    n.feed(NOW + 2 * S, lifecycle(tk, "close_date_updated", close_ts=moved // S))
    n.feed(NOW + 3 * S, lifecycle(tk, "deactivated", is_deactivated=True))
    n.feed(NOW + 4 * S, lifecycle(tk, "activated"))
    n.feed(NOW + 5 * S, lifecycle(tk, "determined", result="no", determination_ts=moved // S + 90,
                                  settlement_value="0.0000"))
    n.feed(NOW + 6 * S, lifecycle(tk, "settled", settled_ts=moved // S + 150))
    n.feed(NOW + 7 * S, lifecycle(tk, "settled", settled_ts=moved // S + 150))  # a duplicate: no new version
    n.feed(NOW + 8 * S, '{"type":"market_lifecycle_v2","sid":3,"msg":{"market_ticker":1}}')
    vs = rows(n)
    assert n.c.ignored_frames == 1 and n.c.skip_reasons == {"bad_market_lifecycle_v2": 1}
    assert [v["valid_from"] for v in vs] == [NOW + k * S for k in (0, 2, 3, 4, 5, 6)]
    first = vs[0]
    assert first == {**dict.fromkeys(REF_COLS), "valid_from": NOW, "source": "kalshi", "market": "KXBTC",
                     "instrument": tk, "kind": "binary", "quote": "USD", "underlying": "BTC", "tick_size": 0.01,
                     "status": "active", "strike_type": "greater", "floor_strike": 99999.99, "open_ts": t_open,
                     "close_ts": t_close, "expiration_ts": t_close + 300 * S, "title": "BTC above 99,999.99?"}
    assert vs[1]["close_ts"] == moved and {k: vs[1][k] for k in REF_COLS if k not in ("close_ts", "valid_from")} == {
        k: first[k] for k in REF_COLS if k not in ("close_ts", "valid_from")}
    assert [v["status"] for v in vs] == ["active", "active", "inactive", "active", "determined", "finalized"]
    det, fin = vs[4], vs[5]
    assert (det["result"], det["settlement_value"], det["settled_ts"]) == ("no", 0.0, None)
    assert (fin["result"], fin["settlement_value"], fin["settled_ts"]) == ("no", 0.0, moved + 150 * S)
    assert all(v["floor_strike"] == 99999.99 and v["cap_strike"] is None for v in vs)
    # integer settlement values are cents; a `created` before its open is `initialized`
    n.feed(NOW, lifecycle("KXBTC-X-B1", "created", open_ts=NOW // S + 60, close_ts=NOW // S + 120))
    n.feed(NOW, lifecycle("KXBTC-X-B2", "determined", result="yes", settlement_value=100))
    a, b = rows(n)
    assert (a["status"], b["result"], b["settlement_value"], b["status"]) == ("initialized", "yes", 1.0, "determined")


def test_kalshi_docs_lifecycle_example():
    """The documented `created` example (an S&P contract: no crypto underlying) read as recorded."""
    path = _shared("kalshi", "docs-examples.jsonl")
    if path is None:
        pytest.skip("shared fixtures not present")
    msgs = [json.loads(line)["message"] for line in path.read_text().splitlines() if line.strip()]
    created = next(m for m in msgs if m.get("type") == "market_lifecycle_v2")
    n = KalshiNormalizer()
    n.feed(NOW, json.dumps(created))
    (r,) = rows(n)
    assert (r["market"], r["instrument"], r["strike_type"], r["floor_strike"], r["cap_strike"]) == (
        "INXD", "INXD-23SEP14-B4487", "greater", 4487.0, None)
    assert (r["open_ts"], r["close_ts"], r["expiration_ts"]) == (1694635200 * S, 1694721600 * S, 1694721600 * S)
    assert (r["title"], r["underlying"], r["tick_size"], r["result"]) == (
        "S&P 500 closes up by 0.02% or more", None, 0.01, None)


# ---- Coinbase products -----------------------------------------------------------------------------------


def test_coinbase_product_answers():
    n = CoinbaseNormalizer()
    prod = {"id": "BTC-USD", "base_currency": "BTC", "quote_currency": "USD", "quote_increment": "0.01",
            "base_increment": "0.00000001", "display_name": "BTC-USD", "min_market_funds": "1", "status": "online",
            "trading_disabled": False}
    n.rest(NOW, "product", json.dumps(prod))
    (r,) = rows(n)
    assert r == {**dict.fromkeys(REF_COLS), "valid_from": NOW, "source": "coinbase", "market": "BTC-USD",
                 "instrument": "BTC-USD", "kind": "spot", "base": "BTC", "quote": "USD", "tick_size": 0.01,
                 "size_increment": 1e-8, "status": "online", "title": "BTC-USD"}
    old = {**prod, "id": "ETH-USD", "base_currency": "ETH", "base_min_size": "0.001", "quote_increment": "0.05"}
    n.rest(NOW + S, "products", json.dumps([prod, old, {"id": "X-USD"}]))
    (e,) = rows(n)  # BTC-USD unchanged; ETH-USD new (with the old API's base_min_size); X-USD refused
    assert (e["instrument"], e["tick_size"], e["min_size"]) == ("ETH-USD", 0.05, 0.001)
    assert n.c.skip_reasons == {"bad_rest_products": 1}


# ---- the lake: versions in force, restart ----------------------------------------------------------------


def _market_obj(tk: str, status: str, close_ns: int, **kw) -> dict:
    return {"ticker": tk, "event_ticker": tk.rsplit("-", 1)[0], "status": status, "strike_type": "between",
            "floor_strike": 97000, "cap_strike": 97499.99, "open_time": iso(close_ns - H), "close_time": iso(close_ns),
            "expected_expiration_time": iso(close_ns), "result": "",
            "price_ranges": [{"start": "0.0000", "end": "1.0000", "step": "0.0100"}], **kw}


def test_versions_in_force_at_a_time_and_restart(tmp_path):
    tk = "KXBTC-26NOV2617-B97250"
    t1 = NOW - 3 * H
    close = t1 + H
    page = json.dumps({"cursor": "", "markets": [_market_obj(tk, "active", close)]})
    cap = tmp_path / "cap"
    w = CaptureWriter(cap, "kalshi", compress=False)
    w.meta(t1, {"type": "connect", "source": "kalshi", "conn": 1, "use_yes_price": False, "series": ["KXBTC"]})
    w.meta(t1 + S, {"type": "rest", "name": "markets", "body": page})
    w.frame(close + 60 * S, lifecycle(tk, "determined", result="yes", settlement_value="1.0000",
                                      determination_ts=close // S + 60))
    w.frame(close + 90 * S, lifecycle(tk, "settled", settled_ts=close // S + 90))
    w.meta(close + 100 * S, {"type": "disconnect", "conn": 1, "reason": "shutdown"})
    w.close()
    home = tmp_path / "lake"
    eng = Engine.open(home, writer=True)
    try:
        st = ingest_files(eng, sorted(cap.glob("*.jsonl")), "kalshi", progress=False)
    finally:
        eng.close()
    assert st["rest_answers"] == 1 and st["instrument_versions"] == 3 and st["skipped_frames"] == 0
    eng = Engine.open(home)
    hist = eng.instruments(source="kalshi", history=True, raw_ns=True)
    assert hist["status"].to_list() == ["active", "determined", "finalized"]
    at = lambda t: eng.instruments(instrument=tk, at=t, raw_ns=True).row(0, named=True)  # noqa: E731
    assert eng.instruments(at=t1, raw_ns=True).is_empty()
    assert (at(t1 + S)["status"], at(t1 + S)["result"]) == ("active", None)
    assert (at(close + 60 * S)["status"], at(close + 60 * S)["result"]) == ("determined", "yes")
    assert at(close + 89 * S)["settled_ts"] is None and at(close + 90 * S)["settled_ts"] == close + 90 * S
    latest = eng.instruments(source="kalshi").row(0, named=True)
    assert latest["status"] == "finalized" and latest["result"] == "yes" and latest["settlement_value"] == 1.0
    assert eng.related("btc").select("source", "market", "kind", "key", "instruments").rows() == [
        ("kalshi", "KXBTC", "binary", "kalshi:KXBTC", 1)]
    assert eng.unsettled().is_empty()
    # in force one hour after it expired, the version had no result yet only until 60 s after close
    late = eng.unsettled(grace="30s", at=close + 45 * S, raw_ns=True)
    assert late["instrument"].to_list() == [tk] and late["hours_late"][0] == pytest.approx(45 / 3600)
    eng.close()
    # a restarted collector is seeded with the stored versions: the same answer stores nothing new
    w_eng = Engine.open(home, writer=True)
    try:
        norm = registry.get("kalshi").normalizer()
        registry.get("kalshi").seed(w_eng, norm)
        norm.rest(NOW, "markets", json.dumps({"markets": [
            _market_obj(tk, "finalized", close, result="yes", settlement_value_dollars="1.0000",
                        settlement_ts=iso(close + 90 * S))]}))
        assert norm.c.instrument_versions == 0
        assert norm.unresolved(NOW, NOW - 24 * H) == []
        norm.rest(NOW, "markets", json.dumps({"markets": [_market_obj("KXBTC-26NOV2617-B97750", "closed", close)]}))
        assert norm.c.instrument_versions == 1
        assert norm.unresolved(NOW, NOW - 24 * H) == ["KXBTC-26NOV2617-B97750"]  # asked for by ticker
    finally:
        w_eng.close()


# ---- live through the replay exchange == offline ingest --------------------------------------------------


def _run_collector(home: Path, srv, args: list[str], source: str, env=None, until=None, linger: float = 0.0) -> str:
    errf = home.parent / f"{home.name}-collector.err"
    with open(errf, "w") as ef:
        proc = subprocess.Popen(_cmd(home, *args), stdout=subprocess.DEVNULL, stderr=ef, text=True,
                                env=env or _env(), cwd=ROOT)
        try:
            _wait_read_all(home, srv, source)
            end = time.monotonic() + 20
            while until is not None and not until(_status(home, source)) and time.monotonic() < end:
                time.sleep(0.05)
            time.sleep(linger)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    err = errf.read_text()
    assert proc.returncode == 0, err[-3000:]
    return err


def _offline(tmp_path: Path, files, source: str) -> Path:
    home = tmp_path / "offline"
    eng = Engine.open(home, writer=True, book_anchors=True)
    try:
        ingest_files(eng, files, source, progress=False)
    finally:
        eng.close()
    return home


def _ref_rows(home: Path, source: str) -> list[tuple]:
    eng = Engine.open(home)
    try:
        df = eng.read("instruments", source=source, allow_unsealed=True, raw_ns=True)
        return sorted(df.with_columns(pl.col(c).cast(pl.Utf8) for c in ("source", "market", "instrument", "kind")).rows())
    finally:
        eng.close()


def test_coinbase_products_live_equals_offline(tmp_path):
    cap_recs = list(generate_coinbase(seconds=6, rate=60, seed=4, depth=20))
    home, cap = tmp_path / "live", tmp_path / "cap"
    with ReplayServer.run_in_thread(source="coinbase", capture=cap_recs, speed=0) as srv:
        # the real socket: the products endpoint of the replay exchange
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/products/ETH-USD", timeout=5) as r:
            assert json.loads(r.read())["quote_increment"] == "0.01"
        _run_collector(home, srv, ["--source", "coinbase", "--coinbase-url", srv.ws_url, "--coinbase-stall", "30",
                                   "--capture-dir", str(cap)], "coinbase",
                       until=lambda st: st.get("products_fetched", 0) >= 3)
        assert srv.stats()["rest_requests"] >= 3
    st = _status(home, "coinbase")
    assert st["products_fetched"] == 3 and st["instrument_versions"] == 3 and st["skip_reasons"] == {}
    eng = Engine.open(home)
    ref = eng.instruments(source="coinbase")
    eng.close()
    assert ref.select("instrument", "kind", "base", "quote", "tick_size", "size_increment", "min_size", "status").rows() == [
        ("BTC-USD", "spot", "BTC", "USD", 0.01, 1e-8, None, "online"),
        ("ETH-USD", "spot", "ETH", "USD", 0.01, 1e-8, None, "online"),
        ("SOL-USD", "spot", "SOL", "USD", 0.01, 1e-8, None, "online")]
    files = sorted(cap.glob("coinbase-*.jsonl.zst"))
    offline = _offline(tmp_path, files, "coinbase")
    assert _ref_rows(home, "coinbase") == _ref_rows(offline, "coinbase")  # valid_from (receive time) included


def test_kalshi_contracts_settle_live_equals_offline(tmp_path):
    from engine.collect.kalshi.auth import generate_keypair

    priv, pub = generate_keypair(tmp_path / "keys", bits=2048)
    start = (NOW - 600 * S) // (120 * S) * (120 * S) + 30 * S  # contracts close 90 s and 210 s in
    recs = list(generate_kalshi(series=["KXBTC"], seconds=300, rate=20, seed=8, contract_minutes=2, strikes=3,
                                start_ns=start))
    home, cap = tmp_path / "live", tmp_path / "cap"
    env = _env(KALSHI_API_KEY_ID="0f6a1c9e-test-key", KALSHI_PRIVATE_KEY_PATH=str(priv))
    with ReplayServer.run_in_thread(source="kalshi", capture=recs, speed=30.0, kalshi_public_key=str(pub)) as srv:
        _run_collector(home, srv, ["--source", "kalshi", "--series", "KXBTC", "--kalshi-url", srv.ws_url,
                                   "--kalshi-rest-url", srv.rest_url, "--discovery-interval", "0.2",
                                   "--capture-dir", str(cap)], "kalshi", env=env)
        # the exchange's REST answer agrees: settled contracts show status, result and settlement
        with urllib.request.urlopen(f"{srv.rest_url}/markets?series_ticker=KXBTC&status=settled", timeout=5) as r:
            settled_rest = {m["ticker"]: m for m in json.loads(r.read())["markets"]}
    st = _status(home, "kalshi")
    assert st["skipped_frames"] == 0 and st["rest_answers"] > 3 and st["instrument_versions"] > 6, st
    assert st["rest_unchanged"] > 0  # polls that found nothing new were neither recorded nor normalized
    eng = Engine.open(home)
    ref = eng.instruments(source="kalshi", raw_ns=True)
    eng.close()
    done = ref.filter(pl.col("settled_ts").is_not_null())
    assert done.height >= 6, ref  # two events of three contracts closed and settled during the capture
    assert set(done["status"]) == {"finalized"} and set(done["result"]) <= {"yes", "no"}
    assert set(done["underlying"]) == {"BTC"} and (done["expiration_ts"] <= done["settled_ts"]).all()
    for _, ev in done.group_by(pl.col("instrument").str.extract(r"^(.*)-B\d+$")):
        assert (ev["result"] == "yes").sum() <= 1  # one expiration value per event: at most one range holds it
        assert (ev["settlement_value"] == (ev["result"] == "yes").cast(pl.Float64)).all()
    assert set(done["instrument"]) <= set(settled_rest)
    for r in done.iter_rows(named=True):
        m = settled_rest[r["instrument"]]
        assert m["status"] == "finalized" and m["result"] == r["result"]
    files = sorted(cap.glob("kalshi-*.jsonl*"))
    offline = _offline(tmp_path, files, "kalshi")
    assert _ref_rows(home, "kalshi") == _ref_rows(offline, "kalshi")


class _NoResults(ReplayServer):
    """A replay exchange whose lifecycle channel loses every determination and settlement (the REST
    answers still know them): the collector must ask for the results by ticker."""

    lost = 0

    class conn_cls(ReplayServer.conn_cls):  # noqa: N801
        def put(self, item) -> None:
            if isinstance(item, str) and '"market_lifecycle_v2"' in item and (
                    '"determined"' in item or '"settled"' in item):
                _NoResults.lost += 1
                return
            super().put(item)


def test_kalshi_results_asked_by_ticker_when_the_lifecycle_misses_them(tmp_path):
    from engine.collect.kalshi.auth import generate_keypair

    priv, pub = generate_keypair(tmp_path / "keys", bits=2048)
    start = (NOW - 900 * S) // (120 * S) * (120 * S) + 30 * S  # contracts closed minutes ago (times as recorded)
    recs = list(generate_kalshi(series=["KXBTC"], seconds=300, rate=20, seed=9, contract_minutes=2, strikes=3,
                                start_ns=start))
    want = {}
    for r in recs:
        if "market_lifecycle_v2" in (r.get("frame") or ""):
            m = json.loads(r["frame"])["msg"]
            if m.get("event_type") == "determined":  # (the subscribed ack names the channel too)
                want[m["market_ticker"]] = m["result"]
    home, cap = tmp_path / "live", tmp_path / "cap"
    env = _env(KALSHI_API_KEY_ID="0f6a1c9e-test-key", KALSHI_PRIVATE_KEY_PATH=str(priv))
    with _NoResults.run_in_thread(source="kalshi", capture=recs, speed=30.0, kalshi_public_key=str(pub),
                                  at_present=False) as srv:
        _run_collector(home, srv, ["--source", "kalshi", "--series", "KXBTC", "--kalshi-url", srv.ws_url,
                                   "--kalshi-rest-url", srv.rest_url, "--discovery-interval", "0.2",
                                   "--capture-dir", str(cap)], "kalshi", env=env, linger=1.5)
    assert _NoResults.lost >= 2 * len(want) >= 12
    st = _status(home, "kalshi")
    assert st["results_polled"] > 0 and st["skipped_frames"] == 0, st
    eng = Engine.open(home)
    ref = eng.instruments(source="kalshi", raw_ns=True)
    eng.close()
    got = {r["instrument"]: r for r in ref.iter_rows(named=True) if r["instrument"] in want}
    assert set(got) == set(want)
    assert {t: r["result"] for t, r in got.items()} == want
    assert {r["status"] for r in got.values()} == {"finalized"} and all(r["settled_ts"] for r in got.values())
    offline = _offline(tmp_path, sorted(cap.glob("kalshi-*.jsonl*")), "kalshi")
    assert _ref_rows(home, "kalshi") == _ref_rows(offline, "kalshi")


# ---- generated captures (the demo's) ---------------------------------------------------------------------


def test_demo_capture_settles_contracts(tmp_path):
    """The capture `./scripts/run --demo` generates for Kalshi (its registry demo options): contracts
    close, are determined and settle within the demo's minutes."""
    from engine.sim import capture_gen
    from engine.sim import registry as sim_registry

    out = tmp_path / "kalshi-now.jsonl.zst"
    capture_gen.cli(["--source", "kalshi", "--minutes", "5", "--start", str(NOW - 600 * S), "--out", str(out),
                     *sim_registry.get("kalshi").demo_args])
    home = tmp_path / "lake"
    eng = Engine.open(home, writer=True)
    try:
        ingest_files(eng, [out], "kalshi", progress=False)
    finally:
        eng.close()
    eng = Engine.open(home)
    ref = eng.instruments(source="kalshi")
    eng.close()
    settled = ref.filter(pl.col("status") == "finalized")
    assert settled.height >= 12 and settled["result"].null_count() == 0, ref  # 3 series, 4 contracts, >= 1 event each
    assert set(settled["market"]) == {"KXBTC", "KXETH", "KXSOL"}
    assert ref.filter(pl.col("result") == "yes").height >= 1


# ---- Dagster: the instruments asset, its settlement check, the sensor -------------------------------------


def _ref_table(rows_: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows_, schema=INSTRUMENTS_SCHEMA)


def _contract(tk: str, valid_from: int, expiration: int, **kw) -> dict:
    return {"valid_from": valid_from, "source": "kalshi", "market": tk.split("-")[0], "instrument": tk,
            "kind": "binary", "quote": "USD", "underlying": "BTC", "expiration_ts": expiration,
            "close_ts": expiration, "status": "active", **kw}


def test_instruments_asset_and_settlement_check(tmp_path):
    from engine_defs.reference import instruments, reference_sensor, settlement_check
    from engine_defs.resources import EngineResource

    home = tmp_path / "h"
    eng = Engine.open(home, writer=True, background=False)
    eng.append("instruments", _ref_table([
        _contract("KXBTC-A-B1", NOW - 9 * H, NOW - 8 * H),  # expired 8 h ago, no result: late
        _contract("KXBTC-A-B2", NOW - 9 * H, NOW - 8 * H),
        _contract("KXBTC-A-B2", NOW - 8 * H + 90 * S, NOW - 8 * H, status="finalized", result="no",
                  settlement_value=0.0, settled_ts=NOW - 8 * H + 90 * S),
        _contract("KXBTC-C-B1", NOW - 2 * H, NOW - H),  # expired 1 h ago: within the grace
        {"valid_from": NOW - 2 * H, "source": "coinbase", "market": "BTC-USD", "instrument": "BTC-USD", "kind": "spot",
         "base": "BTC", "quote": "USD", "tick_size": 0.01},
    ]))
    eng.flush()
    res = EngineResource(home=str(home))
    with dg.instance_for_test() as inst:
        with dg.build_sensor_context(instance=inst, resources={"engine": res}) as ctx:
            first = reference_sensor(ctx)
        assert [r.run_key.split("|")[0] for r in first.run_requests] == ["instruments"]
        with dg.build_sensor_context(instance=inst, cursor=first.cursor, resources={"engine": res}) as ctx:
            again = reference_sensor(ctx)
        assert not again.run_requests  # nothing new since the cursor
        run = dg.materialize([instruments, settlement_check], instance=inst, resources={"engine": res})
        (mat,) = run.get_asset_materialization_events()
        md = mat.materialization.metadata
        assert md["versions"].value == 5 and md["instruments"].value == 4
        assert md["instruments_per_source"].value == {"coinbase": 1, "kalshi": 3}
        assert md["resolved_contracts"].value == 1 and md["uploaded_files"].value >= 2
        assert md["latest_valid_from"].value == pytest.approx((NOW - 2 * H) / 1e9)
        (chk,) = run.get_asset_check_evaluations()
        assert not chk.passed and chk.severity == dg.AssetCheckSeverity.WARN
        assert chk.metadata["unsettled"].value == 1 and "KXBTC-A-B1" in chk.metadata["unsettled_contracts"].value
        assert "KXBTC-A-B2" not in chk.metadata["unsettled_contracts"].value
        # the result arrives: a new raw file, the sensor asks for a run, the check passes
        eng.append("instruments", _ref_table([_contract("KXBTC-A-B1", NOW - 7 * H, NOW - 8 * H, status="finalized",
                                                        result="yes", settlement_value=1.0, settled_ts=NOW - 7 * H)]))
        eng.flush()
        with dg.build_sensor_context(instance=inst, cursor=first.cursor, resources={"engine": res}) as ctx:
            third = reference_sensor(ctx)
        assert len(third.run_requests) == 1 and third.run_requests[0].run_key != first.run_requests[0].run_key
        run = dg.materialize([instruments, settlement_check], instance=inst, resources={"engine": res})
        (chk,) = run.get_asset_check_evaluations()
        assert chk.passed and chk.metadata["unsettled"].value == 0
        # loadable by name through the lake IO manager: every version, as eng.instruments(history=True)
        from engine_tests.test_dagster_io import defs_for

        with defs_for(res).get_asset_value_loader(instance=inst) as loader:
            v = loader.load_asset_value("instruments")
        assert v.height == 6 and v.equals(eng.instruments(history=True))
    eng.close()
