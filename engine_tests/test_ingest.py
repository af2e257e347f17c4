"""Capture files (writer/reader, rotation, torn tails) and offline ingest (CLI, determinism, meta lines)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from engine.collect.capture import CaptureReader, CaptureWriter, read_capture
from engine.collect.ingest import apply_line, cli, ingest_files
from engine.collect.kalshi.normalize import KalshiNormalizer

H = 3_600_000_000_000
T0 = 1_795_712_400_000_000_000  # 2026-11-26T17:00:00Z


def _cb(seq, pid="BTC-USD", typ="update", px="100", q="1", t="2026-11-26T17:00:00.5Z"):
    return json.dumps({"channel": "l2_data", "timestamp": t, "sequence_num": seq, "events": [
        {"type": typ, "product_id": pid, "updates": [{"side": "bid", "event_time": t, "price_level": px, "new_quantity": q}]}]})


@pytest.mark.parametrize("compress", [True, False])
def test_capture_roundtrip_and_hourly_rotation(tmp_path, compress):
    w = CaptureWriter(tmp_path, "coinbase", compress=compress)
    w.meta(T0, {"type": "connect", "source": "coinbase", "conn": 1})
    w.frame(T0 + 1, _cb(0, typ="snapshot"))
    w.frame(T0 + 2, b'{"raw":"bytes \xc3\xa9"}')
    w.flush()
    w.frame(T0 + H + 5, _cb(1))  # next UTC hour: new file, which restates the connection
    w.meta(T0 + H + 6, {"type": "disconnect", "conn": 1, "reason": "x"})
    w.close()
    names = [p.name for p in w.files]
    sfx = ".jsonl.zst" if compress else ".jsonl"
    assert names == ["coinbase-20261126T17Z" + sfx, "coinbase-20261126T18Z" + sfx]
    a = list(read_capture(w.files[0]))
    b = list(read_capture(w.files[1]))
    assert a[0] == (T0, None, {"type": "connect", "source": "coinbase", "conn": 1})
    assert a[2] == (T0 + 2, '{"raw":"bytes é"}', None)
    assert b[0][2] == {"type": "connect", "source": "coinbase", "conn": 1, "continued": True}
    assert b[1][1] == _cb(1) and b[2][2]["type"] == "disconnect"
    # a restarted writer never appends to an existing file
    w2 = CaptureWriter(tmp_path, "coinbase", compress=compress)
    w2.frame(T0 + 3, _cb(0))
    w2.close()
    assert w2.files[0].name == "coinbase-20261126T17Z.1" + sfx


def test_torn_tail_tolerated(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"recv_ns": T0, "frame": "x"}) + "\n" + '{"recv_ns": 17, "fra')
    rd = CaptureReader(p)
    assert list(rd) == [(T0, "x", None)] and rd.bad_lines == 1
    # truncated zstd stream (crash mid-write): what was flushed is still readable
    w = CaptureWriter(tmp_path / "z", "kalshi", compress=True)
    for i in range(100):
        w.frame(T0 + i, f"frame {i}")
    w.flush()
    w.frame(T0 + 200, "lost")
    raw = w._raw
    raw.flush()
    data = w.path.read_bytes()
    path = w.path
    w._out = None  # abandon without the end of frame, as a SIGKILL would
    raw.close()
    path.write_bytes(data)
    got = [f for _, f, _ in read_capture(path)]
    assert got[:100] == [f"frame {i}" for i in range(100)]


def test_rotation_continued_meta_keeps_the_connection(tmp_path):
    w = CaptureWriter(tmp_path, "coinbase", compress=False)
    w.meta(T0, {"type": "connect", "source": "coinbase", "conn": 1})
    w.frame(T0 + 1, _cb(0, typ="snapshot"))
    w.frame(T0 + H, _cb(1, px="101", t="2026-11-26T18:00:00Z"))
    w.close()
    from engine import Engine

    eng = Engine.open(home=tmp_path / "lake", writer=True, book_anchors=True)
    try:
        st = ingest_files(eng, w.files, "coinbase", progress=False)
        l2 = eng.l2(allow_unsealed=True)
    finally:
        eng.close()
    assert st["gaps"] == 0 and st["skipped_rows"] == 0
    assert l2.filter(~pl.col("snapshot")).height == 1  # the update in the next file applied to the book


def test_kalshi_meta_use_yes_price_is_honored():
    frames = [
        json.dumps({"type": "orderbook_snapshot", "sid": 1, "seq": 1,
                    "msg": {"market_ticker": "KXBTC-X-B1", "no_dollars_fp": [["0.3000", "1.00"]]}}),
    ]
    out = {}
    for use_yes in (None, False, True):
        n = KalshiNormalizer()
        if use_yes is not None:
            apply_line(n, T0, None, {"type": "connect", "source": "kalshi", "conn": 1, "use_yes_price": use_yes})
        for f in frames:
            apply_line(n, T0, f, None)
        out[use_yes] = n.take()["l2"].column("price").to_pylist()
    assert out[None] == out[False] == [0.7] and out[True] == [0.3]


def test_ingest_cli_deterministic(tmp_path, capsys):
    from engine.sim.capture_gen import generate_kalshi, write_capture

    cap = tmp_path / "k.jsonl.zst"
    write_capture(generate_kalshi(series=["KXBTC"], seconds=60, rate=50, seed=2), cap)
    lakes = []
    for name in ("a", "b"):
        home = tmp_path / name
        assert cli([str(cap), "--source", "kalshi", "--home", str(home), "--no-progress"]) == 0
        from engine import Engine

        eng = Engine.open(home=home)
        try:
            lakes.append((eng.l2(allow_unsealed=True), eng.trades(allow_unsealed=True), eng.gaps(allow_unsealed=True)))
        finally:
            eng.close()
    (l2a, tra, ga), (l2b, trb, gb) = lakes
    assert l2a.height > 100 and tra.height > 0
    assert l2a.equals(l2b) and tra.equals(trb) and ga.equals(gb)
    assert "ingested 1 file(s)" in capsys.readouterr().out
    assert cli([str(tmp_path / "missing.jsonl"), "--source", "kalshi", "--home", str(tmp_path / "c")]) == 2
