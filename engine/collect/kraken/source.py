"""Kraken spot WebSocket v2 as a `Source`: pairs, book depth, subscription, and the resync policy.

No authentication. There are no sequence numbers: the book checksum is the integrity check, and a
mismatch is repaired on the same connection: the Link unsubscribes and resubscribes that pair's
book (a fresh snapshot; the other pairs keep streaming). A snapshot that does not come within
`--kraken-snapshot-timeout`, or a pair needing a second resync within `RESYNC_MIN_INTERVAL_S`,
falls back to a reconnect.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine.collect.append import seed_trade_ids
from engine.collect.base import Action
from engine.collect.kraken import wire
from engine.collect.kraken.normalize import KrakenNormalizer
from engine.collect.source import Demo, Link, Reconnect, Source
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS

RESYNC_MIN_INTERVAL_S = 2.0  # a pair failing again sooner than this is resynced by reconnecting (with backoff)
DEMO_CHECKSUM_FAULT_AT = 2500  # capture frame index of the demo's one corrupted book level (~30 s in)


class KrakenLink(Link):
    """Book resubscriptions of one runner: pairs asked for a fresh snapshot (and when), and the
    status counters (checksums from the normalizer, resyncs sent here)."""

    def __init__(self, source: "KrakenSource", runner: Any):
        super().__init__(source, runner)
        self.pending: dict[str, float] = {}  # symbol -> monotonic time of its resubscribe
        self.last_resync: dict[str, float] = {}
        self.resyncs = 0

    async def on_open(self, ws) -> None:
        self.pending = {}
        await super().on_open(ws)

    async def act(self, ws, a: Action) -> None:
        r = self.runner
        if a.kind == "get_snapshot":
            sym = a.args["symbol"]
            now = time.monotonic()
            if now - self.last_resync.get(sym, -1e18) < RESYNC_MIN_INTERVAL_S:
                raise Reconnect(f"checksum: the {sym} book failed again {now - self.last_resync[sym]:.1f} s after "
                                f"a resubscribe; reconnecting")
            self.last_resync[sym] = now
            for m in wire.book_resubscribe(sym, r.cfg.kraken_depth):
                await ws.send(m)
            self.pending[sym] = now
            self.resyncs += 1
            r.log.warning("book_resubscribed", symbol=sym, reason=a.args.get("reason"))
        elif a.kind == "error":
            # logged by the normalizer; a subscription that fails leaves its pair out (a bad pair name
            # must not cost the others), and a resubscribe that fails is caught by `overdue`
            pass

    def overdue(self) -> str | None:
        """A resubscribed book whose snapshot has not come in time: reconnect for fresh ones."""
        if not self.pending:
            return None
        r = self.runner
        with r.lock:
            valid = set(r.norm.valid)
        for sym, t0 in list(self.pending.items()):
            if sym in valid:
                del self.pending[sym]
            elif time.monotonic() - t0 > r.cfg.kraken_snapshot_timeout:
                return f"disconnect: no fresh {sym} book {r.cfg.kraken_snapshot_timeout:g} s after resubscribing"
        return None

    def status(self) -> dict[str, Any]:
        r = self.runner
        with r.lock:
            st = r.norm.checksum_status()
        st["book_resyncs"] = self.resyncs
        return st


class KrakenSource(Source):
    name = wire.SOURCE
    title = "Kraken"
    markets_option = "--kraken-pairs"
    markets_help = "pairs (BTC/USD or BTC-USD; stored as market BTC-USD, instrument BTC/USD)"
    default_markets = wire.DEFAULT_PAIRS
    default_url = wire.DEFAULT_URL
    stall_s = 10.0  # a heartbeat every second on a quiet connection: ten silent seconds is a dead feed
    ping_interval = 20.0
    link_class = KrakenLink

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        super().add_arguments(ap)  # --kraken-pairs, --kraken-url, --kraken-stall
        g = ap.add_argument_group("Kraken book")
        g.add_argument("--kraken-depth", type=int, choices=wire.DEPTHS, default=wire.DEFAULT_DEPTH,
                       help="Kraken book depth subscribed (levels per side), recorded in the capture")
        g.add_argument("--kraken-snapshot-timeout", type=float, default=10.0,
                       help="reconnect when a resubscribed Kraken book has no fresh snapshot within this (s)")

    def markets(self, cfg: argparse.Namespace) -> list[str]:
        """Market keys (`BTC-USD`) of the configured pairs, whichever way they were written."""
        return list(dict.fromkeys(wire.market_of(wire.symbol_of(p)) for p in super().markets(cfg)))

    def symbols(self, cfg: argparse.Namespace) -> list[str]:
        return [wire.symbol_of(m) for m in self.markets(cfg)]

    def normalizer(self, markets: Iterable[str] = (), max_skew_ns: int = DEFAULT_MAX_SKEW_NS, log=None) -> KrakenNormalizer:
        return KrakenNormalizer(max_skew_ns=max_skew_ns, pairs=markets, log=log)

    def subscribe_messages(self, cfg: argparse.Namespace) -> list[str]:
        return wire.subscribe_messages(self.symbols(cfg), cfg.kraken_depth)

    def connect_meta(self, cfg: argparse.Namespace) -> dict[str, Any]:
        # the depth decides the truncation, which the frames do not restate (the acks do, per pair)
        return {"depth": cfg.kraken_depth, "pairs": self.symbols(cfg)}

    def connect_kwargs(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        depth = meta.get("depth")
        pairs = meta.get("pairs")
        return {"depth": depth if type(depth) is int and depth > 0 else wire.DEFAULT_DEPTH,
                "pairs": tuple(p for p in pairs if isinstance(p, str)) if isinstance(pairs, list) else ()}

    def seed(self, eng, norm: KrakenNormalizer) -> None:
        """Trade snapshots are re-sent after every (re)subscribe: the stored trade ids are not stored twice."""
        seed_trade_ids(eng, norm, self.name)

    def local_args(self, port: int) -> list[str]:
        return ["--kraken-url", f"ws://127.0.0.1:{port}/v2"]

    def demo(self, directory: Path) -> Demo:
        """One corrupted book level, so the demo shows a `checksum` gap and the resync after it."""
        return Demo(replay_args=["--faults", f"corrupt@{DEMO_CHECKSUM_FAULT_AT}"])


SOURCE = KrakenSource()
