"""Coinbase Advanced Trade as a `Source`: products, subscription, trade-id seeding, and the products'
reference data from the Exchange REST API.

No authentication; one sequence counter per connection, so the resync after any gap is a
reconnect (the default resync policy): the new subscription brings fresh snapshots. The link also
fetches `GET /products/{id}` for every configured product at start and every
`--products-interval` seconds; each answer is a REST answer of the capture (reference data).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import urllib.parse
from typing import Any, Iterable

from engine.collect.append import seed_trade_ids
from engine.collect.coinbase import wire
from engine.collect.coinbase.normalize import CoinbaseNormalizer
from engine.collect.rest import get_text
from engine.collect.source import Link, Source
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS


class CoinbaseLink(Link):
    """The default protocol plus a products task (reference data)."""

    def __init__(self, source: "CoinbaseSource", runner: Any):
        super().__init__(source, runner)
        self.products_fetched = 0

    def tasks(self, stop: asyncio.Event) -> list:
        return [self._products_loop(stop)]

    def status(self) -> dict[str, Any]:
        return {"products_fetched": self.products_fetched}

    async def _products_loop(self, stop: asyncio.Event) -> None:
        r, cfg = self.runner, self.runner.cfg
        base = self.source.rest_url(cfg).rstrip("/")
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            for pid in self.source.markets(cfg):
                url = f"{base}/products/{urllib.parse.quote(pid, safe='')}"
                try:
                    body = await loop.run_in_executor(None, get_text, url)
                except Exception as e:  # noqa: BLE001 - the next round asks again
                    r.log.warning("product_fetch_failed", product=pid, error=repr(e)[:300])
                    continue
                r.rest("product", body, key=url)  # captured and normalized (like ingest does) when it changed
                self.products_fetched += 1
            try:
                await asyncio.wait_for(stop.wait(), cfg.products_interval)
            except asyncio.TimeoutError:
                pass


class CoinbaseSource(Source):
    name = wire.SOURCE
    title = "Coinbase"
    markets_option = "--products"
    markets_help = "products"
    default_markets = wire.DEFAULT_PRODUCTS
    default_url = wire.DEFAULT_URL
    stall_s = 5.0  # heartbeats every second: five silent seconds is a dead feed
    ping_interval = 20.0
    link_class = CoinbaseLink

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        super().add_arguments(ap)
        g = ap.add_argument_group("Coinbase reference data")
        g.add_argument("--coinbase-rest-url", default=os.environ.get("COINBASE_REST_URL") or None,
                       help="Exchange REST API for product increments (default: the public API when --coinbase-url "
                            "is the default, else the same host as --coinbase-url, as a replay exchange serves both)")
        g.add_argument("--products-interval", type=float, default=900.0, help="Coinbase product refresh period (s)")

    def rest_url(self, cfg: argparse.Namespace) -> str:
        """The REST base: as configured, else the public API for the public feed, else the feed's host."""
        explicit = getattr(cfg, "coinbase_rest_url", None)
        if explicit:
            return explicit
        ws = self.url(cfg)
        if ws == self.default_url:
            return wire.DEFAULT_REST_URL
        u = urllib.parse.urlsplit(ws)
        return urllib.parse.urlunsplit(("https" if u.scheme == "wss" else "http", u.netloc, "", "", ""))

    def normalizer(self, markets: Iterable[str] = (), max_skew_ns: int = DEFAULT_MAX_SKEW_NS, log=None) -> CoinbaseNormalizer:
        return CoinbaseNormalizer(max_skew_ns=max_skew_ns, products=markets, log=log)

    def subscribe_messages(self, cfg) -> list[str]:
        return wire.subscribe_messages(self.markets(cfg))

    def seed(self, eng, norm: CoinbaseNormalizer) -> None:
        """Trade snapshots are re-sent after every (re)connect: the stored trade ids are not stored twice."""
        super().seed(eng, norm)
        seed_trade_ids(eng, norm, self.name)


SOURCE = CoinbaseSource()
