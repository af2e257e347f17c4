"""Kraken spot WebSocket v2: normalization of decoded frames into canonical rows.

Traps handled here (docs/kraken-protocol.md):
- No sequence numbers on public data: the book checksum is the integrity check. Every book
  message, snapshot or update, is applied, the book truncated to the subscribed depth, and the
  CRC32 of its best 10 levels compared with the message's `checksum`. A mismatch writes a
  `checksum` gap (expected and computed values in `detail`), drops that pair's book (its updates
  are skipped until a fresh snapshot) and asks the live runtime for a fresh snapshot
  (`Action("get_snapshot", symbol=...)`: the Link resubscribes that pair's book).
- An insert pushes the deepest level out of the subscribed depth without Kraken saying so: the
  truncation writes a size-0 row for each level it drops, so books rebuilt from the rows stay
  equal to the venue's.
- Prices and quantities are JSON numbers whose exact text the checksum needs (trailing zeros
  included): book levels keep it (`msgspec.Raw`), rows get floats.
- Trade snapshots repeat the last 50 trades after every (re)subscribe: trade ids are sequential
  per pair, so an id at or below the last one kept is a duplicate.
- Naming: market = the pair with `/` replaced by `-` (`BTC-USD`, the partition key, lined up
  with Coinbase); instrument = Kraken's symbol (`BTC/USD`).
- Reference data (`instrument` channel, every pair of the venue): rows of the `instruments`
  table for the collected pairs only (the configured ones, those subscribed or seen in book or
  trade messages); the others would be a thousand partitions nobody asked for.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left
from typing import Iterable, Mapping

import msgspec

from engine.collect.base import Action, BaseNormalizer
from engine.collect.kraken import wire
from engine.collect.kraken.book import TOP, Book
from engine.collect.kraken.wire import (
    DEFAULT_DEPTH,
    IGNORED_CHANNELS,
    SOURCE,
    BookMsg,
    InstrumentMsg,
    Pair,
    TradeMsg,
    market_of,
    symbol_of,
)
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS, parse_ts

INF = float("inf")
# assigned, not imported: a method call on an imported name compiles to a slower LOAD_ATTR + CALL
_decoder = wire.decoder
_probe = wire.probe_decoder
_crc = zlib.crc32
_bisect = bisect_left
_TOP1 = TOP - 1
_PTOK_MAX = 50_000  # price tokens cached per side: the touch wanders over a day; forget them past this


class _Bad(Exception):
    pass


def _tid(t: wire.Trade) -> int:
    return t.trade_id


class KrakenNormalizer(BaseNormalizer):
    source = SOURCE

    def __init__(self, max_skew_ns: int = DEFAULT_MAX_SKEW_NS, pairs: Iterable[str] = (), depth: int = DEFAULT_DEPTH,
                 verify_checksum: bool = True, log=None):
        super().__init__(max_skew_ns=max_skew_ns, log=log)
        self.depth = depth  # the subscribed depth (the connection's meta line; a subscribe ack overrides per pair)
        self.verify = verify_checksum  # False only to measure what verifying costs
        self.known: set[str] = set()  # markets (BTC-USD) collected: gaps are written for them
        self.wanted: set[str] = set()  # symbols (BTC/USD) collected: their reference data is kept
        self.books: dict[str, Book] = {}
        self.valid: set[str] = set()  # symbols whose book is verified on this connection
        self.depth_of: dict[str, int] = {}
        self.last_ok: dict[str, int] = {}  # symbol -> receive time of its last book message that verified
        self.trade_floor: dict[str, int] = {}
        self.pair_info: dict[str, tuple[int, Pair]] = {}  # latest reference data of every pair (and its receive time)
        self.checksums_verified = 0
        self.checksums_failed = 0
        self.checksums_missing = 0  # book messages without a checksum (not verifiable)
        self._mkt: dict[str, str] = {}
        for p in pairs:
            self._want(symbol_of(p))

    # ---- state ------------------------------------------------------------------------------
    def markets(self) -> Iterable[str]:
        return self.known

    def _market(self, sym: str) -> str:
        m = self._mkt.get(sym)
        if m is None:
            m = self._mkt[sym] = market_of(sym)
        return m

    def _want(self, sym: str) -> None:
        """Collect `sym`: its market gets gaps, its reference data (kept or yet to come) rows."""
        if sym in self.wanted:
            return
        self.wanted.add(sym)
        self.known.add(self._market(sym))
        info = self.pair_info.get(sym)
        if info is not None:
            self._record_pair(*info)

    def seed_trade_ids(self, max_ids: Mapping[str, int]) -> None:
        """Max stored trade_id per instrument (symbol), so re-sent trade snapshots are not stored twice."""
        for s, v in max_ids.items():
            self.trade_floor[s] = max(self.trade_floor.get(s, -1), int(v))

    def reset_connection(self, recv_ns: int, depth: int | None = None, pairs: Iterable[str] = (), **meta) -> None:
        if depth:
            self.depth = int(depth)
        for p in pairs:
            self._want(symbol_of(p))
        self.books.clear()
        self.valid.clear()
        self.depth_of.clear()
        self.last_ok.clear()

    def invalidate_all(self) -> None:
        self.valid.clear()
        self.books.clear()

    def checksum_status(self) -> dict[str, int]:
        """For the status file."""
        return {"checksums_verified": self.checksums_verified, "checksums_failed": self.checksums_failed,
                "checksums_missing": self.checksums_missing, "books_valid": len(self.valid)}

    # ---- frames -----------------------------------------------------------------------------
    def feed(self, recv_ns: int, frame: str | bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes += len(frame)
        try:
            msg = _decoder.decode(frame)
        except msgspec.DecodeError as e:  # ValidationError too: method responses, bad frames
            self._untyped(recv_ns, frame, e)
            return
        if self.conn is None:
            self.on_connect(recv_ns)
        self.last_frame_recv = recv_ns
        cls = type(msg)
        if cls is BookMsg:
            self._book(recv_ns, msg, frame)
        elif cls is TradeMsg:
            self._trades(recv_ns, msg, frame)
        elif cls is InstrumentMsg:
            for p in msg.data.pairs:
                self.pair_info[p.symbol] = (recv_ns, p)
                if p.symbol in self.wanted:
                    self._record_pair(recv_ns, p)
                book = self.books.get(p.symbol)
                if book is not None:  # the price precision may have changed: cached price tokens go
                    book.bids.ptok.clear()
                    book.asks.ptok.clear()
        else:  # heartbeat, status
            c.ignored_frames += 1

    def _book(self, recv_ns: int, msg: BookMsg, frame) -> None:
        typ = msg.type
        snap = typ == "snapshot"
        if not snap and typ != "update":
            self.skip(frame, f"bad_book: unknown type {typ!r}")
            for d in msg.data:
                self._lost(recv_ns, d.symbol, "sequence", f"book message of unknown type {typ!r}")
            return
        l2 = self.l2
        price, size = l2.price, l2.size
        for d in msg.data:
            sym = d.symbol
            if snap:
                book = Book()
            else:
                book = self.books.get(sym)
                if book is None or sym not in self.valid:  # no verified book: wait for the fresh snapshot
                    self.c.skipped_rows += len(d.bids) + len(d.asks)
                    continue
            depth = self.depth_of.get(sym, self.depth)
            row0 = len(price)
            try:
                nb = self._side(book.bids, d.bids, False, depth, price, size)
                na = self._side(book.asks, d.asks, True, depth, price, size)
            except (_Bad, ValueError, TypeError) as e:
                del price[row0:], size[row0:]  # no rows of a level list that could not be read
                self.skip(frame, f"bad_book: {e}"[:200])
                self._lost(recv_ns, sym, "sequence", f"unreadable book level: {e}"[:300], force=snap)
                continue
            mkt = self._mkt.get(sym) or self._market(sym)
            ts = d.timestamp
            t_ns = None if ts else recv_ns  # no exchange time: the receive time
            if nb:
                l2.runs.append((nb, recv_ns, t_ns, ts or None, None, mkt, sym, "bid", None, snap))
            if na:
                l2.runs.append((na, recv_ns, t_ns, ts or None, None, mkt, sym, "ask", None, snap))
            l2.rows += nb + na
            want = d.checksum
            if self.verify and want is not None:
                got = book.crc
                bs, as_ = book.bids, book.asks
                if as_.dirty or got is None:  # `Book.checksum`, inline
                    as_.top = b"".join(as_.toks)
                    as_.dirty = False
                    book.ask_crc = _crc(as_.top)
                    if bs.dirty:
                        bs.top = b"".join(bs.toks)
                        bs.dirty = False
                    got = book.crc = _crc(bs.top, book.ask_crc)
                elif bs.dirty:
                    bs.top = b"".join(bs.toks)
                    bs.dirty = False
                    got = book.crc = _crc(bs.top, book.ask_crc)
                if got != want:
                    self.checksums_failed += 1
                    self._lost(recv_ns, sym, "checksum",
                               f"checksum mismatch after a book {typ}: Kraken sent {want}, the book kept gives {got}",
                               force=True)
                    continue
                self.checksums_verified += 1
            elif want is None:
                self.checksums_missing += 1
            if snap:
                self.books[sym] = book
                self.valid.add(sym)
                if sym not in self.wanted:
                    self._want(sym)
            self.last_ok[sym] = recv_ns

    def _side(self, side, levels: list, ask: bool, depth: int, price: list, size: list) -> int:
        """Apply one side's levels in order (qty 0 removes), then truncate to `depth`; appends a row
        per level sent and a size-0 row per level truncated; returns the rows appended. When
        verifying, the side's best-10 tokens follow (`book.Side.put`/`remove`, inline)."""
        keys, lv, toks = side.keys, side.lv, side.toks
        verify = self.verify
        ptok = side.ptok  # price -> its checksum token (a pair writes a price the same way every time)
        changed = False
        for x in levels:
            p = float(x.price)
            q = float(x.qty)
            if not (0.0 < p < INF and 0.0 <= q < INF):
                raise _Bad(f"absurd level: price {bytes(x.price)!r}, qty {bytes(x.qty)!r}")
            price.append(p)
            size.append(q)
            k = p if ask else -p
            if q:
                if k in lv:
                    lv[k] = x
                    if verify and (len(keys) <= TOP or k <= keys[_TOP1]):
                        t = ptok.get(k)
                        if t is None:
                            if len(ptok) > _PTOK_MAX:
                                ptok.clear()
                            t = ptok[k] = bytes(x.price).replace(b".", b"").lstrip(b"0")
                        toks[keys.index(k)] = t + bytes(x.qty).replace(b".", b"").lstrip(b"0")  # among the first 10
                        changed = True
                else:
                    r = _bisect(keys, k)
                    keys.insert(r, k)
                    lv[k] = x
                    if verify and r < TOP:  # a new level among the best 10
                        t = ptok.get(k)
                        if t is None:
                            if len(ptok) > _PTOK_MAX:
                                ptok.clear()
                            t = ptok[k] = bytes(x.price).replace(b".", b"").lstrip(b"0")
                        toks.insert(r, t + bytes(x.qty).replace(b".", b"").lstrip(b"0"))
                        if len(toks) > TOP:
                            del toks[TOP]
                        changed = True
            elif k in lv:
                r = _bisect(keys, k)
                del lv[k]
                del keys[r]
                if verify and r < TOP:
                    del toks[r]
                    if len(keys) >= TOP:  # the next level enters the best 10
                        k = keys[_TOP1]
                        y = lv[k]
                        t = ptok.get(k)
                        if t is None:
                            if len(ptok) > _PTOK_MAX:
                                ptok.clear()
                            t = ptok[k] = bytes(y.price).replace(b".", b"").lstrip(b"0")
                        toks.append(t + bytes(y.qty).replace(b".", b"").lstrip(b"0"))
                    changed = True
        n = len(levels)
        if len(keys) > depth:  # beyond the best 10 (depth >= 10): the tokens are unchanged
            cut = keys[depth:]
            del keys[depth:]
            for k in cut:
                del lv[k]
            price += cut if ask else [-k for k in cut]
            size += [0.0] * len(cut)
            n += len(cut)
        if changed:
            side.dirty = True
        return n

    def _lost(self, recv_ns: int, sym: str, kind: str, detail: str, force: bool = False) -> None:
        """`sym`'s book can no longer be trusted: a gap from its last verified message, the book
        dropped until a fresh snapshot, which is asked for. Without `force`, only a book that was
        valid (an invalid one already waits for its snapshot)."""
        if not (force or sym in self.valid):
            return
        start = self.last_ok.get(sym, recv_ns)
        self.gap(self._market(sym), sym, start, recv_ns, kind, detail)
        self.valid.discard(sym)
        self.books.pop(sym, None)
        self.actions.append(Action("get_snapshot", symbol=sym, reason=f"{kind}: {detail}"[:300]))

    def bad_run(self, run: tuple, reason: str) -> None:
        """Rows of one book message failed the bulk checks at conversion: that book is not known."""
        super().bad_run(run, reason)
        self._lost(run[1], run[6], "sequence", f"unreadable book rows: {reason}"[:300])

    def _trades(self, recv_ns: int, msg: TradeMsg, frame) -> None:
        trs = msg.data
        if msg.type == "snapshot" and len(trs) > 1:
            trs = sorted(trs, key=_tid)
        c = self.c
        add = self.trades.add
        skew = self.max_skew_ns
        floor_of = self.trade_floor
        for t in trs:
            sym = t.symbol
            tid = t.trade_id
            if tid <= floor_of.get(sym, -1):
                c.dup_trades += 1
                continue
            side, p, q = t.side, t.price, t.qty
            if side != "buy" and side != "sell":
                self.skip(frame, f"bad_trade: side {side!r}")
                continue
            if not (0.0 < p < INF and 0.0 < q < INF):
                self.skip(frame, "bad_trade: absurd price or qty")
                continue
            try:
                ts = parse_ts(t.timestamp)
            except (ValueError, IndexError) as e:
                self.skip(frame, "bad_trade: timestamp", e)
                continue
            if not -skew < recv_ns - ts < skew:
                self.skip(frame, f"bad_trade: timestamp far from receive time: {t.timestamp!r}")
                continue
            floor_of[sym] = tid
            if sym not in self.wanted:
                self._want(sym)
            add(ts, recv_ns, self._mkt.get(sym) or self._market(sym), sym, side, p, q, str(tid), None)
            c.rows_trades += 1

    def _record_pair(self, valid_from: int, p: Pair) -> None:
        self.instrument(valid_from, self._market(p.symbol), p.symbol, "spot", base=p.base, quote=p.quote,
                        tick_size=p.price_increment if p.price_increment is not None else p.tick_size,
                        size_increment=p.qty_increment, min_size=p.qty_min, status=p.status)

    def _untyped(self, recv_ns: int, frame, exc) -> None:
        p = self.probe(_probe, frame)
        if p is None:
            return
        if self.conn is None:
            self.on_connect(recv_ns)
        self.last_frame_recv = recv_ns
        if p.method is not None:  # a response: subscribe/unsubscribe ack, pong, or an error
            if p.success is False or p.error is not None:
                self.c.errors += 1
                self.log.error("exchange_error", method=p.method, error=p.error, symbol=p.symbol, req_id=p.req_id)
                self.actions.append(Action("error", message=p.error, method=p.method, symbol=p.symbol))
                return
            r = p.result if isinstance(p.result, dict) else {}
            sym, ch = r.get("symbol"), r.get("channel")
            if p.method == "subscribe" and isinstance(sym, str) and ch in ("book", "trade"):
                self._want(sym)
                if ch == "book" and type(r.get("depth")) is int:
                    self.depth_of[sym] = r["depth"]
            self.c.ignored_frames += 1
            return
        ch = p.channel
        if ch == "book":  # a book message we cannot read: its pairs' books can no longer be trusted
            self.skip(frame, "bad_book", exc)
            for d in p.data if isinstance(p.data, list) else ():
                if isinstance(d, dict) and isinstance(d.get("symbol"), str):
                    self._lost(recv_ns, d["symbol"], "sequence", f"unreadable book frame: {exc}"[:300])
        elif ch in IGNORED_CHANNELS:
            self.c.ignored_frames += 1
        elif ch in ("trade", "instrument", "heartbeat", "status"):
            self.skip(frame, f"bad_{ch}", exc)
        else:
            self.skip(frame, "unknown_message" if ch or p.type else "missing_fields", exc)
