"""Coinbase Advanced Trade on the replay exchange (`ReplayProtocol` "coinbase").

The client must `subscribe` (one channel per message: level2, market_trades, heartbeats, ticker...)
within `subscribe_timeout` s; the server answers each level2 product with a full `l2_data`
snapshot synthesized from the book it maintains from the capture (so a reconnect mid-capture gets
the correct current book), each market_trades product with a snapshot of the recent trades, and a
cumulative `subscriptions` ack; then forwards the capture's updates, trades and heartbeats with
`sequence_num` rewritten contiguous from 0 per connection. On a looped pass, exchange times move
with the pass and trade ids move above every id of the passes before. REST on the same port: the
Exchange API's `GET /products` and `/products/{id}` (`engine.sim.coinbase.products`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from engine.sim.coinbase import products as rest_products
from engine.sim.fmt import fmt_rfc3339
from engine.sim.replay.conn import Conn
from engine.sim.replay.protocol import ReplayProtocol, WireRows, dec, enc, shift_rfc3339

CHANNELS = ("level2", "market_trades", "heartbeats", "ticker", "ticker_batch", "candles", "status")
DATA_CHANNEL = {"l2_data": "level2", "market_trades": "market_trades", "heartbeats": "heartbeats",
                "ticker": "ticker", "ticker_batch": "ticker_batch", "candles": "candles", "status": "status"}
LOOP_TRADE_ID_STEP = 10**12  # trade ids on a looped pass: above every id of the passes before
_PRODUCT_RE = re.compile(r'"product_id":"([^"]+)"')


@dataclass(slots=True)
class CoinbaseConnState:
    seq: int = 0  # the connection's next sequence_num
    subs: dict[str, list[str]] = field(default_factory=dict)  # channel -> product ids
    l2_ready: set[str] = field(default_factory=set)  # level2 products whose snapshot was sent
    l2_waiting: set[str] = field(default_factory=set)  # subscribed before the capture had a book
    tr_snap: set[str] = field(default_factory=set)  # market_trades products whose snapshot was sent


class CoinbaseProtocol(ReplayProtocol):
    rest_prefix = "/products"  # the Exchange REST API has no path prefix: its product endpoints live here

    def __init__(self, server):
        super().__init__(server)
        self.books: dict[str, dict[str, dict[str, str]]] = {}  # product -> bid/offer -> price -> size
        self.trades: dict[str, deque] = {}  # product -> the last 100 trades, oldest first
        self.products: set[str] = set()
        from engine.sim.replay.server import ReplayServer

        # a server subclass that overrides the one-class server's `_cb_next` hook sees every data frame
        default = ReplayServer._cb_next
        self._next = server._cb_next if getattr(type(server), "_cb_next", default) is not default else self.next_frame

    # ------------------------------------------------------------------------------------------ capture

    def rest(self, path: str, query: dict[str, list[str]]):
        return rest_products.answer(self.products, path)

    def prescan(self, records: Iterable[dict]) -> int | None:
        first = None
        for i, rec in enumerate(records):
            if first is None and "recv_ns" in rec:
                first = rec["recv_ns"]
            if i > 20000:
                break
            fr = rec.get("frame")
            if fr and '"product_id"' in fr:
                for m in _PRODUCT_RE.finditer(fr[:200000]):
                    self.products.add(m.group(1))
        return first

    def on_frame(self, text: str) -> None:
        d = dec(text)
        if self.server.shift_ns:
            self.shift(d)
            text = enc(d).decode()
        ch = d.get("channel")
        events = d.get("events") or []
        if ch == "l2_data":
            for ev in events:
                self._l2_event(text, d, ev)
        elif ch == "market_trades":
            self._trades(text, d, events)
        elif ch == "subscriptions" or ch is None:
            return
        else:
            sub = DATA_CHANNEL.get(ch)
            if sub is None:
                return
            targets = [(c, None) for c in self.server.conns if c.alive and c.state.subs.get(sub)]
            self.server.deliver(targets, lambda c, _: self._next(c, text, d))

    def _l2_event(self, text: str, d: dict, ev: dict) -> None:
        pid = ev.get("product_id")
        if not pid:
            return
        self.products.add(pid)
        book = self.books.get(pid)
        is_snap = ev.get("type") == "snapshot"
        if book is None or is_snap:
            book = self.books[pid] = {"bid": {}, "offer": {}}
        for u in ev.get("updates") or []:
            side = book["bid"] if u.get("side") == "bid" else book["offer"]
            p, q = u.get("price_level"), u.get("new_quantity")
            if p is None or q is None:
                continue
            if q == "0" or (q[:1] == "0" and Decimal(q) == 0):
                side.pop(p, None)
            else:
                side[p] = q
        targets = []
        for c in self.server.conns:
            st = c.state
            if not c.alive or pid not in st.subs.get("level2", ()):
                continue
            if pid in st.l2_ready:
                if not is_snap:  # Coinbase sends no unsolicited snapshots: keep the book silently
                    targets.append((c, None))
            elif pid in st.l2_waiting and is_snap:
                st.l2_waiting.discard(pid)
                st.l2_ready.add(pid)
                targets.append((c, None))
                self.server.counters["snapshots_sent"] += 1
        self.server.deliver(targets, lambda c, _: self._next(c, text, d))

    def _trades(self, text: str, d: dict, events: list) -> None:
        pids = set()
        snap = False
        for ev in events:
            trades = ev.get("trades") or []
            snap = snap or ev.get("type") == "snapshot"
            by_pid: dict[str, list] = {}
            for t in trades:
                by_pid.setdefault(t.get("product_id"), []).append(t)
            for pid, ts in by_pid.items():
                pids.add(pid)
                self.products.add(pid)
                dq = self.trades.setdefault(pid, deque(maxlen=100))
                if ev.get("type") == "snapshot":
                    dq.clear()
                    dq.extend(reversed(ts))  # stored oldest → newest
                else:
                    dq.extend(sorted(ts, key=lambda t: t.get("time", "")))
        targets = []
        for c in self.server.conns:
            subs = c.state.subs.get("market_trades", ())
            mine = [p for p in pids if p in subs]
            if not c.alive or not mine:
                continue
            if snap:
                fresh = [p for p in mine if p not in c.state.tr_snap]
                if not fresh:
                    continue
                c.state.tr_snap.update(fresh)
            targets.append((c, None))
        self.server.deliver(targets, lambda c, _: self._next(c, text, d))

    def shift(self, d: dict) -> None:
        """A frame of a shifted pass: times moved forward by `shift_ns`, trade ids by whole passes."""
        sh = self.server.shift_ns
        tid_step = self.server.shift_pass * LOOP_TRADE_ID_STEP
        if isinstance(d.get("timestamp"), str):
            d["timestamp"] = shift_rfc3339(d["timestamp"], sh)
        for ev in d.get("events") or []:
            for u in ev.get("updates") or ():
                if isinstance(u, dict) and isinstance(u.get("event_time"), str):
                    u["event_time"] = shift_rfc3339(u["event_time"], sh)
            for t in ev.get("trades") or ():
                if isinstance(t, dict):
                    if isinstance(t.get("time"), str):
                        t["time"] = shift_rfc3339(t["time"], sh)
                    tid = t.get("trade_id")
                    if isinstance(tid, str) and tid.isdigit():
                        t["trade_id"] = str(int(tid) + tid_step)

    def wire_rows(self, text: str) -> list[WireRows]:
        """An `l2_data` event's updates are l2 rows (a snapshot's: snapshot rows), a `market_trades`
        event's trades trade rows, each carrying the frame's `sequence_num`."""
        if '"l2_data"' not in text[:40] and '"market_trades"' not in text[:40]:
            return []
        d = dec(text)
        seq = d.get("sequence_num")
        out = []
        for ev in d.get("events") or ():
            if d.get("channel") == "l2_data":
                out.append(WireRows("l2", ev.get("product_id", ""), len(ev.get("updates") or ()),
                                    ev.get("type") == "snapshot", seq))
            else:
                per: dict[str, int] = {}
                for t in ev.get("trades") or ():
                    per[t.get("product_id", "")] = per.get(t.get("product_id", ""), 0) + 1
                out += [WireRows("trades", pid, n, False, seq) for pid, n in per.items()]
        return out

    # ------------------------------------------------------------------------------------------ frames out

    @staticmethod
    def _rewrite(text: str, d: dict, seq: int) -> str:
        i = text.find('"sequence_num":')
        j = text.find('"events"')
        if i >= 0 and (j < 0 or i < j):
            k = i + 15
            m = k
            while m < len(text) and text[m] in "0123456789-":
                m += 1
            return text[:k] + str(seq) + text[m:]
        d = dict(d)
        d["sequence_num"] = seq
        return enc(d).decode()

    def next_frame(self, c: Conn, text: str, d: dict) -> str:
        """A captured data frame's text for `c`, its `sequence_num` the connection's next."""
        s = self._rewrite(text, d, c.state.seq)
        c.state.seq += 1
        return s

    def _envelope(self, c: Conn, channel: str, events: list) -> str:
        srv = self.server
        s = enc({"channel": channel, "timestamp": fmt_rfc3339(srv.clock_ns + srv.shift_ns, 9),
                 "sequence_num": c.state.seq, "events": events}).decode()
        c.state.seq += 1
        return s

    def _l2_snapshot(self, c: Conn, pid: str) -> str:
        book = self.books.get(pid, {"bid": {}, "offer": {}})
        et = fmt_rfc3339(self.server.clock_ns + self.server.shift_ns, 6)  # the time of the pass being sent
        ups = [{"side": "bid", "event_time": et, "price_level": p, "new_quantity": q}
               for p, q in sorted(book["bid"].items(), key=lambda kv: Decimal(kv[0]), reverse=True)]
        ups += [{"side": "offer", "event_time": et, "price_level": p, "new_quantity": q}
                for p, q in sorted(book["offer"].items(), key=lambda kv: Decimal(kv[0]))]
        self.server.counters["snapshots_sent"] += 1
        return self._envelope(c, "l2_data", [{"type": "snapshot", "product_id": pid, "updates": ups}])

    # ------------------------------------------------------------------------------------------ client session

    def new_conn_state(self) -> CoinbaseConnState:
        return CoinbaseConnState()

    def is_subscribed(self, conn: Conn) -> bool:
        return bool(conn.state.subs)

    def jump_seq(self, conn: Conn, k: int) -> None:
        conn.state.seq += k

    async def session(self, c: Conn) -> None:
        ws = c.ws
        deadline = time.monotonic() + self.server.subscribe_timeout
        while True:
            timeout = None if c.state.subs else max(0.0, deadline - time.monotonic())
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout)
            except TimeoutError:
                self.server.log.info("subscribe_timeout", conn=c.id)
                await ws.close(1008, "subscribe timeout")
                return
            self._command(c, raw)

    def _error(self, c: Conn, message: str, reason: str | None = None) -> None:
        obj = {"type": "error", "message": message}
        if reason:
            obj["reason"] = reason
        self.server.counters["errors_sent"] += 1
        c.put(enc(obj).decode())

    def _command(self, c: Conn, raw) -> None:
        try:
            m = json.loads(raw)
            if not isinstance(m, dict):
                raise ValueError
        except (ValueError, TypeError):
            return self._error(c, "failure to parse message", "malformed JSON")
        typ = m.get("type")
        if typ not in ("subscribe", "unsubscribe"):
            return self._error(c, "failure to subscribe", f"unknown message type {typ!r}")
        ch = m.get("channel")
        if not isinstance(ch, str) or ch not in CHANNELS:
            return self._error(c, "failure to subscribe", f"unknown or missing channel {ch!r}")
        pids = m.get("product_ids") or []
        if ch == "heartbeats":
            pids = ["heartbeats"]
        elif not isinstance(pids, list) or not pids:
            return self._error(c, "failure to subscribe", "product_ids required")
        if ch != "heartbeats":
            bad = [p for p in pids if p not in self.products]
            if bad:
                return self._error(c, "failure to subscribe", f"{bad[0]} is not a valid product")
        if typ == "subscribe":
            self._subscribe(c, ch, pids)
        else:
            self._unsubscribe(c, ch, pids)
        subs = {k: list(v) for k, v in c.state.subs.items() if v}
        c.put(self._envelope(c, "subscriptions", [{"subscriptions": subs}]))
        self.server.clients_changed()

    def _subscribe(self, c: Conn, ch: str, pids: list[str]) -> None:
        st = c.state
        cur = st.subs.setdefault(ch, [])
        new = [p for p in pids if p not in cur]
        cur.extend(new)
        if ch == "level2":
            for pid in new:
                if pid in self.books:
                    c.put(self._l2_snapshot(c, pid))
                    st.l2_ready.add(pid)
                else:
                    st.l2_waiting.add(pid)
        elif ch == "market_trades":
            for pid in new:
                if pid in self.trades:
                    trades = list(reversed(self.trades[pid]))
                    c.put(self._envelope(c, "market_trades", [{"type": "snapshot", "trades": trades}]))
                    st.tr_snap.add(pid)

    def _unsubscribe(self, c: Conn, ch: str, pids: list[str]) -> None:
        st = c.state
        cur = st.subs.setdefault(ch, [])
        for p in pids:
            if p in cur:
                cur.remove(p)
            if ch == "level2":
                st.l2_ready.discard(p)
                st.l2_waiting.discard(p)
            elif ch == "market_trades":
                st.tr_snap.discard(p)
        if not cur:
            st.subs.pop(ch, None)
