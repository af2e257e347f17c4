"""Deterministic Kraken spot WebSocket v2 capture generator (the project's own code, no fixtures).

One connection, subscribed as the collector subscribes (`engine.collect.kraken.wire`): the
`status` frame, then per pair a `book` ack and snapshot (depth `depth`), a `trade` ack and a
snapshot of its last 50 trades, the `instrument` ack and snapshot (assets and every pair, more
than the collected ones), then book updates at `rate` messages/s (a pair drawn by weight, a
few level changes, mostly near the touch), trades when a taker hits the touch (a `trade` message,
then the book update it caused), `heartbeat` in a second without other frames, and one
`instrument` update half way (a pair's `qty_min` changes).

Each book is kept deeper than the depth, and each update is what Kraken sends a subscriber of
that depth: the levels of the visible book (the best `depth`) that changed or entered it, and
qty 0 for those removed from the book; nothing for a level pushed out of the visible book by an
insert (the subscriber truncates it). Prices and quantities are written with the pair's full
precision (`"qty":0.10000000`), the checksum computed from that text by the collector's own
function (`engine.collect.kraken.book.checksum`). Same parameters → byte-identical output.
"""

from __future__ import annotations

import argparse
import math
import random
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import Raw

from engine.collect.kraken.book import checksum
from engine.collect.kraken.wire import DEFAULT_DEPTH, DEFAULT_PAIRS, SOURCE, TRADE_SNAPSHOT, subscribe_messages
from engine.sim.fmt import DEFAULT_START_NS, fmt_dp, fmt_fixed, fmt_iso_seconds

_enc = msgspec.json.Encoder()
EXTRA = 40  # levels kept beyond the visible depth (they enter it as better ones go)
DEFAULT_RATE = 80.0  # book update messages per second, all pairs (BTC/USD at depth 1000 sends a few dozen)


@dataclass(frozen=True)
class PairSpec:
    """A pair's reference data as the `instrument` channel states it, and where its price starts."""

    symbol: str
    base: str
    quote: str
    mid: float
    price_precision: int
    qty_precision: int
    qty_min: str
    cost_min: str = "0.5"
    cost_precision: int = 5
    weight: float = 1.0  # share of the book messages
    big: float = 5.0  # sizes up to about this many units of base

    def pair_object(self, **changes) -> dict:
        """The pair as the `instrument` channel sends it (decimals as Kraken writes them)."""
        inc_p = Raw(fmt_dp(1, self.price_precision).encode())
        d = {"symbol": self.symbol, "base": self.base, "quote": self.quote, "status": "online",
             "qty_precision": self.qty_precision, "qty_increment": Raw(fmt_dp(1, self.qty_precision).encode()),
             "price_precision": self.price_precision, "cost_precision": self.cost_precision, "marginable": True,
             "has_index": True, "cost_min": Raw(self.cost_min.encode()), "margin_initial": Raw(b"0.2"),
             "position_limit_long": 250, "position_limit_short": 200, "tick_size": inc_p, "price_increment": inc_p,
             "qty_min": Raw(self.qty_min.encode())}
        d.update(changes)
        return d


SPECS = {
    "BTC/USD": PairSpec("BTC/USD", "BTC", "USD", 97_000.0, 1, 8, "0.00005", weight=0.45, big=2.0),
    "ETH/USD": PairSpec("ETH/USD", "ETH", "USD", 3_400.0, 2, 8, "0.002", weight=0.35, big=40.0),
    "SOL/USD": PairSpec("SOL/USD", "SOL", "USD", 240.0, 2, 8, "0.02", weight=0.2, big=500.0),
    # in the instrument snapshot only (Kraken lists every pair): the collector keeps the collected ones
    "ETH/BTC": PairSpec("ETH/BTC", "ETH", "BTC", 0.035, 5, 8, "0.002", cost_min="0.00002"),
    "USDG/USD": PairSpec("USDG/USD", "USDG", "USD", 1.0, 4, 5, "5", big=500_000.0),
    "XRP/USD": PairSpec("XRP/USD", "XRP", "USD", 2.4, 5, 8, "2"),
}
ASSETS = ("BTC", "ETH", "SOL", "USD", "USDG", "XRP")


def spec_of(symbol: str, i: int = 0) -> PairSpec:
    s = SPECS.get(symbol)
    if s is not None:
        return s
    base, _, quote = symbol.partition("/")
    return PairSpec(symbol, base, quote or "USD", 100.0 * (i + 1), 2, 8, "0.1")


def ts6(ns: int) -> str:
    """RFC 3339 with 6 fractional digits, as Kraken writes its times."""
    return f"{fmt_iso_seconds(ns)[:-1]}.{ns % 10**9 // 1000:06d}Z"


class _Side:
    """A side of the full book: keys ascend from the best (ticks for asks, -ticks for bids) -> size
    units. Changes during one message are noted so `end()` can say what the subscriber gets."""

    def __init__(self, ask: bool, depth: int):
        self.ask = ask
        self.depth = depth
        self.keys: list[int] = []
        self.size: dict[int, int] = {}
        self.b0 = 0
        self.touched: dict[int, bool] = {}  # key -> whether it was in the visible book when the message began

    def boundary(self) -> float:
        return self.keys[self.depth - 1] if len(self.keys) >= self.depth else math.inf

    def begin(self) -> None:
        self.b0 = self.boundary()
        self.touched = {}

    def _touch(self, k: int) -> None:
        if k not in self.touched:
            self.touched[k] = k in self.size and k <= self.b0

    def set(self, k: int, units: int) -> None:
        self._touch(k)
        if k not in self.size:
            insort(self.keys, k)
        self.size[k] = units

    def remove(self, k: int) -> None:
        self._touch(k)
        if k in self.size:
            del self.size[k]
            del self.keys[bisect_left(self.keys, k)]

    def end(self) -> list[tuple[int, int]]:
        """(key, units) the subscriber is sent: changed or entering levels of the visible book, 0
        for visible levels removed from the book; none for levels merely pushed out of view."""
        b1 = self.boundary()
        out = []
        for k, was_visible in self.touched.items():
            if k in self.size:
                if k <= b1:
                    out.append((k, self.size[k]))
            elif was_visible:
                out.append((k, 0))
        if b1 > self.b0:  # better levels went: untouched ones entered the visible book
            keys = self.keys
            for k in keys[bisect_right(keys, self.b0):min(len(keys), self.depth)]:
                if k not in self.touched:
                    out.append((k, self.size[k]))
        self.touched = {}
        return out

    def visible(self, n: int) -> list[int]:
        return self.keys[:min(n, self.depth)]


@dataclass
class _Pair:
    spec: PairSpec
    bids: _Side
    asks: _Side
    next_trade_id: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=TRADE_SNAPSHOT))


class _KrakenSim:
    def __init__(self, pairs: Iterable[str], seconds: float, rate: float, seed: int, start_ns: int, depth: int,
                 conn: int, instrument_update: bool):
        self.rng = random.Random(seed * 104_729 + 3)
        self.symbols = list(dict.fromkeys(pairs))
        self.depth = depth
        self.start_ns = start_ns
        self.end = start_ns + int(seconds * 1e9)
        self.step = 1e9 / max(rate, 1.0)
        self.conn = conn
        self.instrument_update = instrument_update
        self.pairs = {s: self._new_pair(spec_of(s, i)) for i, s in enumerate(self.symbols)}
        weights = [self.pairs[s].spec.weight for s in self.symbols]
        total = sum(weights)
        self.cum = [sum(weights[:i + 1]) / total for i in range(len(weights))]
        self.last_out = start_ns

    # ---- state ----------------------------------------------------------------------------------
    def _size(self, sp: PairSpec, big: bool = False) -> int:
        """Log-uniform between the pair's minimum and `big` units of base, rounded to a few significant
        digits (as people type sizes), in units of 10**-qty_precision."""
        rng = self.rng
        lo = math.log(float(sp.qty_min))
        hi = math.log(sp.big * (4 if big else 1))
        units = max(1, int(math.exp(rng.uniform(lo, hi)) * 10**sp.qty_precision))
        digits = rng.choice((1, 2, 2, 3, 4, 5, 8))
        mag = len(str(units))
        if mag > digits:
            q = 10 ** (mag - digits)
            units = max(q, units // q * q)
        return units

    def _new_pair(self, sp: PairSpec) -> _Pair:
        rng = self.rng
        tick = 10**sp.price_precision
        mid = int(sp.mid * tick)
        p = _Pair(sp, _Side(False, self.depth), _Side(True, self.depth))
        n = self.depth + EXTRA
        px = mid - rng.randint(1, 3)
        for j in range(n):
            if px <= 1:
                break
            p.bids.set(-px, self._size(sp, big=j > n // 2))
            px -= rng.randint(1, 2 + j // 60)
        px = mid + rng.randint(1, 3)
        for j in range(n):
            p.asks.set(px, self._size(sp, big=j > n // 2))
            px += rng.randint(1, 2 + j // 60)
        p.bids.touched, p.asks.touched = {}, {}
        p.next_trade_id = rng.randint(10**6, 10**8)
        # the last 50 trades, the newest ~1 s before the start, ids ascending with time
        t = self.start_ns - 10**9
        hist = []
        for _ in range(TRADE_SNAPSHOT):
            side = rng.choice(("buy", "sell"))
            px = p.asks.keys[0] if side == "buy" else -p.bids.keys[0]
            hist.append((px, self._size(sp), side, rng.choice(("limit", "market")), t))
            t -= rng.randint(10**7, 3 * 10**9)
        for h in reversed(hist):
            p.recent.append((p.next_trade_id,) + h)
            p.next_trade_id += 1
        return p

    # ---- frames ---------------------------------------------------------------------------------
    def _out(self, recv: int, obj: dict) -> dict:
        self.last_out = recv
        return {"recv_ns": recv, "frame": _enc.encode(obj).decode()}

    def _ack(self, recv: int, result: dict) -> dict:
        return self._out(recv, {"method": "subscribe", "result": result, "success": True,
                                "time_in": ts6(recv - 900_000), "time_out": ts6(recv - 850_000)})

    def _levels(self, p: _Pair, side: _Side, items: list[tuple[int, int]]) -> list[dict]:
        sp = p.spec
        sign = 1 if side.ask else -1
        return [{"price": Raw(fmt_dp(sign * k, sp.price_precision).encode()),
                 "qty": Raw(fmt_dp(u, sp.qty_precision).encode())} for k, u in items]

    def _checksum(self, p: _Pair) -> int:
        sp = p.spec

        def texts(side: _Side):
            sign = 1 if side.ask else -1
            return [(fmt_dp(sign * k, sp.price_precision), fmt_dp(side.size[k], sp.qty_precision)) for k in side.visible(10)]

        return checksum(texts(p.asks), texts(p.bids))

    def _book_msg(self, recv: int, typ: str, p: _Pair, bids: list, asks: list, ev_ns: int) -> dict:
        return self._out(recv, {"channel": "book", "type": typ, "data": [{
            "symbol": p.spec.symbol, "bids": self._levels(p, p.bids, bids), "asks": self._levels(p, p.asks, asks),
            "checksum": self._checksum(p), "timestamp": ts6(ev_ns)}]})

    def _trade_obj(self, sym: str, sp: PairSpec, tr: tuple) -> dict:
        tid, px, units, side, ord_type, t = tr
        return {"symbol": sym, "side": side, "price": Raw(fmt_fixed(px, sp.price_precision).encode()),
                "qty": Raw(fmt_fixed(units, sp.qty_precision).encode()), "ord_type": ord_type, "trade_id": tid,
                "timestamp": ts6(t)}

    # ---- the connection -------------------------------------------------------------------------
    def records(self) -> Iterator[dict]:
        rng = self.rng
        now = self.start_ns
        yield {"recv_ns": now, "meta": {"type": "connect", "source": SOURCE, "conn": self.conn, "depth": self.depth,
                                        "pairs": list(self.symbols)}}
        now += rng.randint(20, 60) * 10**6
        yield self._out(now, {"channel": "status", "type": "update", "data": [{
            "version": "2.0.10", "system": "online", "api_version": "v2", "connection_id": rng.getrandbits(63)}]})
        assert len(subscribe_messages(self.symbols, self.depth)) == 3  # book, trade, instrument: answered in that order
        now += rng.randint(30, 90) * 10**6
        for sym in self.symbols:
            p = self.pairs[sym]
            yield self._ack(now, {"channel": "book", "depth": self.depth, "snapshot": True, "symbol": sym})
            now += rng.randint(200_000, 2_000_000)
            bids = [(k, p.bids.size[k]) for k in p.bids.visible(self.depth)]
            asks = [(k, p.asks.size[k]) for k in p.asks.visible(self.depth)]
            yield self._book_msg(now, "snapshot", p, bids, asks, now - rng.randint(200_000, 900_000))
            now += rng.randint(200_000, 2_000_000)
        for sym in self.symbols:
            p = self.pairs[sym]
            yield self._ack(now, {"channel": "trade", "snapshot": True, "symbol": sym})
            now += rng.randint(100_000, 1_000_000)
            yield self._out(now, {"channel": "trade", "type": "snapshot",
                                  "data": [self._trade_obj(sym, p.spec, tr) for tr in p.recent]})
            now += rng.randint(100_000, 1_000_000)
        yield self._ack(now, {"channel": "instrument", "snapshot": True})
        now += rng.randint(1, 5) * 10**6
        yield self._out(now, self._instrument_snapshot())
        yield from self._stream(now)

    def _instrument_snapshot(self) -> dict:
        specs = {s: spec_of(s, i) for i, s in enumerate(self.symbols)}
        for s, sp in SPECS.items():
            specs.setdefault(s, sp)
        assets = sorted(set(ASSETS) | {sp.base for sp in specs.values()} | {sp.quote for sp in specs.values()})
        return {"channel": "instrument", "type": "snapshot", "data": {
            "assets": [{"id": a, "status": "enabled", "precision": 10, "precision_display": 5, "borrowable": True,
                        "collateral_value": Raw(b"1.0"), "margin_rate": Raw(b"0.02")} for a in assets],
            "pairs": [sp.pair_object() for sp in specs.values()]}}

    def _stream(self, now: int) -> Iterator[dict]:
        rng = self.rng
        half = self.start_ns + (self.end - self.start_ns) // 2
        update_done = not self.instrument_update
        while True:
            # after the last frame out (a trade message moves it past `now`): receive times never go back
            now = max(now + max(1, int(rng.expovariate(1.0) * self.step)), self.last_out + 1)
            if now >= self.end:
                break
            while now - self.last_out > 10**9:  # a quiet second: a heartbeat
                yield self._out(min(now - 1, self.last_out + 10**9 + rng.randint(0, 2_000_000)), {"channel": "heartbeat"})
            if not update_done and now >= half:
                update_done = True
                sym = self.symbols[-1]
                sp = spec_of(sym, len(self.symbols) - 1)
                new_min = fmt_dp(int(float(sp.qty_min) * 2 * 10**sp.qty_precision), sp.qty_precision)
                yield self._out(now, {"channel": "instrument", "type": "update", "data": {
                    "assets": [], "pairs": [sp.pair_object(qty_min=Raw(new_min.encode()))]}})
                now += rng.randint(100_000, 1_000_000)
            yield from self._event(now)

    def _event(self, now: int) -> Iterator[dict]:
        """One book update of a pair drawn by weight (after the trade that caused it, if any)."""
        rng = self.rng
        r = rng.random()
        p = self.pairs[self.symbols[next(i for i, c in enumerate(self.cum) if r <= c or i == len(self.cum) - 1)]]
        ev_ns = now - rng.randint(300_000, 3_000_000)
        p.bids.begin()
        p.asks.begin()
        if rng.random() < 0.1:
            tr = self._trade(p, ev_ns)
            if tr is not None:
                yield self._out(now, {"channel": "trade", "type": "update",
                                      "data": [self._trade_obj(p.spec.symbol, p.spec, t) for t in tr]})
                now += rng.randint(20_000, 300_000)
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            self._change(p)
        self._replenish(p, p.bids)
        self._replenish(p, p.asks)
        bids, asks = p.bids.end(), p.asks.end()
        if bids or asks:
            yield self._book_msg(now, "update", p, bids, asks, ev_ns)

    def _trade(self, p: _Pair, ev_ns: int) -> list[tuple] | None:
        """A taker order walks one or two levels of the opposite side."""
        rng = self.rng
        side = rng.choice(("buy", "sell"))
        book = p.asks if side == "buy" else p.bids
        out = []
        for _ in range(rng.choice((1, 1, 1, 2))):
            if len(book.keys) <= 5:
                break
            k = book.keys[0]
            units = book.size[k]
            take = units if rng.random() < 0.35 else rng.randint(1, units)
            out.append((p.next_trade_id, abs(k), take, side, rng.choice(("market", "limit", "limit")), ev_ns))
            p.next_trade_id += 1
            if take == units:
                book.remove(k)
            else:
                book.set(k, units - take)
        p.recent.extend(out)
        return out or None

    def _change(self, p: _Pair) -> None:
        rng = self.rng
        sp = p.spec
        side = p.bids if rng.random() < 0.5 else p.asks
        keys = side.keys
        r = rng.random()
        if r < 0.45:  # a new size near the touch
            k = keys[min(len(keys) - 1, int(rng.expovariate(0.2)))]
            side.set(k, self._size(sp))
        elif r < 0.7:  # a new level inside or near the spread, never crossing
            best_bid, best_ask = -p.bids.keys[0], p.asks.keys[0]
            if side.ask:
                px = max(best_bid + 1, best_ask + rng.randint(-1, 12))
                side.set(px, self._size(sp))
            else:
                px = min(best_ask - 1, best_bid - rng.randint(-1, 12))
                if px > 0:
                    side.set(-px, self._size(sp))
        elif r < 0.9:  # a level near the touch cancelled
            if len(keys) > 20:
                side.remove(keys[min(len(keys) - 1, int(rng.expovariate(0.2)))])
        else:  # anywhere in the book
            k = keys[rng.randrange(len(keys))]
            if rng.random() < 0.5:
                side.set(k, self._size(sp, big=True))
            elif len(keys) > 20:
                side.remove(k)

    def _replenish(self, p: _Pair, side: _Side) -> None:
        """Keep the book deeper than the subscriber's view: new levels beyond the deepest."""
        rng = self.rng
        while len(side.keys) < self.depth + EXTRA // 2:
            k = side.keys[-1] + rng.randint(1, 4)
            if not side.ask and k >= 0:  # bids: keys are -ticks; a price must stay positive
                break
            side.set(k, self._size(p.spec, big=True))


def generate_kraken(
    pairs: Iterable[str] = DEFAULT_PAIRS,
    seconds: float = 600.0,
    rate: float = DEFAULT_RATE,
    seed: int = 0,
    start_ns: int = DEFAULT_START_NS,
    depth: int = DEFAULT_DEPTH,
    conn: int = 0,
    instrument_update: bool = True,
) -> Iterator[dict]:
    """Yield capture records of one Kraken v2 connection (book at `depth` + trade + instrument)."""
    yield from _KrakenSim(pairs, seconds, rate, seed, start_ns, depth, conn, instrument_update).records()


# ---------------------------------------------------------------------------------------------- gen-capture


def add_gen_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--kraken-pairs", default=",".join(DEFAULT_PAIRS), help="kraken pairs, comma separated")
    group.add_argument("--kraken-depth", type=int, default=DEFAULT_DEPTH, help="kraken book depth subscribed")


def gen_records(a: argparse.Namespace, common: dict[str, Any]) -> Iterator[dict]:
    return generate_kraken([p for p in a.kraken_pairs.split(",") if p], common["seconds"], common["rate"] or DEFAULT_RATE,
                           common["seed"], common["start_ns"], a.kraken_depth)
