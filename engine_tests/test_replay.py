"""Replay exchange, capture generator and Kalshi auth, driven by a raw websockets client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as _connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.collect import kalshi_auth as ka
from engine.sim.capture_gen import (
    generate_coinbase,
    generate_kalshi,
    kalshi_markets,
    read_capture,
    write_capture,
)
from engine.sim.replay import ReplayServer, parse_fault
from engine_tests.exchange_fixtures import coinbase_wire_frames, kalshi_wire_samples

PRODUCTS = ["BTC-USD", "ETH-USD", "SOL-USD"]
NUM = re.compile(r"^(0|[1-9]\d*)(\.\d*[1-9])?$")  # trimmed decimal string
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cb_capture():
    return list(generate_coinbase(PRODUCTS, seconds=40, rate=100, seed=3, depth=40))


@pytest.fixture(scope="module")
def k_capture():
    return list(generate_kalshi(seconds=300, rate=30, seed=5, contract_minutes=2, strikes=3))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub = ka.generate_keypair(d)
    other_priv, _ = ka.generate_keypair(d, name="other")
    return ka.load_private_key(priv), pub, ka.load_private_key(other_priv)


def connect(*a, **kw):
    # a client that stops reading cannot see the server's close frame behind queued data: keep exits short
    kw.setdefault("close_timeout", 1)
    return _connect(*a, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 45))


async def recv_json(ws, timeout=2.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def cb_subscribe(ws, products=PRODUCTS):
    for ch in ("level2", "market_trades"):
        await ws.send(json.dumps({"type": "subscribe", "product_ids": products, "channel": ch}))
    await ws.send(json.dumps({"type": "subscribe", "channel": "heartbeats"}))


async def drain(ws, idle=0.5, limit=100000):
    """Read frames until the server is quiet for `idle` s; returns raw texts."""
    out = []
    while len(out) < limit:
        try:
            out.append(await asyncio.wait_for(ws.recv(), idle))
        except TimeoutError:
            break
    return out


def apply_cb(book, d):
    for ev in d["events"]:
        b = book.setdefault(ev["product_id"], {"bid": {}, "offer": {}})
        if ev["type"] == "snapshot":
            b["bid"].clear()
            b["offer"].clear()
        for u in ev["updates"]:
            side = b[u["side"]]
            if Decimal(u["new_quantity"]) == 0:
                side.pop(Decimal(u["price_level"]), None)
            else:
                side[Decimal(u["price_level"])] = Decimal(u["new_quantity"])


# ---------------------------------------------------------------------------------------------- auth


def test_kalshi_auth_sign_verify(keys):
    priv, pub_path, other = keys
    pub = ka.load_public_key(pub_path)
    h = ka.sign_headers("key-1", priv, "GET", "/trade-api/ws/v2?x=1", now_ms=1_800_000_000_000)
    assert set(h) == {ka.HDR_KEY, ka.HDR_TS, ka.HDR_SIG} and h[ka.HDR_TS] == "1800000000000"
    ka.verify_headers(h, pub, "GET", "/trade-api/ws/v2", now_ms=1_800_000_000_500)
    lower = {k.lower(): v for k, v in h.items()}
    ka.verify_headers(lower, pub, "get", "/trade-api/ws/v2", now_ms=1_800_000_000_500)
    with pytest.raises(ka.KalshiAuthError, match="signature"):
        ka.verify_headers(h, pub, "GET", "/trade-api/v2/markets", now_ms=1_800_000_000_500)
    with pytest.raises(ka.KalshiAuthError, match="server time"):
        ka.verify_headers(h, pub, "GET", "/trade-api/ws/v2", now_ms=1_800_000_900_000)
    with pytest.raises(ka.KalshiAuthError, match="missing"):
        ka.verify_headers({ka.HDR_KEY: "k"}, pub, "GET", "/trade-api/ws/v2")
    bad = ka.sign_headers("key-1", other, "GET", "/trade-api/ws/v2", now_ms=1_800_000_000_000)
    with pytest.raises(ka.KalshiAuthError):
        ka.verify_headers(bad, pub, "GET", "/trade-api/ws/v2", now_ms=1_800_000_000_000)
    with pytest.raises(ka.KalshiAuthError, match="base64"):
        ka.verify_headers({**h, ka.HDR_SIG: "%%%"}, pub, "GET", "/trade-api/ws/v2", now_ms=1_800_000_000_000)
    assert os.stat(Path(pub_path).parent / "kalshi-private.pem").st_mode & 0o077 == 0


# ---------------------------------------------------------------------------------------------- generator


def test_generator_deterministic(tmp_path):
    for src in ("coinbase", "kalshi"):
        from engine.sim.capture_gen import cli

        a, b, c = (tmp_path / f"{src}-{i}.jsonl.zst" for i in range(3))
        args = ["--source", src, "--seconds", "20", "--rate", "50", "--contract-minutes", "1"]
        assert cli(args + ["--seed", "7", "--out", str(a)]) == 0
        assert cli(args + ["--seed", "7", "--out", str(b)]) == 0
        assert cli(args + ["--seed", "8", "--out", str(c)]) == 0
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()
        recs = list(read_capture(a))
        assert recs[0]["meta"]["type"] == "connect" and recs[0]["meta"]["source"] == src
        assert all("frame" in r and isinstance(r["frame"], str) for r in recs[1:])
        assert [r["recv_ns"] for r in recs] == sorted(r["recv_ns"] for r in recs)


def _fixture_cb_frames():
    """Received frames: the real recording in ../shared when present, the project's hand-written sample otherwise."""
    return coinbase_wire_frames().items


def _cb_shapes(frames):
    shapes = {}
    for d in frames:
        ch = d["channel"]
        s = shapes.setdefault(ch, {"env": set(), "ev": set(), "item": set()})
        s["env"] |= set(d)
        for ev in d["events"]:
            s["ev"] |= set(ev)
            for k in ("updates", "trades"):
                for it in ev.get(k, []):
                    s["item"] |= set(it)
    return shapes


def test_generator_coinbase_protocol(cb_capture):
    frames = [json.loads(r["frame"]) for r in cb_capture if "frame" in r]
    assert [d["sequence_num"] for d in frames] == list(range(len(frames)))
    seen_snap, last_tid, hb = set(), {}, []
    for d in frames:
        assert TS_RE.match(d["timestamp"])
        assert isinstance(d["sequence_num"], int)
        if d["channel"] == "l2_data":
            (ev,) = d["events"]
            if ev["type"] == "snapshot":
                seen_snap.add(ev["product_id"])
            else:
                assert ev["product_id"] in seen_snap, "update before snapshot"
                assert len({u["event_time"] for u in ev["updates"]}) == 1
            for u in ev["updates"]:
                assert u["side"] in ("bid", "offer")
                assert NUM.match(u["price_level"]) and NUM.match(u["new_quantity"])
                assert TS_RE.match(u["event_time"])
        elif d["channel"] == "market_trades":
            for ev in d["events"]:
                trades = ev["trades"] if ev["type"] == "update" else list(reversed(ev["trades"]))
                for t in trades:
                    assert t["side"] in ("BUY", "SELL") and NUM.match(t["price"]) and NUM.match(t["size"])
                    tid = int(t["trade_id"])
                    assert tid > last_tid.get(t["product_id"], -1)
                    last_tid[t["product_id"]] = tid
        elif d["channel"] == "heartbeats":
            hb.append(d["events"][0]["heartbeat_counter"])
            assert isinstance(hb[-1], int)
    assert seen_snap == set(PRODUCTS)
    assert hb == list(range(hb[0], hb[0] + len(hb))) and 35 <= len(hb) <= 41
    # variable fractional digits with trailing zeros trimmed
    digits = {len(u["event_time"].split(".")[1]) - 1 for d in frames if d["channel"] == "l2_data"
              for u in d["events"][0]["updates"] if "." in u["event_time"]}
    assert len(digits) > 1
    # the book is never crossed
    book = {}
    for d in frames:
        if d["channel"] == "l2_data":
            apply_cb(book, d)
            b = book[d["events"][0]["product_id"]]
            assert max(b["bid"]) < min(b["offer"])
    # same field sets as the real recording (or the project's hand-written sample of the wire format)
    real = _cb_shapes([f for f in _fixture_cb_frames() if f["channel"] in ("l2_data", "market_trades",
                                                                             "heartbeats", "subscriptions")])
    mine = _cb_shapes(frames)
    for ch in ("l2_data", "market_trades", "heartbeats", "subscriptions"):
        assert mine[ch] == real[ch], ch


def test_generator_kalshi_protocol(k_capture):
    recs = [r for r in k_capture if "frame" in r]
    frames = [json.loads(r["frame"]) for r in recs]
    seqs = {}
    books = {}
    kinds = {}
    for d in frames:
        kinds.setdefault(d["type"], set()).update(d.get("msg", {}) if isinstance(d.get("msg"), dict) else ())
        if "seq" in d:
            assert d["seq"] == seqs.get(d["sid"], 0) + 1
            seqs[d["sid"]] = d["seq"]
        m = d.get("msg", {})
        if d["type"] == "orderbook_snapshot":
            books[m["market_ticker"]] = {s: {p: Decimal(q) for p, q in m.get(f"{s}_dollars_fp", [])}
                                         for s in ("yes", "no")}
            for s in ("yes", "no"):
                for p, q in m.get(f"{s}_dollars_fp", []):
                    assert re.match(r"^0\.\d{4}$", p) and re.match(r"^\d+\.\d{2}$", q)
        elif d["type"] == "orderbook_delta":
            assert re.match(r"^0\.\d{4}$", m["price_dollars"]) and re.match(r"^-?\d+\.\d{2}$", m["delta_fp"])
            assert isinstance(m["ts_ms"], int) and m["side"] in ("yes", "no")
            lv = books[m["market_ticker"]][m["side"]]
            v = lv.get(m["price_dollars"], Decimal(0)) + Decimal(m["delta_fp"])
            assert v >= 0
            if v:
                lv[m["price_dollars"]] = v
            else:
                lv.pop(m["price_dollars"], None)
            b = books[m["market_ticker"]]
            if b["yes"] and b["no"]:
                assert max(map(Decimal, b["yes"])) + max(map(Decimal, b["no"])) < 1, "crossed book"
        elif d["type"] == "trade":
            assert Decimal(m["yes_price_dollars"]) + Decimal(m["no_price_dollars"]) == 1
            assert m["taker_side"] in ("yes", "no") and isinstance(m["ts_ms"], int)
    assert {"subscribed", "orderbook_snapshot", "orderbook_delta", "trade", "ok"} <= set(kinds)
    # contracts rotate: markets open and expire during the capture
    oks = [d for d in frames if d["type"] == "ok"]
    assert len(oks) >= 4
    ms = kalshi_markets(seconds=300, seed=5, contract_minutes=2, strikes=3)
    tickers = {m["ticker"] for m in ms}
    assert {d["msg"]["market_ticker"] for d in frames if d["type"] == "orderbook_snapshot"} <= tickers
    assert all(re.match(r"^KX(BTC|ETH|SOL)-\d{2}[A-Z]{3}\d{4}(\d{2})?-B\d+$", t) for t in tickers)
    real = {}  # field sets of real frames (or of the project's hand-written sample of the wire format)
    for line in kalshi_wire_samples().items:
        fr = line.get("frame")
        if isinstance(fr, dict) and isinstance(fr.get("msg"), dict) and "type" in fr:
            real.setdefault(fr["type"], set()).update(fr["msg"])
            real.setdefault("env:" + fr["type"], set()).update(fr)
    for t in ("orderbook_delta", "trade", "subscribed"):
        assert kinds[t] == real[t], t
    assert kinds["orderbook_snapshot"] <= real["orderbook_snapshot"]
    env = {}
    for d in frames:
        env.setdefault(d["type"], set()).update(d)
    for t in ("orderbook_delta", "trade", "orderbook_snapshot", "subscribed"):
        assert env[t] == real["env:" + t], t


# ---------------------------------------------------------------------------------------------- coinbase replay


def test_coinbase_handshake_sequence_snapshot_heartbeats(cb_capture):
    async def go():
        srv = ReplayServer("coinbase", cb_capture)
        await srv.start()
        try:
            assert srv.ws_url == f"ws://127.0.0.1:{srv.port}"
            async with connect(srv.ws_url, max_size=1 << 24) as ws:
                await cb_subscribe(ws)
                texts = await drain(ws)
            frames = [json.loads(t) for t in texts]
            assert [d["sequence_num"] for d in frames] == list(range(len(frames)))
            snap = set()
            for d in frames:
                if d["channel"] == "l2_data":
                    ev = d["events"][0]
                    if ev["type"] == "snapshot":
                        snap.add(ev["product_id"])
                    else:
                        assert ev["product_id"] in snap
            assert snap == set(PRODUCTS)
            acks = [d for d in frames if d["channel"] == "subscriptions"]
            assert acks[-1]["events"][0]["subscriptions"] == {
                "level2": PRODUCTS, "market_trades": PRODUCTS, "heartbeats": ["heartbeats"]}
            assert sum(d["channel"] == "heartbeats" for d in frames) >= 35
            n_cap = sum(1 for r in cb_capture if "frame" in r and '"subscriptions"' not in r["frame"][:40])
            assert sum(d["channel"] != "subscriptions" for d in frames) == n_cap
            assert srv.done.is_set()
        finally:
            await srv.stop()

    run(go())


def test_coinbase_subscribe_timeout_and_errors(cb_capture):
    async def go():
        srv = ReplayServer("coinbase", cb_capture, subscribe_timeout=0.5)
        await srv.start()
        try:
            async with connect(srv.ws_url) as ws:
                t0 = time.monotonic()
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 3)
                assert 0.4 < time.monotonic() - t0 < 2.5
            async with connect(srv.ws_url) as ws:
                await ws.send(json.dumps({"type": "subscribe", "product_ids": ["DOGE-XYZ"], "channel": "level2"}))
                d = await recv_json(ws)
                assert d["type"] == "error" and "DOGE-XYZ" in d["reason"]
                await ws.send("not json")
                assert (await recv_json(ws))["type"] == "error"
                await ws.send(json.dumps({"type": "subscribe", "channel": "nope", "product_ids": ["BTC-USD"]}))
                assert (await recv_json(ws))["type"] == "error"
        finally:
            await srv.stop()

    run(go())


def test_coinbase_reconnect_gets_current_book(cb_capture):
    """A second connection mid-capture gets a snapshot equal to the book the first client built."""

    async def go():
        srv = ReplayServer("coinbase", cb_capture, speed=10.0)
        await srv.start()
        try:
            book = {}
            async with connect(srv.ws_url, max_size=1 << 24) as ws:
                await ws.send(json.dumps({"type": "subscribe", "product_ids": PRODUCTS, "channel": "level2"}))
                n = 0
                while n < 300:
                    d = await recv_json(ws)
                    if d["channel"] == "l2_data":
                        apply_cb(book, d)
                        n += 1
                srv.inject("stall:3")
                for t in await drain(ws, idle=0.4):
                    d = json.loads(t)
                    if d["channel"] == "l2_data":
                        apply_cb(book, d)
                async with connect(srv.ws_url, max_size=1 << 24) as ws2:
                    await ws2.send(json.dumps({"type": "subscribe", "product_ids": PRODUCTS, "channel": "level2"}))
                    book2 = {}
                    seqs = []
                    for _ in range(4):
                        d = await recv_json(ws2)
                        seqs.append(d["sequence_num"])
                        if d["channel"] == "l2_data":
                            assert d["events"][0]["type"] == "snapshot"
                            apply_cb(book2, d)
                    assert seqs == [0, 1, 2, 3]
                    assert book2 == book
        finally:
            await srv.stop()

    run(go())


def test_coinbase_looped_pass_is_stamped_as_its_own_time():
    """On a looped pass every frame the server sends, those it synthesizes (a late client's
    snapshot, the envelope) included, carries the pass's shifted time, and trade ids are new."""
    cap = list(generate_coinbase(["BTC-USD"], seconds=3, rate=100, seed=1, depth=20))

    def t(s):
        from engine.collect.sources import parse_ts

        return parse_ts(s)

    async def first_frames(url, n):
        async with connect(url, max_size=1 << 24) as ws:
            await cb_subscribe(ws, ["BTC-USD"])
            out = []
            while len(out) < n:
                d = await recv_json(ws)
                if d["channel"] in ("l2_data", "market_trades"):
                    out.append(d)
            return out

    async def go():
        srv = ReplayServer("coinbase", cap, speed=4.0, loop_capture=True)
        await srv.start()
        try:
            first = await first_frames(srv.ws_url, 20)
            async with connect(srv.ws_url, max_size=1 << 24) as keep:  # the playback clock runs while subscribed
                await cb_subscribe(keep, ["BTC-USD"])
                while srv.stats()["loops"] < 2:
                    await asyncio.wait_for(keep.recv(), 5)
                later = await first_frames(srv.ws_url, 20)
        finally:
            await srv.stop()
        return first, later

    first, later = run(go())
    t0 = t(first[0]["events"][0]["updates"][0]["event_time"])
    span = (cap[-1]["recv_ns"] - cap[0]["recv_ns"]) / 1e9
    snap = later[0]
    assert snap["channel"] == "l2_data" and snap["events"][0]["type"] == "snapshot"
    times = [t(snap["timestamp"]), t(snap["events"][0]["updates"][0]["event_time"])]
    times += [t(u["event_time"]) for d in later[1:] if d["channel"] == "l2_data" for u in d["events"][0]["updates"]]
    # two whole passes later, and all within one pass's length of each other
    assert min(times) - t0 >= 2 * span * 1e9, ((min(times) - t0) / 1e9, span)
    assert (max(times) - min(times)) / 1e9 <= span + 1
    ids = lambda frames: {tr["trade_id"] for d in frames if d["channel"] == "market_trades"  # noqa: E731
                          for ev in d["events"] for tr in ev["trades"]}
    assert ids(later) and not ids(later) & ids(first)


def test_coinbase_runtime_faults_seen_by_client(cb_capture):
    with ReplayServer.run_in_thread(source="coinbase", capture=cb_capture, speed=4.0) as srv:

        async def go():
            async with connect(srv.ws_url, max_size=1 << 24) as ws:
                await cb_subscribe(ws)
                texts = []

                async def take(n):
                    for _ in range(n):
                        texts.append(await asyncio.wait_for(ws.recv(), 3))

                await take(50)
                srv.inject("drop")
                await take(20)
                srv.inject("seq_jump:7")
                await take(20)
                srv.inject("malformed:3")
                await take(20)
                srv.inject("stall:1.2")
                t0 = time.monotonic()
                gaps = []
                for _ in range(40):
                    t = time.monotonic()
                    texts.append(await asyncio.wait_for(ws.recv(), 3))
                    gaps.append(time.monotonic() - t)
                assert max(gaps) > 0.9 and time.monotonic() - t0 > 1.0
                srv.inject("close")
                with pytest.raises(ConnectionClosed) as ei:
                    for _ in range(10000):
                        await asyncio.wait_for(ws.recv(), 3)
                assert ei.value.rcvd is None  # abrupt: no close frame
            bad = []
            seqs = []
            for t in texts:
                try:
                    seqs.append(json.loads(t)["sequence_num"])
                except (ValueError, KeyError):
                    bad.append(t)
            assert len(bad) == 3
            steps = [b - a for a, b in zip(seqs, seqs[1:]) if b - a != 1]
            assert sorted(steps) == [2, 8]  # one dropped frame, one jump of 7

        run(go())
        st = srv.stats()
        assert st["dropped"] == 1 and st["seq_jumps"] == 1 and st["malformed_sent"] == 3
        assert st["stalls"] == 1 and st["closes"] == 1


def test_coinbase_scheduled_faults(cb_capture):
    assert parse_fault("stall@500:3") == ("stall", 3.0, 500)
    assert parse_fault("malformed:4") == ("malformed", 4.0, None)
    with pytest.raises(ValueError):
        parse_fault("explode")

    async def go():
        srv = ReplayServer("coinbase", cb_capture, faults=["drop@100", "malformed@200:2", "close@400"])
        await srv.start()
        try:
            async with connect(srv.ws_url, max_size=1 << 24) as ws:
                await cb_subscribe(ws)
                texts = []
                with pytest.raises(ConnectionClosed):
                    while True:
                        texts.append(await asyncio.wait_for(ws.recv(), 3))
            good = [json.loads(t) for t in texts if t.startswith('{"channel"') and t.endswith("}")]
            assert len(texts) - len(good) == 2
            seqs = [d["sequence_num"] for d in good]
            assert [b - a for a, b in zip(seqs, seqs[1:]) if b - a != 1] == [2]
            assert 380 < len(texts) < 420
            # reconnect: fresh sequence from 0 and a fresh snapshot
            async with connect(srv.ws_url, max_size=1 << 24) as ws:
                await ws.send(json.dumps({"type": "subscribe", "product_ids": ["BTC-USD"], "channel": "level2"}))
                d = await recv_json(ws)
                assert d["sequence_num"] == 0 and d["events"][0]["type"] == "snapshot"
        finally:
            await srv.stop()

    run(go())


# ---------------------------------------------------------------------------------------------- kalshi replay


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_kalshi_auth_on_upgrade(k_capture, keys):
    priv, pub, other = keys

    async def go():
        srv = ReplayServer("kalshi", k_capture, kalshi_public_key=pub)
        await srv.start()
        try:
            assert srv.ws_url.endswith("/trade-api/ws/v2") and srv.rest_url.endswith("/trade-api/v2")
            with pytest.raises(InvalidStatus) as ei:
                async with connect(srv.ws_url):
                    pass
            assert ei.value.response.status_code == 401
            bad = ka.sign_headers("k", other, "GET", ka.WS_PATH)
            with pytest.raises(InvalidStatus) as ei:
                async with connect(srv.ws_url, additional_headers=bad):
                    pass
            assert ei.value.response.status_code == 401
            wrong_path = ka.sign_headers("k", priv, "GET", "/trade-api/v2/markets")
            with pytest.raises(InvalidStatus):
                async with connect(srv.ws_url, additional_headers=wrong_path):
                    pass
            good = ka.sign_headers("k", priv, "GET", ka.WS_PATH)
            async with connect(srv.ws_url, additional_headers=good) as ws:
                await ws.send(json.dumps({"id": 1, "cmd": "list_subscriptions"}))
                assert await recv_json(ws) == {"id": 1, "type": "ok", "msg": []}
            assert srv.stats()["auth_rejected"] == 3
        finally:
            await srv.stop()

    run(go())


def _apply_k(books, d):
    m = d["msg"]
    t = m["market_ticker"]
    if d["type"] == "orderbook_snapshot":
        books[t] = {s: {p: Decimal(q) for p, q in m.get(f"{s}_dollars_fp", [])} for s in ("yes", "no")}
    else:
        lv = books[t][m["side"]]
        v = lv.get(m["price_dollars"], Decimal(0)) + Decimal(m["delta_fp"])
        if v > 0:
            lv[m["price_dollars"]] = v
        else:
            lv.pop(m["price_dollars"], None)


def test_kalshi_subscribe_seq_update_get_snapshot_errors(k_capture, keys):
    priv, pub, _ = keys

    async def go():
        srv = ReplayServer("kalshi", k_capture, kalshi_public_key=pub, speed=20.0)
        await srv.start()
        try:
            openm = [m["ticker"] for m in (await asyncio.to_thread(_get, srv.rest_url + "/markets?status=open"))["markets"]]
            assert len(openm) == 9
            hdr = ka.sign_headers("k", priv, "GET", ka.WS_PATH)
            async with connect(srv.ws_url, additional_headers=hdr, max_size=1 << 24) as ws:
                await ws.send(json.dumps({"id": 1, "cmd": "subscribe", "params": {
                    "channels": ["orderbook_delta", "trade"], "market_tickers": openm[:4]}}))
                assert await recv_json(ws) == {"id": 1, "type": "subscribed", "msg": {"channel": "orderbook_delta", "sid": 1}}
                assert await recv_json(ws) == {"id": 1, "type": "subscribed", "msg": {"channel": "trade", "sid": 2}}
                books = {}
                last = {}
                for i in range(4):
                    d = await recv_json(ws)
                    assert d["type"] == "orderbook_snapshot" and d["seq"] == i + 1 and d["sid"] == 1
                    _apply_k(books, d)
                assert set(books) == set(openm[:4])

                async def pump(n, expect=None, timeout=3):
                    got = []
                    while len(got) < n:
                        d = await recv_json(ws, timeout)
                        if "seq" in d:
                            assert d["seq"] == last.get(d["sid"], 0) + 1, d
                            last[d["sid"]] = d["seq"]
                        if d["type"] in ("orderbook_snapshot", "orderbook_delta"):
                            assert d["msg"]["market_ticker"] in books or d["type"] == "orderbook_snapshot"
                            _apply_k(books, d)
                        if d["type"] in ("orderbook_delta", "trade"):
                            assert d["msg"]["market_ticker"] in subscribed
                        got.append(d)
                        if expect and expect(d):
                            break
                    return got

                last[1] = 4
                subscribed = set(openm[:4])
                await pump(60)
                # add a market: ok with the full list, then its snapshot
                await ws.send(json.dumps({"id": 2, "cmd": "update_subscription", "params": {
                    "sids": [1], "market_tickers": [openm[5]], "action": "add_markets"}}))
                subscribed.add(openm[5])
                got = await pump(500, lambda d: d["type"] == "orderbook_snapshot" and d["msg"]["market_ticker"] == openm[5])
                ok = [d for d in got if d["type"] == "ok"]
                assert ok and ok[0]["id"] == 2 and ok[0]["sid"] == 1 and set(ok[0]["msg"]["market_tickers"]) == set(openm[:4]) | {openm[5]}
                # delete one
                await ws.send(json.dumps({"id": 3, "cmd": "update_subscription", "params": {
                    "sid": 1, "market_tickers": [openm[0]], "action": "delete_markets"}}))
                got = await pump(500, lambda d: d["type"] == "ok")
                assert openm[0] not in got[-1]["msg"]["market_tickers"]
                subscribed.discard(openm[0])
                # errors
                await ws.send(json.dumps({"id": 4, "cmd": "bogus"}))
                got = await pump(500, lambda d: d["type"] == "error")
                assert got[-1]["msg"]["code"] == 5 and got[-1]["id"] == 4
                await ws.send(json.dumps({"id": 5, "cmd": "update_subscription", "params": {
                    "sids": [2], "market_tickers": [openm[1]], "action": "get_snapshot"}}))
                got = await pump(500, lambda d: d["type"] == "error")
                assert got[-1]["msg"]["code"] == 13 and got[-1]["sid"] == 2 and "seq" in got[-1]
                await ws.send(json.dumps({"id": 6, "cmd": "update_subscription", "params": {
                    "sids": [1, 2], "market_tickers": [openm[1]], "action": "add_markets"}}))
                got = await pump(500, lambda d: d["type"] == "error")
                assert got[-1]["msg"]["code"] == 12
                await ws.send(json.dumps({"id": 7, "cmd": "subscribe", "params": {
                    "channels": ["orderbook_delta"], "market_tickers": ["KXBTC-NOPE-B1"]}}))
                got = await pump(500, lambda d: d["type"] == "error")
                assert got[-1]["msg"]["code"] == 16
                await ws.send("{{{")
                got = await pump(500, lambda d: d["type"] == "error")
                assert got[-1]["msg"]["code"] == 1
                # freeze the feed, read what is in flight, then get_snapshot must equal our book
                srv.inject("stall:15")
                while True:
                    try:
                        await pump(1, timeout=0.4)
                    except TimeoutError:
                        break
                mine = sorted(subscribed)
                await ws.send(json.dumps({"id": 8, "cmd": "update_subscription", "params": {
                    "sids": [1], "market_tickers": mine, "action": "get_snapshot"}}))
                snaps = await pump(len(mine))
                assert all(d["type"] == "orderbook_snapshot" and d["id"] == 8 for d in snaps)
                theirs = {}
                for d in snaps:
                    _apply_k(theirs, d)
                assert theirs == {t: books[t] for t in mine}
                # unsubscribe
                await ws.send(json.dumps({"id": 9, "cmd": "unsubscribe", "params": {"sids": [2]}}))
                got = await pump(500, lambda d: d["type"] == "unsubscribed")
                assert got[-1]["sid"] == 2 and got[-1]["id"] == 9
        finally:
            await srv.stop()

    run(go())


def test_kalshi_use_yes_price_conversion(k_capture, keys):
    priv, pub, _ = keys

    async def go():
        srv = ReplayServer("kalshi", k_capture)
        await srv.start()
        try:
            hdr = ka.sign_headers("k", priv, "GET", ka.WS_PATH)
            tick = next(json.loads(r["frame"])["msg"]["market_ticker"] for r in k_capture
                        if "frame" in r and '"orderbook_snapshot"' in r["frame"])
            out = {}
            srv.inject("stall:5")  # freeze the replay clock so both snapshots see the same book
            for flag in (False, True):
                async with connect(srv.ws_url, additional_headers=hdr) as ws:
                    await ws.send(json.dumps({"id": 1, "cmd": "subscribe", "params": {
                        "channels": ["orderbook_delta"], "market_tickers": [tick], "use_yes_price": flag}}))
                    await recv_json(ws)
                    out[flag] = (await recv_json(ws))["msg"]
            assert out[True]["yes_dollars_fp"] == out[False]["yes_dollars_fp"]
            assert [[str(1 - Decimal(p)), q] for p, q in out[False]["no_dollars_fp"]] == [
                [str(Decimal(p)), q] for p, q in out[True]["no_dollars_fp"]]
        finally:
            await srv.stop()

    run(go())


def test_kalshi_rest_pagination_and_rotation(k_capture, keys):
    priv, _, _ = keys

    async def go():
        srv = ReplayServer("kalshi", k_capture)
        await srv.start()
        try:
            base = srv.rest_url
            allm, cur, pages = [], "", 0
            while True:
                r = await asyncio.to_thread(_get, f"{base}/markets?series_ticker=KXBTC&limit=2" + (f"&cursor={cur}" if cur else ""))
                allm += r["markets"]
                pages += 1
                cur = r["cursor"]
                if not cur:
                    break
            assert pages >= 3 and len({m["ticker"] for m in allm}) == len(allm)
            assert all(m["ticker"].startswith("KXBTC-") for m in allm)
            before = {m["ticker"] for m in (await asyncio.to_thread(_get, f"{base}/markets?series_ticker=KXBTC&status=open"))["markets"]}
            assert before and all(m["status"] == "active" for m in (await asyncio.to_thread(_get, f"{base}/markets?status=open"))["markets"])
            one = await asyncio.to_thread(_get, f"{base}/markets/{sorted(before)[0]}")
            assert {"ticker", "event_ticker", "status", "open_time", "close_time"} <= set(one["market"])
            ob = await asyncio.to_thread(_get, f"{base}/markets/{sorted(before)[0]}/orderbook")
            assert "yes_dollars" in ob["orderbook_fp"]
            ev = await asyncio.to_thread(_get, f"{base}/events?series_ticker=KXBTC&status=open&with_nested_markets=true")
            assert ev["events"] and all(e["series_ticker"] == "KXBTC" for e in ev["events"])
            assert (await asyncio.to_thread(_get, f"{base}/series/KXBTC"))["series"]["ticker"] == "KXBTC"
            with pytest.raises(urllib.error.HTTPError) as ei:
                await asyncio.to_thread(_get, f"{base}/markets/NOPE-1")
            assert ei.value.code == 404
            # advance the replay clock to the end by consuming the capture
            hdr = ka.sign_headers("k", priv, "GET", ka.WS_PATH)
            async with connect(srv.ws_url, additional_headers=hdr, max_size=1 << 24) as ws:
                await ws.send(json.dumps({"id": 1, "cmd": "subscribe", "params": {"channels": ["trade"]}}))
                t0 = time.monotonic()
                while not srv.done.is_set() and time.monotonic() - t0 < 20:
                    await drain(ws, idle=0.05, limit=5000)
                assert srv.done.is_set()
            after = {m["ticker"] for m in (await asyncio.to_thread(_get, f"{base}/markets?series_ticker=KXBTC&status=open"))["markets"]}
            closed = {m["ticker"] for m in (await asyncio.to_thread(_get, f"{base}/markets?series_ticker=KXBTC&status=closed"))["markets"]}
            settled = (await asyncio.to_thread(_get, f"{base}/markets?series_ticker=KXBTC&status=settled"))["markets"]
            assert after and before - after and after - before
            # expired contracts are closed, or settled once the capture's lifecycle events say so
            assert before - after <= closed | {m["ticker"] for m in settled}
            assert settled and all(m["status"] == "finalized" and m["result"] in ("yes", "no") for m in settled)
        finally:
            await srv.stop()

    run(go())


def test_replay_cli_sigterm(tmp_path):
    cap = tmp_path / "cb.jsonl"
    write_capture(generate_coinbase(["BTC-USD"], seconds=5, rate=20, depth=10), cap)
    p = subprocess.Popen([sys.executable, "-c", "import sys; from engine.sim.replay import cli; sys.exit(cli(sys.argv[1:]))",
                          "--source", "coinbase", "--capture", str(cap), "--port", "0", "--faults", "drop@10"],
                         stderr=subprocess.PIPE, text=True)
    try:
        url = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            line = p.stderr.readline()
            m = re.search(r"listening on (ws://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                break
        assert url

        async def go():
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "subscribe", "product_ids": ["BTC-USD"], "channel": "level2"}))
                assert (await recv_json(ws, 5))["sequence_num"] == 0

        run(go())
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
