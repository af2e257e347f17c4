"""Coinbase Advanced Trade as a `Source`: products, subscription, trade-id seeding.

No authentication; one sequence counter per connection, so the resync after any gap is a
reconnect (the default `Link`): the new subscription brings fresh snapshots.
"""

from __future__ import annotations

from typing import Iterable

from engine.collect.append import seed_trade_ids
from engine.collect.coinbase import wire
from engine.collect.coinbase.normalize import CoinbaseNormalizer
from engine.collect.source import Source
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS


class CoinbaseSource(Source):
    name = wire.SOURCE
    title = "Coinbase"
    markets_option = "--products"
    markets_help = "products"
    default_markets = wire.DEFAULT_PRODUCTS
    default_url = wire.DEFAULT_URL
    stall_s = 5.0  # heartbeats every second: five silent seconds is a dead feed
    ping_interval = 20.0

    def normalizer(self, markets: Iterable[str] = (), max_skew_ns: int = DEFAULT_MAX_SKEW_NS, log=None) -> CoinbaseNormalizer:
        return CoinbaseNormalizer(max_skew_ns=max_skew_ns, products=markets, log=log)

    def subscribe_messages(self, cfg) -> list[str]:
        return wire.subscribe_messages(self.markets(cfg))

    def seed(self, eng, norm: CoinbaseNormalizer) -> None:
        """Trade snapshots are re-sent after every (re)connect: the stored trade ids are not stored twice."""
        seed_trade_ids(eng, norm, self.name)


SOURCE = CoinbaseSource()
