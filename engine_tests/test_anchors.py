"""Book anchors: every raw l2 file can be rebuilt into books on its own."""

from __future__ import annotations

import pyarrow.parquet as pq

from engine import Engine
from engine.schema import NS_PER_HOUR
from engine.sim import synth
from engine.timeutil import to_ns


def apply(book: dict, rows: list[dict]) -> dict:
    """Reference: plain dict books keyed by instrument → {(side, price): size}, rows in (ts, seq) order."""
    snap_key = {}
    for r in rows:
        inst = r["instrument"]
        if r["snapshot"]:
            k = (r["ts"], r["seq"])
            if snap_key.get(inst) != k:  # first row of a new snapshot replaces the book
                book[inst] = {}
                snap_key[inst] = k
        else:
            snap_key.pop(inst, None)
        lv = book.setdefault(inst, {})
        if r["size"] == 0:
            lv.pop((r["side"], r["price"]), None)
        else:
            lv[(r["side"], r["price"])] = r["size"]
    return {i: b for i, b in book.items() if b}


def test_each_file_rebuilds_the_book(tmp_path):
    eng = Engine.open(tmp_path / "h", background=False, book_anchors=True, writer=True)
    start = to_ns("2026-11-02")
    insts = ["KXBTC-X-B1", "KXBTC-X-B2"]
    full = []
    for h in range(4):
        t = synth.l2_rows("kalshi", "KXBTC", start + h * NS_PER_HOUR, 3000, NS_PER_HOUR, seed=h, instruments=insts,
                          seq_start=h * 10_000)
        full.append(t)
        eng.append("l2", t)
    eng.flush()
    files = sorted(eng.catalog.files("l2"), key=lambda e: e.key)
    assert len(files) == 4
    history: dict = {}
    for i, e in enumerate(files):
        rows = pq.read_table(eng.local_path(e)).to_pylist()
        own = apply({}, sorted(rows, key=lambda r: (r["ts"], r["seq"], not r["snapshot"])))
        history = apply(history, sorted(full[i].to_pylist(), key=lambda r: (r["ts"], r["seq"])))
        assert own == history, f"file {e.key} alone does not rebuild the book"
        if i:  # after the first file, each instrument's rows open with its anchor snapshot
            for inst in insts:
                mine = [r for r in rows if r["instrument"] == inst]
                assert mine[0]["snapshot"], f"{e.key}: {inst} does not start with an anchor"
    eng.close()


def test_gap_drops_the_carried_book(tmp_path):
    eng = Engine.open(tmp_path / "h", background=False, book_anchors=True, writer=True)
    start = to_ns("2026-11-02")
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", start, 500, NS_PER_HOUR))
    eng.flush()
    eng.append("gaps", synth.gap_rows([{"source": "coinbase", "market": "BTC-USD", "instrument": None,
                                        "start_ts": start + NS_PER_HOUR - 10**9, "end_ts": start + NS_PER_HOUR + 10**9,
                                        "kind": "disconnect", "detail": "test"}]))
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", start + NS_PER_HOUR, 500, NS_PER_HOUR, seed=3))
    eng.flush()
    second = max(eng.catalog.files("l2"), key=lambda e: e.key)
    rows = pq.read_table(eng.local_path(second))
    assert rows.num_rows == 500 and not any(rows.column("snapshot").to_pylist()), "stale pre-gap book was anchored"
    eng.close()
