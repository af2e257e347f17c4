"""Exchange messages for the protocol tests: the recorded ones when ../shared/fixtures is present,
the project's own otherwise, so that every such test runs (CI has no ../shared).

The recordings in ../shared/fixtures are under a licence that keeps them out of the project: they
are read in place, never copied. The project's own stand-ins are
* hand-written samples in engine_tests/data/ (see its README.md), in the same wire formats;
* a Coinbase recording made by the project's generator (engine.sim.capture_gen), fixed seed and start.
Each comes with the facts the tests check on it (`facts`), so one test body serves both.

ENGINE_SHARED_FIXTURES=<dir> points at another copy of the shared fixtures (a path that does not
exist runs the tests on the project's own, as CI does).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENGINE_SHARED_FIXTURES") or ROOT.parent / "shared" / "fixtures")
DATA = Path(__file__).resolve().parent / "data"


@dataclass
class Sample:
    origin: str  # "shared" (a recording in ../shared/fixtures) or "project" (engine_tests/data, capture_gen)
    path: Path | None
    items: list = field(default_factory=list)  # lines (dicts), or (recv_ns, frame text) pairs
    facts: dict = field(default_factory=dict)


def _shared(*parts: str) -> Path | None:
    p = SHARED.joinpath(*parts)
    return p if p.is_file() else None


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ---- Coinbase Advanced Trade -------------------------------------------------------------------


def coinbase_recording() -> Sample:
    """A level2 + market_trades recording as (recv_ns, frame text), one connection."""
    p = _shared("coinbase", "advanced-trade", "cryptofeed-v3-COINBASE.jsonl.zst")
    if p is not None:
        import zstandard

        frames = []
        with open(p, "rb") as f:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
                o = json.loads(line)
                if o.get("t") == "recv":
                    frames.append((int(round(o["ts"] * 1e6)) * 1000, o["data"]))
        # both full-depth snapshots: 46,000 + 23,334 levels (its PROVENANCE.md)
        return Sample("shared", p, frames, {"products": {"BTC-USD", "ETH-USD"}, "min_levels": 20_000,
                                            "snapshot_rows": 46_000 + 23_334})
    from engine.sim.capture_gen import generate_coinbase

    products = ["BTC-USD", "ETH-USD"]
    frames = [(r["recv_ns"], r["frame"]) for r in generate_coinbase(products, seconds=30, rate=200, seed=13, depth=250)
              if "frame" in r]
    # counted from the frames with the stdlib, independently of the engine
    snap_rows = sum(len(ev["updates"]) for _, f in frames for d in [json.loads(f)] if d["channel"] == "l2_data"
                    for ev in d["events"] if ev["type"] == "snapshot")
    return Sample("project", None, frames, {"products": set(products), "min_levels": 200, "snapshot_rows": snap_rows})


def coinbase_wire_frames() -> Sample:
    """Received frames (dicts) of every channel the collector uses, for field-set comparisons."""
    p = _shared("coinbase", "advanced-trade", "ws-2026-08-09-btc-eth.jsonl")
    if p is not None:
        return Sample("shared", p, [json.loads(line)["frame"] for line in p.open() if '"recv"' in line])
    p = DATA / "coinbase" / "ws-sample.jsonl"
    return Sample("project", p, [o["frame"] for o in _jsonl(p) if o["dir"] == "recv"])


# ---- Kalshi ------------------------------------------------------------------------------------


def kalshi_get_snapshot() -> Sample:
    """A use_yes_price=true connection: snapshots, deltas, then `get_snapshot` answers (`id` 2) that
    the book built from the snapshots and deltas must equal. Lines: {dir, recv_at, frame}."""
    p = _shared("kalshi", "demo-orderbook-get-snapshot-2026-08-17.jsonl")
    if p is not None:  # the first delta: +100 at 0.21 yes on a level of 200
        return Sample("shared", p, _jsonl(p), {"answers": 3, "first_delta": ("bid", 0.21, 300.0),
                                               "first_delta_ts_ms": 1786956810579})
    p = DATA / "kalshi" / "orderbook-get-snapshot.jsonl"
    return Sample("project", p, _jsonl(p), {"answers": 3, "first_delta": ("bid", 0.21, 250.0),
                                            "first_delta_ts_ms": 1781274600444})


def kalshi_wire_samples() -> Sample:
    """Mixed received frames of several series (use_yes_price=true): trades, tickers, a sequence
    jump and a mid-stream snapshot without ladders (the book is emptied). Lines: {dir, recv_at, frame}."""
    p = _shared("kalshi", "prod-wire-samples-2026-08-20.jsonl")
    if p is not None:
        return Sample("shared", p, _jsonl(p), {"emptied": ("KXMLBGAME-26AUG191805MIAPHI-PHI", 76182),
                                               "markets": {"KXMLBGAME", "KXATPMATCH"}})
    p = DATA / "kalshi" / "wire-samples.jsonl"
    return Sample("project", p, _jsonl(p), {"emptied": ("KXGOLFWIN-26JUN14-SOUTH", 12),
                                            "markets": {"KXGOLFWIN", "KXRAINNYC"}})


def kalshi_error_samples() -> Sample:
    """Received frames holding exactly one exchange `error` frame. Lines: {dir, recv_at, frame}."""
    p = _shared("kalshi", "demo-wire-samples-2026-08-17.jsonl")
    if p is not None:
        return Sample("shared", p, _jsonl(p), {"error_code": 13})
    p = DATA / "kalshi" / "wire-samples.jsonl"
    return Sample("project", p, _jsonl(p), {"error_code": 6})


def kalshi_trades() -> Sample:
    """`trade` frames, one a line, with and without `ts_ms` (seconds-only `ts`, integer-cent fields)."""
    p = _shared("kalshi", "prod-trade-2026-02-12.jsonl")
    if p is not None:
        return Sample("shared", p, _jsonl(p))
    p = DATA / "kalshi" / "trades.jsonl"
    return Sample("project", p, _jsonl(p))


def kalshi_legacy_cents() -> Sample:
    """Book messages in the older integer-cent form: lines {kind, message}, "legacy" in the kind;
    the facts give the book after the first legacy snapshot + delta (use_yes_price false)."""
    p = _shared("kalshi", "docs-examples.jsonl")
    if p is not None:  # the delta at 96c yes of -54 on an empty level -> removed (0)
        return Sample("shared", p, _jsonl(p), {"ticker": "FED-23DEC-T3.00", "bids": {800: 30000, 2200: 33300},
                                               "asks": {10000 - 5400: 2000, 10000 - 5600: 14600},
                                               "last_row": (0.96, 0.0)})
    p = DATA / "kalshi" / "legacy-cent-fields.jsonl"  # the delta takes all 40 at 31c yes: level removed
    return Sample("project", p, _jsonl(p), {"ticker": "KXSNOWBOS-27JAN05-T6", "bids": {1200: 15000},
                                            "asks": {10000 - 4500: 7500, 10000 - 6200: 1000}, "last_row": (0.31, 0.0)})
