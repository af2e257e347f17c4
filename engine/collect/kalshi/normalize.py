"""Kalshi: normalization of decoded frames into canonical rows (books kept per contract).

Traps handled here (see exchange-protocols.md §2):
- prices are exact decimals: all arithmetic in integer units (1e-4 dollars, 1e-2 contracts),
  converted to float once, so a NO bid at 0.93 becomes an ask at exactly 0.07;
- `orderbook_delta.delta_fp` is a signed CHANGE: the normalizer keeps every book and writes the
  absolute level size; legacy integer-cent fields are read when the `_fp` ones are missing;
- `use_yes_price` decides the NO-side price scale and is not restated by the frames: it comes
  from the connection's meta line (default false, Kalshi's documented default);
- `seq` runs per (connection, sid); a jump -> `sequence` gap, books on that sid invalid until a
  fresh snapshot, and the runtime is asked for `get_snapshot`;
- snapshots can arrive unrequested and may lack both ladders: they always replace the book.

Reference data (`instruments` rows, `engine.collect.kalshi.reference`): REST market objects
(`rest("markets", body)`: discovery's pages, recorded in the capture) and `market_lifecycle_v2`
events (all markets: only the series named by the connection's meta line are kept).
"""

from __future__ import annotations

from itertools import repeat
from operator import not_
from typing import Iterable

import msgspec
import numpy as np
import pyarrow as pa

from engine.collect.base import Action, BaseNormalizer
from engine.collect.columns import DICT_T, const_dict
from engine.collect.kalshi import wire
from engine.collect.kalshi.reference import KIND, BadReference, lifecycle_fields, market_fields
from engine.collect.kalshi.wire import (
    IGNORED_TYPES,
    LIFECYCLE_CHANNEL,
    LifecycleMsg,
    ONE,
    SOURCE,
    DeltaBody,
    DeltaMsg,
    ErrorMsg,
    OkMsg,
    SnapshotMsg,
    SubscribedMsg,
    TradeMsg,
    UnsubscribedMsg,
    p4,
    q2,
    series_of,
)
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS, parse_ts
from engine.schema import L2_SCHEMA
from engine.timeutil import NS

_SIDES = pa.array(["bid", "ask"], pa.string())  # side dictionary: index 0 = bid (YES), 1 = ask (NO)
# assigned, not imported: a method call on an imported name compiles to a slower LOAD_ATTR + CALL
_decoder = wire.decoder
_probe = wire.probe_decoder


class _Bad(Exception):
    pass


_Q2: dict[str, int] = {}  # change strings -> 1e-2 units (bounded cache)
_NO_LEVELS: dict[str, tuple[int, bool, float]] = {}  # an unknown side: never cached, parsed (and rejected)


class L2Rows:
    """Kalshi l2 rows awaiting conversion: one tuple per row
    `(recv_ns, ts_ns, ticker, bid, seq, price, size, snapshot)`.

    Every `sub_rows` rows, while the tuples are still in the CPU cache, they are turned into columns
    and released; `take` joins the columns into one Arrow table. Every value is already exact and
    checked (integer units converted once, timestamps checked at decode), so there is nothing to
    check in bulk; the market (series) is derived once per distinct ticker.
    """

    __slots__ = ("rows_", "rows", "flush_at", "sub_rows", "parts", "ts_fallbacks", "last_lag")

    def __init__(self, sub_rows: int = 4096) -> None:
        self.sub_rows = sub_rows
        self.ts_fallbacks = 0
        self.last_lag: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.rows_: list[tuple[int, int, str, bool, int | None, float, float, bool]] = []  # not yet columns
        self.parts: list[tuple] = []  # columns of the rows turned over so far
        self.rows = 0  # rows pending in this chunk
        self.flush_at = self.sub_rows  # turn the tuples into columns when `rows` reaches this

    def flush(self) -> None:
        """Turns the pending row tuples into columns."""
        if not self.rows_:
            return
        recv, ts, tk, bid, seq, price, size, snap = zip(*self.rows_)
        self.rows_ = []
        self.flush_at = self.rows + self.sub_rows
        self.parts.append((
            np.array(recv, np.int64),
            np.array(ts, np.int64),
            pa.array(tk, DICT_T),
            np.frombuffer(bytes(map(not_, bid)), np.uint8),  # 1 = ask
            pa.array(seq, pa.int64()),
            np.array(price, np.float64),
            np.array(size, np.float64),
            np.array(snap, bool),
        ))

    def take(self, on_bad=None) -> pa.Table | None:
        self.flush()
        parts = self.parts
        self._reset()
        if not parts:
            return None
        recv, ts, tk, ask, seq, price, size, snap = zip(*parts)
        recv, ts, ask, price, size, snap = map(np.concatenate, (recv, ts, ask, price, size, snap))
        self.last_lag = int(recv[-1] - ts[-1])
        inst = pa.chunked_array(tk).unify_dictionaries().combine_chunks()
        series = [series_of(t) for t in inst.dictionary.to_pylist()]
        uniq = sorted(set(series))
        remap = np.array([uniq.index(x) for x in series], np.int32)
        market = pa.DictionaryArray.from_arrays(pa.array(remap[inst.indices.to_numpy(zero_copy_only=False)], pa.int32()),
                                                pa.array(uniq, pa.string()))
        cols = [
            pa.array(ts, pa.int64()),
            pa.array(recv, pa.int64()),
            const_dict(SOURCE, len(recv)),
            market,
            inst,
            pa.DictionaryArray.from_arrays(pa.array(ask.astype(np.int32), pa.int32()), _SIDES),
            pa.array(price, pa.float64()),
            pa.array(size, pa.float64()),
            pa.chunked_array(seq, pa.int64()).combine_chunks(),
            pa.array(snap, pa.bool_()),
        ]
        return pa.Table.from_arrays(cols, schema=L2_SCHEMA)


class KalshiNormalizer(BaseNormalizer):
    source = SOURCE

    def __init__(self, max_skew_ns: int = DEFAULT_MAX_SKEW_NS, series: Iterable[str] = (), log=None):
        super().__init__(max_skew_ns=max_skew_ns, log=log)
        self.known: set[str] = set(series)
        self.use_yes_price = False
        self.explicit_conns = False
        self.sid_channel: dict[int, str] = {}
        self.sid_seq: dict[int, int] = {}
        self.sid_tickers: dict[int, set[str]] = {}
        self.books: dict[str, tuple[dict[int, int], dict[int, int]]] = {}
        self.valid: set[str] = set()
        self._series: dict[str, str] = {}
        self._pf: dict[int, float] = {}
        self.l2 = L2Rows()
        self._levels_by_side: dict[str, dict[str, tuple[int, bool, float]]] = {"yes": {}, "no": {}}
        # series whose lifecycle events are kept (the channel sends every market's): set by the
        # connection's meta line, so live and offline keep the same ones; None = all
        self.lifecycle_series: frozenset[str] | None = None

    def markets(self) -> Iterable[str]:
        return self.known

    def _ser(self, t: str) -> str:
        s = self._series.get(t)
        if s is None:
            s = self._series[t] = series_of(t)
            self.known.add(s)
        return s

    def _price(self, u: int) -> float:
        f = self._pf.get(u)
        if f is None:
            f = self._pf[u] = u / ONE
        return f

    # ---- lifecycle --------------------------------------------------------------------------
    def on_connect(self, recv_ns: int, conn: int | None = None, **meta) -> None:
        if conn is not None:
            self.explicit_conns = True
        super().on_connect(recv_ns, conn, **meta)

    def reset_connection(self, recv_ns: int, use_yes_price: bool | None = None, keep_sids: bool = False,
                         series: Iterable[str] | None = None, **meta) -> None:
        if use_yes_price is not None:
            self.use_yes_price = bool(use_yes_price)
        if series is not None:
            self.lifecycle_series = frozenset(series)
        # else (meta-less capture): keep the documented default (False) or what was last set
        self._levels_by_side = {"yes": {}, "no": {}}  # the NO price scale may have changed
        if not keep_sids:
            self.sid_channel = {}
        self.sid_seq = {}
        self.sid_tickers = {}
        self.valid.clear()

    def invalidate_all(self) -> None:
        self.valid.clear()

    def _implicit_reconnect(self, recv_ns: int, why: str) -> None:
        chans = dict(self.sid_channel)
        self.on_disconnect(recv_ns, f"{why} (new connection)")
        self.on_connect(recv_ns)
        self.sid_channel = chans

    def drop_instrument(self, ticker: str) -> None:
        self.books.pop(ticker, None)
        self.valid.discard(ticker)
        for s in self.sid_tickers.values():
            s.discard(ticker)

    # ---- sequence -----------------------------------------------------------------------------
    def _seq(self, recv_ns: int, sid: int, seq: int | None, frame, channel: str) -> bool:
        if seq is None:
            return True
        if sid not in self.sid_channel:
            self.sid_channel[sid] = channel
        last = self.sid_seq.get(sid)
        if last is None or seq == last + 1:
            self.sid_seq[sid] = seq
            return True
        if seq <= last:
            if seq == 1:
                if not self.explicit_conns:
                    self._implicit_reconnect(recv_ns, f"seq restart on sid {sid}")
                else:  # a new subscription reusing the sid on this connection
                    self.sid_tickers.pop(sid, None)
                self.sid_seq[sid] = 1
                return True
            self.skip(frame, f"out_of_order: seq {seq} after {last} on sid {sid}")
            return False
        # jump: every book on this sid is suspect
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        ch = self.sid_channel.get(sid, channel)
        tickers = sorted(self.sid_tickers.get(sid, ()))
        series = sorted({self._ser(t) for t in tickers}) or sorted(self.known)
        for m in series:
            self.gap(m, None, start, recv_ns, "sequence", f"{ch} sid {sid} seq jumped {last} -> {seq} on connection {self.conn}")
        if ch == "orderbook_delta":
            for t in tickers:
                self.valid.discard(t)
            if tickers:
                self.actions.append(Action("get_snapshot", sid=sid, tickers=tickers))
        self.sid_seq[sid] = seq
        return True

    # ---- frames -------------------------------------------------------------------------------
    def feed(self, recv_ns: int, frame: str | bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes += len(frame)
        try:
            m = _decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self._untyped(recv_ns, frame, e)
            return
        if self.conn is None:
            self.on_connect(recv_ns)
        cls = type(m)
        if cls is DeltaMsg:
            sid, seq = m.sid, m.seq
            last = self.sid_seq.get(sid)
            if last is not None and seq == last + 1:
                self.sid_seq[sid] = seq
            elif not self._seq(recv_ns, sid, seq, frame, "orderbook_delta"):
                return
            self.last_frame_recv = recv_ns
            # the delta itself, inline (the hot path): cached price level, signed change, timestamp
            b = m.msg
            t = b.market_ticker
            try:
                lv = self._levels_by_side.get(b.side, _NO_LEVELS).get(b.price_dollars)
                if lv is None:
                    lv = self._level(b)
                d = _Q2.get(b.delta_fp)
                if d is None:
                    d = self._change(b)
                ts = b.ts_ms
                if ts is not None:
                    ts *= 1_000_000
                elif b.ts:
                    ts = parse_ts(b.ts)
                else:
                    ts = recv_ns
                if not -self.max_skew_ns < recv_ns - ts < self.max_skew_ns:
                    raise _Bad("timestamp far from receive time")
            except (_Bad, ValueError, IndexError, TypeError) as e:
                self.skip(frame, "bad_orderbook_delta", e)
                self._book_lost(sid, t if t in self.books else None, recv_ns, f"bad delta for {t}")
                return
            if t not in self.valid:
                self.c.skipped_rows += 1
                return
            p, bid, price = lv
            book = self.books[t][0 if bid else 1]
            new = book.get(p, 0) + d
            if new <= 0:
                book.pop(p, None)
                new = 0
            else:
                book[p] = new
            l2 = self.l2
            l2.rows_.append((recv_ns, ts, t, bid, seq, price, new / 100, False))
            l2.rows += 1
            if l2.rows >= l2.flush_at:
                l2.flush()
        elif cls is TradeMsg:
            if self._seq(recv_ns, m.sid, m.seq, frame, "trade"):
                self.last_frame_recv = recv_ns
                self._trade(recv_ns, m, frame)
        elif cls is SnapshotMsg:
            if self._seq(recv_ns, m.sid, m.seq, frame, "orderbook_delta"):
                self.last_frame_recv = recv_ns
                self._snapshot(recv_ns, m, frame)
        elif cls is SubscribedMsg:
            sid = m.msg.sid
            if not self.explicit_conns and sid in self.sid_seq:
                self._implicit_reconnect(recv_ns, f"new subscribe ack for sid {sid}")
            self.sid_channel[sid] = m.msg.channel
            self.sid_seq.pop(sid, None)
            self.last_frame_recv = recv_ns
        elif cls is OkMsg:
            if m.sid is not None and self._seq(recv_ns, m.sid, m.seq, frame, self.sid_channel.get(m.sid, "?")):
                self.last_frame_recv = recv_ns
                self._ok(m)
        elif cls is ErrorMsg:
            if m.sid is not None:
                self._seq(recv_ns, m.sid, m.seq, frame, self.sid_channel.get(m.sid, "?"))
            self._error(m, frame)
        elif cls is LifecycleMsg:
            self.last_frame_recv = recv_ns
            self._lifecycle(recv_ns, m, frame)
        elif cls is UnsubscribedMsg:
            if m.sid is not None:
                self.sid_channel.pop(m.sid, None)
                self.sid_seq.pop(m.sid, None)
                for t in self.sid_tickers.pop(m.sid, ()):
                    self.valid.discard(t)

    def _untyped(self, recv_ns: int, frame, exc) -> None:
        p = self.probe(_probe, frame)
        if p is None:
            return
        if p.type in IGNORED_TYPES:
            self.c.ignored_frames += 1
            return
        if p.type == LIFECYCLE_CHANNEL:
            self.skip(frame, f"bad_{p.type}", exc)
            return
        if p.type in ("orderbook_delta", "orderbook_snapshot", "trade") and p.sid is not None and p.seq is not None:
            ch = "trade" if p.type == "trade" else "orderbook_delta"
            if self.conn is None:
                self.on_connect(recv_ns)
            if self._seq(recv_ns, p.sid, p.seq, frame, ch):
                self.last_frame_recv = recv_ns
                self.skip(frame, f"bad_{p.type}", exc)
                if ch == "orderbook_delta":
                    self._book_lost(p.sid, None, recv_ns, f"unreadable {p.type}")
            return
        self.skip(frame, "unknown_message" if p.type else "missing_fields", exc)

    def _book_lost(self, sid: int, ticker: str | None, recv_ns: int, why: str) -> None:
        """A change to a book could not be applied: the book(s) are invalid until a fresh snapshot."""
        tickers = [ticker] if ticker else sorted(self.sid_tickers.get(sid, ()))
        tickers = [t for t in tickers if t in self.valid]
        if not tickers:
            return
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        for t in tickers:
            self.valid.discard(t)
        for s in sorted({self._ser(t) for t in tickers}):
            self.gap(s, None, start, recv_ns, "sequence", f"{why}; book(s) resynced by snapshot")
        self.actions.append(Action("get_snapshot", sid=sid, tickers=tickers))

    def _ts_ok(self, t: int, recv_ns: int) -> bool:
        return -self.max_skew_ns < recv_ns - t < self.max_skew_ns

    def _level(self, b: DeltaBody) -> tuple[int, bool, float]:
        """Slow path of a delta's price level: (book key in 1e-4 dollars on the bid/ask scale, is bid,
        price as float), parsed and checked, then cached by price string and side."""
        side = b.side
        if side == "yes":
            bid = True
        elif side == "no":
            bid = False
        else:
            raise _Bad(f"unknown side {side!r}")
        if b.price_dollars is not None:
            p = p4(b.price_dollars)
        elif b.price is not None:
            p = int(b.price) * 100
        else:
            raise _Bad("no price")
        if not 0 < p < ONE:
            raise _Bad(f"price out of range: {p}")
        if not bid and not self.use_yes_price:
            p = ONE - p  # a NO bid at x is a YES ask at 1 - x
        lv = (p, bid, self._price(p))
        if b.price_dollars is not None:
            cache = self._levels_by_side[side]
            if len(cache) > 200_000:
                cache.clear()
            cache[b.price_dollars] = lv
        return lv

    @staticmethod
    def _change(b: DeltaBody) -> int:
        """Slow path of a delta's signed change in 1e-2 contracts: parsed, then cached by string."""
        if b.delta_fp is not None:
            d = q2(b.delta_fp)
            if len(_Q2) > 200_000:
                _Q2.clear()
            _Q2[b.delta_fp] = d
            return d
        if b.delta is not None:
            return round(float(b.delta) * 100)
        raise _Bad("no delta")

    def _levels(self, fp, dollars, cents) -> list[tuple[int, int]]:
        if fp is not None:
            return [(p4(p), q2(q)) for p, q in fp]
        if dollars is not None:
            return [(p4(p), round(float(q) * 100)) for p, q in dollars]
        if cents is not None:
            return [(int(p) * 100, round(float(q) * 100)) for p, q in cents]
        return []

    def _snapshot(self, recv_ns: int, m: SnapshotMsg, frame) -> None:
        b = m.msg
        t = b.market_ticker
        try:
            yes = self._levels(b.yes_dollars_fp, b.yes_dollars, b.yes)
            no = self._levels(b.no_dollars_fp, b.no_dollars, b.no)
            for p, q in yes + no:
                if not 0 < p < ONE or q < 0:
                    raise _Bad(f"absurd level {p} {q}")
        except (_Bad, ValueError, TypeError) as e:
            self.skip(frame, "bad_orderbook_snapshot", e)
            self._book_lost(m.sid, t if t in self.books else None, recv_ns, f"bad snapshot for {t}")
            return
        bids = {p: q for p, q in yes if q > 0}
        if self.use_yes_price:
            asks = {p: q for p, q in no if q > 0}
        else:
            asks = {ONE - p: q for p, q in no if q > 0}
        old = self.books.get(t)
        self.books[t] = (bids, asks)
        self.valid.add(t)
        self.sid_tickers.setdefault(m.sid, set()).add(t)
        self._ser(t)  # the series is known from now on
        src = ((True, bids), (False, asks)) if (bids or asks) else ((True, old[0]), (False, old[1])) if old else ()
        zero = not (bids or asks)  # an empty snapshot still resets the book: size-0 rows for the old levels
        l2 = self.l2
        for bid, book in src:
            if not book:
                continue
            ps = sorted(book)
            sizes = repeat(0.0) if zero else [book[p] / 100 for p in ps]
            l2.rows_ += zip(repeat(recv_ns), repeat(recv_ns), repeat(t), repeat(bid), repeat(m.seq), map(self._price, ps),
                            sizes, repeat(True))
            l2.rows += len(ps)
        if l2.rows >= l2.flush_at:
            l2.flush()

    def _trade(self, recv_ns: int, m: TradeMsg, frame) -> None:
        b = m.msg
        try:
            if b.yes_price_dollars is not None:
                p = p4(b.yes_price_dollars)
            elif b.yes_price is not None:
                p = int(b.yes_price) * 100
            else:
                raise _Bad("no price")
            if b.count_fp is not None:
                q = q2(b.count_fp)
            elif b.count is not None:
                q = round(float(b.count) * 100)
            else:
                raise _Bad("no count")
            if not 0 < p < ONE or q <= 0:
                raise _Bad(f"absurd trade {p} {q}")
            side = {"yes": "buy", "no": "sell"}[b.taker_side]
            if b.ts_ms is not None:
                ts = b.ts_ms * 1_000_000
            elif b.ts is not None:
                ts = b.ts * NS
            else:
                ts = recv_ns
            if not self._ts_ok(ts, recv_ns):
                raise _Bad("timestamp far from receive time")
        except (_Bad, ValueError, KeyError) as e:
            self.skip(frame, "bad_trade", e)
            return
        t = b.market_ticker
        self.trades.add(ts, recv_ns, self._ser(t), t, side, self._price(p), q / 100, b.trade_id, m.seq)
        self.c.rows_trades += 1

    # ---- reference data ------------------------------------------------------------------------
    def _lifecycle(self, recv_ns: int, m: LifecycleMsg, frame) -> None:
        b = m.msg
        t = b.market_ticker
        if self.lifecycle_series is not None and series_of(t) not in self.lifecycle_series:
            self.c.ignored_frames += 1  # another series' market: the channel takes no filter
            return
        try:
            market, f = lifecycle_fields(self.last_instrument(series_of(t), t), b, recv_ns)
            self.instrument(recv_ns, market, t, KIND, **f)
        except (BadReference, ValueError, TypeError) as e:
            self.skip(frame, f"bad_{LIFECYCLE_CHANNEL}", e)

    def on_rest(self, recv_ns: int, name: str, body: str) -> None:
        """REST market objects (`GET /markets` pages, `GET /markets/{ticker}`): one version each; a
        bad object is a counted skip, the rest of its page is kept."""
        if name not in ("markets", "market"):
            return super().on_rest(recv_ns, name, body)
        try:
            page = wire.page_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.skip(body, f"bad_rest_{name}", e)
            return
        raws = list(page.markets or ()) + ([page.market] if bytes(page.market) != b"null" else [])
        for raw in raws:
            try:
                mk = wire.market_decoder.decode(raw)
                market, f = market_fields(mk)
                self.instrument(recv_ns, market, mk.ticker, KIND, **f)
            except (msgspec.DecodeError, msgspec.ValidationError, BadReference, ValueError) as e:
                self.skip(bytes(raw), f"bad_rest_{name}", e)

    def unresolved(self, closed_before_ns: int, closed_after_ns: int) -> list[str]:
        """Contracts (recorded or seeded) closed in (closed_after_ns, closed_before_ns] whose result or
        settlement is not known yet."""
        out = []
        for (_, t), r in self._ref_last.items():
            c = r.get("close_ts")
            if c is not None and closed_after_ns < c <= closed_before_ns and (
                    r.get("result") is None or r.get("settled_ts") is None):
                out.append(t)
        return sorted(out)

    def _ok(self, m: OkMsg) -> None:
        if m.msg is None or self.sid_channel.get(m.sid) != "orderbook_delta":
            return
        body = m.msg
        tickers = body.get("market_tickers") if isinstance(body, dict) else None
        if isinstance(tickers, list):
            now = set(tickers)
            for t in list(self.sid_tickers.get(m.sid, ())):
                if t not in now:
                    self.drop_instrument(t)

    def _error(self, m: ErrorMsg, frame) -> None:
        self.c.errors += 1
        code = m.msg.code if m.msg else None
        text = m.msg.msg if m.msg else None
        self.log.error("exchange_error", code=code, msg=text, sid=m.sid, cmd_id=m.id, frame_head=str(frame[:200]))
        self.actions.append(
            Action("error", code=code, msg=text, sid=m.sid, cmd_id=m.id, market_ticker=m.msg.market_ticker if m.msg else None)
        )
