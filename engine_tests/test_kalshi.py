"""Kalshi normalization: demo/production frames (the recordings in ../shared when present, the
project's hand-written samples otherwise), exact dollar prices, seq gaps, legacy fields."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from engine.collect.timestamps import parse_ts
from engine.collect.kalshi.discovery import fetch_markets, open_tickers
from engine.collect.kalshi.normalize import KalshiNormalizer
from engine.collect.kalshi.wire import p4, q2
from engine_tests import exchange_fixtures as fx

T0 = 1_795_712_400_000_000_000
TK = "KXBTC-26NOV2617-B97500"


def snap(seq, yes=None, no=None, tk=TK, sid=1, **extra):
    msg = {"market_ticker": tk, "market_id": "m"}
    if yes is not None:
        msg["yes_dollars_fp"] = yes
    if no is not None:
        msg["no_dollars_fp"] = no
    return json.dumps({"type": "orderbook_snapshot", "sid": sid, "seq": seq, "msg": msg, **extra})


def delta(seq, price, d, side, tk=TK, sid=1, ts_ms=T0 // 10**6):
    return json.dumps({"type": "orderbook_delta", "sid": sid, "seq": seq, "msg": {
        "market_ticker": tk, "market_id": "m", "price_dollars": price, "delta_fp": d, "side": side, "ts_ms": ts_ms}})


def ack(sid, ch, cid=1):
    return json.dumps({"id": cid, "type": "subscribed", "msg": {"channel": ch, "sid": sid}})


def book_of(n: KalshiNormalizer, t: str):
    bids, asks = n.books[t]
    return dict(bids), dict(asks)


# ---- a demo capture: snapshot + deltas == later get_snapshot --------------------------------------


def test_demo_snapshot_plus_deltas_reproduce_get_snapshot():
    sample = fx.kalshi_get_snapshot()
    lines, facts = sample.items, sample.facts
    n = KalshiNormalizer()
    n.on_connect(parse_ts(lines[0]["recv_at"]), conn=1, use_yes_price=True)  # the capturing client set it
    checked = 0
    all_rows = []
    for o in lines:
        if o["dir"] != "recv":
            continue
        f = o["frame"]
        if f.get("type") == "orderbook_snapshot" and f.get("id") == 2:
            # the get_snapshot answer: our book (snapshot seq 1-3 + deltas) must equal it exactly
            t = f["msg"]["market_ticker"]
            want_bids = {p4(p): q2(q) for p, q in f["msg"].get("yes_dollars_fp", [])}
            want_asks = {p4(p): q2(q) for p, q in f["msg"].get("no_dollars_fp", [])}
            assert book_of(n, t) == (want_bids, want_asks), t
            checked += 1
            # and the absolute-size rows we wrote rebuild the same book
            rows = [r for r in all_rows if r["instrument"] == t]
            rb: dict = {}
            for r in rows:
                if r["snapshot"] and (not rb.get("_snap") or rb["_snap"] != r["seq"]):
                    rb = {"_snap": r["seq"]}
                elif not r["snapshot"]:
                    rb["_snap"] = None
                k = (r["side"], r["price"])
                if r["size"] == 0:
                    rb.pop(k, None)
                else:
                    rb[k] = r["size"]
            rb.pop("_snap", None)
            want = {("bid", float(Decimal(p))): float(Decimal(q)) for p, q in f["msg"].get("yes_dollars_fp", [])}
            want.update({("ask", float(Decimal(p))): float(Decimal(q)) for p, q in f["msg"].get("no_dollars_fp", [])})
            assert rb == want, t
        n.feed(parse_ts(o["recv_at"]), json.dumps(f))
        out = n.take()
        if "l2" in out:
            all_rows += out["l2"].to_pylist()
    assert checked == facts["answers"]
    assert n.c.skipped_frames == 0 and n.c.gaps == 0
    # a delta moves a level, never a delta-valued size: the first delta's row holds the level's new size
    d0 = next(r for r in all_rows if not r["snapshot"])
    assert (d0["side"], d0["price"], d0["size"]) == facts["first_delta"]
    # delta rows carry ts_ms, snapshot rows the receive time
    assert d0["ts"] == facts["first_delta_ts_ms"] * 10**6


def test_prod_samples_unsolicited_empty_snapshot_resets_book():
    sample = fx.kalshi_wire_samples()
    lines, facts = sample.items, sample.facts
    n = KalshiNormalizer()
    n.on_connect(parse_ts(lines[1]["recv_at"]), conn=1, use_yes_price=True)
    for o in lines:
        if o["dir"] == "recv":
            n.feed(parse_ts(o["recv_at"]), json.dumps(o["frame"]))
    # sampled file: seq jumps are expected (gaps recorded), never a crash
    assert n.c.skipped_frames == 0
    assert n.c.rows_trades > 0 and n.c.ignored_frames > 0  # trades stored, tickers ignored
    t, seq = facts["emptied"]
    assert n.books[t] == ({}, {})  # the ladderless mid-stream snapshot replaced the book
    out = n.take()
    rows = [r for r in out["l2"].to_pylist() if r["instrument"] == t and r["seq"] == seq]
    assert rows and all(r["snapshot"] and r["size"] == 0.0 for r in rows)  # reset marker rows
    assert {r["market"] for r in out["l2"].to_pylist()} >= facts["markets"]
    # no crossed book anywhere
    for tk, (bids, asks) in n.books.items():
        if bids and asks:
            assert max(bids) < min(asks), tk


def test_demo_wire_error_frame_counted_and_reported():
    sample = fx.kalshi_error_samples()
    lines = sample.items
    n = KalshiNormalizer()
    for o in lines:
        if o["dir"] == "recv":
            n.feed(parse_ts(o["recv_at"]), json.dumps(o["frame"]))
    assert n.c.errors == 1 and n.c.skipped_frames == 0
    errs = [a for a in n.pop_actions() if a.kind == "error"]
    assert errs and errs[0].args["code"] == sample.facts["error_code"]


def test_prod_trades_legacy_and_fp_fields():
    lines = fx.kalshi_trades().items
    n = KalshiNormalizer()
    for o in lines:
        n.feed(o["msg"]["ts"] * 10**9 + 5 * 10**8, json.dumps(o))  # received just after the trade
    t = n.take()["trades"].to_pylist()
    assert len(t) == len(lines)
    for r, o in zip(t, lines):
        m = o["msg"]
        assert r["price"] == float(Decimal(m["yes_price_dollars"]))
        assert r["size"] == float(Decimal(m["count_fp"]))
        assert r["side"] == {"yes": "buy", "no": "sell"}[m["taker_side"]]
        assert r["market"] == m["market_ticker"].split("-")[0] and r["instrument"] == m["market_ticker"]
        assert r["trade_id"] == m["trade_id"]
        assert r["ts"] == (m["ts_ms"] * 10**6 if "ts_ms" in m else m["ts"] * 10**9)


def test_docs_legacy_cent_fields():
    sample = fx.kalshi_legacy_cents()
    lines, facts = sample.items, sample.facts
    legacy = [o["message"] for o in lines if "legacy" in o["kind"]]
    snap_l = next(m for m in legacy if m["type"] == "orderbook_snapshot")
    delta_l = next(m for m in legacy if m["type"] == "orderbook_delta")
    for m in (snap_l, delta_l):  # strip the _fp forms: the integer-cent ones must suffice
        for k in [k for k in m["msg"] if k.endswith("_fp") or k.endswith("_dollars") or k == "price_dollars"]:
            del m["msg"][k]
    n = KalshiNormalizer()
    recv = parse_ts(delta_l["msg"]["ts"]) + 10**6  # legacy delta: RFC 3339 `ts`, no ts_ms
    n.feed(recv, json.dumps(snap_l))
    n.feed(recv, json.dumps(delta_l))
    bids, asks = n.books[facts["ticker"]]
    assert bids == facts["bids"]
    assert asks == facts["asks"]  # use_yes_price default false: a NO bid at x is an ask at 1 - x
    assert n.c.skipped_rows == 0 and n.c.skipped_frames == 0
    # the delta's row: its level, removed (size 0)
    rows = n.take()["l2"].to_pylist()
    assert (rows[-1]["price"], rows[-1]["size"]) == facts["last_row"]


# ---- exact prices and use_yes_price ---------------------------------------------------------------------


@pytest.mark.parametrize("use_yes", [False, True])
def test_no_side_mapping_exact(use_yes):
    n = KalshiNormalizer()
    n.on_connect(T0, conn=1, use_yes_price=use_yes)
    n.feed(T0, ack(1, "orderbook_delta"))
    no_px = "0.9300" if not use_yes else "0.0700"  # the same NO bid in both conventions
    n.feed(T0, snap(1, yes=[["0.0500", "10.00"]], no=[[no_px, "47.03"]]))
    n.feed(T0, delta(2, no_px, "-0.03", "no"))
    rows = n.take()["l2"].to_pylist()
    ask = [r for r in rows if r["side"] == "ask"]
    assert [r["price"] for r in ask] == [0.07, 0.07]
    assert ask[0]["price"] == float("0.07") and 1 - 0.93 != 0.07  # the drift this avoids
    assert [r["size"] for r in ask] == [47.03, 47.0]
    bid = [r for r in rows if r["side"] == "bid"]
    assert bid[0]["price"] == 0.05 and bid[0]["snapshot"]


def test_meta_less_default_is_use_yes_price_false():
    n = KalshiNormalizer()
    n.feed(T0, snap(1, no=[["0.4000", "1.00"]]))
    assert n.take()["l2"].column("price").to_pylist() == [0.6]


# ---- sequence handling ---------------------------------------------------------------------------------------


def test_seq_jump_gap_get_snapshot_and_resume():
    n = KalshiNormalizer(series=["KXBTC"])
    n.on_connect(T0, conn=1, use_yes_price=False)
    n.feed(T0, ack(1, "orderbook_delta"))
    n.feed(T0, ack(2, "trade"))
    n.feed(T0, snap(1, yes=[["0.4000", "5.00"]]))
    n.feed(T0 + 1, delta(2, "0.4000", "1.00", "yes"))
    n.feed(T0 + 2, delta(5, "0.4000", "1.00", "yes"))  # 3, 4 lost
    acts = n.pop_actions()
    assert [(a.kind, a.args["sid"], a.args["tickers"]) for a in acts] == [("get_snapshot", 1, [TK])]
    n.feed(T0 + 3, delta(6, "0.4000", "1.00", "yes"))  # still invalid: skipped
    n.feed(T0 + 4, snap(7, yes=[["0.4000", "9.00"]], id=2))
    n.feed(T0 + 5, delta(8, "0.4000", "-9.00", "yes"))
    out = n.take()
    g = out["gaps"].to_pylist()
    assert len(g) == 1 and g[0]["kind"] == "sequence" and g[0]["market"] == "KXBTC"
    assert (g[0]["start_ts"], g[0]["end_ts"]) == (T0 + 1, T0 + 2)
    rows = [(r["snapshot"], r["size"], r["seq"]) for r in out["l2"].to_pylist()]
    assert rows == [(True, 5.0, 1), (False, 6.0, 2), (True, 9.0, 7), (False, 0.0, 8)]
    assert n.c.skipped_rows == 2
    # trade sid sequence independent of the orderbook sid
    n.feed(T0, json.dumps({"type": "trade", "sid": 2, "seq": 1, "msg": {"trade_id": "a", "market_ticker": TK,
           "yes_price_dollars": "0.4000", "count_fp": "1.00", "taker_side": "no", "ts_ms": T0 // 10**6}}))
    assert n.take()["trades"].column("side").to_pylist() == ["sell"] and n.c.gaps == 1


def test_meta_less_seq_restart_is_new_connection():
    n = KalshiNormalizer(series=["KXBTC"])
    n.feed(T0, ack(1, "orderbook_delta"))
    n.feed(T0, snap(1, yes=[["0.4000", "5.00"]]))
    n.feed(T0 + 1, delta(2, "0.4000", "1.00", "yes"))
    n.feed(T0 + 9, ack(1, "orderbook_delta"))
    n.feed(T0 + 9, snap(1, yes=[["0.3000", "5.00"]]))
    g = n.take()["gaps"].to_pylist()
    assert [r["kind"] for r in g] == ["disconnect"] and g[0]["start_ts"] == T0 + 1 and g[0]["end_ts"] == T0 + 9
    assert n.books[TK] == ({3000: 500}, {})


def test_delete_markets_ok_drops_book():
    n = KalshiNormalizer()
    n.on_connect(T0, conn=1)
    n.feed(T0, ack(1, "orderbook_delta"))
    n.feed(T0, snap(1, yes=[["0.4000", "5.00"]]))
    other = "KXBTC-26NOV2618-B98000"
    n.feed(T0, snap(2, yes=[["0.2000", "5.00"]], tk=other))
    assert TK in n.books and other in n.books
    n.feed(T0, json.dumps({"id": 3, "sid": 1, "seq": 3, "type": "ok", "msg": {"market_tickers": [other]}}))
    assert TK not in n.books and other in n.books
    assert TK not in n.valid and other in n.valid


def test_bad_kalshi_frames():
    n = KalshiNormalizer()
    n.on_connect(T0, conn=1)
    n.feed(T0, snap(1, yes=[["0.4000", "5.00"]]))
    for f in ["nope", '{"type":"orderbook_delta","sid":1,"seq":,"msg":{}}', "[1, 2, 3", '{"type":"weird"}',
              '{"type":"ticker","sid":2,"msg":{}}']:
        n.feed(T0, f)
    assert n.c.skipped_frames == 4 and n.c.ignored_frames == 1
    n.feed(T0, delta(2, "1.5000", "1.00", "yes"))  # price out of range: skipped, book resynced
    n.feed(T0, delta(3, "0.4000", "1.00", "maybe"))
    assert n.c.skipped_frames == 6
    assert any(a.kind == "get_snapshot" for a in n.pop_actions())
    n.feed(T0, delta(4, "0.4000", "NaN", "yes"))
    assert n.c.skipped_frames == 7
    assert n.take()["l2"].num_rows == 1


# ---- discovery helpers ----------------------------------------------------------------------------------------


def test_open_tickers_filters_series_prefix_and_status():
    mk = [
        {"ticker": "KXBTC-26NOV2617-B1", "status": "active", "open_time": "2026-11-26T16:00:00Z", "close_time": "2026-11-26T17:00:00Z"},
        {"ticker": "KXBTCD-26NOV2617-T1", "status": "active"},
        {"ticker": "KXBTC-26NOV2616-B1", "status": "closed"},
        {"ticker": "KXBTC-26NOV2618-B1", "status": "initialized"},
    ]
    assert open_tickers(mk, "KXBTC") == {"KXBTC-26NOV2617-B1"}
    now = parse_ts("2026-11-26T17:30:00Z") / 1e9
    assert open_tickers(mk, "KXBTC", now) == set()


def test_fetch_markets_follows_cursor():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            cur = "c2" if "cursor=" not in self.path else ""
            body = json.dumps({"markets": [{"ticker": f"KXBTC-X-{len(seen)}", "status": "active"}], "cursor": cur}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        mk = fetch_markets(f"http://127.0.0.1:{srv.server_port}/trade-api/v2", "KXBTC", timeout=5)
    finally:
        srv.shutdown()
    assert [m["ticker"] for m in mk] == ["KXBTC-X-1", "KXBTC-X-2"]
    assert "series_ticker=KXBTC" in seen[0] and "cursor=c2" in seen[1]
