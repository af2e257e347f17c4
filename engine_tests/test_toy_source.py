"""A source registered from outside engine/ (engine_tests/toy_source.py) is collected like the
built-in ones: registry, `collect` options, the runner's wiring, and offline ingest of a capture
into the lake (meta lines, sequence and disconnect gaps, skipped frames, trade-id seeding, CLI)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from engine.collect import registry
from engine_tests import toy_source as toy

T0 = 1_795_712_400_000_000_000  # 2026-11-26T17:00:00Z
MS = 1_000_000


@pytest.fixture
def registered():
    registry.register(toy.SOURCE)
    try:
        yield toy.SOURCE
    finally:
        registry.unregister(toy.NAME)


def _capture(path: Path, tick: float | None = 0.01) -> Path:
    """A toy capture in the collector's format: frames and the connection's meta lines."""
    t = T0
    lines: list[dict] = []

    def frame(text: str) -> None:
        nonlocal t
        t += MS
        lines.append({"recv_ns": t, "frame": text})

    def meta(m: dict) -> None:
        nonlocal t
        t += MS
        lines.append({"recv_ns": t, "meta": m})

    connect = {"type": "connect", "source": "toy", "conn": 1} | ({"tick": tick} if tick is not None else {})
    meta(connect)
    frame(toy.book(1, t, bids=[[100, 5], [99, 2]], asks=[[101, 4]]))  # 3 snapshot rows
    frame(toy.level(2, t, "bid", 100, 3))
    frame(toy.trade(3, t, 1, "buy", 101, 1))
    frame("{not json")  # skipped: malformed
    frame(json.dumps({"type": "hello", "seq": 4}))  # skipped: unknown message (its seq is never read)
    frame(toy.level(4, t, "ask", 101, 0))  # removes the level
    frame(toy.level(7, t, "bid", 98, 1))  # seq jump: a sequence gap, the book invalid, this row skipped
    frame(toy.book(8, t, bids=[[100, 3]], asks=[[102, 1]]))  # 2 snapshot rows, the book valid again
    frame(toy.trade(9, t, 2, "sell", 100, 2))
    meta({"type": "disconnect", "conn": 1, "reason": "test"})
    meta(connect | {"conn": 2})  # a disconnect gap up to here
    frame(toy.book(1, t, bids=[[100, 3]], asks=[[102, 1]]))  # 2 snapshot rows
    frame(toy.trade(2, t, 2, "sell", 100, 2))  # re-sent after the reconnect: a duplicate
    frame(toy.trade(3, t, 3, "buy", 102, 1))
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _lake(home: Path):
    from engine import Engine

    return Engine.open(home=home, writer=True, book_anchors=True)


def test_registry_refuses_a_second_source_of_the_same_name(registered):
    assert registry.names()[:2] == ["coinbase", "kalshi"] and "toy" in registry.names()
    assert registry.get("toy") is registered
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy.ToySource())
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="lowercase identifier"):
        registry.register(type("Bad", (toy.ToySource,), {"name": "Bad-Name"})())


def test_collect_options_and_runner_wiring(registered):
    from engine.collect.runner import SourceRunner, parse_args

    cfg = parse_args(["--source", "toy", "--toy-markets", "TOY-A", "TOY-B", "--toy-tick", "0.5", "--toy-stall", "3"])
    assert cfg.source == ["toy"]
    assert registered.markets(cfg) == ["TOY-A", "TOY-B"]
    assert registered.url(cfg) == toy.ToySource.default_url and registered.stall_limit(cfg) == 3.0
    assert parse_args([]).source == registry.names()  # every registered source by default
    with ThreadPoolExecutor(1) as pool:
        r = SourceRunner("toy", None, cfg, pool)
    assert isinstance(r.norm, toy.ToyNormalizer) and r.norm.known == {"TOY-A", "TOY-B"}
    assert r.url == toy.ToySource.default_url and r.stall_s == 3.0 and r.src.ping_interval == 20.0
    assert r.src.auth_headers(cfg) is None and r.src.unusable(cfg) is None
    assert r.link.status() == {} and r.link.overdue() is None and r.link.tasks(None) == []
    assert r.src.connect_meta(cfg) == {"tick": 0.5}
    assert registered.subscribe_messages(cfg) == ['{"subscribe": ["TOY-A", "TOY-B"]}']
    assert registered.local_args(8123) == ["--toy-url", "ws://127.0.0.1:8123"]


def test_ingest_toy_capture_into_the_lake(registered, tmp_path):
    from engine.collect.ingest import ingest_files

    cap = _capture(tmp_path / "toy-20261126T17Z.jsonl")
    eng = _lake(tmp_path / "lake")
    try:
        st = ingest_files(eng, [cap], "toy", progress=False)
        l2 = eng.l2(allow_unsealed=True, raw_ns=True)
        tr = eng.trades(allow_unsealed=True, raw_ns=True)
        gaps = eng.gaps(allow_unsealed=True, raw_ns=True)
    finally:
        eng.close()
    assert st["frames"] == 12 and st["bad_lines"] == 0
    assert st["skipped_frames"] == 2 and st["skip_reasons"] == {"malformed_json": 1, "unknown_message": 1}
    assert st["skipped_rows"] == 1 and st["dup_trades"] == 1 and st["gaps"] == 2
    assert st["rows_l2"] == 9 and st["rows_trades"] == 3 and st["rows_appended"] == 9 + 3 + 2
    for df in (l2, tr, gaps):
        assert df["source"].cast(pl.Utf8).unique().to_list() == ["toy"]
        assert df["market"].cast(pl.Utf8).unique().to_list() == ["TOY-A"]
    # the tick came from the connect meta line: prices in ticks * 0.01
    rows = l2.select(pl.col("side").cast(pl.Utf8), "price", "size", "seq", "snapshot").rows()
    assert sorted(rows) == sorted([
        ("bid", 100 * 0.01, 5.0, 1, True), ("bid", 99 * 0.01, 2.0, 1, True), ("ask", 101 * 0.01, 4.0, 1, True),
        ("bid", 100 * 0.01, 3.0, 2, False),
        ("ask", 101 * 0.01, 0.0, 4, False),
        ("bid", 100 * 0.01, 3.0, 8, True), ("ask", 102 * 0.01, 1.0, 8, True),
        ("bid", 100 * 0.01, 3.0, 1, True), ("ask", 102 * 0.01, 1.0, 1, True),
    ])
    assert (l2["instrument"].cast(pl.Utf8) == "TOY-A").all() and (l2["ts"] <= l2["recv_ts"]).all()
    assert tr.sort("trade_id").select("trade_id", pl.col("side").cast(pl.Utf8), "price").rows() == [
        ("1", "buy", 101 * 0.01), ("2", "sell", 100 * 0.01), ("3", "buy", 102 * 0.01)]
    g = gaps.sort("start_ts").select(pl.col("kind").cast(pl.Utf8), "start_ts", "end_ts").rows()
    assert [k for k, _, _ in g] == ["sequence", "disconnect"]
    assert all(e > s for _, s, e in g)

    # again into the same lake: the stored trade ids are seeded, so no trade is stored twice
    eng = _lake(tmp_path / "lake")
    try:
        st2 = ingest_files(eng, [cap], "toy", progress=False)
        assert eng.trades(allow_unsealed=True).height == 3
    finally:
        eng.close()
    assert st2["rows_trades"] == 0 and st2["dup_trades"] == 4


def test_ingest_meta_without_tick_and_apply_line(registered):
    from engine.collect.ingest import apply_line

    out = {}
    for tick in (None, 0.5):
        n = registered.normalizer()
        meta = {"type": "connect", "source": "toy", "conn": 1} | ({} if tick is None else {"tick": tick})
        apply_line(n, T0, None, meta)
        apply_line(n, T0 + 1, toy.book(1, T0, bids=[[10, 1]]), None)
        apply_line(n, T0 + 2, None, {"type": "disconnect", "conn": 1, "reason": "x"})
        out[tick] = n.take()["l2"].column("price").to_pylist()
        assert n.conn is None
    assert out == {None: [10.0], 0.5: [5.0]}


def test_ingest_cli_takes_a_registered_source(registered, tmp_path, capsys):
    from engine.collect.ingest import cli

    cap = _capture(tmp_path / "toy.jsonl", tick=None)
    assert cli([str(cap), "--source", "toy", "--home", str(tmp_path / "lake"), "--no-progress"]) == 0
    assert "12 frames, 9 l2 rows, 3 trades, 2 gaps, 2 skipped frames, 0 bad lines" in capsys.readouterr().out
    eng = _lake(tmp_path / "lake")
    try:
        assert sorted(eng.l2(allow_unsealed=True)["price"].unique().to_list()) == [99.0, 100.0, 101.0, 102.0]
    finally:
        eng.close()
