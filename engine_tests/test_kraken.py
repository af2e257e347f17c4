"""Kraken spot WebSocket v2: normalization of literal frames (book snapshot/update with the
checksum, truncation rows, trades, reference data, ignored and bad frames), books rebuilt from the
stored rows of a generated capture passing Kraken's checksum at every message, and live through the
replay exchange: live equals offline, a corrupted level gives one `checksum` gap and a resync on the
same connection, a drop, a close and a stall give gaps."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from engine.collect import registry
from engine.collect.kraken import wire
from engine.collect.kraken.book import Book, checksum
from engine.collect.kraken.normalize import KrakenNormalizer
from engine.schema import row_faults
from engine.sim.capture import read_capture, write_capture
from engine.sim.kraken.gen import generate_kraken, ts6
from engine.sim.replay import ReplayServer
from engine_tests.test_collector import (
    ROOT,
    _canon_l2,
    _canon_trades,
    _cmd,
    _collect_all,
    _env,
    _final_books,
    _ingest,
    _status,
    _tables,
    _wait_read_all,
    _wait_reconnect_after_end,
)

pytestmark = pytest.mark.timeout(180)
NOW = time.time_ns()
T0 = (NOW - 3600 * 10**9) // 1000 * 1000  # literal frames: an hour ago, in whole µs as Kraken writes times

# Kraken's "Book checksum (WebSocket v2)" guide: this book has checksum 3310070434
GUIDE_BIDS = [("45283.5", "0.10000000"), ("45283.4", "1.54582015"), ("45282.1", "0.10000000"), ("45281.0", "0.10000000"),
              ("45280.3", "1.54592586"), ("45279.0", "0.07990000"), ("45277.6", "0.03310103"), ("45277.5", "0.30000000"),
              ("45277.3", "1.54602737"), ("45276.6", "0.15445238")]
GUIDE_ASKS = [("45285.2", "0.00100000"), ("45286.4", "1.54571953"), ("45286.6", "1.54571109"), ("45289.6", "1.54560911"),
              ("45290.2", "0.15890660"), ("45291.8", "1.54553491"), ("45294.7", "0.04454749"), ("45296.1", "0.35380000"),
              ("45297.5", "0.09945542"), ("45299.5", "0.18772827")]
# a snapshot Kraken sent for USDG/USD (recorded in public code, 2026-09-17): trailing zeros matter
USDG = ('{"channel":"book","type":"snapshot","data":[{"symbol":"USDG/USD","bids":[{"price":0.9999,"qty":653645.22211},'
        '{"price":0.9998,"qty":21389.49905},{"price":0.9997,"qty":311181.88799},{"price":0.9996,"qty":935949.00167},'
        '{"price":0.9995,"qty":5.25262},{"price":0.9993,"qty":15819.07585},{"price":0.9990,"qty":28045.34609},'
        '{"price":0.9985,"qty":35372.52894},{"price":0.9900,"qty":10.07905},{"price":0.9835,"qty":240.14072}],'
        '"asks":[{"price":1.0000,"qty":382506.65119},{"price":1.0001,"qty":242215.90771},{"price":1.0002,"qty":357570.43200},'
        '{"price":1.0003,"qty":936797.08901},{"price":1.0004,"qty":10578.85361},{"price":1.0005,"qty":83656.47123},'
        '{"price":1.0007,"qty":15819.07585},{"price":1.0010,"qty":23655.03579},{"price":1.0015,"qty":35372.52894},'
        '{"price":1.0024,"qty":5000.00000}],"checksum":3225719247,"timestamp":"%s"}]}')


# ---- literal frames -----------------------------------------------------------------------------
def _levels(levels) -> str:
    return ",".join(f'{{"price":{p},"qty":{q}}}' for p, q in levels)


def book_frame(typ: str, sym: str, bids, asks, cks: int | None, t: int = T0) -> str:
    ck = "" if cks is None else f',"checksum":{cks}'
    return (f'{{"channel":"book","type":"{typ}","data":[{{"symbol":"{sym}","bids":[{_levels(bids)}],'
            f'"asks":[{_levels(asks)}]{ck},"timestamp":"{ts6(t)}"}}]}}')


def trade_frame(typ: str, trades, t: int = T0) -> str:
    return json.dumps({"channel": "trade", "type": typ, "data": [
        {"symbol": s, "side": side, "price": p, "qty": q, "ord_type": "limit", "trade_id": tid, "timestamp": ts6(t)}
        for s, side, p, q, tid in trades]})


def instrument_frame(typ: str, pairs) -> str:
    return json.dumps({"channel": "instrument", "type": typ, "data": {"assets": [{"id": "BTC", "status": "enabled"}], "pairs": [
        {"symbol": s, "base": s.split("/")[0], "quote": s.split("/")[1], "status": st, "qty_precision": 8,
         "qty_increment": 1e-08, "price_precision": 1, "cost_precision": 5, "cost_min": 0.5, "tick_size": 0.1,
         "price_increment": 0.1, "qty_min": qmin} for s, st, qmin in pairs]}})


class _Mirror:
    """The book the venue has, from the test's own level lists, for expected checksums."""

    def __init__(self, bids, asks):
        self.b = {float(p): (p, q) for p, q in bids}
        self.a = {float(p): (p, q) for p, q in asks}

    def apply(self, bids=(), asks=(), depth=10):
        for side, lv in ((self.b, bids), (self.a, asks)):
            for p, q in lv:
                if float(q) == 0:
                    side.pop(float(p), None)
                else:
                    side[float(p)] = (p, q)
        for side, rev in ((self.b, True), (self.a, False)):
            for k in sorted(side, reverse=rev)[depth:]:
                del side[k]

    def checksum(self) -> int:
        return checksum([self.a[k] for k in sorted(self.a)], [self.b[k] for k in sorted(self.b, reverse=True)])


def _norm(depth: int = 10, pairs=("BTC/USD", "ETH/USD")) -> KrakenNormalizer:
    n = KrakenNormalizer(pairs=pairs)
    n.on_connect(T0, conn=1, depth=depth, pairs=list(pairs))
    return n


def _rows(n: KrakenNormalizer, table: str = "l2") -> list[dict]:
    t = n.take().get(table)
    return t.to_pylist() if t is not None else []


def test_checksum_of_the_guide_and_of_a_real_snapshot():
    assert checksum(GUIDE_ASKS, GUIDE_BIDS) == 3310070434
    n = _norm(pairs=())
    n.feed(T0 + 5_000_000, USDG % ts6(T0))
    assert n.checksums_verified == 1 and n.checksums_failed == 0 and n.c.skipped_frames == 0
    rows = _rows(n)
    assert len(rows) == 20 and all(r["snapshot"] for r in rows)
    assert {(r["market"], r["instrument"]) for r in rows} == {("USDG-USD", "USDG/USD")}
    assert rows[0]["price"] == 0.9999 and rows[0]["size"] == 653645.22211 and rows[0]["ts"] == T0
    # the text is what counts: the same numbers read as floats and written back lose "1.0000" -> "1.0"
    d = json.loads(USDG % ts6(T0))["data"][0]
    as_floats = checksum([(repr(x["price"]), repr(x["qty"])) for x in d["asks"]], [(repr(x["price"]), repr(x["qty"])) for x in d["bids"]])
    assert as_floats != d["checksum"]


def test_the_kept_best_10_follow_every_change():
    """`Book` keeps the best-10 tokens incrementally; after any mix of changes and truncations its
    checksum is the one computed from scratch."""
    import random

    from engine.collect.kraken.book import make_level

    rng = random.Random(4)
    b = Book()
    ref: dict[bool, dict[float, tuple[str, str]]] = {False: {}, True: {}}
    for i in range(4000):
        ask = rng.random() < 0.5
        p = f"{(100 + rng.randint(1, 60)) if ask else (100 - rng.randint(0, 60)):d}.{rng.randint(0, 9)}"
        q = "0.00000000" if rng.random() < 0.3 else f"{rng.randint(0, 3)}.{rng.randint(0, 10**8 - 1):08d}"
        if float(q) == 0 and rng.random() < 0.5 and ref[ask]:  # mostly remove levels that exist
            p = rng.choice([v[0] for v in ref[ask].values()])
        b.apply(ask, make_level(p, q))
        if float(q):
            ref[ask][float(p)] = (p, q)
        else:
            ref[ask].pop(float(p), None)
        if i % 7 == 0:
            b.truncate(25)
            for side, rev in ((ref[False], True), (ref[True], False)):
                for k in sorted(side, reverse=rev)[25:]:
                    del side[k]
        want = checksum([ref[True][k] for k in sorted(ref[True])], [ref[False][k] for k in sorted(ref[False], reverse=True)])
        assert b.checksum() == want, i
    # the normalizer's inline version of the same, one update message per change (depth 25)
    n = _norm(depth=25)
    n.feed(T0 + 1, book_frame("snapshot", "BTC/USD", [], [], checksum([], [])))
    m = _Mirror([], [])
    for i in range(3000):
        ask = rng.random() < 0.5
        p = f"{(100 + rng.randint(1, 60)) if ask else (100 - rng.randint(0, 60)):d}.{rng.randint(0, 9)}"
        q = "0.00000000" if rng.random() < 0.3 else f"{rng.randint(0, 3)}.{rng.randint(0, 10**8 - 1):08d}"
        lv = [(p, q)]
        m.apply(bids=[] if ask else lv, asks=lv if ask else [], depth=25)
        n.feed(T0 + 2 + i, book_frame("update", "BTC/USD", [] if ask else lv, lv if ask else [], m.checksum()))
    assert (n.checksums_verified, n.checksums_failed) == (3001, 0)


def test_snapshot_update_truncation_and_a_checksum_mismatch():
    n = _norm()
    r0 = T0 + 1_000_000
    n.feed(r0, '{"method":"subscribe","result":{"channel":"book","depth":10,"snapshot":true,"symbol":"BTC/USD"},"success":true}')
    n.feed(r0 + 1, book_frame("snapshot", "BTC/USD", GUIDE_BIDS, GUIDE_ASKS, 3310070434))
    assert n.valid == {"BTC/USD"} and n.checksums_verified == 1
    assert len(_rows(n)) == 20
    m = _Mirror(GUIDE_BIDS, GUIDE_ASKS)
    # a new best bid pushes the 10th bid out of the depth: Kraken says nothing, the rows say size 0
    up = [("45284.0", "0.50000000")]
    m.apply(bids=up)
    n.feed(r0 + 2, book_frame("update", "BTC/USD", up, [], m.checksum()))
    rows = _rows(n)
    assert [(r["side"], r["price"], r["size"], r["snapshot"]) for r in rows] == [
        ("bid", 45284.0, 0.5, False), ("bid", 45276.6, 0.0, False)]
    # a removal, and the level entering the depth in its place (as Kraken sends it)
    dl, enter = [("45299.5", "0.00000000")], [("45300.1", "2.00000000")]
    m.apply(asks=dl + enter)
    n.feed(r0 + 3, book_frame("update", "BTC/USD", [], dl + enter, m.checksum()))
    assert [(r["side"], r["price"], r["size"]) for r in _rows(n)] == [("ask", 45299.5, 0.0), ("ask", 45300.1, 2.0)]
    assert n.checksums_verified == 3 and n.c.gaps == 0
    # ETH/USD has its own book, unaffected by what follows
    n.feed(r0 + 4, book_frame("snapshot", "ETH/USD", [("3400.00", "1.00000000")], [("3400.10", "2.00000000")],
                              checksum([("3400.10", "2.00000000")], [("3400.00", "1.00000000")])))
    # a checksum that disagrees: one gap with both values, the book dropped, a fresh snapshot asked for
    bad = m.checksum() ^ 1
    n.feed(r0 + 5, book_frame("update", "BTC/USD", [("45283.5", "0.20000000")], [], bad))
    assert n.checksums_failed == 1 and n.valid == {"ETH/USD"}
    gaps = n.take()["gaps"].to_pylist()
    assert len(gaps) == 1
    g = gaps[0]
    assert (g["kind"], g["market"], g["instrument"], g["start_ts"], g["end_ts"]) == ("checksum", "BTC-USD", "BTC/USD", r0 + 3, r0 + 5)
    assert f"Kraken sent {bad}" in g["detail"] and "gives" in g["detail"]
    acts = n.pop_actions()
    assert [(a.kind, a.args["symbol"]) for a in acts] == [("get_snapshot", "BTC/USD")]
    # until the fresh snapshot, BTC/USD updates are skipped (counted); ETH/USD goes on
    n.feed(r0 + 6, book_frame("update", "BTC/USD", [("45283.5", "0.30000000")], [], 1))
    assert n.c.skipped_rows == 1 and n.checksums_failed == 1 and not n.pop_actions()
    n.feed(r0 + 7, book_frame("snapshot", "BTC/USD", GUIDE_BIDS, GUIDE_ASKS, 3310070434))
    assert n.valid == {"BTC/USD", "ETH/USD"} and n.checksums_verified == 5
    assert n.checksum_status() == {"checksums_verified": 5, "checksums_failed": 1, "checksums_missing": 0, "books_valid": 2}


def test_trades_taker_side_dedupe_and_bad_ones():
    n = _norm()
    r = T0 + 2_000_000
    snap = [("BTC/USD", "sell", 45283.5, 0.01, 12), ("BTC/USD", "buy", 45285.2, 0.5, 11), ("ETH/USD", "buy", 3400.1, 1.25, 7)]
    n.feed(r, trade_frame("snapshot", snap))
    n.feed(r + 1, trade_frame("update", [("BTC/USD", "buy", 45285.2, 0.002, 13)]))
    n.feed(r + 2, trade_frame("snapshot", snap))  # re-sent after a resubscribe: duplicates
    n.feed(r + 3, trade_frame("update", [("BTC/USD", "hold", 45285.2, 1.0, 14)]))
    n.feed(r + 4, trade_frame("update", [("BTC/USD", "buy", 45285.2, 1.0, 15)], t=T0 - 3 * 86400 * 10**9))
    rows = _rows(n, "trades")
    assert [(x["instrument"], x["market"], x["trade_id"], x["side"], x["size"]) for x in rows] == [
        ("ETH/USD", "ETH-USD", "7", "buy", 1.25), ("BTC/USD", "BTC-USD", "11", "buy", 0.5),
        ("BTC/USD", "BTC-USD", "12", "sell", 0.01), ("BTC/USD", "BTC-USD", "13", "buy", 0.002)]  # a snapshot in id order
    assert rows[0]["ts"] == T0 and rows[0]["seq"] is None
    assert n.c.dup_trades == 3 and n.c.skip_reasons == {"bad_trade": 2}
    n2 = _norm()
    n2.seed_trade_ids({"BTC/USD": 12})  # from the lake: what is stored is not stored again
    n2.feed(r, trade_frame("snapshot", snap))
    assert [x["trade_id"] for x in _rows(n2, "trades")] == ["7"]


def test_reference_data_of_the_collected_pairs():
    n = _norm(pairs=("BTC/USD",))
    r = T0 + 3_000_000
    n.feed(r, instrument_frame("snapshot", [("BTC/USD", "online", 0.0001), ("ETH/USD", "online", 0.002), ("XRP/USD", "online", 2.0)]))
    n.feed(r + 1, instrument_frame("snapshot", [("BTC/USD", "online", 0.0001)]))  # unchanged: no new version
    n.feed(r + 2, instrument_frame("update", [("BTC/USD", "maintenance", 0.0001)]))
    # ETH/USD is subscribed later on: its reference data (already received) is kept from then on
    n.feed(r + 3, '{"method":"subscribe","result":{"channel":"trade","snapshot":true,"symbol":"ETH/USD"},"success":true}')
    rows = _rows(n, "instruments")
    assert [(x["instrument"], x["market"], x["status"], x["valid_from"]) for x in rows] == [
        ("BTC/USD", "BTC-USD", "online", r), ("BTC/USD", "BTC-USD", "maintenance", r + 2), ("ETH/USD", "ETH-USD", "online", r)]
    x = rows[0]
    assert (x["kind"], x["base"], x["quote"], x["tick_size"], x["size_increment"], x["min_size"]) == (
        "spot", "BTC", "USD", 0.1, 1e-08, 0.0001)
    assert n.c.instrument_versions == 3 and n.known == {"BTC-USD", "ETH-USD"}


def test_heartbeat_status_and_acks_ignored_bad_frames_counted():
    n = _norm()
    r = T0 + 4_000_000
    n.feed(r, book_frame("snapshot", "BTC/USD", GUIDE_BIDS, GUIDE_ASKS, 3310070434))
    for f in ('{"channel":"heartbeat"}',
              '{"channel":"status","type":"update","data":[{"version":"2.0.10","system":"online","api_version":"v2","connection_id":1}]}',
              '{"method":"subscribe","result":{"channel":"instrument","snapshot":true},"success":true,"time_in":"x","time_out":"y"}',
              '{"method":"pong","req_id":3,"time_in":"x","time_out":"y"}',
              '{"channel":"ticker","type":"update","data":[{"symbol":"BTC/USD","bid":1.0}]}'):
        n.feed(r + 1, f)
    assert n.c.ignored_frames == 5 and n.c.skipped_frames == 0 and n.c.errors == 0
    n.feed(r + 2, '{"error":"Currency pair not supported FOO/USD","method":"subscribe","success":false,"symbol":"FOO/USD"}')
    assert n.c.errors == 1 and [(a.kind, a.args["symbol"]) for a in n.pop_actions()] == [("error", "FOO/USD")]
    for f in ('{"channel":"book","type":"update","data":[{"symbol":"BTC/USD","bids":[{"price":', "[1, 2, 3",
              '{"channel":"candles","data":[]}', '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD"}]}', "{}"):
        n.feed(r + 3, f)
    assert n.c.skip_reasons == {"malformed_json": 2, "unknown_message": 1, "bad_trade": 1, "missing_fields": 1}
    assert n.valid == {"BTC/USD"} and n.c.gaps == 0  # nothing said which book a truncated frame was for
    # a book frame of BTC/USD that cannot be read: that book is lost (a gap), a fresh snapshot asked for
    n.feed(r + 4, book_frame("update", "BTC/USD", [('"45283.5"', "0.1")], [], 1))
    n.feed(r + 5, book_frame("update", "BTC/USD", [("-45283.5", "0.1")], [], 1))  # after the gap: skipped
    assert n.c.skip_reasons["bad_book"] == 1 and n.c.skipped_rows == 1
    assert n.valid == set() and [(a.kind, a.args["symbol"]) for a in n.pop_actions()] == [("get_snapshot", "BTC/USD")]
    g = n.take()["gaps"].to_pylist()
    assert [(x["kind"], x["instrument"]) for x in g] == [("sequence", "BTC/USD")]
    assert n.c.frames == 14


def test_names_pass_the_lake_row_checks():
    n = _norm()
    n.feed(T0 + 1, book_frame("snapshot", "BTC/USD", GUIDE_BIDS, GUIDE_ASKS, 3310070434))
    t = n.take()["l2"]
    assert row_faults("l2", t) == []  # instrument BTC/USD (any non-control text), market BTC-USD (a key part)
    bad = t.set_column(t.schema.get_field_index("market"), "market",
                       pa.array(["BTC/USD"] * t.num_rows, pa.string()).dictionary_encode().cast(t.schema.field("market").type))
    assert [c for c, _, _ in row_faults("l2", bad)] == ["market"]


def test_source_options_and_registration():
    from engine.collect.runner import parse_args
    from engine.run.supervisor import _live_sources
    from engine.sim import registry as sim_registry
    from engine.sim.replay.faults import parse_fault

    src = registry.get("kraken")
    assert "kraken" in registry.names() and "kraken" in sim_registry.names()
    cfg = parse_args(["--source", "kraken", "--kraken-pairs", "BTC-USD", "ETH/USD", "--kraken-depth", "100"])
    assert src.markets(cfg) == ["BTC-USD", "ETH-USD"] and src.stall_limit(cfg) == 10.0 and src.url(cfg) == wire.DEFAULT_URL
    subs = [json.loads(m) for m in src.subscribe_messages(cfg)]
    assert subs == [
        {"method": "subscribe", "params": {"channel": "book", "symbol": ["BTC/USD", "ETH/USD"], "depth": 100, "snapshot": True}},
        {"method": "subscribe", "params": {"channel": "trade", "symbol": ["BTC/USD", "ETH/USD"], "snapshot": True}},
        {"method": "subscribe", "params": {"channel": "instrument", "snapshot": True}}]
    assert parse_args([]).kraken_depth == 1000 and parse_args([]).kraken_pairs == ["BTC/USD", "ETH/USD", "SOL/USD"]
    meta = src.connect_meta(cfg)
    assert meta == {"depth": 100, "pairs": ["BTC/USD", "ETH/USD"]}
    assert src.connect_kwargs(meta) == {"depth": 100, "pairs": ("BTC/USD", "ETH/USD")}
    assert src.connect_kwargs({}) == {"depth": 1000, "pairs": ()}
    assert src.local_args(8123) == ["--kraken-url", "ws://127.0.0.1:8123/v2"]
    demo = src.demo(Path("."))
    assert demo.replay_args[0] == "--faults" and parse_fault(demo.replay_args[1])[0] == "corrupt"
    assert [json.loads(m)["method"] for m in wire.book_resubscribe("SOL/USD", 100)] == ["unsubscribe", "subscribe"]
    assert "kraken" in _live_sources()  # no credentials needed: `scripts/run` collects it by default


def test_gen_capture_is_deterministic(tmp_path):
    from engine.sim.generate import cli

    a, b, c = (tmp_path / f"k{i}.jsonl.zst" for i in range(3))
    args = ["--source", "kraken", "--seconds", "5", "--rate", "40", "--kraken-depth", "25"]
    for out, seed in ((a, "3"), (b, "3"), (c, "4")):
        assert cli(args + ["--seed", seed, "--out", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    recs = list(read_capture(a))
    assert recs[0]["meta"] == {"type": "connect", "source": "kraken", "conn": 0, "depth": 25,
                               "pairs": ["BTC/USD", "ETH/USD", "SOL/USD"]}
    assert [r["recv_ns"] for r in recs] == sorted(r["recv_ns"] for r in recs)


# ---- a generated capture through the lake -------------------------------------------------------
@pytest.fixture(scope="module")
def kr_capture(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("krcap") / "kraken.jsonl.zst"
    write_capture(generate_kraken(seconds=12, rate=100, seed=5, start_ns=time.time_ns() - 600 * 10**9), p)
    return p


@pytest.fixture(scope="module")
def kr_reference(kr_capture, tmp_path_factory) -> tuple:
    home = tmp_path_factory.mktemp("krref")
    _ingest(home, [kr_capture], "kraken")
    return _tables(home)


def _book_messages(path: Path) -> list[tuple[int, str, wire.BookData, int]]:
    """(frame index, type, data with the levels' exact text, recv_ns) of every book message of a capture."""
    out, idx = [], 0
    for rec in read_capture(path):
        fr = rec.get("frame")
        if fr is None:
            continue
        if fr.startswith('{"channel":"book"'):
            m = wire.book_decoder.decode(fr)
            out.append((idx, m.type, m.data[0], rec["recv_ns"]))
        idx += 1
    return out


def _apply(b: Book, d: wire.BookData, depth: int = 1000) -> None:
    for ask, levels in ((False, d.bids), (True, d.asks)):
        for x in levels:
            b.apply(ask, x)
    b.truncate(depth)


def _copy(b: Book) -> Book:
    c = Book()
    for name in ("bids", "asks"):
        src, dst = getattr(b, name), getattr(c, name)
        dst.keys, dst.lv, dst.toks, dst.top, dst.dirty = list(src.keys), dict(src.lv), list(src.toks), src.top, src.dirty
    c.crc, c.ask_crc = b.crc, b.ask_crc
    return c


def _decimals(x: float) -> int:
    return max(0, round(-__import__("math").log10(x)))


def test_books_from_stored_rows_pass_the_checksum_at_every_message(kr_capture, tmp_path):
    from engine import Engine
    from engine.collect.timestamps import parse_ts

    home = tmp_path / "lake"
    _ingest(home, [kr_capture], "kraken")
    eng = Engine.open(home=home)
    try:
        l2 = eng.l2(source="kraken", allow_unsealed=True, raw_ns=True)
        ref = eng.instruments(source="kraken", history=True, raw_ns=True)
        assert set(ref["instrument"]) == {"BTC/USD", "ETH/USD", "SOL/USD"}  # not the other pairs of the snapshot
        assert ref.filter(pl.col("instrument") == "SOL/USD").height == 2  # the update half way: a second version
        assert eng.gaps(allow_unsealed=True).height == 0
        # the text of a stored float: the pair's precision, from its reference data
        prec = {r["instrument"]: (_decimals(r["tick_size"]), _decimals(r["size_increment"])) for r in ref.iter_rows(named=True)}
        msgs = _book_messages(kr_capture)
        want = {(d.symbol, recv): d.checksum for _, _, d, recv in msgs}
        # replay the stored rows in arrival order (receive time; a message's rows keep their order)
        rows = l2.with_row_index("i").sort(["recv_ts", "i"]).select(
            pl.col("instrument").cast(pl.Utf8), pl.col("side").cast(pl.Utf8), "price", "size", "snapshot", "recv_ts")
        books: dict[str, dict] = {}
        checked = 0
        for (inst, recv), grp in rows.group_by(["instrument", "recv_ts"], maintain_order=True):
            if grp["snapshot"][0] or inst not in books:
                books[inst] = {"bid": {}, "ask": {}}
            b = books[inst]
            for _, side, price, size, _, _ in grp.iter_rows():
                if size == 0:
                    b[side].pop(price, None)
                else:
                    b[side][price] = size
            pp, qp = prec[inst]
            asks = [(f"{p:.{pp}f}", f"{q:.{qp}f}") for p, q in sorted(b["ask"].items())]
            bids = [(f"{p:.{pp}f}", f"{q:.{qp}f}") for p, q in sorted(b["bid"].items(), reverse=True)]
            assert checksum(asks, bids) == want[(inst, recv)], (inst, recv)
            checked += 1
        assert checked == len(msgs) > 1000
        # eng.book (the research API) at message times agrees, where the message's ts orders it (no
        # message of the pair before it has a later ts, none after it an earlier one)
        ts = [parse_ts(d.timestamp) for _, _, d, _ in msgs]
        spot = 0
        for k in range(50, len(msgs) - 1, max(1, len(msgs) // 25)):
            d, t = msgs[k][2], ts[k]
            mine = [j for j in range(len(msgs)) if msgs[j][2].symbol == d.symbol]
            if any(ts[j] >= t for j in mine if j < k) or any(ts[j] <= t for j in mine if j > k):
                continue
            bk = eng.book("kraken", wire.market_of(d.symbol), d.symbol, at=t, depth=10, allow_unsealed=True)
            pp, qp = prec[d.symbol]
            asks = [(f"{p:.{pp}f}", f"{q:.{qp}f}") for p, q in bk.select("ask_price", "ask_size").iter_rows()]
            bids = [(f"{p:.{pp}f}", f"{q:.{qp}f}") for p, q in bk.select("bid_price", "bid_size").iter_rows()]
            assert checksum(asks, bids) == d.checksum, (d.symbol, k)
            spot += 1
        assert spot >= 10
    finally:
        eng.close()


def test_a_corrupted_level_offline_gives_one_checksum_gap(kr_capture):
    """Offline there is no resync (actions are the live runtime's): one gap, then that pair's
    updates are skipped until the capture's next snapshot of it (none here)."""
    from engine.collect.ingest import apply_line

    msgs = _book_messages(kr_capture)
    books: dict[str, Book] = {}
    target = None
    for idx, typ, d, _ in msgs:
        if typ == "snapshot":
            books[d.symbol] = Book()
        b = books[d.symbol]
        _apply(b, d)
        if target is None and idx > 100:
            edge = b.asks.keys[9]
            hit = [x for x in d.asks if float(x.qty) > 0 and float(x.price) <= edge]
            if hit:
                target = (idx, d.symbol, hit[0])
    idx, sym, x = target
    recs = list(read_capture(kr_capture))
    frames = [r for r in recs if r.get("frame") is not None]
    p, q = bytes(x.price).decode(), bytes(x.qty).decode()
    old = f'"price":{p},"qty":{q}'
    assert old in frames[idx]["frame"]
    frames[idx]["frame"] = frames[idx]["frame"].replace(old, f'"price":{p},"qty":{q[:-1]}{"2" if q[-1] == "1" else "1"}', 1)
    n = KrakenNormalizer()
    for r in recs:
        apply_line(n, r["recv_ns"], r.get("frame"), r.get("meta"))
    g = n.take()["gaps"].to_pylist()
    assert [(x["kind"], x["instrument"]) for x in g] == [("checksum", sym)]
    assert n.checksums_failed == 1 and n.c.skipped_rows > 0 and n.valid == {"BTC/USD", "ETH/USD", "SOL/USD"} - {sym}


# ---- live, through the replay exchange ----------------------------------------------------------
def test_live_equals_offline_and_the_served_capture(kr_capture, kr_reference, tmp_path):
    home, cap = tmp_path / "live", tmp_path / "cap"
    with ReplayServer.run_in_thread(source="kraken", capture=str(kr_capture), speed=0) as srv:
        _collect_all(home, srv, "--source", "kraken", "--kraken-url", srv.ws_url, "--capture-dir", str(cap),
                     "--kraken-stall", "30", source="kraken")
        shift = srv.stats()["shift_ns"]
    st = _status(home, "kraken")
    assert st["skipped_frames"] == 0 and st["gaps"] == 0 and st["reconnects"] == 0, st
    assert st["checksums_failed"] == 0 and st["checksums_verified"] > 1000 and st["book_resyncs"] == 0
    l2, tr, gaps = _tables(home)
    files = sorted(cap.glob("kraken-*.jsonl.zst"))
    assert files
    _ingest(tmp_path / "offline", files, "kraken")
    l2o, tro, _ = _tables(tmp_path / "offline")
    assert _canon_l2(l2, True) == _canon_l2(l2o, True)
    assert _canon_trades(tr) == _canon_trades(tro)
    ref_l2, ref_tr, _ = kr_reference
    assert _canon_l2(l2, False, shift) == _canon_l2(ref_l2, False)
    # trades: the subscription's snapshot holds the last 50 trades when it is answered, which may be
    # after the capture played a few updates; from the first trade held on, every one is identical
    live_t, ref_t = _canon_trades(tr, shift), _canon_trades(ref_tr)
    first: dict = {}
    for inst, tid, *_ in live_t:
        first[inst] = min(first.get(inst, int(tid)), int(tid))
    assert live_t == [r for r in ref_t if int(r[1]) >= first[r[0]]]
    assert len(ref_t) - len(live_t) < 30
    assert l2.height > 5000 and tr.height > 100


def test_corrupt_fault_one_checksum_gap_and_a_resync_on_the_same_connection(kr_capture, kr_reference, tmp_path):
    from engine import Engine
    from engine.research.books import BookGapError

    home, cap = tmp_path / "live", tmp_path / "cap"
    with ReplayServer.run_in_thread(source="kraken", capture=str(kr_capture), speed=3.0, faults=["corrupt@400"]) as srv:
        _collect_all(home, srv, "--source", "kraken", "--kraken-url", srv.ws_url, "--kraken-stall", "30",
                     "--capture-dir", str(cap), source="kraken")
        s = srv.stats()
    assert s["corrupted"] == 1 and s["connections"] == 1
    st = _status(home, "kraken")
    assert (st["checksums_failed"], st["book_resyncs"], st["reconnects"]) == (1, 1, 0), st  # resynced, not reconnected
    l2, tr, gaps = _tables(home)
    g = gaps.with_columns(pl.col("kind").cast(pl.Utf8), pl.col("instrument").cast(pl.Utf8))
    assert g.height == 1 and g["kind"][0] == "checksum"
    sym, end = g["instrument"][0], g["end_ts"][0]
    assert "Kraken sent" in g["detail"][0]
    # the fresh snapshot after the gap, and the books end equal to the exchange's
    again = l2.filter(pl.col("snapshot") & (pl.col("recv_ts") > end) & (pl.col("instrument").cast(pl.Utf8) == sym))
    assert again.height > 0
    assert _final_books(l2) == _final_books(kr_reference[0])
    # the resync is in the collector's capture: offline ingest gives the same rows and the same gap
    _ingest(tmp_path / "offline", sorted(cap.glob("kraken-*.jsonl.zst")), "kraken")
    l2o, _, gapso = _tables(tmp_path / "offline")
    assert _canon_l2(l2, True) == _canon_l2(l2o, True)
    assert gapso.select("kind", "start_ts", "end_ts").rows() == gaps.select("kind", "start_ts", "end_ts").rows()
    eng = Engine.open(home=home)
    try:
        first_after = int(again["ts"].min())
        with pytest.raises(BookGapError):
            eng.book("kraken", wire.market_of(sym), sym, at=end + 1, allow_unsealed=True)
        assert eng.book("kraken", wire.market_of(sym), sym, at=first_after, allow_unsealed=True).height == 10
    finally:
        eng.close()


def _drop_index(path: Path) -> int:
    """A book update whose loss the next update of its pair shows (a change to the best 10 not undone)."""
    msgs = _book_messages(path)
    books: dict[str, Book] = {}
    for k, (idx, typ, d, _) in enumerate(msgs):
        if typ == "update" and idx >= 300:
            trial = _copy(books[d.symbol])
            nxt = next(m[2] for m in msgs[k + 1:] if m[2].symbol == d.symbol)
            _apply(trial, nxt)
            if trial.checksum() != nxt.checksum:
                return idx
        if typ == "snapshot":
            books[d.symbol] = Book()
        _apply(books[d.symbol], d)
    raise AssertionError("no book update whose loss shows")


def test_drop_close_and_stall_give_gaps_and_resyncs(kr_capture, kr_reference, tmp_path):
    drop_at = _drop_index(kr_capture)
    home = tmp_path / "live"
    with ReplayServer.run_in_thread(source="kraken", capture=str(kr_capture), speed=3.0,
                                    faults=[f"drop@{drop_at}", f"close@{drop_at + 200}", f"stall@{drop_at + 500}:2.5"]) as srv:
        proc = subprocess.Popen(_cmd(home, "--source", "kraken", "--kraken-url", srv.ws_url, "--kraken-stall", "1.2"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            _wait_reconnect_after_end(srv)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        s = srv.stats()
    assert s["dropped"] == 1 and s["stalls"] == 1 and s["closes"] == 1
    l2, tr, gaps = _tables(home)
    g = gaps.with_columns(pl.col("kind").cast(pl.Utf8), pl.col("market").cast(pl.Utf8))
    assert g.filter(pl.col("kind") == "checksum").height == 1  # the dropped update, found by the next one's checksum
    assert set(g.filter(pl.col("kind") == "disconnect")["market"]) == {"BTC-USD", "ETH-USD", "SOL-USD"}  # the close
    stale = g.filter(pl.col("kind") == "stale")
    last_rx = l2["recv_ts"].max()
    assert set(stale.filter(pl.col("start_ts") < last_rx)["market"]) == {"BTC-USD", "ETH-USD", "SOL-USD"}  # the stall
    for end in g["end_ts"].to_list():  # after every gap a fresh snapshot
        if l2.filter(pl.col("recv_ts") > end).height:
            assert l2.filter(pl.col("snapshot") & (pl.col("recv_ts") >= end)).height > 0
    assert _final_books(l2) == _final_books(kr_reference[0])
    assert tr.select("instrument", "trade_id").unique().height == tr.height
    assert set(_canon_trades(tr, s["shift_ns"])) <= set(_canon_trades(kr_reference[1]))
