"""Deterministic Coinbase Advanced Trade capture generator (the project's own code, no fixtures).

One connection subscribed to level2, market_trades and heartbeats: `subscriptions` acks, an
`l2_data` snapshot (multi-level book per product) then updates (`event_time`, `price_level`,
`new_quantity` as trimmed decimal strings), a `market_trades` snapshot (100 trades, newest first)
then 250 ms batches (maker `side`, increasing `trade_id`), `heartbeats` once a second;
`sequence_num` contiguous from 0 on the connection. Same parameters (seed and start time
included) → byte-identical output.
"""

from __future__ import annotations

import argparse
import math
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.sim.fmt import DEFAULT_START_NS, fmt_fixed, fmt_rfc3339

DEFAULT_PRODUCTS = ("BTC-USD", "ETH-USD", "SOL-USD")
_PRODUCT_MIDS = {"BTC-USD": 9_700_000, "ETH-USD": 340_000, "SOL-USD": 24_000}
_enc = msgspec.json.Encoder()


@dataclass
class _Product:
    pid: str
    mid_cents: int
    size_scale: int = 8
    bids: dict[int, int] = field(default_factory=dict)  # price cents -> size units (1e-8)
    asks: dict[int, int] = field(default_factory=dict)
    next_trade_id: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=100))
    pending_trades: list = field(default_factory=list)


def _rand_size(rng: random.Random, scale: int, big: bool = False) -> int:
    # log-uniform between 1e-8 and ~2 (or ~20) coins, rounded to a random number of significant digits
    hi = math.log(20 if big else 2)
    v = math.exp(rng.uniform(math.log(1e-6), hi))
    units = max(1, int(v * 10**scale))
    digits = rng.choice((1, 2, 3, 4, 5, 6, 8))
    mag = len(str(units))
    if mag > digits:
        q = 10 ** (mag - digits)
        units = max(q, units // q * q)
    return units


def _trade_dict(pid: str, tr) -> dict:
    tid, price, size, tns, maker = tr
    return {
        "product_id": pid,
        "trade_id": str(tid),
        "price": fmt_fixed(price, 2),
        "size": fmt_fixed(size, 8),
        "time": fmt_rfc3339(tns, 6),
        "side": maker,
    }


def _update(side: str, et: str, px: int, sz: int) -> dict:
    return {"side": side, "event_time": et, "price_level": fmt_fixed(px, 2), "new_quantity": fmt_fixed(sz, 8)}


class _CoinbaseSim:
    """The generator's state; every random draw happens in the order of the original single function,
    so output is unchanged for a given seed."""

    def __init__(self, products: Iterable[str], seconds: float, rate: float, seed: int, start_ns: int,
                 depth: int, conn: int):
        self.rng = random.Random(seed)
        self.products = list(products)
        self.depth = depth
        self.start_ns = start_ns
        self.end = start_ns + int(seconds * 1e9)
        self.step = int(1e9 / max(rate, 1.0))
        self.conn = conn
        self.prods = {pid: self._new_product(i, pid) for i, pid in enumerate(self.products)}
        self.seq = 0
        self.hb_counter = self.rng.randint(10_000, 90_000)
        self.mono_base = self.rng.uniform(10_000, 90_000)

    def _new_product(self, i: int, pid: str) -> _Product:
        rng, depth = self.rng, self.depth
        mid = _PRODUCT_MIDS.get(pid, 10_000 + 1_000 * i)
        p = _Product(pid, mid)
        # full book: `depth` levels per side, gaps of 1..k ticks, widening away from the touch
        px = mid - rng.randint(1, 3)
        for j in range(depth):
            p.bids[px] = _rand_size(rng, 8, big=j > depth // 2)
            px -= rng.randint(1, 2 + j // 10)
            if px <= 1:
                break
        px = mid + rng.randint(1, 3)
        for j in range(depth):
            p.asks[px] = _rand_size(rng, 8, big=j > depth // 2)
            px += rng.randint(1, 2 + j // 10)
        p.next_trade_id = rng.randint(10**8, 10**9)
        # 100 historical trades, the newest ~1 s before start
        t = self.start_ns - 10**9
        hist = []
        for _ in range(100):
            maker = rng.choice(("BUY", "SELL"))
            price = max(p.bids) if maker == "BUY" else min(p.asks)
            hist.append((p.next_trade_id, price, _rand_size(rng, 8), t, maker))
            p.next_trade_id += 1
            t -= rng.randint(10**7, 2 * 10**9)
        # trade ids increase with time: reassign ids in time order
        hist.sort(key=lambda x: x[3])
        base = p.next_trade_id - 100
        for k, h in enumerate(hist):
            p.recent.append((base + k,) + h[1:])
        return p

    def frame(self, channel: str, events: list, recv: int) -> dict:
        ts = recv - self.rng.randint(200_000, 5_000_000)
        s = _enc.encode({"channel": channel, "timestamp": fmt_rfc3339(ts, 9), "sequence_num": self.seq,
                         "events": events})
        self.seq += 1
        return {"recv_ns": recv, "frame": s.decode()}

    def records(self) -> Iterator[dict]:
        now = self.start_ns
        yield {"recv_ns": now, "meta": {"type": "connect", "source": "coinbase", "conn": self.conn}}
        now = yield from self._subscribe(now)
        yield from self._stream(now)

    def _subscribe(self, now: int) -> Iterator[dict]:
        """level2 snapshots and ack, market_trades snapshots and ack, heartbeats ack; returns the time."""
        rng = self.rng
        subs: dict[str, list[str]] = {}
        now += rng.randint(50, 150) * 10**6
        for pid in self.products:
            p = self.prods[pid]
            et = fmt_rfc3339(now - rng.randint(10**6, 10**8), 6)
            ups = [_update("bid", et, px, sz) for px, sz in sorted(p.bids.items(), reverse=True)]
            ups += [_update("offer", et, px, sz) for px, sz in sorted(p.asks.items())]
            yield self.frame("l2_data", [{"type": "snapshot", "product_id": pid, "updates": ups}], now)
            now += rng.randint(100_000, 2_000_000)
        subs["level2"] = list(self.products)
        yield self.frame("subscriptions", [{"subscriptions": dict(subs)}], now)
        now += rng.randint(100_000, 2_000_000)
        for pid in self.products:
            p = self.prods[pid]
            trades = [_trade_dict(pid, tr) for tr in reversed(p.recent)]
            yield self.frame("market_trades", [{"type": "snapshot", "trades": trades}], now)
            now += rng.randint(100_000, 2_000_000)
        subs["market_trades"] = list(self.products)
        yield self.frame("subscriptions", [{"subscriptions": dict(subs)}], now)
        now += rng.randint(100_000, 2_000_000)
        subs["heartbeats"] = ["heartbeats"]
        yield self.frame("subscriptions", [{"subscriptions": dict(subs)}], now)
        return now

    def _stream(self, now: int) -> Iterator[dict]:
        rng = self.rng
        next_hb = (now // 10**9 + 1) * 10**9 + rng.randint(0, 10**8)
        next_flush = now + 250_000_000
        while True:
            now += max(1, int(rng.expovariate(1.0) * self.step))
            if now >= self.end:
                break
            while next_hb <= now:
                yield self._heartbeat(next_hb)
                next_hb += 10**9 + rng.randint(-2_000_000, 2_000_000)
            while next_flush <= now:
                for pid in self.products:
                    p = self.prods[pid]
                    if p.pending_trades:
                        trades = [_trade_dict(pid, tr) for tr in p.pending_trades]
                        p.pending_trades.clear()
                        yield self.frame("market_trades", [{"type": "update", "trades": trades}], next_flush)
                next_flush += 250_000_000
            rec = self._book_event(now)
            if rec is not None:
                yield rec

    def _heartbeat(self, at: int) -> dict:
        self.hb_counter += 1
        mono = self.mono_base + (at - self.start_ns) / 1e9
        cur = fmt_rfc3339(at - 1_500_000, 9)
        cur_s = cur.replace("T", " ").rstrip("Z")
        ev = {"current_time": f"{cur_s} +0000 UTC m=+{mono:.9f}", "heartbeat_counter": self.hb_counter}
        return self.frame("heartbeats", [ev], at)

    def _book_event(self, now: int) -> dict | None:
        """One l2_data update of a random product (a trade at the touch, then level changes)."""
        rng = self.rng
        p = self.prods[self.products[rng.randrange(len(self.products))]]
        ev_ns = now - rng.randint(20_000_000, 300_000_000)
        et = fmt_rfc3339(ev_ns, rng.choice((6, 6, 6, 5, 4)))
        changes: list[tuple[str, int, int]] = []
        if rng.random() < 0.12:
            self._trade(p, ev_ns, changes)
        n = rng.choice((1, 1, 1, 2, 2, 3, 4, 6, 8))
        for _ in range(n):
            ch = self._level_change(p)
            if ch is not None:
                changes.append(ch)
        if not changes:
            return None
        ups = [_update(s, et, px, sz) for s, px, sz in changes]
        return self.frame("l2_data", [{"type": "update", "product_id": p.pid, "updates": ups}], now)

    def _trade(self, p: _Product, ev_ns: int, changes: list) -> None:
        # a taker hits the touch; the maker side is the resting side
        rng = self.rng
        maker = rng.choice(("BUY", "SELL"))
        book = p.bids if maker == "BUY" else p.asks
        if len(book) > 5:
            px = max(book) if maker == "BUY" else min(book)
            sz = book[px]
            take = sz if rng.random() < 0.3 else max(1, rng.randint(1, sz))
            p.pending_trades.append((p.next_trade_id, px, take, ev_ns, maker))
            p.next_trade_id += 1
            left = sz - take
            if left:
                book[px] = left
            else:
                del book[px]
            changes.append(("bid" if maker == "BUY" else "offer", px, left))

    def _level_change(self, p: _Product) -> tuple[str, int, int] | None:
        rng = self.rng
        side = rng.choice(("bid", "offer"))
        book = p.bids if side == "bid" else p.asks
        best_bid, best_ask = max(p.bids), min(p.asks)
        r = rng.random()
        if r < 0.55 and book:
            # modify a level near the touch
            levels = sorted(book, reverse=(side == "bid"))[:20]
            px = levels[min(len(levels) - 1, int(rng.expovariate(0.3)))]
            sz = _rand_size(rng, 8)
            book[px] = sz
        elif r < 0.8:
            # new level inside or near the spread (never crossing)
            if side == "bid":
                px = best_bid + rng.randint(-15, 1)
                if px >= best_ask:
                    px = best_ask - 1
            else:
                px = best_ask + rng.randint(-1, 15)
                if px <= best_bid:
                    px = best_bid + 1
            if px <= 0:
                return None
            sz = _rand_size(rng, 8)
            book[px] = sz
        else:
            if len(book) <= self.depth // 2:
                return None
            levels = sorted(book, reverse=(side == "bid"))[:30]
            px = rng.choice(levels)
            del book[px]
            sz = 0
        return side, px, sz


def generate_coinbase(
    products: Iterable[str] = DEFAULT_PRODUCTS,
    seconds: float = 600.0,
    rate: float = 200.0,
    seed: int = 0,
    start_ns: int = DEFAULT_START_NS,
    depth: int = 200,
    conn: int = 0,
) -> Iterator[dict]:
    """Yield capture records of one Advanced Trade connection (level2 + market_trades + heartbeats)."""
    yield from _CoinbaseSim(products, seconds, rate, seed, start_ns, depth, conn).records()


# ---------------------------------------------------------------------------------------------- gen-capture


def add_gen_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--products", default=",".join(DEFAULT_PRODUCTS), help="coinbase products, comma separated")
    group.add_argument("--depth", type=int, default=200, help="coinbase book levels per side")


def gen_records(a: argparse.Namespace, common: dict[str, Any]) -> Iterator[dict]:
    return generate_coinbase([p for p in a.products.split(",") if p], common["seconds"], common["rate"] or 200.0,
                             common["seed"], common["start_ns"], a.depth)
