"""Kraken spot WebSocket v2 on the replay exchange (`ReplayProtocol` "kraken").

WebSocket at `/v2` (any path is accepted). On connect a `status` frame; requests: `ping` (answered
`pong`), `subscribe` / `unsubscribe` of `book` (symbols; `depth` must be the capture's), `trade`
(symbols; `snapshot` asks for the last 50 trades) and `instrument`; one ack per symbol
(`{"method":"subscribe","result":{...},"success":true,...}`), errors as Kraken writes them
(`{"error":"...","method":"subscribe","success":false,"symbol":...}`).

Books are kept from the capture with their levels as sent (the exact decimal text). A `book`
subscription gets a snapshot made from the current book with its checksum
(`engine.collect.kraken.book`), or the capture's first snapshot when it has not come yet; then the
capture's updates. On a looped pass the capture's snapshot of a pair reaches subscribers that
already hold its book as the update from their book to the new one (with its checksum), as the
venue would send a book that changed. `instrument` subscribers get the latest reference data.

Fault `corrupt[:N]`: the next N book updates that touch the best 10 levels go out with the
quantity of one of those levels changed and their checksum kept, so the subscriber's checksum
fails; the book kept here stays right, so a resubscription heals it. On a present-shifted or looped
pass exchange times move (the text rewritten, numbers left as sent) and trade ids move above every
id of the passes before.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.collect.kraken import wire
from engine.collect.kraken.book import TOP, Book, make_level
from engine.collect.kraken.wire import DEFAULT_DEPTH, DEPTHS, TRADE_SNAPSHOT
from engine.sim.kraken.gen import ts6
from engine.sim.replay.conn import Conn
from engine.sim.replay.protocol import ReplayProtocol, dec, enc, shift_rfc3339

WS_PATH = "/v2"
LOOP_TRADE_ID_STEP = 10**11  # trade ids on a looped pass: above every id of the passes before
_CHANNEL_RE = re.compile(r'^\{"channel":"([a-z0-9_]+)"')
_SYMBOL_RE = re.compile(r'"symbol":"([^"]+)"')
_TS_RE = re.compile(r'"timestamp":"([^"]*)"')
_TID_RE = re.compile(r'"trade_id":(\d+)')
_DEPTH_RE = re.compile(r'"channel":"book","depth":(\d+)')
_book_dec = wire.book_decoder


@dataclass(slots=True)
class KrakenConnState:
    book: dict[str, bool] = field(default_factory=dict)  # symbol -> its snapshot was sent (False: waiting for one)
    trade: dict[str, bool] = field(default_factory=dict)  # symbol -> a trade snapshot is still owed
    instrument: bool = False
    instrument_owed: bool = False  # subscribed before the capture's reference data was seen


class KrakenProtocol(ReplayProtocol):
    ws_path = WS_PATH

    def __init__(self, server):
        super().__init__(server)
        self.depth = DEFAULT_DEPTH  # the capture's (connect meta line or book ack)
        self.symbols: set[str] = set()
        self.books: dict[str, Book] = {}
        self.trades: dict[str, deque] = {}  # symbol -> the last 50 trades (dicts as sent), oldest first
        self.pairs: dict[str, dict] = {}  # reference data, by symbol
        self.assets: list = []
        self._corrupt_left = 0
        self._conn_ids = 0

    # ------------------------------------------------------------------------------------------ capture

    def prescan(self, records: Iterable[dict]) -> int | None:
        first = None
        depth_seen = False
        for i, rec in enumerate(records):
            if first is None and "recv_ns" in rec and rec.get("frame") is not None:
                first = rec["recv_ns"]
            meta = rec.get("meta")
            if meta and meta.get("type") == "connect" and type(meta.get("depth")) is int and not depth_seen:
                self.depth, depth_seen = meta["depth"], True
            fr = rec.get("frame")
            if fr:
                if not depth_seen and '"method":"subscribe"' in fr:
                    m = _DEPTH_RE.search(fr)
                    if m:
                        self.depth, depth_seen = int(m.group(1)), True
                if fr.startswith('{"channel":"book"') or fr.startswith('{"channel":"trade"'):
                    self.symbols.update(_SYMBOL_RE.findall(fr[:100_000]))
            if i > 20_000:
                break
        return first

    def on_frame(self, text: str) -> None:
        m = _CHANNEL_RE.match(text)
        ch = m.group(1) if m else None
        if ch is None:  # a response (the capture's acks: answered here, not replayed) or unusual layout
            if '"method"' in text[:200]:
                return
            ch = dec(text).get("channel")
        if ch == "book":
            self._book(self._shifted(text))
        elif ch == "trade":
            self._trade(self._shifted(text))
        elif ch == "instrument":
            self._instrument(text)
        elif ch == "heartbeat":
            targets = [(c, None) for c in self.server.conns if c.alive and self.is_subscribed(c)]
            self.server.deliver(targets, lambda c, _: text)
        # status: each connection got its own on connect

    def _shifted(self, text: str) -> str:
        """Times moved by the shift, trade ids by whole passes; numbers keep their text."""
        sh = self.server.shift_ns
        if not sh:
            return text
        text = _TS_RE.sub(lambda m: f'"timestamp":"{shift_rfc3339(m.group(1), sh)}"', text)
        if self.server.shift_pass:
            step = self.server.shift_pass * LOOP_TRADE_ID_STEP
            text = _TID_RE.sub(lambda m: f'"trade_id":{int(m.group(1)) + step}', text)
        return text

    def _book(self, text: str) -> None:
        msg = _book_dec.decode(text)
        if len(msg.data) > 1:  # one pair per frame from here on (subscribers differ per pair)
            for d in msg.data:
                self._book(enc({"channel": "book", "type": msg.type, "data": [d]}).decode())
            return
        for d in msg.data:
            sym = d.symbol
            self.symbols.add(sym)
            if msg.type == "snapshot":
                self._captured_snapshot(text, sym, d)
                continue
            book = self.books.get(sym)
            if book is None:
                continue  # no snapshot yet: nothing to apply it to
            self._apply(book, d)
            targets = [(c, None) for c in self.server.conns if c.alive and c.state.book.get(sym)]
            out = text
            if self._corrupt_left and targets:
                bad = self._corrupted(text, book, d)
                if bad is not None:
                    out = bad
                    self._corrupt_left -= 1
                    self.server.counters["corrupted"] += 1
                    self.server.log.info("book_corrupted", symbol=sym)
            self.server.deliver(targets, lambda c, _: out)

    def _apply(self, book: Book, d: wire.BookData) -> None:
        for ask, levels in ((False, d.bids), (True, d.asks)):
            for x in levels:
                try:
                    book.apply(ask, x)
                except ValueError:
                    pass  # the collector reports it; the book here keeps what it can read
        book.truncate(self.depth)

    def _captured_snapshot(self, text: str, sym: str, d: wire.BookData) -> None:
        old = self.books.get(sym)
        new = self.books[sym] = Book()
        self._apply(new, d)
        srv = self.server
        waiting = [(c, None) for c in srv.conns if c.alive and c.state.book.get(sym) is False]
        for c, _ in waiting:
            c.state.book[sym] = True
            srv.counters["snapshots_sent"] += 1
        srv.deliver(waiting, lambda c, _: text)
        holding = [(c, None) for c in srv.conns if c.alive and c.state.book.get(sym) and (c, None) not in waiting]
        if holding and old is not None:
            diff = self._diff(sym, old, new)
            if diff is not None:
                srv.deliver(holding, lambda c, _: diff)

    def _diff(self, sym: str, old: Book, new: Book) -> str | None:
        """The update taking a subscriber from `old` to `new` (a looped pass's snapshot)."""
        sides = []
        for o, n in ((old.bids, new.bids), (old.asks, new.asks)):
            out = [n.lv[k] for k in n.keys if k not in o.lv or bytes(o.lv[k].qty) != bytes(n.lv[k].qty)]
            out += [make_level(bytes(o.lv[k].price), b"0") for k in o.keys if k not in n.lv]
            sides.append(out)
        if not sides[0] and not sides[1]:
            return None
        return enc({"channel": "book", "type": "update", "data": [{
            "symbol": sym, "bids": sides[0], "asks": sides[1], "checksum": new.checksum(), "timestamp": self._now()}]}).decode()

    def _corrupted(self, text: str, book: Book, d: wire.BookData) -> str | None:
        """`text` with the quantity of one of its levels in the best 10 (after it) changed, or None."""
        for ask, levels in ((True, d.asks), (False, d.bids)):
            side = book.asks if ask else book.bids
            if not side.keys:
                continue
            edge = side.keys[min(TOP, len(side.keys)) - 1]
            for x in levels:
                p, q = bytes(x.price).decode(), bytes(x.qty).decode()
                k = float(p) if ask else -float(p)
                if float(q) == 0.0 or k not in side.lv or k > edge:
                    continue
                q2 = q[:-1] + ("2" if q[-1] == "1" else "1")
                old, new = f'"price":{p},"qty":{q}', f'"price":{p},"qty":{q2}'
                if old in text:
                    return text.replace(old, new, 1)
        return None

    def _trade(self, text: str) -> None:
        d = dec(text)
        data = [t for t in d.get("data") or () if isinstance(t, dict)]
        snap = d.get("type") == "snapshot"
        syms = []
        for t in data:
            sym = t.get("symbol")
            if not isinstance(sym, str):
                continue
            if sym not in syms:
                syms.append(sym)
            self.symbols.add(sym)
        for sym in syms:
            dq = self.trades.get(sym)
            if dq is None or snap:
                dq = self.trades[sym] = deque(maxlen=TRADE_SNAPSHOT)
            dq.extend(sorted((t for t in data if t.get("symbol") == sym), key=lambda t: t.get("trade_id") or 0))
        srv = self.server
        targets = []
        for c in srv.conns:
            mine = [s for s in syms if s in c.state.trade]
            if not c.alive or not mine:
                continue
            if snap:  # the capture's snapshot goes only to those still owed one
                owed = [s for s in mine if c.state.trade[s]]
                if not owed:
                    continue
                for s in owed:
                    c.state.trade[s] = False
            targets.append((c, None))
        srv.deliver(targets, lambda c, _: text)

    def _instrument(self, text: str) -> None:
        d = dec(text)
        data = d.get("data") or {}
        snap = d.get("type") == "snapshot"
        if snap:
            self.pairs = {}
            self.assets = data.get("assets") or []
        for p in data.get("pairs") or ():
            if isinstance(p, dict) and isinstance(p.get("symbol"), str):
                self.pairs[p["symbol"]] = p
        srv = self.server
        targets = []
        for c in srv.conns:
            st = c.state
            if c.alive and st.instrument and (st.instrument_owed or not snap):
                st.instrument_owed = False
                targets.append((c, None))
        srv.deliver(targets, lambda c, _: text)

    # ------------------------------------------------------------------------------------------ frames out

    def _now(self) -> str:
        return ts6(self.server.clock_ns + self.server.shift_ns)

    def _snapshot(self, sym: str) -> str:
        b = self.books[sym]
        self.server.counters["snapshots_sent"] += 1
        return enc({"channel": "book", "type": "snapshot", "data": [{
            "symbol": sym, "bids": list(b.bids.levels()), "asks": list(b.asks.levels()), "checksum": b.checksum(),
            "timestamp": self._now()}]}).decode()

    def _reply(self, c: Conn, method: str, result: dict, req_id) -> None:
        t = self._now()
        obj = {"method": method, "result": result, "success": True, "time_in": t, "time_out": t}
        if req_id is not None:
            obj["req_id"] = req_id
        c.put(enc(obj).decode())

    def _error(self, c: Conn, method: str | None, error: str, symbol: str | None = None, req_id=None) -> None:
        t = self._now()
        obj = {"error": error, "method": method, "success": False, "time_in": t, "time_out": t}
        if symbol is not None:
            obj["symbol"] = symbol
        if req_id is not None:
            obj["req_id"] = req_id
        self.server.counters["errors_sent"] += 1
        c.put(enc(obj).decode())

    # ------------------------------------------------------------------------------------------ client session

    def new_conn_state(self) -> KrakenConnState:
        return KrakenConnState()

    def corrupt(self, k: int) -> bool:
        self._corrupt_left += k
        return True

    def is_subscribed(self, conn: Conn) -> bool:
        st = conn.state
        return bool(st.book or st.trade or st.instrument)

    async def session(self, c: Conn) -> None:
        self._conn_ids += 1
        c.put(enc({"channel": "status", "type": "update", "data": [{
            "version": "2.0.10", "system": "online", "api_version": "v2", "connection_id": 7_000_000 + self._conn_ids}]}).decode())
        while True:
            self._request(c, await c.ws.recv())

    def _request(self, c: Conn, raw) -> None:
        try:
            m = json.loads(raw)
            if not isinstance(m, dict):
                raise ValueError
        except (ValueError, TypeError):
            return self._error(c, None, "EGeneral:Invalid arguments")
        method, req_id = m.get("method"), m.get("req_id")
        if method == "ping":
            return self._reply_pong(c, req_id)
        if method not in ("subscribe", "unsubscribe"):
            return self._error(c, method if isinstance(method, str) else None, "EGeneral:Invalid arguments", req_id=req_id)
        params = m.get("params")
        ch = params.get("channel") if isinstance(params, dict) else None
        if ch == "instrument":
            self._instrument_sub(c, method, params, req_id)
        elif ch in ("book", "trade"):
            syms = params.get("symbol")
            if not isinstance(syms, list) or not syms or not all(isinstance(s, str) for s in syms):
                return self._error(c, method, "EGeneral:Invalid arguments:symbol", req_id=req_id)
            if ch == "book":
                depth = params.get("depth", 10)
                if depth not in DEPTHS:
                    return self._error(c, method, "EGeneral:Invalid arguments:depth", req_id=req_id)
                if depth != self.depth:
                    return self._error(c, method, f"EGeneral:Invalid arguments:depth {depth} (this replay serves {self.depth})",
                                       req_id=req_id)
            for sym in syms:
                if sym not in self.symbols:
                    self._error(c, method, f"Currency pair not supported {sym}", sym, req_id)
                elif ch == "book":
                    self._book_sub(c, method, sym, req_id)
                else:
                    self._trade_sub(c, method, sym, bool(params.get("snapshot", False)), req_id)
        else:
            return self._error(c, method, f"EGeneral:Invalid arguments:channel {ch!r} is not served by this replay",
                               req_id=req_id)
        self.server.clients_changed()

    def _reply_pong(self, c: Conn, req_id) -> None:
        t = self._now()
        obj = {"method": "pong", "time_in": t, "time_out": t}
        if req_id is not None:
            obj["req_id"] = req_id
        c.put(enc(obj).decode())

    def _book_sub(self, c: Conn, method: str, sym: str, req_id) -> None:
        st = c.state
        if method == "unsubscribe":
            if sym not in st.book:
                return self._error(c, method, "Subscription Not Found", sym, req_id)
            del st.book[sym]
            return self._reply(c, method, {"channel": "book", "depth": self.depth, "symbol": sym}, req_id)
        if sym in st.book:
            return self._error(c, method, "Already subscribed", sym, req_id)
        self._reply(c, method, {"channel": "book", "depth": self.depth, "snapshot": True, "symbol": sym}, req_id)
        if sym in self.books:
            c.put(self._snapshot(sym))
            st.book[sym] = True
        else:
            st.book[sym] = False  # the capture's first snapshot will be sent

    def _trade_sub(self, c: Conn, method: str, sym: str, snapshot: bool, req_id) -> None:
        st = c.state
        if method == "unsubscribe":
            if sym not in st.trade:
                return self._error(c, method, "Subscription Not Found", sym, req_id)
            del st.trade[sym]
            return self._reply(c, method, {"channel": "trade", "symbol": sym}, req_id)
        if sym in st.trade:
            return self._error(c, method, "Already subscribed", sym, req_id)
        self._reply(c, method, {"channel": "trade", "snapshot": snapshot, "symbol": sym}, req_id)
        owed = snapshot
        if snapshot and self.trades.get(sym):
            c.put(enc({"channel": "trade", "type": "snapshot", "data": list(self.trades[sym])}).decode())
            owed = False
        st.trade[sym] = owed

    def _instrument_sub(self, c: Conn, method: str, params: dict, req_id) -> None:
        st = c.state
        if method == "unsubscribe":
            if not st.instrument:
                return self._error(c, method, "Subscription Not Found", None, req_id)
            st.instrument = st.instrument_owed = False
            return self._reply(c, method, {"channel": "instrument"}, req_id)
        if st.instrument:
            return self._error(c, method, "Already subscribed", None, req_id)
        snapshot = bool(params.get("snapshot", True))
        self._reply(c, method, {"channel": "instrument", "snapshot": snapshot}, req_id)
        st.instrument = True
        if snapshot and self.pairs:
            c.put(enc({"channel": "instrument", "type": "snapshot",
                       "data": {"assets": self.assets, "pairs": list(self.pairs.values())}}).decode())
        else:
            st.instrument_owed = snapshot
