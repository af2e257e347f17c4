"""Coinbase Advanced Trade normalization: a recording (the real one in ../shared when present, the
project's generated one otherwise), sequence gaps, bad input, trade dedupe."""

from __future__ import annotations

import json
from decimal import Decimal

import polars as pl
import pytest

from engine.collect.capture import CaptureWriter
from engine.collect.base import fixed_units
from engine.collect.columns import L2Cols
from engine.collect.timestamps import parse_ts
from engine.collect.coinbase.normalize import CoinbaseNormalizer
from engine_tests.exchange_fixtures import coinbase_recording

T0 = 1_795_712_400_000_000_000  # 2026-11-26T17:00:00Z


def _iso(ns: int, digits: int = 6) -> str:
    import time as _t

    s, frac = divmod(ns, 10**9)
    base = _t.strftime("%Y-%m-%dT%H:%M:%S", _t.gmtime(s))
    return base + ("." + f"{frac:09d}"[:digits] if digits else "") + "Z"


def l2_frame(seq: int, pid: str, updates, typ: str = "update", t: int = T0, env_t: int | None = None) -> str:
    return json.dumps(
        {
            "channel": "l2_data",
            "timestamp": _iso(env_t if env_t is not None else t, 9),
            "sequence_num": seq,
            "events": [
                {
                    "type": typ,
                    "product_id": pid,
                    "updates": [
                        {"side": s, "event_time": _iso(t), "price_level": p, "new_quantity": q} for s, p, q in updates
                    ],
                }
            ],
        }
    )


def trades_frame(seq: int, trades, typ: str = "update", t: int = T0) -> str:
    return json.dumps(
        {
            "channel": "market_trades",
            "timestamp": _iso(t, 9),
            "sequence_num": seq,
            "events": [
                {
                    "type": typ,
                    "trades": [
                        {"product_id": pid, "trade_id": str(tid), "price": p, "size": q, "time": _iso(t), "side": side}
                        for pid, tid, p, q, side in trades
                    ],
                }
            ],
        }
    )


def hb(seq: int, t: int = T0) -> str:
    return json.dumps({"channel": "heartbeats", "timestamp": _iso(t, 9), "sequence_num": seq,
                       "events": [{"current_time": "x", "heartbeat_counter": seq}]})


# ---- timestamps and decimals -------------------------------------------------------------------


def test_parse_ts_fraction_widths_and_offsets():
    base = parse_ts("2026-08-09T21:05:48Z")
    assert base == 1786309548 * 10**9
    assert parse_ts("2026-08-09T21:05:48.505Z") == base + 505_000_000
    assert parse_ts("2026-08-09T21:05:48.210883Z") == base + 210_883_000
    assert parse_ts("2026-08-09T21:05:48.505350477Z") == base + 505_350_477
    assert parse_ts("2026-08-09T21:05:48.5Z") == base + 500_000_000
    assert parse_ts("2026-08-09T23:05:48.5+02:00") == base + 500_000_000
    assert parse_ts("2026-08-09T21:05:48.123456+00:00") == base + 123_456_000
    for bad in ("2026-08-09T21:05:48.12a4Z", "garbage", "2026-13-09T21:05:48Z", "2026-08-09T21:05:48.1234567890Z"):
        with pytest.raises((ValueError, IndexError)):
            parse_ts(bad)


def test_fixed_units_exact():
    assert fixed_units("0.2100", 4) == 2100
    assert fixed_units("0.96", 4) == 9600
    assert fixed_units("-1.00", 2) == -100
    assert fixed_units("47.03", 2) == 4703
    assert fixed_units("12", 2) == 1200
    with pytest.raises(ValueError):
        fixed_units("1.001", 2)
    with pytest.raises(ValueError):
        fixed_units("1e5", 2)


# ---- a recording ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording():
    return coinbase_recording()


def _reference(frames):
    """Independent minimal reference: stdlib json + Decimal, applied frame by frame."""
    books: dict[str, dict[tuple[str, Decimal], Decimal]] = {}
    trades: dict[tuple[str, str], str] = {}
    for _, text in frames:
        d = json.loads(text)
        if d.get("channel") == "l2_data":
            for ev in d["events"]:
                pid = ev["product_id"]
                if ev["type"] == "snapshot":
                    books[pid] = {}
                b = books[pid]
                for u in ev["updates"]:
                    k = ("ask" if u["side"] == "offer" else "bid", Decimal(u["price_level"]))
                    q = Decimal(u["new_quantity"])
                    if q == 0:
                        b.pop(k, None)
                    else:
                        b[k] = q
        elif d.get("channel") == "market_trades":
            for ev in d["events"]:
                for t in ev["trades"]:
                    trades[(t["product_id"], t["trade_id"])] = {"SELL": "buy", "BUY": "sell"}[t["side"]]
    return books, trades


def _rebuild(l2: pl.DataFrame) -> dict[str, dict[tuple[str, float], float]]:
    books: dict[str, dict] = {}
    cur_snap: dict[str, tuple] = {}
    for inst, side, price, size, snap, recv, seq in l2.select(
        pl.col("instrument").cast(pl.Utf8), pl.col("side").cast(pl.Utf8), "price", "size", "snapshot", "recv_ts", "seq"
    ).iter_rows():
        if snap:
            key = (recv, seq)
            if cur_snap.get(inst) != key:  # a new snapshot group replaces the book
                books[inst] = {}
                cur_snap[inst] = key
        else:
            cur_snap.pop(inst, None)
        b = books.setdefault(inst, {})
        if size == 0:
            b.pop((side, price), None)
        else:
            b[(side, price)] = size
    return books


def test_real_capture_ingest_rebuilds_reference_book(tmp_path, recording):
    frames, facts = recording.items, recording.facts
    cap = CaptureWriter(tmp_path / "cap", "coinbase", compress=True)
    cap.meta(frames[0][0], {"type": "connect", "source": "coinbase", "conn": 1})
    for r, f in frames:
        cap.frame(r, f)
    cap.close()

    from engine import Engine
    from engine.collect.ingest import ingest_files

    eng = Engine.open(home=tmp_path / "lake", writer=True, book_anchors=True)
    try:
        st = ingest_files(eng, cap.files, "coinbase", progress=False)
        l2 = eng.l2(source="coinbase", allow_unsealed=True)
        tr = eng.trades(source="coinbase", allow_unsealed=True)
        gaps = eng.gaps(source="coinbase", allow_unsealed=True)
    finally:
        eng.close()
    assert st["skipped_frames"] == 0 and st["gaps"] == 0 and gaps.height == 0
    ref_books, ref_trades = _reference(frames)
    # rows in receive order (one connection: seq is the wire order; stable within a message)
    l2 = l2.with_row_index("i").sort(["recv_ts", "seq", "i"])
    got = _rebuild(l2)
    assert set(got) == set(ref_books) == facts["products"]
    for pid, ref in ref_books.items():
        want = {(s, float(p)): float(q) for (s, p), q in ref.items()}
        assert got[pid] == want, pid  # level for level
        assert len(want) > facts["min_levels"]
    # snapshot flags: the full-depth snapshots are there, side mapped offer -> ask
    snaps = l2.filter(pl.col("snapshot"))
    assert snaps.height == facts["snapshot_rows"]  # every level of every snapshot
    assert set(l2["side"].cast(pl.Utf8).unique()) == {"bid", "ask"}
    # trades: one row per distinct trade_id, taker side = opposite of the maker side
    assert tr.height == len(ref_trades) == tr.select("instrument", "trade_id").unique().height
    for inst, tid, side in tr.select(pl.col("instrument").cast(pl.Utf8), "trade_id", pl.col("side").cast(pl.Utf8)).iter_rows():
        assert ref_trades[(inst, tid)] == side
    # best bid < best ask at the end
    for pid, b in got.items():
        bb = max(p for s, p in b if s == "bid")
        ba = min(p for s, p in b if s == "ask")
        assert bb < ba


def test_real_capture_direct_normalizer_matches_meta_less_capture(recording):
    frames = recording.items
    a = CoinbaseNormalizer()
    a.on_connect(frames[0][0], conn=1)
    for r, f in frames:
        a.feed(r, f)
    b = CoinbaseNormalizer()  # no meta line: implicit connection
    for r, f in frames:
        b.feed(r, f)
    ta, tb = a.take(), b.take()
    assert ta["l2"].equals(tb["l2"]) and ta["trades"].equals(tb["trades"])
    # snapshot ts: from event_time (sane here), rows carry the envelope sequence_num
    assert ta["l2"].column("seq").null_count == 0


# ---- sequence gaps --------------------------------------------------------------------------------


def _start(n: CoinbaseNormalizer, pids=("BTC-USD", "ETH-USD")) -> int:
    seq = 0
    n.on_connect(T0, conn=1)
    for pid in pids:
        n.feed(T0, l2_frame(seq, pid, [("bid", "100.5", "1"), ("offer", "101", "2")], typ="snapshot"))
        seq += 1
    return seq


def test_sequence_jump_invalidates_all_books_and_asks_for_reconnect():
    n = CoinbaseNormalizer(products=["BTC-USD", "ETH-USD"])
    seq = _start(n)
    n.feed(T0 + 1, l2_frame(seq, "BTC-USD", [("bid", "100.5", "3")], t=T0 + 1))
    n.feed(T0 + 2, l2_frame(seq + 5, "ETH-USD", [("bid", "100.5", "4")], t=T0 + 2))  # 4 frames lost
    acts = n.pop_actions()
    assert [a.kind for a in acts] == ["reconnect"]
    out = n.take()
    g = out["gaps"].to_pylist()
    assert {r["market"] for r in g} == {"BTC-USD", "ETH-USD"}
    assert all(r["kind"] == "sequence" and r["instrument"] is None for r in g)
    assert all(r["start_ts"] == T0 + 1 and r["end_ts"] == T0 + 2 for r in g)
    # the update after the jump is not applied to an invalid book
    assert out["l2"].num_rows == 4 + 1
    # runtime reconnects: disconnect gap at the next connect, then the new snapshot rebuilds
    n.on_disconnect(T0 + 3, "sequence: resync")
    n.on_connect(T0 + 4, conn=2)
    n.feed(T0 + 5, l2_frame(0, "BTC-USD", [("bid", "99", "1")], typ="snapshot", t=T0 + 5))
    n.feed(T0 + 6, l2_frame(1, "BTC-USD", [("bid", "99", "0")], t=T0 + 6))
    out = n.take()
    kinds = [r["kind"] for r in out["gaps"].to_pylist()]
    assert kinds == ["disconnect", "disconnect"]
    rows = out["l2"].to_pylist()
    assert [(r["snapshot"], r["size"]) for r in rows] == [(True, 1.0), (False, 0.0)]
    assert n.valid == {"BTC-USD"}  # the new snapshot made BTC-USD valid again, ETH-USD waits for its own


def test_meta_less_sequence_restart_is_a_new_connection():
    n = CoinbaseNormalizer(products=["BTC-USD"])
    n.feed(T0, l2_frame(0, "BTC-USD", [("bid", "1", "1")], typ="snapshot"))
    n.feed(T0 + 1, hb(1))
    n.feed(T0 + 9, l2_frame(0, "BTC-USD", [("bid", "2", "1")], typ="snapshot", t=T0 + 9))
    out = n.take()
    g = out["gaps"].to_pylist()
    assert len(g) == 1 and g[0]["kind"] == "disconnect" and g[0]["start_ts"] == T0 + 1 and g[0]["end_ts"] == T0 + 9
    assert n.pop_actions() == []


def test_out_of_order_frame_is_ignored():
    n = CoinbaseNormalizer()
    seq = _start(n, ("BTC-USD",))
    n.feed(T0, hb(seq))
    n.feed(T0, l2_frame(seq - 1, "BTC-USD", [("bid", "5", "5")]))
    assert n.c.skipped_frames == 1 and n.pop_actions() == []


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_frames_counted_skipped_good_rows_kept():
    n = CoinbaseNormalizer()
    seq = _start(n, ("BTC-USD",))
    bad = [
        "not json at all",
        '{"channel":"l2_data","sequence_num":',
        "[1,2,3]",
        '{"channel":"mystery","sequence_num":null}',
        '{"foo":1}',
        b"\x00\xff binary",
    ]
    for f in bad:
        n.feed(T0, f)
    assert n.c.skipped_frames == len(bad) and n.pop_actions() == []
    # typed but absurd l2 frames consume their sequence number; found by the bulk check at
    # conversion: the message is dropped, the book marked invalid, a resync requested
    n.feed(T0 + 1, l2_frame(seq, "BTC-USD", [("bid", "100", "-1")]))
    out = n.take()
    assert n.c.skipped_frames == len(bad) + 1 and n.c.skip_reasons["bad_rows"] == 1
    assert [a.kind for a in n.pop_actions()] == ["reconnect"]
    assert out["gaps"].num_rows == 1 and out["gaps"].column("kind").to_pylist() == ["sequence"]
    assert out["l2"].num_rows == 2  # the snapshot survives
    assert "BTC-USD" not in n.valid


@pytest.mark.parametrize(
    "updates,why,kept",
    [
        ([("bid", "NaN", "1")], "nan price", 3),
        ([("bid", "100", "inf")], "inf size", 3),
        ([("bid", "0", "1")], "zero price", 3),
        ([("bid", "100", "1"), ("bid", "101", "-0.5")], "negative size", 3),
        ([("middle", "100", "1")], "side", 2),
    ],
)
def test_absurd_values_skip_the_frame(updates, why, kept):
    n = CoinbaseNormalizer()
    seq = _start(n, ("BTC-USD",))
    n.feed(T0, l2_frame(seq, "BTC-USD", updates))
    n.feed(T0, l2_frame(seq + 1, "BTC-USD", [("bid", "100.5", "7")]))
    out = n.take()
    assert n.c.skipped_frames == 1, why
    # only the bad message is dropped (bulk checks find it at conversion, so a later update in the
    # same chunk is kept; an unknown side is caught while decoding, before the next update)
    assert out["l2"].num_rows == kept, why
    assert "BTC-USD" not in n.valid and [a.kind for a in n.pop_actions()] == ["reconnect"]
    assert out["gaps"].column("kind").to_pylist() == ["sequence"]


def test_timestamp_far_from_receive_time():
    n = CoinbaseNormalizer()
    n.on_connect(T0, conn=1)
    # snapshot event_time 1970 (documented example): falls back to the envelope timestamp
    f = json.loads(l2_frame(0, "BTC-USD", [("bid", "1", "1")], typ="snapshot"))
    for u in f["events"][0]["updates"]:
        u["event_time"] = "1970-01-01T00:00:00Z"
    n.feed(T0 + 5, json.dumps(f))
    assert n.take()["l2"].column("ts").to_pylist() == [T0]
    # event time and envelope both absurd: the receive time stands in (the level change is real)
    n.feed(T0 + 7, l2_frame(1, "BTC-USD", [("bid", "1", "2")], t=T0 - 10 * 86400 * 10**9))
    # an unparseable event time too
    g = json.loads(l2_frame(2, "BTC-USD", [("bid", "1", "3")]))
    g["events"][0]["updates"][0]["event_time"] = "yesterday-ish"
    n.feed(T0 + 8, json.dumps(g))
    out = n.take()["l2"]
    assert out.column("ts").to_pylist() == [T0 + 7, T0]  # recv, then the envelope
    assert n.c.ts_fallbacks == 3 and n.c.skipped_frames == 0
    # a trade with an absurd time is skipped (no book depends on it)
    n.feed(T0, trades_frame(3, [("BTC-USD", 1, "1", "1", "BUY")], t=T0 - 10 * 86400 * 10**9))
    assert n.c.skipped_frames == 1


@pytest.mark.parametrize("sub_rows", [3, 4096])
def test_every_row_keeps_its_own_event_time(sub_rows):
    """Event times are stored once per stretch of equal values: stretches that change inside a
    message, continue across messages, or cross a read-out boundary still give each row its own."""
    n = CoinbaseNormalizer()
    n.l2.sub_rows = n.l2.flush_at = sub_rows
    n.on_connect(T0, conn=1)

    def frame(seq, typ, times, env_t=T0 + 50):
        f = json.loads(l2_frame(seq, "BTC-USD", [("bid", str(100 + i), "1") for i in range(len(times))], typ=typ,
                                env_t=env_t))
        for u, t in zip(f["events"][0]["updates"], times):
            u["event_time"] = t if isinstance(t, str) else _iso(t, 9)
        return json.dumps(f)

    n.feed(T0 + 100, frame(0, "snapshot", [T0, T0]))
    n.feed(T0 + 100, frame(1, "update", [T0 + 1, T0 + 1, T0 + 2, "garbage"]))
    n.feed(T0 + 100, frame(2, "update", [T0 + 3] * 3))
    n.feed(T0 + 100, frame(3, "update", [T0 + 3, T0 + 4]))
    out = n.take()["l2"]
    assert out.column("ts").to_pylist() == [T0, T0, T0 + 1, T0 + 1, T0 + 2, T0 + 50, T0 + 3, T0 + 3, T0 + 3,
                                            T0 + 3, T0 + 4]
    assert out.column("seq").to_pylist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert out.column("snapshot").to_pylist() == [True] * 2 + [False] * 9
    assert n.c.ts_fallbacks == 1 and n.c.skipped_frames == 0


def test_conversion_failure_skips_only_the_bad_message():
    cols = L2Cols("coinbase")
    for i, side in enumerate(["bid", "weird", "offer"]):
        cols.price.append(1.0 + i)
        cols.size.append(1.0)
        cols.run(1, T0, T0, "BTC-USD", "BTC-USD", side, i, False)
    bad = []
    t = cols.take(lambda run, why: bad.append(run[6]))
    assert t.num_rows == 2 and len(bad) == 1
    assert t.column("side").to_pylist() == ["bid", "ask"]


# ---- trades -------------------------------------------------------------------------------------------


def test_trades_taker_side_and_dedupe_across_reconnect_and_seed():
    n = CoinbaseNormalizer()
    n.on_connect(T0, conn=1)
    snap = [("BTC-USD", 12, "100", "0.5", "SELL"), ("BTC-USD", 11, "99", "0.1", "BUY")]
    n.feed(T0, trades_frame(0, snap, typ="snapshot"))
    n.feed(T0, trades_frame(1, [("BTC-USD", 13, "100", "1", "BUY")]))
    n.on_disconnect(T0 + 1, "x")
    n.on_connect(T0 + 2, conn=2)
    n.feed(T0 + 2, trades_frame(0, [("BTC-USD", 13, "100", "1", "BUY"), ("BTC-USD", 12, "100", "0.5", "SELL")], typ="snapshot"))
    n.feed(T0 + 3, trades_frame(1, [("BTC-USD", 14, "101", "1", "SELL")]))
    t = n.take()["trades"].to_pylist()
    assert [(r["trade_id"], r["side"]) for r in t] == [("12", "buy"), ("11", "sell"), ("13", "sell"), ("14", "buy")]
    assert n.c.dup_trades == 2
    # seeded from the lake: a fresh process does not store 12..14 again
    m = CoinbaseNormalizer()
    m.seed_trade_ids({"BTC-USD": 14})
    m.feed(T0, trades_frame(0, [("BTC-USD", 14, "1", "1", "BUY"), ("BTC-USD", 15, "1", "1", "BUY")], typ="snapshot"))
    assert m.take()["trades"].column("trade_id").to_pylist() == ["15"]


def test_trade_bad_values_skipped_individually():
    n = CoinbaseNormalizer()
    n.feed(T0, trades_frame(0, [("BTC-USD", 1, "100", "1", "BUY"), ("BTC-USD", 2, "100", "-1", "BUY"),
                                ("BTC-USD", 3, "100", "1", "UP")]))
    assert n.take()["trades"].num_rows == 1
    assert n.c.skipped_frames == 2


def test_generated_capture_rows_track_reference_book_after_every_message():
    """Mixed bid/offer orders within messages, repeated levels in one message: row order is kept."""
    from engine.sim.capture_gen import generate_coinbase

    n = CoinbaseNormalizer()
    ref: dict = {}
    mine: dict = {}
    checked = 0
    for rec in generate_coinbase(seconds=8, rate=150, seed=3, depth=60):
        if "meta" in rec:
            n.on_connect(rec["recv_ns"], conn=rec["meta"].get("conn"))
            continue
        n.feed(rec["recv_ns"], rec["frame"])
        d = json.loads(rec["frame"])
        if d["channel"] != "l2_data":
            continue
        for ev in d["events"]:
            if ev["type"] == "snapshot":
                ref[ev["product_id"]] = {}
            for u in ev["updates"]:
                k = ("ask" if u["side"] == "offer" else "bid", float(u["price_level"]))
                if float(u["new_quantity"]) == 0:
                    ref[ev["product_id"]].pop(k, None)
                else:
                    ref[ev["product_id"]][k] = float(u["new_quantity"])
        rows = n.take()["l2"].to_pylist()
        if rows[0]["snapshot"]:
            mine[rows[0]["instrument"]] = {}
        for r in rows:
            b = mine[r["instrument"]]
            if r["size"] == 0:
                b.pop((r["side"], r["price"]), None)
            else:
                b[(r["side"], r["price"])] = r["size"]
        pid = d["events"][0]["product_id"]
        assert mine[pid] == ref[pid], d["sequence_num"]
        checked += 1
    assert checked > 500
