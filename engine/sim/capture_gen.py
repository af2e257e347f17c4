"""Deterministic generator of protocol-exact exchange captures (the project's own code, no fixtures).

Output is the capture format shared with the collector: JSON Lines (plain or `.zst`), one object per
line in receive order, either `{"recv_ns": int, "frame": "<raw text frame>"}` or
`{"recv_ns": int, "meta": {...}}` (connect / disconnect).

* Coinbase Advanced Trade: `subscriptions` acks, `l2_data` snapshot (multi-level book per product) then
  updates (`event_time`, `price_level`, `new_quantity` as trimmed decimal strings), `market_trades`
  snapshot (100 trades, newest first) then 250 ms batches (maker `side`, increasing `trade_id`),
  `heartbeats` once a second; `sequence_num` contiguous from 0 on the connection.
* Kalshi: `subscribed` acks (orderbook_delta sid 1, trade sid 2), one `orderbook_snapshot` per open
  market, `orderbook_delta` (signed `delta_fp`), `trade`, per-sid contiguous `seq`; contracts of each
  series open and expire every `contract_minutes` (the simulated collector sends `update_subscription`
  add/delete, whose `ok` answers are in the capture). `kalshi_markets(...)` gives the matching
  REST `/markets` objects.

Same parameters (including seed and start time) → byte-identical output.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from engine.sim.capture import read_capture, write_capture
from engine.sim.fmt import DEFAULT_START_NS, fmt_dp, fmt_fixed, fmt_iso_seconds, fmt_rfc3339, parse_start
from engine.sim.kalshi.markets import (
    DEFAULT_SERIES,
    KalshiMarketSpec,
    kalshi_event_code,
    kalshi_markets,
    kalshi_schedule,
    market_object,
)

__all__ = ["DEFAULT_PRODUCTS", "DEFAULT_SERIES", "DEFAULT_START_NS", "KalshiMarketSpec", "cli", "fmt_dp",
           "fmt_fixed", "fmt_iso_seconds", "fmt_rfc3339", "generate_coinbase", "generate_kalshi",
           "kalshi_event_code", "kalshi_markets", "kalshi_schedule", "market_object", "parse_start",
           "read_capture", "write_capture"]

DEFAULT_PRODUCTS = ("BTC-USD", "ETH-USD", "SOL-USD")
_enc = msgspec.json.Encoder()

# ---------------------------------------------------------------------------------------------- Coinbase


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


_PRODUCT_MIDS = {"BTC-USD": 9_700_000, "ETH-USD": 340_000, "SOL-USD": 24_000}


def _rand_size(rng: random.Random, scale: int, big: bool = False) -> int:
    # log-uniform between 1e-8 and ~2 (or ~20) coins, rounded to a random number of significant digits
    import math

    hi = math.log(20 if big else 2)
    v = math.exp(rng.uniform(math.log(1e-6), hi))
    units = max(1, int(v * 10**scale))
    digits = rng.choice((1, 2, 3, 4, 5, 6, 8))
    mag = len(str(units))
    if mag > digits:
        q = 10 ** (mag - digits)
        units = max(q, units // q * q)
    return units


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
    rng = random.Random(seed)
    products = list(products)
    prods: dict[str, _Product] = {}
    for i, pid in enumerate(products):
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
        t = start_ns - 10**9
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
        prods[pid] = p

    seq = 0
    now = start_ns
    hb_counter = rng.randint(10_000, 90_000)
    mono_base = rng.uniform(10_000, 90_000)

    def trade_dict(pid: str, tr) -> dict:
        tid, price, size, tns, maker = tr
        return {
            "product_id": pid,
            "trade_id": str(tid),
            "price": fmt_fixed(price, 2),
            "size": fmt_fixed(size, 8),
            "time": fmt_rfc3339(tns, 6),
            "side": maker,
        }

    def frame(channel: str, events: list, recv: int) -> dict:
        nonlocal seq
        ts = recv - rng.randint(200_000, 5_000_000)
        s = _enc.encode({"channel": channel, "timestamp": fmt_rfc3339(ts, 9), "sequence_num": seq, "events": events})
        seq += 1
        return {"recv_ns": recv, "frame": s.decode()}

    yield {"recv_ns": now, "meta": {"type": "connect", "source": "coinbase", "conn": conn}}
    subs: dict[str, list[str]] = {}

    # level2 subscribe: snapshots then the cumulative ack
    now += rng.randint(50, 150) * 10**6
    for pid in products:
        p = prods[pid]
        et = fmt_rfc3339(now - rng.randint(10**6, 10**8), 6)
        ups = [
            {"side": "bid", "event_time": et, "price_level": fmt_fixed(px, 2), "new_quantity": fmt_fixed(sz, 8)}
            for px, sz in sorted(p.bids.items(), reverse=True)
        ] + [
            {"side": "offer", "event_time": et, "price_level": fmt_fixed(px, 2), "new_quantity": fmt_fixed(sz, 8)}
            for px, sz in sorted(p.asks.items())
        ]
        yield frame("l2_data", [{"type": "snapshot", "product_id": pid, "updates": ups}], now)
        now += rng.randint(100_000, 2_000_000)
    subs["level2"] = list(products)
    yield frame("subscriptions", [{"subscriptions": dict(subs)}], now)
    now += rng.randint(100_000, 2_000_000)
    for pid in products:
        p = prods[pid]
        trades = [trade_dict(pid, tr) for tr in reversed(p.recent)]
        yield frame("market_trades", [{"type": "snapshot", "trades": trades}], now)
        now += rng.randint(100_000, 2_000_000)
    subs["market_trades"] = list(products)
    yield frame("subscriptions", [{"subscriptions": dict(subs)}], now)
    now += rng.randint(100_000, 2_000_000)
    subs["heartbeats"] = ["heartbeats"]
    yield frame("subscriptions", [{"subscriptions": dict(subs)}], now)

    end = start_ns + int(seconds * 1e9)
    step = int(1e9 / max(rate, 1.0))
    next_hb = (now // 10**9 + 1) * 10**9 + rng.randint(0, 10**8)
    next_flush = now + 250_000_000
    while True:
        now += max(1, int(rng.expovariate(1.0) * step))
        if now >= end:
            break
        while next_hb <= now:
            hb_counter += 1
            mono = mono_base + (next_hb - start_ns) / 1e9
            cur = fmt_rfc3339(next_hb - 1_500_000, 9)
            cur_s = cur.replace("T", " ").rstrip("Z")
            ev = {"current_time": f"{cur_s} +0000 UTC m=+{mono:.9f}", "heartbeat_counter": hb_counter}
            yield frame("heartbeats", [ev], next_hb)
            next_hb += 10**9 + rng.randint(-2_000_000, 2_000_000)
        while next_flush <= now:
            for pid in products:
                p = prods[pid]
                if p.pending_trades:
                    trades = [trade_dict(pid, tr) for tr in p.pending_trades]
                    p.pending_trades.clear()
                    yield frame("market_trades", [{"type": "update", "trades": trades}], next_flush)
            next_flush += 250_000_000
        p = prods[products[rng.randrange(len(products))]]
        ev_ns = now - rng.randint(20_000_000, 300_000_000)
        et = fmt_rfc3339(ev_ns, rng.choice((6, 6, 6, 5, 4)))
        changes: list[tuple[str, int, int]] = []
        if rng.random() < 0.12:
            # a trade: taker hits the touch; maker side is the resting side
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
        n = rng.choice((1, 1, 1, 2, 2, 3, 4, 6, 8))
        for _ in range(n):
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
                    continue
                sz = _rand_size(rng, 8)
                book[px] = sz
            else:
                if len(book) <= depth // 2:
                    continue
                levels = sorted(book, reverse=(side == "bid"))[:30]
                px = rng.choice(levels)
                del book[px]
                sz = 0
            changes.append((side, px, sz))
        if not changes:
            continue
        ups = [
            {"side": s, "event_time": et, "price_level": fmt_fixed(px, 2), "new_quantity": fmt_fixed(sz, 8)}
            for s, px, sz in changes
        ]
        yield frame("l2_data", [{"type": "update", "product_id": p.pid, "updates": ups}], now)


# ---------------------------------------------------------------------------------------------- Kalshi

def generate_kalshi(
    series: Iterable[str] = DEFAULT_SERIES,
    seconds: float = 600.0,
    rate: float = 100.0,
    seed: int = 0,
    start_ns: int = DEFAULT_START_NS,
    contract_minutes: int = 60,
    strikes: int = 6,
    use_yes_price: bool = False,
    conn: int = 0,
) -> Iterator[dict]:
    """Yield capture records of one Kalshi connection subscribed to orderbook_delta + trade."""
    series = list(series)
    sched = kalshi_schedule(series, seconds, seed, start_ns, contract_minutes, strikes)
    rng = random.Random(seed * 7919 + 17)
    end = start_ns + int(seconds * 1e9)
    # books in 1e-4 dollar units (price) and 1e-2 contract units (size); "yes"/"no" bids in native price
    books: dict[str, dict[str, dict[int, int]]] = {}
    fair: dict[str, int] = {}
    spec = {m.ticker: m for m in sched}
    seqs = {1: 0, 2: 0}
    cmd_id = 1

    def new_book(m: KalshiMarketSpec) -> None:
        f = rng.randint(300, 9700) // 100 * 100
        fair[m.ticker] = f
        b = {"yes": {}, "no": {}}
        for side, ref in (("yes", f), ("no", 10000 - f)):
            for k in range(1, rng.randint(3, 12)):
                px = ref - k * 100
                if px >= 100:
                    b[side][px] = rng.choice((100, 200, 500, 1000, 2500, 10000, 25000)) * 100 + (
                        rng.randint(1, 99) if rng.random() < 0.1 else 0
                    )
        books[m.ticker] = b

    def wire_price(side: str, px: int) -> str:
        if side == "no" and use_yes_price:
            px = 10000 - px
        return fmt_dp(px, 4)

    def out(recv: int, obj: dict) -> dict:
        return {"recv_ns": recv, "frame": _enc.encode(obj).decode()}

    def snapshot(recv: int, tick: str) -> dict:
        seqs[1] += 1
        b = books[tick]
        msg = {"market_ticker": tick, "market_id": spec[tick].market_id}
        for side in ("yes", "no"):
            if b[side]:
                lv = sorted(b[side].items())
                msg[f"{side}_dollars_fp"] = [[wire_price(side, px), fmt_dp(sz, 2)] for px, sz in lv]
        return out(recv, {"type": "orderbook_snapshot", "sid": 1, "seq": seqs[1], "msg": msg})

    now = start_ns
    yield {"recv_ns": now, "meta": {"type": "connect", "source": "kalshi", "conn": conn, "use_yes_price": use_yes_price}}
    is_open = lambda m, t: m.open_ns <= t < m.close_ns  # noqa: E731
    current = [m.ticker for m in sched if is_open(m, now)]
    for t in current:
        new_book(spec[t])
    now += rng.randint(30, 90) * 10**6
    yield out(now, {"id": cmd_id, "type": "subscribed", "msg": {"channel": "orderbook_delta", "sid": 1}})
    now += rng.randint(100_000, 900_000)
    yield out(now, {"id": cmd_id, "type": "subscribed", "msg": {"channel": "trade", "sid": 2}})
    for t in current:
        now += rng.randint(20_000, 300_000)
        yield snapshot(now, t)
    boundaries = sorted({x for m in sched for x in (m.open_ns, m.close_ns) if start_ns < x < end})
    step = int(1e9 / max(rate, 1.0))
    while True:
        nxt = now + max(1, int(rng.expovariate(1.0) * step))
        if boundaries and boundaries[0] <= nxt:
            # rotation: drop expired contracts, add the newly opened ones (ok answers consume seq)
            b_ns = boundaries.pop(0)
            now = max(now, b_ns)
            expired = [t for t in current if not is_open(spec[t], b_ns)]
            opened = [m.ticker for m in sched if is_open(m, b_ns) and m.ticker not in current]
            if expired:
                current = [t for t in current if t not in expired]
                for sid in (1, 2):
                    cmd_id += 1
                    now += rng.randint(20_000, 200_000)
                    seqs[sid] += 1
                    yield out(now, {"id": cmd_id, "sid": sid, "seq": seqs[sid], "type": "ok",
                                    "msg": {"market_tickers": list(current)}})
                for t in expired:
                    books.pop(t, None)
            if opened:
                current = current + opened
                for t in opened:
                    new_book(spec[t])
                cmd_id += 1
                now += rng.randint(20_000, 200_000)
                seqs[1] += 1
                yield out(now, {"id": cmd_id, "sid": 1, "seq": seqs[1], "type": "ok",
                                "msg": {"market_tickers": list(current)}})
                for t in opened:
                    now += rng.randint(20_000, 300_000)
                    yield snapshot(now, t)
                cmd_id += 1
                now += rng.randint(20_000, 200_000)
                seqs[2] += 1
                yield out(now, {"id": cmd_id, "sid": 2, "seq": seqs[2], "type": "ok",
                                "msg": {"market_tickers": list(current)}})
            continue
        now = nxt
        if now >= end:
            break
        if not current:
            continue
        tick = current[rng.randrange(len(current))]
        b = books[tick]
        ev_ns = now - rng.randint(1_000_000, 40_000_000)
        ts = fmt_rfc3339(ev_ns, 6)
        ts_ms = ev_ns // 10**6
        mid = spec[tick].market_id
        if rng.random() < 0.15 and b["yes"] and b["no"]:
            # trade: taker yes lifts the best NO bid (YES price 1 - no); taker no hits the best YES bid
            taker = rng.choice(("yes", "no"))
            rest = "no" if taker == "yes" else "yes"
            px = max(b[rest])
            sz = b[rest][px]
            cnt = min(sz, rng.choice((100, 100, 500, 1000, 2500)) + (rng.randint(1, 99) if rng.random() < 0.1 else 0))
            yes_px = 10000 - px if rest == "no" else px
            seqs[2] += 1
            yield out(now, {"type": "trade", "sid": 2, "seq": seqs[2], "msg": {
                "trade_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "market_ticker": tick,
                "yes_price_dollars": fmt_dp(yes_px, 4),
                "no_price_dollars": fmt_dp(10000 - yes_px, 4),
                "count_fp": fmt_dp(cnt, 2),
                "taker_side": taker,
                "taker_outcome_side": taker,
                "taker_book_side": "bid" if taker == "yes" else "ask",
                "is_block_trade": False,
                "ts": ev_ns // 10**9,
                "ts_ms": ts_ms,
            }})
            left = sz - cnt
            if left:
                b[rest][px] = left
            else:
                del b[rest][px]
            deltas = [(rest, px, -cnt)]
        else:
            side = rng.choice(("yes", "no"))
            lv = b[side]
            other_best = max(b["no" if side == "yes" else "yes"], default=0)
            r = rng.random()
            if r < 0.45 or not lv:
                # add at a new or existing level, never crossing the other side
                top = 10000 - other_best - 100 if other_best else 9900
                px = rng.randint(1, max(1, top // 100)) * 100
                px = min(px, top) if top >= 100 else 100
                if px < 100 or (other_best and px + other_best >= 10000):
                    continue
                d = rng.choice((100, 200, 500, 1000, 2500)) * 100 + (rng.randint(1, 99) if rng.random() < 0.08 else 0)
            else:
                px = rng.choice(sorted(lv)[-6:])
                sz = lv[px]
                d = -sz if rng.random() < 0.4 else -rng.randint(1, sz)
            nv = lv.get(px, 0) + d
            if nv > 0:
                lv[px] = nv
            else:
                lv.pop(px, None)
            deltas = [(side, px, d)]
        for side, px, d in deltas:
            seqs[1] += 1
            yield out(now, {"type": "orderbook_delta", "sid": 1, "seq": seqs[1], "msg": {
                "market_ticker": tick,
                "market_id": mid,
                "price_dollars": wire_price(side, px),
                "delta_fp": fmt_dp(d, 2),
                "side": side,
                "ts": ts,
                "ts_ms": ts_ms,
            }})


# ---------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine gen-capture", description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=("coinbase", "kalshi"), required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    ap.add_argument("--rate", type=float, default=None, help="data messages per second (coinbase 200, kalshi 100)")
    ap.add_argument("--products", default=",".join(DEFAULT_PRODUCTS), help="coinbase products, comma separated")
    ap.add_argument("--series", default=",".join(DEFAULT_SERIES), help="kalshi series, comma separated")
    ap.add_argument("--contract-minutes", type=int, default=60, help="kalshi contract lifetime")
    ap.add_argument("--strikes", type=int, default=6, help="kalshi contracts per event")
    ap.add_argument("--depth", type=int, default=200, help="coinbase book levels per side")
    ap.add_argument("--use-yes-price", action="store_true", help="kalshi NO prices on the YES scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", default=None, help="ISO time or Unix s/ns (default 2026-11-26T17:00:00Z)")
    ap.add_argument("--out", required=True, help="output file (.jsonl or .jsonl.zst)")
    ap.add_argument("--markets-out", default=None, help="kalshi: also write the REST market list (JSON)")
    a = ap.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else a.minutes * 60
    start = parse_start(a.start)
    if a.source == "coinbase":
        recs = generate_coinbase(
            [p for p in a.products.split(",") if p], seconds, a.rate or 200.0, a.seed, start, a.depth
        )
    else:
        kw = dict(
            series=[s for s in a.series.split(",") if s], seconds=seconds, seed=a.seed, start_ns=start,
            contract_minutes=a.contract_minutes, strikes=a.strikes,
        )
        recs = generate_kalshi(rate=a.rate or 100.0, use_yes_price=a.use_yes_price, **kw)
        if a.markets_out:
            Path(a.markets_out).write_text(json.dumps(kalshi_markets(**kw), indent=1))
    n = write_capture(recs, a.out)
    print(f"wrote {n} lines to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli(sys.argv[1:]))
