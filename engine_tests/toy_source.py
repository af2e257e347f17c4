"""A toy exchange registered from the tests: the smallest complete `Source` (docs/adding-a-source.md).

Wire: JSON text frames, one message each; times are int ns; `seq` counts per connection from 1;
prices are in ticks, the tick coming from the connection's capture meta line (as Kalshi's
`use_yes_price` does), default 1.

    {"type": "book",  "seq": 1, "market": "TOY-A", "ts": T, "bids": [[p, q], ...], "asks": [[p, q], ...]}
    {"type": "level", "seq": 2, "market": "TOY-A", "ts": T, "side": "bid" | "ask", "price": p, "size": q}
    {"type": "trade", "seq": 3, "market": "TOY-A", "ts": T, "id": 17, "side": "buy" | "sell", "price": p, "size": q}

`book` replaces a market's book (snapshot rows); `level` is the absolute size at a price (0
removes it); `trade` ids grow per market, so a trade re-sent after a reconnect is a duplicate. A
`seq` jump writes a `sequence` gap per market, invalidates the books until their next `book` and
asks for a snapshot (the default `Link` reconnects for it). Instrument == market.
"""

from __future__ import annotations

import argparse
import json
from typing import Iterable, Literal, Mapping, Union

import msgspec

from engine.collect.append import seed_trade_ids
from engine.collect.base import Action, BaseNormalizer
from engine.collect.source import Source
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS

NAME = "toy"


# ---- wire -------------------------------------------------------------------------------------
class Book(msgspec.Struct, tag_field="type", tag="book", gc=False):
    seq: int
    market: str
    ts: int
    bids: list[tuple[float, float]] = []
    asks: list[tuple[float, float]] = []


class Level(msgspec.Struct, tag_field="type", tag="level", gc=False):
    seq: int
    market: str
    ts: int
    side: Literal["bid", "ask"]
    price: float
    size: float


class Trade(msgspec.Struct, tag_field="type", tag="trade", gc=False):
    seq: int
    market: str
    ts: int
    id: int
    side: Literal["buy", "sell"]
    price: float
    size: float


_decoder = msgspec.json.Decoder(Union[Book, Level, Trade])


# ---- normalizer -------------------------------------------------------------------------------
class ToyNormalizer(BaseNormalizer):
    source = NAME

    def __init__(self, max_skew_ns: int = DEFAULT_MAX_SKEW_NS, markets: Iterable[str] = (), log=None):
        super().__init__(max_skew_ns=max_skew_ns, log=log)
        self.known: set[str] = set(markets)
        self.valid: set[str] = set()  # markets whose book is complete on this connection
        self.last_seq: int | None = None
        self.tick = 1.0
        self.trade_floor: dict[str, int] = {}

    def markets(self) -> Iterable[str]:
        return self.known

    def seed_trade_ids(self, max_ids: Mapping[str, int]) -> None:
        for m, v in max_ids.items():
            self.trade_floor[m] = max(self.trade_floor.get(m, -1), int(v))

    def reset_connection(self, recv_ns: int, tick: float | None = None, **meta) -> None:
        if tick is not None:
            self.tick = tick
        self.last_seq = None
        self.valid.clear()

    def invalidate_all(self) -> None:
        self.valid.clear()

    def feed(self, recv_ns: int, frame: str | bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes += len(frame)
        try:
            m = _decoder.decode(frame)
        except msgspec.ValidationError as e:  # a subclass of DecodeError: first
            self.skip(frame, "unknown_message", e)
            return
        except msgspec.DecodeError as e:
            self.skip(frame, "malformed_json", e)
            return
        if self.conn is None:
            self.on_connect(recv_ns)
        if not self._sequence(recv_ns, m.seq, frame):
            return
        self.last_frame_recv = recv_ns
        if not -self.max_skew_ns < recv_ns - m.ts < self.max_skew_ns:
            self.skip(frame, "bad_timestamp")
            return
        if type(m) is Book:
            self._book(recv_ns, m)
        elif type(m) is Level:
            self._level(recv_ns, m)
        else:
            self._trade(recv_ns, m)

    def _sequence(self, recv_ns: int, seq: int, frame) -> bool:
        last = self.last_seq
        if last is None or seq == last + 1:
            self.last_seq = seq
            return True
        if seq <= last:
            self.skip(frame, f"out_of_order: seq {seq} after {last}")
            return False
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        for mk in sorted(self.known):
            self.gap(mk, None, start, recv_ns, "sequence", f"seq jumped {last} -> {seq} on connection {self.conn}")
        self.invalidate_all()
        self.actions.append(Action("get_snapshot", markets=sorted(self.known)))
        self.last_seq = seq
        return True

    def _book(self, recv_ns: int, m: Book) -> None:
        self.known.add(m.market)
        self.valid.add(m.market)
        l2, tick = self.l2, self.tick
        for side, levels in (("bid", m.bids), ("ask", m.asks)):
            if levels:
                l2.price += [p * tick for p, _ in levels]
                l2.size += [q for _, q in levels]
                l2.run(len(levels), recv_ns, m.ts, m.market, m.market, side, m.seq, True)

    def _level(self, recv_ns: int, m: Level) -> None:
        if m.market not in self.valid:
            self.c.skipped_rows += 1  # no book to apply it to until the next snapshot
            return
        l2 = self.l2
        l2.price.append(m.price * self.tick)
        l2.size.append(m.size)
        l2.run(1, recv_ns, m.ts, m.market, m.market, m.side, m.seq, False)

    def _trade(self, recv_ns: int, m: Trade) -> None:
        if m.id <= self.trade_floor.get(m.market, -1):
            self.c.dup_trades += 1
            return
        self.trade_floor[m.market] = m.id
        self.known.add(m.market)
        self.trades.add(m.ts, recv_ns, m.market, m.market, m.side, m.price * self.tick, m.size, str(m.id), m.seq)
        self.c.rows_trades += 1


# ---- source -----------------------------------------------------------------------------------
class ToySource(Source):
    name = NAME
    title = "Toy"
    default_markets = ("TOY-A",)
    default_url = "ws://127.0.0.1:9/toy"
    stall_s = 10.0

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        super().add_arguments(ap)  # --toy-markets, --toy-url, --toy-stall
        ap.add_argument("--toy-tick", type=float, default=1.0, help="Toy price tick, recorded in the capture")

    def normalizer(self, markets: Iterable[str] = (), max_skew_ns: int = DEFAULT_MAX_SKEW_NS, log=None) -> ToyNormalizer:
        return ToyNormalizer(max_skew_ns=max_skew_ns, markets=markets, log=log)

    def subscribe_messages(self, cfg: argparse.Namespace) -> list[str]:
        return [json.dumps({"subscribe": self.markets(cfg)})]

    def connect_meta(self, cfg: argparse.Namespace) -> dict:
        return {"tick": cfg.toy_tick}

    def connect_kwargs(self, meta: Mapping) -> dict:
        return {"tick": float(meta.get("tick", 1.0))}

    def seed(self, eng, norm: ToyNormalizer) -> None:
        seed_trade_ids(eng, norm, self.name)


SOURCE = ToySource()


# ---- frames, for captures (and a replay exchange) ---------------------------------------------
def book(seq: int, ts: int, bids=(), asks=(), market: str = "TOY-A") -> str:
    return json.dumps({"type": "book", "seq": seq, "market": market, "ts": ts, "bids": list(bids), "asks": list(asks)})


def level(seq: int, ts: int, side: str, price: float, size: float, market: str = "TOY-A") -> str:
    return json.dumps({"type": "level", "seq": seq, "market": market, "ts": ts, "side": side, "price": price, "size": size})


def trade(seq: int, ts: int, tid: int, side: str, price: float, size: float, market: str = "TOY-A") -> str:
    return json.dumps({"type": "trade", "seq": seq, "market": market, "ts": ts, "id": tid, "side": side, "price": price,
                       "size": size})
