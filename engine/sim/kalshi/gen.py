"""Deterministic Kalshi capture generator (the project's own code, no fixtures).

One connection subscribed to orderbook_delta (sid 1), trade (sid 2) and market_lifecycle_v2 (sid 3):
`subscribed` acks, one `orderbook_snapshot` per open market, `orderbook_delta` (signed `delta_fp`),
`trade`, per-sid contiguous `seq`; contracts of each series open and expire every
`contract_minutes` (`engine.sim.kalshi.markets.kalshi_schedule`; the simulated collector sends
`update_subscription` add/delete, whose `ok` answers are in the capture). Lifecycle (no `seq`,
times in Unix seconds): `created` when a contract opens during the capture, and for every event
whose contracts close during it, `determined` 10-30 s after the close (one expiration value per
event, drawn around its strikes: the contract whose range holds it settles yes, the others no) and
`settled` 10-30 s later, all contracts of the event at once. `kalshi_markets(...)` gives the
matching REST `/markets` objects. The lifecycle draws use their own random stream, so the other
frames are the same with or without them. Same parameters (seed and start time included) →
byte-identical output.
"""

from __future__ import annotations

import argparse
import json
import random
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from engine.sim.fmt import DEFAULT_START_NS, fmt_dp, fmt_rfc3339
from engine.sim.kalshi.markets import (
    DEFAULT_SERIES,
    KalshiMarketSpec,
    kalshi_markets,
    kalshi_schedule,
    market_title,
)

LIFECYCLE_SID = 3
# the demo's capture (a few minutes, looped): two-minute contracts, so several settle while it runs
DEMO_ARGS = ("--contract-minutes", "2", "--strikes", "4")

_enc = msgspec.json.Encoder()


def _is_open(m: KalshiMarketSpec, t: int) -> bool:
    return m.open_ns <= t < m.close_ns


def _out(recv: int, obj: dict) -> dict:
    return {"recv_ns": recv, "frame": _enc.encode(obj).decode()}


class _KalshiSim:
    """The generator's state; every random draw happens in the order of the original single function,
    so output is unchanged for a given seed."""

    def __init__(self, series: Iterable[str], seconds: float, rate: float, seed: int, start_ns: int,
                 contract_minutes: int, strikes: int, use_yes_price: bool, conn: int, lifecycle: bool = True):
        self.sched = kalshi_schedule(list(series), seconds, seed, start_ns, contract_minutes, strikes)
        self.rng = random.Random(seed * 7919 + 17)
        self.start_ns = start_ns
        self.end = start_ns + int(seconds * 1e9)
        self.step = int(1e9 / max(rate, 1.0))
        self.use_yes = use_yes_price
        self.conn = conn
        # books in 1e-4 dollar units (price) and 1e-2 contract units (size); "yes"/"no" bids in native price
        self.books: dict[str, dict[str, dict[int, int]]] = {}
        self.fair: dict[str, int] = {}
        self.spec = {m.ticker: m for m in self.sched}
        self.seqs = {1: 0, 2: 0}
        self.cmd_id = 1
        self.current: list[str] = []  # open contracts, in subscription order
        self.series = sorted({m.series_ticker for m in self.sched} | set(series))
        self.lifecycle = lifecycle
        self.life = self._lifecycle_events(random.Random(f"{seed}:lifecycle")) if lifecycle else []

    # ---- market_lifecycle_v2 ------------------------------------------------------------------
    def _lifecycle_events(self, rng: random.Random) -> list[tuple[int, int, dict]]:
        """(time, order, msg) of every lifecycle event inside the capture, in time order."""
        out: list[tuple[int, int, dict]] = []
        for m in self.sched:
            if self.start_ns < m.open_ns < self.end:
                out.append((m.open_ns, len(out), {
                    "market_ticker": m.ticker, "event_type": "created", "open_ts": m.open_ns // 10**9,
                    "close_ts": m.close_ns // 10**9, "price_level_structure": "linear_cent",
                    "additional_metadata": {
                        "event_ticker": m.event_ticker, "title": market_title(m), "strike_type": "between",
                        "floor_strike": m.floor_strike, "cap_strike": m.cap_strike,
                        "expected_expiration_ts": m.close_ns // 10**9, "can_close_early": False}}))
        events: dict[str, list[KalshiMarketSpec]] = {}
        for m in self.sched:
            if self.start_ns < m.close_ns < self.end:
                events.setdefault(m.event_ticker, []).append(m)
        for ms in events.values():
            close = ms[0].close_ns
            lo, hi = min(m.floor_strike for m in ms), max(m.cap_strike for m in ms)
            width = (hi - lo) / len(ms)
            value = round(rng.uniform(lo - width / 2, hi + width / 2), 2)
            det = close + rng.randint(10_000, 30_000) * 10**6
            settled = det + rng.randint(10_000, 30_000) * 10**6
            for m in ms:
                res = "yes" if m.floor_strike <= value <= m.cap_strike else "no"
                out.append((det, len(out), {
                    "market_ticker": m.ticker, "event_type": "determined", "result": res,
                    "determination_ts": det // 10**9, "settlement_value": "1.0000" if res == "yes" else "0.0000"}))
                out.append((settled, len(out), {"market_ticker": m.ticker, "event_type": "settled",
                                                "settled_ts": settled // 10**9}))
        return sorted(e for e in out if e[0] < self.end)

    def _lifecycle_until(self, t_ns: int, now: int) -> Iterator[dict]:
        """Yield the lifecycle frames due by `t_ns` (each at its own time, never before `now`);
        returns the time of the last one (or `now`)."""
        while self.life and self.life[0][0] <= t_ns:
            t, _, msg = self.life.pop(0)
            now = max(now, t)
            yield _out(now, {"type": "market_lifecycle_v2", "sid": LIFECYCLE_SID, "msg": msg})
        return now

    def _new_book(self, m: KalshiMarketSpec) -> None:
        rng = self.rng
        f = rng.randint(300, 9700) // 100 * 100
        self.fair[m.ticker] = f
        b = {"yes": {}, "no": {}}
        for side, ref in (("yes", f), ("no", 10000 - f)):
            for k in range(1, rng.randint(3, 12)):
                px = ref - k * 100
                if px >= 100:
                    b[side][px] = rng.choice((100, 200, 500, 1000, 2500, 10000, 25000)) * 100 + (
                        rng.randint(1, 99) if rng.random() < 0.1 else 0
                    )
        self.books[m.ticker] = b

    def _wire_price(self, side: str, px: int) -> str:
        if side == "no" and self.use_yes:
            px = 10000 - px
        return fmt_dp(px, 4)

    def _snapshot(self, recv: int, tick: str) -> dict:
        self.seqs[1] += 1
        b = self.books[tick]
        msg = {"market_ticker": tick, "market_id": self.spec[tick].market_id}
        for side in ("yes", "no"):
            if b[side]:
                lv = sorted(b[side].items())
                msg[f"{side}_dollars_fp"] = [[self._wire_price(side, px), fmt_dp(sz, 2)] for px, sz in lv]
        return _out(recv, {"type": "orderbook_snapshot", "sid": 1, "seq": self.seqs[1], "msg": msg})

    def _ok(self, now: int, sid: int) -> dict:
        """The `ok` answer of an update_subscription on `sid` (it consumes a seq), listing `current`."""
        self.cmd_id += 1
        now += self.rng.randint(20_000, 200_000)
        self.seqs[sid] += 1
        return _out(now, {"id": self.cmd_id, "sid": sid, "seq": self.seqs[sid], "type": "ok",
                          "msg": {"market_tickers": list(self.current)}})

    def records(self) -> Iterator[dict]:
        rng = self.rng
        now = self.start_ns
        yield {"recv_ns": now, "meta": {"type": "connect", "source": "kalshi", "conn": self.conn,
                                        "use_yes_price": self.use_yes, "series": self.series}}
        self.current = [m.ticker for m in self.sched if _is_open(m, now)]
        for t in self.current:
            self._new_book(self.spec[t])
        now += rng.randint(30, 90) * 10**6
        yield _out(now, {"id": self.cmd_id, "type": "subscribed", "msg": {"channel": "orderbook_delta", "sid": 1}})
        now += rng.randint(100_000, 900_000)
        yield _out(now, {"id": self.cmd_id, "type": "subscribed", "msg": {"channel": "trade", "sid": 2}})
        if self.lifecycle:  # at the trade ack's time: the frames after keep their times
            yield _out(now, {"id": self.cmd_id, "type": "subscribed",
                             "msg": {"channel": "market_lifecycle_v2", "sid": LIFECYCLE_SID}})
        for t in self.current:
            now += rng.randint(20_000, 300_000)
            yield self._snapshot(now, t)
        boundaries = sorted({x for m in self.sched for x in (m.open_ns, m.close_ns) if self.start_ns < x < self.end})
        while True:
            nxt = now + max(1, int(rng.expovariate(1.0) * self.step))
            due = min(boundaries[0] if boundaries and boundaries[0] <= nxt else nxt, self.end - 1)
            if self.life and self.life[0][0] <= due:  # lifecycle frames before the next step
                now = yield from self._lifecycle_until(due, now)
            if boundaries and boundaries[0] <= nxt:
                now = yield from self._rotate(boundaries.pop(0), now)
                continue
            now = nxt
            if now >= self.end:
                break
            if self.current:
                yield from self._activity(now)

    def _rotate(self, b_ns: int, now: int) -> Iterator[dict]:
        """A contract boundary: drop expired contracts, add the newly opened ones; returns the time."""
        now = max(now, b_ns)
        expired = [t for t in self.current if not _is_open(self.spec[t], b_ns)]
        opened = [m.ticker for m in self.sched if _is_open(m, b_ns) and m.ticker not in self.current]
        if expired:
            self.current = [t for t in self.current if t not in expired]
            for sid in (1, 2):
                rec = self._ok(now, sid)
                now = rec["recv_ns"]
                yield rec
            for t in expired:
                self.books.pop(t, None)
        if opened:
            self.current = self.current + opened
            for t in opened:
                self._new_book(self.spec[t])
            rec = self._ok(now, 1)
            now = rec["recv_ns"]
            yield rec
            for t in opened:
                now += self.rng.randint(20_000, 300_000)
                yield self._snapshot(now, t)
            rec = self._ok(now, 2)
            now = rec["recv_ns"]
            yield rec
        return now

    def _activity(self, now: int) -> Iterator[dict]:
        """A trade (and the book delta it causes) or a book change, on a random open contract."""
        rng = self.rng
        tick = self.current[rng.randrange(len(self.current))]
        b = self.books[tick]
        ev_ns = now - rng.randint(1_000_000, 40_000_000)
        ts = fmt_rfc3339(ev_ns, 6)
        ts_ms = ev_ns // 10**6
        if rng.random() < 0.15 and b["yes"] and b["no"]:
            trade, deltas = self._trade(tick, b, ev_ns, ts_ms)
            yield _out(now, {"type": "trade", "sid": 2, "seq": self.seqs[2], "msg": trade})
        else:
            deltas = self._book_change(b)
            if deltas is None:
                return
        for side, px, d in deltas:
            self.seqs[1] += 1
            yield _out(now, {"type": "orderbook_delta", "sid": 1, "seq": self.seqs[1], "msg": {
                "market_ticker": tick,
                "market_id": self.spec[tick].market_id,
                "price_dollars": self._wire_price(side, px),
                "delta_fp": fmt_dp(d, 2),
                "side": side,
                "ts": ts,
                "ts_ms": ts_ms,
            }})

    def _trade(self, tick: str, b: dict, ev_ns: int, ts_ms: int) -> tuple[dict, list]:
        # taker yes lifts the best NO bid (YES price 1 - no); taker no hits the best YES bid
        rng = self.rng
        taker = rng.choice(("yes", "no"))
        rest = "no" if taker == "yes" else "yes"
        px = max(b[rest])
        sz = b[rest][px]
        cnt = min(sz, rng.choice((100, 100, 500, 1000, 2500)) + (rng.randint(1, 99) if rng.random() < 0.1 else 0))
        yes_px = 10000 - px if rest == "no" else px
        self.seqs[2] += 1
        msg = {
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
        }
        left = sz - cnt
        if left:
            b[rest][px] = left
        else:
            del b[rest][px]
        return msg, [(rest, px, -cnt)]

    def _book_change(self, b: dict) -> list | None:
        rng = self.rng
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
                return None
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
        return [(side, px, d)]


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
    lifecycle: bool = True,
) -> Iterator[dict]:
    """Yield capture records of one Kalshi connection subscribed to orderbook_delta + trade (and
    market_lifecycle_v2 unless `lifecycle=False`)."""
    yield from _KalshiSim(series, seconds, rate, seed, start_ns, contract_minutes, strikes, use_yes_price,
                          conn, lifecycle).records()


# ---------------------------------------------------------------------------------------------- gen-capture


def add_gen_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--series", default=",".join(DEFAULT_SERIES), help="kalshi series, comma separated")
    group.add_argument("--contract-minutes", type=int, default=60, help="kalshi contract lifetime")
    group.add_argument("--strikes", type=int, default=6, help="kalshi contracts per event")
    group.add_argument("--use-yes-price", action="store_true", help="kalshi NO prices on the YES scale")
    group.add_argument("--markets-out", default=None, help="kalshi: also write the REST market list (JSON)")


def gen_records(a: argparse.Namespace, common: dict[str, Any]) -> Iterator[dict]:
    kw = dict(series=[s for s in a.series.split(",") if s], seconds=common["seconds"], seed=common["seed"],
              start_ns=common["start_ns"], contract_minutes=a.contract_minutes, strikes=a.strikes)
    recs = generate_kalshi(rate=common["rate"] or 100.0, use_yes_price=a.use_yes_price, **kw)
    if a.markets_out:
        Path(a.markets_out).write_text(json.dumps(kalshi_markets(**kw), indent=1))
    return recs
