"""Kalshi on the replay exchange (`ReplayProtocol` "kalshi").

WebSocket at `/trade-api/ws/v2` behind the RSA-PSS auth headers (HTTP 401 when missing, malformed
or, with `kalshi_public_key`, not verifying); `subscribe` → one `subscribed` ack per channel, one
`orderbook_snapshot` per market, then deltas/trades with per-sid contiguous `seq`;
`update_subscription` (add_markets / delete_markets / get_snapshot), `unsubscribe`,
`list_subscriptions`; `market_lifecycle_v2` (every market, no filter, no `seq`: the capture's
lifecycle events); error frames with the documented codes; WebSocket pings (payload `heartbeat`)
every `ping_interval` s. Books are kept in the capture's price convention and converted per
subscription (`use_yes_price`). REST on the same port: `engine.sim.kalshi.rest`. On a looped pass,
exchange times move with the pass and trades get new ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engine.collect import kalshi_auth
from engine.sim.fmt import fmt_dp
from engine.sim.kalshi.markets import KalshiMarketSpec
from engine.sim.kalshi.rest import KalshiRest, markets_from_list, markets_from_scan, scan_capture
from engine.sim.replay.conn import Conn
from engine.sim.replay.protocol import ReplayProtocol, WireRows, dec, enc, json_response, shift_rfc3339

WS_PATH = "/trade-api/ws/v2"
REST_PREFIX = "/trade-api/v2"
LIFECYCLE = "market_lifecycle_v2"
CHANNELS = ("orderbook_delta", "trade", "ticker", LIFECYCLE)
_LIFECYCLE_SECONDS = ("open_ts", "close_ts", "determination_ts", "settled_ts")


@dataclass
class KalshiSub:
    sid: int
    channel: str
    markets: set | None  # None = every market (trade / ticker without a filter)
    use_yes: bool = False
    seq: int = 0
    awaiting: set = field(default_factory=set)  # orderbook: markets whose first snapshot is pending


@dataclass(slots=True)
class KalshiConnState:
    next_sid: int = 1
    subs: dict[int, KalshiSub] = field(default_factory=dict)


def _px(s: str) -> int:
    return int(Decimal(s) * 10000)


def _sz(s) -> int:
    return int(Decimal(str(s)) * 100)


class KalshiProtocol(ReplayProtocol):
    ws_path = WS_PATH
    rest_prefix = REST_PREFIX
    has_preamble = True

    def __init__(self, server):
        super().__init__(server)
        key = server.kalshi_public_key
        if isinstance(key, (str, Path)):
            key = kalshi_auth.load_public_key(key)
        self.public_key = key  # None: auth headers must be present and well formed, not verified
        self.capture_use_yes = False  # the capture's NO prices are on the YES scale
        self.books: dict[str, dict[str, dict[int, int]]] = {}  # ticker -> yes/no -> price 1e-4 -> size 1e-2
        self.market_ids: dict[str, str] = {}
        self.markets: dict[str, KalshiMarketSpec] = {}
        self.lifecycle: dict[str, list[tuple[int, dict]]] = {}  # ticker -> the capture's lifecycle events
        self._rest = KalshiRest(self)

    # ------------------------------------------------------------------------------------------ capture

    def prescan(self, records: Iterable[dict]) -> int | None:
        sc = scan_capture(records)
        for tk, mid in sc.market_ids.items():
            self.market_ids.setdefault(tk, mid)
        self.lifecycle = sc.lifecycle
        listed = self.server.markets
        cap = self.server.capture
        if listed is None and isinstance(cap, (str, Path)):
            side = Path(str(cap) + ".markets.json")
            if side.exists():
                listed = json.loads(side.read_text())
        if listed:
            self.markets = markets_from_list(listed, self.market_ids)
        else:
            self.markets = markets_from_scan(sc, self.market_ids)
        return sc.first

    def is_preamble(self, frame: str) -> bool:
        head = frame[:60]
        return '"subscribed"' in head or '"orderbook_snapshot"' in head

    def on_meta(self, meta: dict) -> None:
        if meta.get("type") == "connect" and "use_yes_price" in meta:
            self.capture_use_yes = bool(meta["use_yes_price"])

    def on_frame(self, text: str) -> None:
        d = dec(text)
        typ = d.get("type")
        msg = d.get("msg")
        if not isinstance(msg, dict):
            return
        tick = msg.get("market_ticker")
        if self.server.shift_ns:
            self.shift(msg)
        if typ == LIFECYCLE:
            self._lifecycle_frame(msg)
            return
        if not tick:
            return
        if typ == "orderbook_snapshot":
            self._snapshot_frame(tick, msg)
        elif typ == "orderbook_delta":
            self._delta_frame(tick, msg)
        elif typ in ("trade", "ticker"):
            self._trade_frame(typ, tick, msg)

    def _snapshot_frame(self, tick: str, msg: dict) -> None:
        self._apply_snapshot(tick, msg)
        targets = []
        for c in self.server.conns:
            for s in c.state.subs.values():
                if c.alive and s.channel == "orderbook_delta" and tick in s.markets:
                    s.awaiting.discard(tick)
                    targets.append((c, s))
        if targets:
            self.server.counters["snapshots_sent"] += len(targets)

        def mk(c, s):
            s.seq += 1
            return enc({"type": "orderbook_snapshot", "sid": s.sid, "seq": s.seq,
                        "msg": self.snapshot_msg(tick, s.use_yes)}).decode()
        self.server.deliver(targets, mk)

    def _delta_frame(self, tick: str, msg: dict) -> None:
        self._apply_delta(tick, msg)
        targets = [(c, s) for c in self.server.conns if c.alive for s in c.state.subs.values()
                   if s.channel == "orderbook_delta" and tick in s.markets and tick not in s.awaiting]

        def mk(c, s):
            s.seq += 1
            m = msg
            if msg.get("side") == "no" and s.use_yes != self.capture_use_yes and "price_dollars" in msg:
                m = dict(msg)
                m["price_dollars"] = self._conv("no", msg["price_dollars"], s.use_yes)
            return enc({"type": "orderbook_delta", "sid": s.sid, "seq": s.seq, "msg": m}).decode()
        self.server.deliver(targets, mk)

    def _trade_frame(self, typ: str, tick: str, msg: dict) -> None:
        targets = [(c, s) for c in self.server.conns if c.alive for s in c.state.subs.values()
                   if s.channel == typ and (s.markets is None or tick in s.markets)]

        def mk(c, s):
            if typ == "ticker":
                return enc({"type": typ, "sid": s.sid, "msg": msg}).decode()
            s.seq += 1
            return enc({"type": typ, "sid": s.sid, "seq": s.seq, "msg": msg}).decode()
        self.server.deliver(targets, mk)

    def _lifecycle_frame(self, msg: dict) -> None:
        targets = [(c, s) for c in self.server.conns if c.alive for s in c.state.subs.values() if s.channel == LIFECYCLE]
        self.server.deliver(targets, lambda c, s: enc({"type": LIFECYCLE, "sid": s.sid, "msg": msg}).decode())

    def shift(self, msg: dict) -> None:
        """A message of a shifted pass: times moved forward by `shift_ns`, a new trade id per pass."""
        sh = self.server.shift_ns
        for k in _LIFECYCLE_SECONDS:  # lifecycle times are Unix seconds
            if isinstance(msg.get(k), int):
                msg[k] += sh // 10**9
        md = msg.get("additional_metadata")
        if isinstance(md, dict) and isinstance(md.get("expected_expiration_ts"), int):
            md["expected_expiration_ts"] += sh // 10**9
        ts = msg.get("ts")
        if isinstance(ts, str):
            msg["ts"] = shift_rfc3339(ts, sh)
        elif isinstance(ts, int) and not isinstance(ts, bool):
            msg["ts"] = ts + sh // 10**9
        if isinstance(msg.get("ts_ms"), int):
            msg["ts_ms"] += sh // 10**6
        n = self.server.shift_pass
        if n and isinstance(msg.get("trade_id"), str):
            msg["trade_id"] = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{n}:{msg['trade_id']}"))

    def wire_rows(self, text: str) -> list[WireRows]:
        """A delta is one l2 row, a snapshot one snapshot row per level with contracts, a trade one
        trade row; their market is the contract's series, their seq the subscription's."""
        head = text[:60]
        if not ('"orderbook_' in head or '"trade"' in head):
            return []
        d = dec(text)
        typ, msg = d.get("type"), d.get("msg")
        if not isinstance(msg, dict):
            return []
        tick = msg.get("market_ticker") or ""
        spec = self.markets.get(tick)
        series = spec.series_ticker if spec is not None else tick.split("-", 1)[0]
        seq = d.get("seq")
        if typ == "orderbook_delta":
            return [WireRows("l2", series, 1, False, seq)]
        if typ == "trade":
            return [WireRows("trades", series, 1, False, seq)]
        if typ == "orderbook_snapshot":
            n = sum(1 for side in ("yes", "no") for lv in (msg.get(f"{side}_dollars_fp") or msg.get(side) or ())
                    if _sz(lv[1]) > 0)
            return [WireRows("l2", series, n, True, seq)]
        return []

    # ------------------------------------------------------------------------------------------ books

    def _apply_snapshot(self, tick: str, msg: dict) -> None:
        b = {"yes": {}, "no": {}}
        for side in ("yes", "no"):
            lv = msg.get(f"{side}_dollars_fp")
            if lv is not None:
                for p, s in lv:
                    v = _sz(s)
                    if v > 0:
                        b[side][_px(p)] = v
            elif msg.get(side) is not None:  # legacy [cents, count]
                for p, s in msg[side]:
                    if s > 0:
                        b[side][int(p) * 100] = int(s) * 100
        self.books[tick] = b
        if msg.get("market_id"):
            self.market_ids[tick] = msg["market_id"]

    def _apply_delta(self, tick: str, msg: dict) -> None:
        b = self.books.setdefault(tick, {"yes": {}, "no": {}})
        side = b.get(msg.get("side"))
        if side is None:
            return
        if "price_dollars" in msg:
            px = _px(msg["price_dollars"])
        else:
            px = int(msg["price"]) * 100
        d = _sz(msg["delta_fp"]) if "delta_fp" in msg else int(msg["delta"]) * 100
        v = side.get(px, 0) + d
        if v > 0:
            side[px] = v
        else:
            side.pop(px, None)

    def _conv(self, side: str, px_str: str, use_yes: bool) -> str:
        if side == "no" and use_yes != self.capture_use_yes:
            return fmt_dp(10000 - _px(px_str), 4)
        return px_str

    def snapshot_msg(self, tick: str, use_yes: bool) -> dict:
        """An `orderbook_snapshot` message of the current book, NO prices on the asked scale."""
        b = self.books.get(tick, {"yes": {}, "no": {}})
        msg = {"market_ticker": tick, "market_id": self.market_ids.get(tick, "")}
        for side in ("yes", "no"):
            if b[side]:
                # stored in the capture's convention; native NO price order = ascending, best last
                items = sorted(b[side].items())
                if side == "no" and self.capture_use_yes:
                    items = sorted(b[side].items(), key=lambda kv: -kv[0])
                msg[f"{side}_dollars_fp"] = [[self._conv(side, fmt_dp(p, 4), use_yes), fmt_dp(s, 2)]
                                             for p, s in items]
        return msg

    # ------------------------------------------------------------------------------------------ client session

    def new_conn_state(self) -> KalshiConnState:
        return KalshiConnState()

    def is_subscribed(self, conn: Conn) -> bool:
        return bool(conn.state.subs)

    def jump_seq(self, conn: Conn, k: int) -> None:
        for s in conn.state.subs.values():
            s.seq += k

    async def session(self, c: Conn) -> None:
        pinger = asyncio.create_task(self._pinger(c))
        try:
            async for raw in c.ws:
                self._command(c, raw)
        finally:
            pinger.cancel()

    async def _pinger(self, c: Conn) -> None:
        with contextlib.suppress(ConnectionClosed, asyncio.CancelledError):
            while c.alive:
                await asyncio.sleep(self.server.ping_interval)
                if self.server.stalled:
                    continue
                await c.ws.ping(b"heartbeat")

    def _send(self, c: Conn, sub: KalshiSub, typ: str, msg: Any, cmd_id: int | None = None) -> None:
        sub.seq += 1
        obj: dict = {"type": typ, "sid": sub.sid, "seq": sub.seq, "msg": msg}
        if cmd_id is not None:
            obj = {"id": cmd_id, **obj}
        c.put(enc(obj).decode())

    def _error(self, c: Conn, cmd_id, code: int, text: str, sub: KalshiSub | None = None, **extra) -> None:
        self.server.counters["errors_sent"] += 1
        m = {"code": code, "msg": text, **extra}
        obj: dict = {"id": cmd_id, "type": "error"}
        if sub is not None:
            sub.seq += 1
            obj.update(sid=sub.sid, seq=sub.seq)
        obj["msg"] = m
        c.put(enc(obj).decode())

    def _market_ok(self, tick: str) -> bool:
        return tick in self.markets or tick in self.books

    def _send_snapshot(self, c: Conn, s: KalshiSub, tick: str, cmd_id=None) -> None:
        if tick in self.books:
            self.server.counters["snapshots_sent"] += 1
            self._send(c, s, "orderbook_snapshot", self.snapshot_msg(tick, s.use_yes), cmd_id)
        else:
            s.awaiting.add(tick)  # not opened yet in the capture: its first snapshot is forwarded

    def _command(self, c: Conn, raw) -> None:
        try:
            m = json.loads(raw)
            if not isinstance(m, dict):
                raise ValueError
        except (ValueError, TypeError):
            return self._error(c, 0, 1, "Unable to process message")
        cid = m.get("id", 0)
        cmd = m.get("cmd")
        params = m.get("params")
        if cmd == "list_subscriptions":
            c.put(enc({"id": cid, "type": "ok", "msg": [{"channel": s.channel, "sid": s.sid}
                                                        for s in c.state.subs.values()]}).decode())
            return
        if cmd not in ("subscribe", "unsubscribe", "update_subscription"):
            return self._error(c, cid, 5, "Unknown command")
        if not isinstance(params, dict):
            return self._error(c, cid, 2, "Params required")
        if cmd == "subscribe":
            self._subscribe(c, cid, params)
        elif cmd == "unsubscribe":
            self._unsubscribe(c, cid, params)
        else:
            self._update(c, cid, params)

    def _subscribe(self, c: Conn, cid, params: dict) -> None:
        chans = params.get("channels")
        if not chans or not isinstance(chans, list):
            return self._error(c, cid, 3, "Channels required")
        for ch in chans:
            if ch not in CHANNELS:
                return self._error(c, cid, 8, "Unknown channel name", channel=ch)
        ticks = params.get("market_tickers")
        if ticks is None and params.get("market_ticker"):
            ticks = [params["market_ticker"]]
        if ticks is not None and not isinstance(ticks, list):
            return self._error(c, cid, 11, "Invalid parameter")
        if "orderbook_delta" in chans and not ticks:
            return self._error(c, cid, 14, "Market ticker required")
        for t in ticks or []:
            if not self._market_ok(t):
                return self._error(c, cid, 16, "Market not found", market_ticker=t)
        use_yes = bool(params.get("use_yes_price", False))
        st = c.state
        new_subs = []
        for ch in chans:  # one ack per channel (each its own sid), then the snapshots
            s = KalshiSub(st.next_sid, ch, set(ticks) if ticks else None, use_yes)
            st.next_sid += 1
            st.subs[s.sid] = s
            new_subs.append(s)
            c.put(enc({"id": cid, "type": "subscribed", "msg": {"channel": ch, "sid": s.sid}}).decode())
        for s in new_subs:
            if s.channel == "orderbook_delta":
                for t in ticks:
                    self._send_snapshot(c, s, t)
        self.server.clients_changed()

    def _unsubscribe(self, c: Conn, cid, params: dict) -> None:
        sids = params.get("sids")
        if not sids or not isinstance(sids, list):
            return self._error(c, cid, 4, "Subscription IDs required")
        for sid in sids:
            s = c.state.subs.pop(sid, None)
            if s is None:
                self._error(c, cid, 7, "Unknown subscription ID", sid=sid)
                continue
            s.seq += 1
            c.put(enc({"id": cid, "sid": s.sid, "seq": s.seq, "type": "unsubscribed"}).decode())
        self.server.clients_changed()

    def _update(self, c: Conn, cid, params: dict) -> None:
        sids = params.get("sids")
        if sids is None and params.get("sid") is not None:
            sids = [params["sid"]]
        if not isinstance(sids, list) or len(sids) != 1:
            return self._error(c, cid, 12, "Exactly one subscription ID is required")
        s = c.state.subs.get(sids[0])
        if s is None:
            return self._error(c, cid, 7, "Unknown subscription ID")
        action = params.get("action")
        if not action:
            return self._error(c, cid, 15, "Action required")
        if action not in ("add_markets", "delete_markets", "get_snapshot"):
            return self._error(c, cid, 13, "Unsupported action", sub=s)
        ticks = params.get("market_tickers")
        if ticks is None and params.get("market_ticker"):
            ticks = [params["market_ticker"]]
        if not ticks or not isinstance(ticks, list):
            return self._error(c, cid, 14, "Market ticker required")
        if action == "get_snapshot":
            return self._get_snapshot(c, cid, s, ticks)
        for t in ticks:
            if action == "add_markets" and not self._market_ok(t):
                return self._error(c, cid, 16, "Market not found", market_ticker=t)
        if s.markets is None:
            s.markets = set()
        if action == "add_markets":
            new = [t for t in ticks if t not in s.markets]
            s.markets.update(new)
        else:
            new = []
            for t in ticks:
                s.markets.discard(t)
                s.awaiting.discard(t)
        s.seq += 1
        c.put(enc({"id": cid, "sid": s.sid, "seq": s.seq, "type": "ok",
                   "msg": {"market_tickers": sorted(s.markets)}}).decode())
        if s.channel == "orderbook_delta":
            for t in new:
                self._send_snapshot(c, s, t)

    def _get_snapshot(self, c: Conn, cid, s: KalshiSub, ticks: list) -> None:
        if s.channel != "orderbook_delta":
            return self._error(c, cid, 13, "Unsupported action", sub=s)
        for t in ticks:
            if not self._market_ok(t):
                return self._error(c, cid, 16, "Market not found", market_ticker=t)
        for t in ticks:
            if t in self.books:
                self._send_snapshot(c, s, t, cid)

    # ------------------------------------------------------------------------------------------ HTTP

    def rest(self, path: str, query: dict[str, list[str]]) -> Response:
        return self._rest.answer(path, query)

    def check_request(self, path: str, request: Request) -> Response | None:
        if path != WS_PATH:
            return json_response(404, {"error": {"code": "not_found", "message": path}})
        try:
            kalshi_auth.verify_headers(request.headers, self.public_key, "GET", WS_PATH,
                                       max_skew_ms=self.server.auth_max_skew_ms)
        except kalshi_auth.KalshiAuthError as e:
            self.server.counters["auth_rejected"] += 1
            self.server.log.info("auth_rejected", reason=str(e))
            return json_response(401, {"error": {"code": "authentication_error", "message": str(e)}})
        return None
