"""Coinbase Advanced Trade: wire Structs, normalization, subscription messages.

Traps handled here (see exchange-protocols.md §1.2):
- `sequence_num` is one counter per connection shared by all channels: a jump cannot be attributed,
  so every book on the connection is invalidated, a `sequence` gap row is written per market and
  the runtime is asked to reconnect (there is no snapshot request on this feed).
- `market_trades.side` is the MAKER side: taker = opposite. Trade snapshots repeat after each
  reconnect: dedupe on (product, trade_id).
- RFC 3339 timestamps with 3-9 fractional digits; snapshot `event_time` may be bogus (1970).
- `new_quantity` is the absolute size at the level (0 removes it).
"""

from __future__ import annotations

from typing import Iterable, Union

import msgspec
import pyarrow as pa
import pyarrow.compute  # noqa: F401
from msgspec import Struct

from engine.sources import DEFAULT_MAX_SKEW_NS, Action, BaseNormalizer, anchor_table, parse_ts

SOURCE = "coinbase"
DEFAULT_PRODUCTS = ("BTC-USD", "ETH-USD", "SOL-USD")
DEFAULT_URL = "wss://advanced-trade-ws.coinbase.com"
# channels that are valid on this feed but not collected: counted as ignored, never as bad input
IGNORED_CHANNELS = frozenset({"ticker", "ticker_batch", "candles", "status", "level2_batch", "user", "futures_balance_summary"})


# ---- wire Structs (numeric strings decoded to float by the decoder: strict=False) -------------
class L2Update(Struct, gc=False):
    side: str
    price_level: float  # decimal strings parsed by msgspec (correctly rounded, same values as Arrow's cast)
    new_quantity: float
    event_time: str = ""


class L2Event(Struct, gc=False):
    type: str
    product_id: str
    updates: list[L2Update]


class L2Msg(Struct, tag_field="channel", tag="l2_data", gc=False):
    sequence_num: int
    events: list[L2Event]
    timestamp: str = ""


# Fallback view of an l2_data frame whose numbers msgspec's float parser rejects (e.g. "+1", ".5",
# "1e400"): the decimal strings are kept raw and converted exactly as Arrow's string -> float64 cast
# does (what every l2 number went through before msgspec parsed them).
class RawL2Update(Struct, gc=False):
    side: str
    price_level: str
    new_quantity: str
    event_time: str = ""


class RawL2Event(Struct, gc=False):
    type: str
    product_id: str
    updates: list[RawL2Update]


class RawL2Msg(Struct, tag_field="channel", tag="l2_data", gc=False):
    sequence_num: int
    events: list[RawL2Event]
    timestamp: str = ""


class Trade(Struct, gc=False):
    product_id: str
    trade_id: str
    price: float
    size: float
    side: str
    time: str = ""


class TradeEvent(Struct, gc=False):
    trades: list[Trade]
    type: str = "update"


class TradesMsg(Struct, tag_field="channel", tag="market_trades", gc=False):
    sequence_num: int
    events: list[TradeEvent]
    timestamp: str = ""


class HeartbeatsMsg(Struct, tag_field="channel", tag="heartbeats", gc=False):
    sequence_num: int
    timestamp: str = ""


class SubsEvent(Struct, gc=False):
    subscriptions: dict[str, list[str]] = {}


class SubsMsg(Struct, tag_field="channel", tag="subscriptions", gc=False):
    sequence_num: int
    events: list[SubsEvent] = []
    timestamp: str = ""


class Probe(Struct, gc=False):
    """Lenient view used to classify a frame the typed decoder rejected."""

    channel: str | None = None
    type: str | None = None
    sequence_num: int | None = None
    message: str | None = None
    reason: str | None = None
    timestamp: str | None = None


_decoder = msgspec.json.Decoder(Union[L2Msg, TradesMsg, HeartbeatsMsg, SubsMsg], strict=False)
_raw_decoder = msgspec.json.Decoder(Union[RawL2Msg, TradesMsg, HeartbeatsMsg, SubsMsg], strict=False)
_probe = msgspec.json.Decoder(Probe)

_astuple = msgspec.structs.astuple  # L2Update -> (side, price_level, new_quantity, event_time)
_TAKER = {"SELL": "buy", "BUY": "sell", "sell": "buy", "buy": "sell"}
_L2_SIDES = frozenset({"bid", "offer", "ask"})
_INF = float("inf")
_NINF = float("-inf")


def subscribe_messages(products: Iterable[str]) -> list[str]:
    """level2 first (its snapshot is the book's starting point), then trades (their snapshot covers
    the moments in between), then heartbeats (keeps the other channels open, liveness signal)."""
    p = list(products)
    enc = msgspec.json.encode
    return [
        enc({"type": "subscribe", "product_ids": p, "channel": "level2"}).decode(),
        enc({"type": "subscribe", "product_ids": p, "channel": "market_trades"}).decode(),
        enc({"type": "subscribe", "channel": "heartbeats"}).decode(),
    ]


class _Bad(Exception):
    pass


def _arrow_floats(prices: tuple[str, ...], sizes: tuple[str, ...]) -> tuple[list | tuple, list | tuple]:
    """Raw decimal strings -> floats exactly as the chunk's Arrow cast converts them. When Arrow
    cannot read one, the strings stay raw: the chunk conversion then fails in bulk and goes run by
    run, so only this message's runs are dropped (and reported), as for any unreadable value."""
    try:
        cast = pa.compute.cast
        return (cast(pa.array(prices, pa.string()), pa.float64()).to_pylist(),
                cast(pa.array(sizes, pa.string()), pa.float64()).to_pylist())
    except Exception:  # noqa: BLE001
        return prices, sizes


class CoinbaseNormalizer(BaseNormalizer):
    source = SOURCE

    def __init__(self, max_skew_ns: int = DEFAULT_MAX_SKEW_NS, products: Iterable[str] = (), log=None,
                 keep_books: bool = True):
        super().__init__(max_skew_ns=max_skew_ns, log=log)
        self.keep_books = keep_books  # only needed to serve anchor_rows(); the Engine can anchor by itself
        self.books: dict[str, tuple[dict[float, float], dict[float, float]]] = {}  # (bids, asks) by price
        self.valid: set[str] = set()  # products whose book is complete on the current connection
        self.known: set[str] = set(products)
        self.last_seq: int | None = None
        self.explicit_conns = False
        self.trade_floor: dict[str, int] = {}
        self.trade_seen: dict[str, set[int]] = {}
        self._et_s = ""
        self._et_v = 0

    # ---- state ------------------------------------------------------------------------------
    def markets(self) -> Iterable[str]:
        return self.known

    def seed_trade_ids(self, max_ids: dict[str, int]) -> None:
        """Max stored trade_id per product (from the lake) so reconnect snapshots do not duplicate."""
        for p, v in max_ids.items():
            self.trade_floor[p] = max(self.trade_floor.get(p, -1), int(v))

    def on_connect(self, recv_ns: int, conn: int | None = None, **meta) -> None:
        if conn is not None:
            self.explicit_conns = True
        super().on_connect(recv_ns, conn, **meta)

    def reset_connection(self, recv_ns: int, **meta) -> None:
        self.last_seq = None
        self.valid.clear()

    def invalidate_all(self) -> None:
        self.valid.clear()

    def anchor_rows(self, market: str, now_ns: int):
        book = self.books.get(market)
        if not self.keep_books or not book or market not in self.valid:
            return None
        b = {("bid", p): q for p, q in book[0].items()}
        b.update({("ask", p): q for p, q in book[1].items()})
        return anchor_table(SOURCE, {market: (market, b)}, now_ns)

    # ---- frames -----------------------------------------------------------------------------
    def feed(self, recv_ns: int, frame: str | bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes += len(frame)
        try:
            msg = _decoder.decode(frame)
        except msgspec.ValidationError:
            try:  # numbers msgspec does not parse, or not a frame we know: exactly as before
                msg = _raw_decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self._untyped(recv_ns, frame, e)
                return
        except msgspec.DecodeError as e:  # malformed JSON
            self._untyped(recv_ns, frame, e)
            return
        if self.conn is None:
            self.on_connect(recv_ns)
        seq, last = msg.sequence_num, self.last_seq
        if last is not None and seq == last + 1:
            self.last_seq = seq
        elif not self._sequence(recv_ns, seq, frame):
            return
        self.last_frame_recv = recv_ns
        cls = type(msg)
        if cls is L2Msg or cls is RawL2Msg:
            try:
                self._l2(recv_ns, msg, cls is RawL2Msg)
            except _Bad as e:
                self._bad_l2(recv_ns, frame, msg, str(e))
        elif cls is TradesMsg:
            self._trades(recv_ns, msg, frame)
        elif cls is SubsMsg:
            for ev in msg.events:
                for ch, prods in ev.subscriptions.items():
                    if ch in ("level2", "market_trades"):
                        self.known.update(prods)

    def _untyped(self, recv_ns: int, frame, exc) -> None:
        try:
            p = _probe.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.skip(frame, "malformed_json", e)
            return
        if p.type == "error":
            self.c.errors += 1
            self.log.error("exchange_error", message=p.message, reason=p.reason, frame_head=str(frame[:200]))
            self.actions.append(Action("error", message=p.message, reason=p.reason))
            return
        if p.channel in IGNORED_CHANNELS and p.sequence_num is not None:
            if self.conn is None:
                self.on_connect(recv_ns)
            if self._sequence(recv_ns, p.sequence_num, frame):
                self.last_frame_recv = recv_ns
                self.c.ignored_frames += 1
            return
        if p.channel == "l2_data" and p.sequence_num is not None:
            # a book update we cannot read: the books of this connection can no longer be trusted
            if self.conn is None:
                self.on_connect(recv_ns)
            if self._sequence(recv_ns, p.sequence_num, frame):
                self.last_frame_recv = recv_ns
                self._bad_l2(recv_ns, frame, None, f"bad_l2_data: {exc}")
            return
        if p.sequence_num is not None and p.channel in ("market_trades", "heartbeats", "subscriptions"):
            if self.conn is None:
                self.on_connect(recv_ns)
            if self._sequence(recv_ns, p.sequence_num, frame):
                self.last_frame_recv = recv_ns
            self.skip(frame, f"bad_{p.channel}", exc)
            return
        self.skip(frame, "unknown_message" if p.channel or p.type else "missing_fields", exc)

    def _sequence(self, recv_ns: int, seq: int, frame) -> bool:
        last = self.last_seq
        if last is None or seq == last + 1:
            self.last_seq = seq
            return True
        if seq <= last:
            if seq == 0 and not self.explicit_conns:
                # capture without meta lines: a sequence restart is a new connection
                self.on_disconnect(recv_ns, "sequence restart (new connection)")
                self.on_connect(recv_ns)
                self.last_seq = 0
                return True
            self.skip(frame, f"out_of_order: sequence_num {seq} after {last}")
            return False
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        for m in sorted(self.known):
            self.gap(m, None, start, recv_ns, "sequence", f"sequence_num jumped {last} -> {seq} on connection {self.conn}")
        self.invalidate_all()
        self.actions.append(Action("reconnect", reason=f"sequence: sequence_num jumped {last} -> {seq}"))
        self.last_seq = seq
        return True

    def _bad_l2(self, recv_ns: int, frame, msg, reason: str) -> None:
        self.skip(frame, reason)
        prods = sorted({ev.product_id for ev in msg.events}) if msg is not None else sorted(self.known)
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        hit = [p for p in prods if p in self.valid]
        for p in hit:
            self.gap(p, None, start, recv_ns, "sequence", f"unreadable l2_data frame: {reason}"[:300])
            self.valid.discard(p)
        if hit:
            self.actions.append(Action("reconnect", reason=f"sequence: unreadable l2_data frame ({reason})"[:300]))

    def _ts(self, s: str, recv_ns: int, env: str) -> int:
        if s == self._et_s:
            t = self._et_v
        else:
            try:
                t = parse_ts(s)
            except (ValueError, IndexError):
                t = None
            if t is not None:
                self._et_s, self._et_v = s, t
        if t is not None and -self.max_skew_ns < recv_ns - t < self.max_skew_ns:
            return t
        if env:
            try:
                t = parse_ts(env)
            except (ValueError, IndexError):
                raise _Bad(f"bad timestamp {s!r} / {env!r}") from None
            if -self.max_skew_ns < recv_ns - t < self.max_skew_ns:
                return t
        raise _Bad(f"timestamp far from receive time: {s!r}")

    def _l2(self, recv_ns: int, msg: L2Msg | RawL2Msg, raw: bool = False) -> None:
        seq = msg.sequence_num
        env = msg.timestamp
        l2 = self.l2
        for ev in msg.events:
            ups = ev.updates
            n = len(ups)
            typ = ev.type
            pid = ev.product_id
            if typ == "snapshot":
                snap = True
            elif typ == "update":
                snap = False
                if pid not in self.valid:
                    self.c.skipped_rows += n
                    continue
            else:
                raise _Bad(f"unknown l2 event type {typ!r}")
            if not n:
                continue
            sides, prices, sizes, ets = zip(*map(_astuple, ups))  # columns of the message, in C
            s0, e0 = sides[0], ets[0]
            k = sides.count(s0)
            if ets.count(e0) == n and s0 in _L2_SIDES:
                if k == n:
                    segs = ((0, n, s0, e0),)
                elif sides[k] != s0 and sides[k] in _L2_SIDES and sides[k:].count(sides[k]) == n - k:
                    # exactly two groups, s0 then the other side (the usual shape): [k:] is all the
                    # other side, so all k s0 are in [:k]
                    segs = ((0, k, s0, e0), (k, n, sides[k], e0))
                else:
                    segs = self._segments(sides, ets)
            else:
                segs = self._segments(sides, ets)
            if snap:
                self.valid.add(pid)
                self.known.add(pid)
            if raw:
                if self.keep_books:
                    try:
                        self._book(pid, snap, list(map(float, prices)), list(map(float, sizes)), segs)
                    except ValueError as e:
                        raise _Bad(f"bad number: {e}") from None
                prices, sizes = _arrow_floats(prices, sizes)
            elif self.keep_books:
                self._book(pid, snap, prices, sizes, segs)
            l2.price += prices
            l2.size += sizes
            runs = l2.runs
            for a, b, side, et in segs:
                runs.append((b - a, recv_ns, None, et, env, pid, pid, side, seq, snap))
            l2.rows += n

    @staticmethod
    def _segments(sides: list[str], ets: list[str]) -> list[tuple[int, int, str, str]]:
        """(start, end, side, event_time) runs of consecutive updates sharing side and event time."""
        segs = []
        a = 0
        n = len(sides)
        for i in range(1, n + 1):
            if i == n or sides[i] != sides[a] or ets[i] != ets[a]:
                if sides[a] not in _L2_SIDES:
                    raise _Bad(f"unknown side {sides[a]!r}")
                segs.append((a, i, sides[a], ets[a]))
                a = i
        return segs

    def _book(self, pid: str, snap: bool, prices, sizes, segs) -> None:
        if snap:
            bids: dict[float, float] = {}
            asks: dict[float, float] = {}
            self.books[pid] = (bids, asks)
        else:
            bids, asks = self.books[pid]
        zero = 0.0 in sizes
        for a, b, side, _ in segs:
            book = bids if side == "bid" else asks
            if a == 0 and b == len(prices):
                book.update(zip(prices, sizes))
            else:
                book.update(zip(prices[a:b], sizes[a:b]))
            if zero:
                for p, q in zip(prices[a:b], sizes[a:b]):
                    if q == 0.0:
                        book.pop(p, None)

    def bad_run(self, run: tuple, reason: str) -> None:
        """Rows of one l2 message failed the bulk checks: the book of that product is no longer known."""
        super().bad_run(run, reason)
        pid, recv = run[6], run[1]
        if pid in self.valid:
            self.valid.discard(pid)
            self.gap(pid, None, recv, recv, "sequence", f"unreadable l2_data frame: {reason}")
            self.actions.append(Action("reconnect", reason=f"sequence: unreadable l2_data frame for {pid} ({reason})"))

    def _trades(self, recv_ns: int, msg: TradesMsg, frame) -> None:
        seq = msg.sequence_num
        env = msg.timestamp
        good = []
        for ev in msg.events:
            for tr in ev.trades:
                try:
                    tid = int(tr.trade_id)
                    side = _TAKER[tr.side]
                    if not (tr.price > 0.0 and tr.size > 0.0) or tr.price == float("inf") or tr.size == float("inf"):
                        raise _Bad("absurd price or size")
                    ts = self._ts(tr.time, recv_ns, env)
                except (ValueError, KeyError, _Bad) as e:
                    self.skip(frame, "bad_trade", e)
                    continue
                good.append((tid, ts, side, tr))
        add = self.trades.add
        for tid, ts, side, tr in good:
            p = tr.product_id
            seen = self.trade_seen.get(p)
            if seen is None:
                seen = self.trade_seen[p] = set()
            if tid <= self.trade_floor.get(p, -1) or tid in seen:
                self.c.dup_trades += 1
                continue
            seen.add(tid)
            if len(seen) > 200_000:
                keep = sorted(seen)[-100_000:]
                self.trade_floor[p] = max(self.trade_floor.get(p, -1), keep[0] - 1)
                self.trade_seen[p] = set(keep)
            self.known.add(p)
            add(ts, recv_ns, p, p, side, tr.price, tr.size, tr.trade_id, seq)
            self.c.rows_trades += 1
