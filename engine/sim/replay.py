"""Replay exchange: serves a capture over a real local WebSocket in the exchange's own protocol.

* Coinbase Advanced Trade: the client must `subscribe` (one channel per message: level2, market_trades,
  heartbeats, ticker...) within `subscribe_timeout` s; the server answers each level2 product with a
  full `l2_data` snapshot synthesized from the book it maintains from the capture (so a reconnect
  mid-capture gets the correct current book), each market_trades product with a snapshot of the
  recent trades, and a cumulative `subscriptions` ack; then forwards the capture's updates,
  trades and heartbeats with `sequence_num` rewritten contiguous from 0 per connection.
* Kalshi: WebSocket at `/trade-api/ws/v2` behind the RSA-PSS auth headers (HTTP 401 when missing,
  malformed or, with `kalshi_public_key`, not verifying); `subscribe` → one `subscribed` ack per
  channel, one `orderbook_snapshot` per market, then deltas/trades with per-sid contiguous `seq`;
  `update_subscription` (add_markets / delete_markets / get_snapshot), `unsubscribe`,
  `list_subscriptions`; error frames with the documented codes; WebSocket pings (payload
  `heartbeat`) every `ping_interval` s. REST on the same port: `GET /trade-api/v2/markets`,
  `/markets/{ticker}`, `/markets/{ticker}/orderbook`, `/events`, `/series/{ticker}` with cursor
  pagination, market status following the replay clock (contracts open and expire as it advances).

One playback clock per server: it advances while at least one client is subscribed (paused
otherwise), at `speed` × real time from the captures' `recv_ns` spacing (0 = as fast as possible).
With `at_present` (the default), exchange times are moved by whole seconds so that the capture's
first frame reads as happening now (REST open/close times move with them): a capture recorded or
generated on another day is still fresh data to a collector, which refuses exchange times a day
away from its receive time. `stats()["shift_ns"]` is that shift.
With `loop_capture`, each pass after the first moves the exchange times of the frames it sends
forward by whole capture lengths and gives its trades new ids, so a looped capture reads as fresh
data (not the same minutes again, nor trades a collector drops as duplicates); the REST answers
keep following the capture's own clock, so contracts reopen on each pass.

Faults (`inject()` at runtime from any thread, or `faults=["drop@100", "stall@500:3", "close@800"]`
keyed by the capture frame index): `drop[:N]` (the next N frames are not sent but consume sequence
numbers → the client sees a jump), `seq_jump[:N]` (sequence numbers jump by N, default 5),
`malformed[:N]` (N non-JSON frames), `stall:SECONDS` (nothing sent, no pings), `close` (TCP abort).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import email.utils
import json
import re
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from engine.collect import kalshi_auth
from engine.collect.sources import parse_ts
from engine.log import get_logger
from engine.sim.capture_gen import KalshiMarketSpec, fmt_dp, fmt_rfc3339, market_object, read_capture
from engine.timeutil import US_EASTERN

WS_PATH = "/trade-api/ws/v2"
REST_PREFIX = "/trade-api/v2"
_dec = msgspec.json.decode
_enc = msgspec.json.Encoder().encode
_STOP = object()
_ABORT = object()
MALFORMED_FRAMES = (
    '{"channel":"l2_data","timestamp":"2026-11-26T17:00:00Z","sequence_num":',
    "\x00\x01garbage frame \ufffd not json",
    '{"type":"orderbook_delta","sid":1,"seq":,"msg":{}}',
    "[1, 2, 3",
    "<html>502 Bad Gateway</html>",
)
COINBASE_CHANNELS = ("level2", "market_trades", "heartbeats", "ticker", "ticker_batch", "candles", "status")
CB_DATA_CHANNEL = {"l2_data": "level2", "market_trades": "market_trades", "heartbeats": "heartbeats",
                   "ticker": "ticker", "ticker_batch": "ticker_batch", "candles": "candles", "status": "status"}
KALSHI_CHANNELS = ("orderbook_delta", "trade", "ticker")
_TICKER_RE = re.compile(r"^[A-Z0-9]+-(\d{2})([A-Z]{3})(\d{2})(\d{2})(\d{2})?-")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


def parse_fault(spec: str) -> tuple[str, float | None, int | None]:
    """'drop' | 'malformed:5' | 'stall:3' → (name, arg, None); 'stall@500:3' → ('stall', 3, 500)."""
    spec = spec.strip()
    at = None
    if "@" in spec:
        name, rest = spec.split("@", 1)
        idx, _, arg = rest.partition(":")
        at = int(idx)
    else:
        name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name not in ("drop", "seq_jump", "malformed", "stall", "close"):
        raise ValueError(f"unknown fault {spec!r} (drop, seq_jump, malformed, stall, close)")
    val = float(arg) if arg else None
    if name == "stall" and val is None:
        raise ValueError("stall needs a duration: stall:SECONDS or stall@INDEX:SECONDS")
    return name, val, at


def _http_date() -> str:
    return email.utils.formatdate(usegmt=True)


def _json_response(status: int, obj: Any) -> Response:
    body = json.dumps(obj, separators=(",", ":")).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(status, "Error")
    headers = Headers([("Date", _http_date()), ("Connection", "close"), ("Content-Type", "application/json"),
                       ("Content-Length", str(len(body)))])
    return Response(status, reason, headers, body)


# ---------------------------------------------------------------------------------------------- connection state


@dataclass
class _KSub:
    sid: int
    channel: str
    markets: set | None  # None = every market (trade / ticker without a filter)
    use_yes: bool = False
    seq: int = 0
    awaiting: set = field(default_factory=set)  # orderbook: markets whose first snapshot is pending


class _Conn:
    def __init__(self, server: "ReplayServer", ws: ServerConnection, cid: int):
        self.server = server
        self.ws = ws
        self.id = cid
        self.q: asyncio.Queue = asyncio.Queue()
        self.alive = True
        # coinbase
        self.seq = 0
        self.cb_subs: dict[str, list[str]] = {}
        self.l2_ready: set[str] = set()
        self.l2_waiting: set[str] = set()
        self.tr_snap: set[str] = set()
        # kalshi
        self.next_sid = 1
        self.ksubs: dict[int, _KSub] = {}

    def put(self, item) -> None:
        if self.alive:
            self.q.put_nowait(item)

    @property
    def subscribed(self) -> bool:
        return bool(self.cb_subs or self.ksubs)

    async def writer(self) -> None:
        st = self.server.counters
        try:
            while True:
                item = await self.q.get()
                if item is _STOP:
                    return
                if item is _ABORT:
                    transport = getattr(self.ws, "transport", None)
                    if transport is not None:
                        transport.abort()
                    return
                await self.ws.send(item)
                st["frames_sent"] += 1
                st["bytes_sent"] += len(item)
        except ConnectionClosed:
            pass
        finally:
            self.alive = False


# ---------------------------------------------------------------------------------------------- server


class ReplayServer:
    def __init__(
        self,
        source: str,
        capture: str | Path | list[dict],
        host: str = "127.0.0.1",
        port: int = 0,
        speed: float = 0.0,
        faults: list[str] | None = None,
        kalshi_public_key: Any = None,
        loop_capture: bool = False,
        at_present: bool = True,
        subscribe_timeout: float = 5.0,
        ping_interval: float = 10.0,
        markets: list[dict] | None = None,
        auth_max_skew_ms: int = 300_000,
    ):
        if source not in ("coinbase", "kalshi"):
            raise ValueError("source must be coinbase or kalshi")
        self.source = source
        self.capture = capture
        self.host = host
        self.port = port
        self.speed = float(speed or 0.0)
        self.loop_capture = loop_capture
        self.at_present = at_present
        self._shift_ns = 0  # added to the exchange times of sent frames (whole seconds): base + looped passes
        self._base_shift_ns = 0  # moves the capture's first recv_ns to the present (`at_present`)
        self._shift_pass = 0
        self._first_recv: int | None = None  # the capture's first recv_ns (prescan)
        self.subscribe_timeout = subscribe_timeout
        self.ping_interval = ping_interval
        self.auth_max_skew_ms = auth_max_skew_ms
        if isinstance(kalshi_public_key, (str, Path)):
            kalshi_public_key = kalshi_auth.load_public_key(kalshi_public_key)
        self.kalshi_public_key = kalshi_public_key
        self.ws_url = ""
        self.rest_url = ""
        self.log = get_logger(component="replay", source=source)
        self.counters: dict[str, int] = dict.fromkeys(
            ("frames_read", "frames_sent", "bytes_sent", "dropped", "seq_jumps", "malformed_sent", "stalls",
             "closes", "connections", "snapshots_sent", "errors_sent", "auth_rejected", "rest_requests",
             "loops"), 0)
        self.done = threading.Event()  # set when the capture is exhausted (and not looping)
        self.clock_ns = 0
        self._scheduled: dict[int, list[tuple[str, float | None]]] = {}
        for f in faults or []:
            name, val, at = parse_fault(f)
            self._scheduled.setdefault(at if at is not None else 0, []).append((name, val))
        self._pending: deque = deque()
        self._drop_left = 0
        self._stalled_until = 0.0
        self._conns: set[_Conn] = set()
        self._next_cid = 0
        self._server = None
        self._feed_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._have_clients: asyncio.Event | None = None
        # coinbase state
        self.cb_books: dict[str, dict[str, dict[str, str]]] = {}
        self.cb_trades: dict[str, deque] = {}
        self.cb_products: set[str] = set()
        # kalshi state
        self.capture_use_yes = False
        self.k_books: dict[str, dict[str, dict[int, int]]] = {}
        self.k_market_ids: dict[str, str] = {}
        self.k_markets: dict[str, KalshiMarketSpec] = {}
        self._markets_arg = markets

    # ------------------------------------------------------------------------------------------ records

    def _records(self) -> Iterator[dict]:
        if isinstance(self.capture, (list, tuple)):
            yield from self.capture
        else:
            yield from read_capture(self.capture)

    def _prescan(self) -> None:
        first = None
        if self.source == "coinbase":
            for i, rec in enumerate(self._records()):
                if first is None and "recv_ns" in rec:
                    first = rec["recv_ns"]
                if i > 20000:
                    break
                fr = rec.get("frame")
                if fr and '"product_id"' in fr:
                    for m in re.finditer(r'"product_id":"([^"]+)"', fr[:200000]):
                        self.cb_products.add(m.group(1))
        else:
            first = self._scan_kalshi_markets()
        self._first_recv = first
        self.clock_ns = first or 0
        if self.at_present and first is not None:
            # a capture recorded (or generated) on another day plays as if it were happening now:
            # collectors refuse exchange times a day away from the receive time
            self._base_shift_ns = (time.time_ns() - first) // 10**9 * 10**9
            self._shift_ns = self._base_shift_ns

    def _scan_kalshi_markets(self) -> int | None:
        first = last = None
        opened: dict[str, int] = {}
        closed: dict[str, int] = {}
        prev: dict[int, set] = {}
        in_preamble = True
        for rec in self._records():
            r = rec.get("recv_ns")
            if r is None:
                continue
            first = r if first is None else first
            last = r
            fr = rec.get("frame")
            if not fr:
                continue
            try:
                d = _dec(fr)
            except msgspec.DecodeError:
                continue
            if not isinstance(d, dict):
                continue
            msg = d.get("msg")
            if not isinstance(msg, dict):
                continue
            t = d.get("type")
            sid = d.get("sid")
            tick = msg.get("market_ticker")
            if t in ("orderbook_snapshot", "orderbook_delta", "trade", "ticker") and tick:
                if t != "orderbook_snapshot":
                    in_preamble = False
                if tick not in opened:
                    # contracts in the capture's initial snapshot burst were open before it started
                    opened[tick] = first if in_preamble else r
                if msg.get("market_id"):
                    self.k_market_ids.setdefault(tick, msg["market_id"])
                if sid is not None:
                    prev.setdefault(sid, set()).add(tick)
            elif t == "ok" and isinstance(msg.get("market_tickers"), list) and sid is not None:
                now = set(msg["market_tickers"])
                for tk in prev.get(sid, set()) - now:
                    closed.setdefault(tk, r)
                prev[sid] = now
        if self._markets_arg is None and isinstance(self.capture, (str, Path)):
            side = Path(str(self.capture) + ".markets.json")
            if side.exists():
                self._markets_arg = json.loads(side.read_text())
        if self._markets_arg:
            for m in self._markets_arg:
                self.k_markets[m["ticker"]] = KalshiMarketSpec(
                    m["ticker"], m.get("event_ticker") or m["ticker"].rsplit("-", 1)[0],
                    m.get("series_ticker") or m["ticker"].split("-", 1)[0],
                    _parse_time_ns(m["open_time"]), _parse_time_ns(m["close_time"]),
                    m.get("floor_strike"), m.get("cap_strike"), self.k_market_ids.get(m["ticker"], ""))
            return first
        end = last or 0
        by_event: dict[str, list[str]] = {}
        for tk in opened:
            by_event.setdefault(tk.rsplit("-", 1)[0], []).append(tk)
        for ev, ticks in by_event.items():
            strikes = sorted(s for s in (_strike(t) for t in ticks) if s is not None)
            width = min((b - a for a, b in zip(strikes, strikes[1:]) if b > a), default=None)
            for tk in ticks:
                close = closed.get(tk)
                if close is None:
                    close = _ticker_close_ns(tk)
                    if close is None or close <= end:
                        close = end + 3600 * 10**9
                s = _strike(tk)
                floor = cap = None
                if s is not None and width:
                    floor, cap = s - width / 2, s + width / 2 - 0.01
                self.k_markets[tk] = KalshiMarketSpec(tk, ev, tk.split("-", 1)[0], opened[tk], close, floor, cap,
                                                      self.k_market_ids.get(tk, ""))
        return first

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> "ReplayServer":
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._have_clients = asyncio.Event()
        await asyncio.to_thread(self._prescan)
        self._server = await serve(
            self._handler, self.host, self.port, process_request=self._process_request,
            compression=None, ping_interval=None, max_size=1 << 20, close_timeout=2,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.source == "kalshi":
            self.ws_url = f"ws://{self.host}:{self.port}{WS_PATH}"
            self.rest_url = f"http://{self.host}:{self.port}{REST_PREFIX}"
        else:
            self.ws_url = f"ws://{self.host}:{self.port}"
        self._primed = await asyncio.to_thread(self._prime)
        self._feed_task = asyncio.create_task(self._feed())
        self.log.info("replay_listening", ws_url=self.ws_url, rest_url=self.rest_url or None,
                      speed=self.speed, capture=str(self.capture) if not isinstance(self.capture, list) else "<list>",
                      auth_verify=self.kalshi_public_key is not None)
        return self

    async def stop(self) -> None:
        if self._feed_task:
            self._feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._feed_task
        for c in list(self._conns):
            c.put(_STOP)
            with contextlib.suppress(Exception):
                await c.ws.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        self.log.info("replay_stopped", **self.counters)

    @classmethod
    @contextlib.contextmanager
    def run_in_thread(cls, **kwargs):
        """Run a server on its own event-loop thread; yields it started (port, ws_url, rest_url set)."""
        srv = cls(**kwargs)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        err: list[BaseException] = []

        def runner():
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(srv.start())
            except BaseException as e:  # noqa: BLE001
                err.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()

        th = threading.Thread(target=runner, name=f"replay-{srv.source}", daemon=True)
        th.start()
        started.wait(60)
        if err:
            loop.close()
            raise err[0]
        try:
            yield srv
        finally:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(15)
            loop.call_soon_threadsafe(loop.stop)
            th.join(10)
            with contextlib.suppress(Exception):
                loop.close()

    def inject(self, fault: str) -> None:
        """Apply a fault now (thread-safe): drop[:N], seq_jump[:N], malformed[:N], stall:S, close."""
        name, val, _ = parse_fault(fault)
        if self._loop is None:
            self._pending.append((name, val))
            return
        if threading.get_ident() == self._loop_thread:
            self._inject_now(name, val)
        else:
            self._loop.call_soon_threadsafe(self._inject_now, name, val)

    def stats(self) -> dict[str, int]:
        d = dict(self.counters)
        d["clients"] = sum(1 for c in self._conns if c.alive)
        d["clock_ns"] = self.clock_ns
        d["shift_ns"] = self._base_shift_ns
        return d

    def _inject_now(self, name: str, val) -> None:
        if name == "close":
            self._do_close()
        elif name == "stall":
            # immediate: nothing goes out (feed and pings check this) until it ends
            self._stalled_until = max(self._stalled_until, time.monotonic() + float(val))
            self.counters["stalls"] += 1
            self.log.info("fault_stall", seconds=val)
        else:
            self._pending.append((name, val))

    def _do_close(self) -> None:
        self.counters["closes"] += 1
        self.log.info("fault_close", clients=len(self._conns))
        for c in list(self._conns):
            transport = getattr(c.ws, "transport", None)
            if transport is not None:
                transport.abort()
            c.alive = False

    def _apply_pending(self) -> None:
        while self._pending:
            name, val = self._pending.popleft()
            n = int(val) if val is not None else None
            if name == "drop":
                self._drop_left += n or 1
            elif name == "seq_jump":
                k = n or 5
                self.counters["seq_jumps"] += 1
                for c in self._conns:
                    c.seq += k
                    for s in c.ksubs.values():
                        s.seq += k
                self.log.info("fault_seq_jump", by=k)
            elif name == "malformed":
                k = n or 1
                for c in self._conns:
                    for i in range(k):
                        c.put(MALFORMED_FRAMES[i % len(MALFORMED_FRAMES)])
                self.counters["malformed_sent"] += k
                self.log.info("fault_malformed", count=k)
            elif name == "stall":
                self._inject_now("stall", val)
            elif name == "close":
                self._do_close()

    # ------------------------------------------------------------------------------------------ feed

    def _update_client_event(self) -> None:
        if self._have_clients is None:
            return
        if any(c.alive and c.subscribed for c in self._conns):
            self._have_clients.set()
        else:
            self._have_clients.clear()

    def _prime(self) -> tuple[list, Iterator[dict], int]:
        """Kalshi: apply the capture's preamble (acks and the initial snapshot burst) before any client
        connects, so a first subscribe is answered with snapshots at once (Kalshi snapshots carry no
        timestamp, so a synthesized one is identical to the captured one)."""
        it = iter(self._records())
        if self.source != "kalshi":
            return [], it, 0
        n = 0
        for rec in it:
            meta = rec.get("meta")
            if meta is not None:
                if meta.get("type") == "connect" and "use_yes_price" in meta:
                    self.capture_use_yes = bool(meta["use_yes_price"])
                continue
            fr = rec.get("frame") or ""
            head = fr[:60]
            if '"subscribed"' in head or '"orderbook_snapshot"' in head:
                if n in self._scheduled:
                    return [rec], it, n
                self.clock_ns = max(self.clock_ns, rec.get("recv_ns", 0))
                self.counters["frames_read"] += 1
                self._k_frame(fr)
                n += 1
                continue
            return [rec], it, n
        return [], it, n

    async def _feed(self) -> None:
        wall0 = rec0 = None
        idx = 0
        try:
            first = True
            while True:
                if first:
                    head, it, idx = self._primed
                    first = False
                    source = (r for part in (head, it) for r in part)
                else:
                    source = self._records()
                for rec in source:
                    if not self._have_clients.is_set():
                        t0 = time.monotonic()
                        await self._have_clients.wait()
                        if wall0 is not None:
                            wall0 += time.monotonic() - t0
                    meta = rec.get("meta")
                    if meta is not None:
                        if meta.get("type") == "connect" and "use_yes_price" in meta:
                            self.capture_use_yes = bool(meta["use_yes_price"])
                        continue
                    frame = rec.get("frame")
                    r = rec.get("recv_ns", 0)
                    for f in self._scheduled.pop(idx, ()):
                        self._inject_now(*f)
                    if self._pending:
                        self._apply_pending()
                    if self._stalled_until > time.monotonic():
                        t0 = time.monotonic()
                        await asyncio.sleep(self._stalled_until - t0)
                        if wall0 is not None:
                            wall0 += time.monotonic() - t0
                    if self.speed > 0:
                        if wall0 is None:
                            wall0, rec0 = time.monotonic(), r
                        # a looped pass is paced at its shifted times: exchange times keep up with the wall clock
                        delay = wall0 + (r + self._shift_ns - self._base_shift_ns - rec0) / 1e9 / self.speed - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    self.clock_ns = max(self.clock_ns, r)
                    self.counters["frames_read"] += 1
                    idx += 1
                    if frame is not None:
                        try:
                            if self.source == "coinbase":
                                self._cb_frame(frame)
                            else:
                                self._k_frame(frame)
                        except Exception as e:  # a bad capture line must not kill the feed
                            self.log.warning("capture_frame_skipped", error=str(e), head=frame[:80])
                    # backpressure: keep per-connection queues bounded at full speed
                    for c in list(self._conns):
                        while c.alive and c.q.qsize() > 2000:
                            await asyncio.sleep(0.002)
                    if idx % 32 == 0:
                        await asyncio.sleep(0)
                if not self.loop_capture:
                    break
                self.counters["loops"] += 1
                if self._first_recv is not None:
                    # the capture's length (the clock stops at its last recv_ns), rounded up to whole s
                    period = -(-(self.clock_ns - self._first_recv + 10**9) // 10**9) * 10**9
                    self._shift_pass = self.counters["loops"]
                    self._shift_ns = self._base_shift_ns + self._shift_pass * period
                    self.clock_ns = self._first_recv  # the capture clock restarts with the pass
                else:
                    wall0 = rec0 = None
            self.log.info("replay_capture_exhausted", frames=self.counters["frames_read"])
            self.done.set()
            if self._pending:
                self._apply_pending()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("replay_feed_failed")
            self.done.set()

    def _deliver(self, targets: list, make) -> None:
        """Send to each (conn, ctx) target; `make(conn, ctx)` assigns a sequence number and returns text.
        A pending drop consumes the sequence number without sending."""
        if not targets:
            return
        drop = self._drop_left > 0
        if drop:
            self._drop_left -= 1
            self.counters["dropped"] += 1
        for c, ctx in targets:
            text = make(c, ctx)
            if not drop:
                c.put(text)

    # ------------------------------------------------------------------------------------------ coinbase

    def _cb_envelope(self, c: _Conn, channel: str, events: list) -> str:
        s = _enc({"channel": channel, "timestamp": fmt_rfc3339(self.clock_ns + self._shift_ns, 9), "sequence_num": c.seq,
                  "events": events}).decode()
        c.seq += 1
        return s

    @staticmethod
    def _cb_rewrite(text: str, d: dict, seq: int) -> str:
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
        return _enc(d).decode()

    def _cb_l2_snapshot(self, c: _Conn, pid: str) -> str:
        book = self.cb_books.get(pid, {"bid": {}, "offer": {}})
        et = fmt_rfc3339(self.clock_ns + self._shift_ns, 6)  # the time of the pass being sent
        ups = [{"side": "bid", "event_time": et, "price_level": p, "new_quantity": q}
               for p, q in sorted(book["bid"].items(), key=lambda kv: Decimal(kv[0]), reverse=True)]
        ups += [{"side": "offer", "event_time": et, "price_level": p, "new_quantity": q}
                for p, q in sorted(book["offer"].items(), key=lambda kv: Decimal(kv[0]))]
        self.counters["snapshots_sent"] += 1
        return self._cb_envelope(c, "l2_data", [{"type": "snapshot", "product_id": pid, "updates": ups}])

    def _cb_frame(self, text: str) -> None:
        d = _dec(text)
        if self._shift_ns:
            text, d = self._cb_shifted(d)
        ch = d.get("channel")
        events = d.get("events") or []
        if ch == "l2_data":
            for ev in events:
                pid = ev.get("product_id")
                if not pid:
                    continue
                self.cb_products.add(pid)
                book = self.cb_books.get(pid)
                is_snap = ev.get("type") == "snapshot"
                if book is None or is_snap:
                    book = self.cb_books[pid] = {"bid": {}, "offer": {}}
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
                for c in self._conns:
                    if not c.alive or pid not in c.cb_subs.get("level2", ()):
                        continue
                    if pid in c.l2_ready:
                        if not is_snap:  # Coinbase sends no unsolicited snapshots: keep the book silently
                            targets.append((c, None))
                    elif pid in c.l2_waiting and is_snap:
                        c.l2_waiting.discard(pid)
                        c.l2_ready.add(pid)
                        targets.append((c, None))
                        self.counters["snapshots_sent"] += 1
                self._deliver(targets, lambda c, _: self._cb_next(c, text, d))
        elif ch == "market_trades":
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
                    self.cb_products.add(pid)
                    dq = self.cb_trades.setdefault(pid, deque(maxlen=100))
                    if ev.get("type") == "snapshot":
                        dq.clear()
                        dq.extend(reversed(ts))  # stored oldest → newest
                    else:
                        dq.extend(sorted(ts, key=lambda t: t.get("time", "")))
            targets = []
            for c in self._conns:
                subs = c.cb_subs.get("market_trades", ())
                mine = [p for p in pids if p in subs]
                if not c.alive or not mine:
                    continue
                if snap:
                    fresh = [p for p in mine if p not in c.tr_snap]
                    if not fresh:
                        continue
                    c.tr_snap.update(fresh)
                targets.append((c, None))
            self._deliver(targets, lambda c, _: self._cb_next(c, text, d))
        elif ch == "subscriptions" or ch is None:
            return
        else:
            sub = CB_DATA_CHANNEL.get(ch)
            if sub is None:
                return
            targets = [(c, None) for c in self._conns if c.alive and c.cb_subs.get(sub)]
            self._deliver(targets, lambda c, _: self._cb_next(c, text, d))

    def _cb_shifted(self, d: dict) -> tuple[str, dict]:
        """A looped pass's frame: times moved forward by `_shift_ns`, trade ids by whole passes."""
        sh = self._shift_ns
        if isinstance(d.get("timestamp"), str):
            d["timestamp"] = _shift_rfc3339(d["timestamp"], sh)
        for ev in d.get("events") or []:
            for u in ev.get("updates") or ():
                if isinstance(u, dict) and isinstance(u.get("event_time"), str):
                    u["event_time"] = _shift_rfc3339(u["event_time"], sh)
            for t in ev.get("trades") or ():
                if isinstance(t, dict):
                    if isinstance(t.get("time"), str):
                        t["time"] = _shift_rfc3339(t["time"], sh)
                    tid = t.get("trade_id")
                    if isinstance(tid, str) and tid.isdigit():
                        t["trade_id"] = str(int(tid) + self._shift_pass * _LOOP_TRADE_ID_STEP)
        return _enc(d).decode(), d

    def _cb_next(self, c: _Conn, text: str, d: dict) -> str:
        s = self._cb_rewrite(text, d, c.seq)
        c.seq += 1
        return s

    async def _cb_session(self, c: _Conn) -> None:
        ws = c.ws
        deadline = time.monotonic() + self.subscribe_timeout
        while True:
            timeout = None if c.cb_subs else max(0.0, deadline - time.monotonic())
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout)
            except TimeoutError:
                self.log.info("subscribe_timeout", conn=c.id)
                await ws.close(1008, "subscribe timeout")
                return
            self._cb_command(c, raw)

    def _cb_error(self, c: _Conn, message: str, reason: str | None = None) -> None:
        obj = {"type": "error", "message": message}
        if reason:
            obj["reason"] = reason
        self.counters["errors_sent"] += 1
        c.put(_enc(obj).decode())

    def _cb_command(self, c: _Conn, raw) -> None:
        try:
            m = json.loads(raw)
            if not isinstance(m, dict):
                raise ValueError
        except (ValueError, TypeError):
            return self._cb_error(c, "failure to parse message", "malformed JSON")
        typ = m.get("type")
        if typ not in ("subscribe", "unsubscribe"):
            return self._cb_error(c, "failure to subscribe", f"unknown message type {typ!r}")
        ch = m.get("channel")
        if not isinstance(ch, str) or ch not in COINBASE_CHANNELS:
            return self._cb_error(c, "failure to subscribe", f"unknown or missing channel {ch!r}")
        pids = m.get("product_ids") or []
        if ch == "heartbeats":
            pids = ["heartbeats"]
        elif not isinstance(pids, list) or not pids:
            return self._cb_error(c, "failure to subscribe", "product_ids required")
        if ch != "heartbeats":
            bad = [p for p in pids if p not in self.cb_products]
            if bad:
                return self._cb_error(c, "failure to subscribe", f"{bad[0]} is not a valid product")
        cur = c.cb_subs.setdefault(ch, [])
        if typ == "subscribe":
            new = [p for p in pids if p not in cur]
            cur.extend(new)
            if ch == "level2":
                for pid in new:
                    if pid in self.cb_books:
                        c.put(self._cb_l2_snapshot(c, pid))
                        c.l2_ready.add(pid)
                    else:
                        c.l2_waiting.add(pid)
            elif ch == "market_trades":
                for pid in new:
                    if pid in self.cb_trades:
                        trades = list(reversed(self.cb_trades[pid]))
                        c.put(self._cb_envelope(c, "market_trades", [{"type": "snapshot", "trades": trades}]))
                        c.tr_snap.add(pid)
        else:
            for p in pids:
                if p in cur:
                    cur.remove(p)
                if ch == "level2":
                    c.l2_ready.discard(p)
                    c.l2_waiting.discard(p)
                elif ch == "market_trades":
                    c.tr_snap.discard(p)
            if not cur:
                c.cb_subs.pop(ch, None)
        subs = {k: list(v) for k, v in c.cb_subs.items() if v}
        c.put(self._cb_envelope(c, "subscriptions", [{"subscriptions": subs}]))
        self._update_client_event()

    # ------------------------------------------------------------------------------------------ kalshi

    @staticmethod
    def _px(s: str) -> int:
        return int(Decimal(s) * 10000)

    @staticmethod
    def _sz(s) -> int:
        return int(Decimal(str(s)) * 100)

    def _k_apply_snapshot(self, tick: str, msg: dict) -> None:
        b = {"yes": {}, "no": {}}
        for side in ("yes", "no"):
            lv = msg.get(f"{side}_dollars_fp")
            if lv is not None:
                for p, s in lv:
                    v = self._sz(s)
                    if v > 0:
                        b[side][self._px(p)] = v
            elif msg.get(side) is not None:  # legacy [cents, count]
                for p, s in msg[side]:
                    if s > 0:
                        b[side][int(p) * 100] = int(s) * 100
        self.k_books[tick] = b
        if msg.get("market_id"):
            self.k_market_ids[tick] = msg["market_id"]

    def _k_apply_delta(self, tick: str, msg: dict) -> None:
        b = self.k_books.setdefault(tick, {"yes": {}, "no": {}})
        side = b.get(msg.get("side"))
        if side is None:
            return
        if "price_dollars" in msg:
            px = self._px(msg["price_dollars"])
        else:
            px = int(msg["price"]) * 100
        d = self._sz(msg["delta_fp"]) if "delta_fp" in msg else int(msg["delta"]) * 100
        v = side.get(px, 0) + d
        if v > 0:
            side[px] = v
        else:
            side.pop(px, None)

    def _k_conv(self, side: str, px_str: str, use_yes: bool) -> str:
        if side == "no" and use_yes != self.capture_use_yes:
            return fmt_dp(10000 - self._px(px_str), 4)
        return px_str

    def _k_snapshot_msg(self, tick: str, use_yes: bool) -> dict:
        b = self.k_books.get(tick, {"yes": {}, "no": {}})
        msg = {"market_ticker": tick, "market_id": self.k_market_ids.get(tick, "")}
        for side in ("yes", "no"):
            if b[side]:
                # stored in the capture's convention; native NO price order = ascending, best last
                items = sorted(b[side].items())
                if side == "no" and self.capture_use_yes:
                    items = sorted(b[side].items(), key=lambda kv: -kv[0])
                msg[f"{side}_dollars_fp"] = [[self._k_conv(side, fmt_dp(p, 4), use_yes), fmt_dp(s, 2)]
                                             for p, s in items]
        return msg

    def _k_send(self, c: _Conn, sub: _KSub, typ: str, msg: Any, cmd_id: int | None = None) -> None:
        sub.seq += 1
        obj: dict = {"type": typ, "sid": sub.sid, "seq": sub.seq, "msg": msg}
        if cmd_id is not None:
            obj = {"id": cmd_id, **obj}
        c.put(_enc(obj).decode())

    def _k_frame(self, text: str) -> None:
        d = _dec(text)
        typ = d.get("type")
        msg = d.get("msg")
        if not isinstance(msg, dict):
            return
        tick = msg.get("market_ticker")
        if self._shift_ns:
            self._k_shift(msg)
        if typ == "orderbook_snapshot" and tick:
            self._k_apply_snapshot(tick, msg)
            targets = []
            for c in self._conns:
                for s in c.ksubs.values():
                    if c.alive and s.channel == "orderbook_delta" and tick in s.markets:
                        s.awaiting.discard(tick)
                        targets.append((c, s))
            if targets:
                self.counters["snapshots_sent"] += len(targets)

            def mk(c, s):
                s.seq += 1
                return _enc({"type": typ, "sid": s.sid, "seq": s.seq,
                             "msg": self._k_snapshot_msg(tick, s.use_yes)}).decode()
            self._deliver(targets, mk)
        elif typ == "orderbook_delta" and tick:
            self._k_apply_delta(tick, msg)
            targets = [(c, s) for c in self._conns if c.alive for s in c.ksubs.values()
                       if s.channel == "orderbook_delta" and tick in s.markets and tick not in s.awaiting]

            def mk(c, s):
                s.seq += 1
                m = msg
                if msg.get("side") == "no" and s.use_yes != self.capture_use_yes and "price_dollars" in msg:
                    m = dict(msg)
                    m["price_dollars"] = self._k_conv("no", msg["price_dollars"], s.use_yes)
                return _enc({"type": typ, "sid": s.sid, "seq": s.seq, "msg": m}).decode()
            self._deliver(targets, mk)
        elif typ in ("trade", "ticker") and tick:
            targets = [(c, s) for c in self._conns if c.alive for s in c.ksubs.values()
                       if s.channel == typ and (s.markets is None or tick in s.markets)]

            def mk(c, s):
                if typ == "ticker":
                    return _enc({"type": typ, "sid": s.sid, "msg": msg}).decode()
                s.seq += 1
                return _enc({"type": typ, "sid": s.sid, "seq": s.seq, "msg": msg}).decode()
            self._deliver(targets, mk)

    def _k_shift(self, msg: dict) -> None:
        """A looped pass's message: times moved forward by `_shift_ns`, a new trade id per pass."""
        sh = self._shift_ns
        ts = msg.get("ts")
        if isinstance(ts, str):
            msg["ts"] = _shift_rfc3339(ts, sh)
        elif isinstance(ts, int) and not isinstance(ts, bool):
            msg["ts"] = ts + sh // 10**9
        if isinstance(msg.get("ts_ms"), int):
            msg["ts_ms"] += sh // 10**6
        if self._shift_pass and isinstance(msg.get("trade_id"), str):
            msg["trade_id"] = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{self._shift_pass}:{msg['trade_id']}"))

    def _k_error(self, c: _Conn, cmd_id, code: int, text: str, sub: _KSub | None = None, **extra) -> None:
        self.counters["errors_sent"] += 1
        m = {"code": code, "msg": text, **extra}
        obj: dict = {"id": cmd_id, "type": "error"}
        if sub is not None:
            sub.seq += 1
            obj.update(sid=sub.sid, seq=sub.seq)
        obj["msg"] = m
        c.put(_enc(obj).decode())

    def _k_market_ok(self, tick: str) -> bool:
        return tick in self.k_markets or tick in self.k_books

    def _k_send_snapshot(self, c: _Conn, s: _KSub, tick: str, cmd_id=None) -> None:
        if tick in self.k_books:
            self.counters["snapshots_sent"] += 1
            self._k_send(c, s, "orderbook_snapshot", self._k_snapshot_msg(tick, s.use_yes), cmd_id)
        else:
            s.awaiting.add(tick)  # not opened yet in the capture: its first snapshot is forwarded

    def _k_command(self, c: _Conn, raw) -> None:
        try:
            m = json.loads(raw)
            if not isinstance(m, dict):
                raise ValueError
        except (ValueError, TypeError):
            return self._k_error(c, 0, 1, "Unable to process message")
        cid = m.get("id", 0)
        cmd = m.get("cmd")
        params = m.get("params")
        if cmd == "list_subscriptions":
            c.put(_enc({"id": cid, "type": "ok", "msg": [{"channel": s.channel, "sid": s.sid}
                                                         for s in c.ksubs.values()]}).decode())
            return
        if cmd not in ("subscribe", "unsubscribe", "update_subscription"):
            return self._k_error(c, cid, 5, "Unknown command")
        if not isinstance(params, dict):
            return self._k_error(c, cid, 2, "Params required")
        if cmd == "subscribe":
            chans = params.get("channels")
            if not chans or not isinstance(chans, list):
                return self._k_error(c, cid, 3, "Channels required")
            for ch in chans:
                if ch not in KALSHI_CHANNELS:
                    return self._k_error(c, cid, 8, "Unknown channel name", channel=ch)
            ticks = params.get("market_tickers")
            if ticks is None and params.get("market_ticker"):
                ticks = [params["market_ticker"]]
            if ticks is not None and not isinstance(ticks, list):
                return self._k_error(c, cid, 11, "Invalid parameter")
            if "orderbook_delta" in chans and not ticks:
                return self._k_error(c, cid, 14, "Market ticker required")
            for t in ticks or []:
                if not self._k_market_ok(t):
                    return self._k_error(c, cid, 16, "Market not found", market_ticker=t)
            use_yes = bool(params.get("use_yes_price", False))
            new_subs = []
            for ch in chans:  # one ack per channel (each its own sid), then the snapshots
                s = _KSub(c.next_sid, ch, set(ticks) if ticks else None, use_yes)
                c.next_sid += 1
                c.ksubs[s.sid] = s
                new_subs.append(s)
                c.put(_enc({"id": cid, "type": "subscribed", "msg": {"channel": ch, "sid": s.sid}}).decode())
            for s in new_subs:
                if s.channel == "orderbook_delta":
                    for t in ticks:
                        self._k_send_snapshot(c, s, t)
            self._update_client_event()
            return
        if cmd == "unsubscribe":
            sids = params.get("sids")
            if not sids or not isinstance(sids, list):
                return self._k_error(c, cid, 4, "Subscription IDs required")
            for sid in sids:
                s = c.ksubs.pop(sid, None)
                if s is None:
                    self._k_error(c, cid, 7, "Unknown subscription ID", sid=sid)
                    continue
                s.seq += 1
                c.put(_enc({"id": cid, "sid": s.sid, "seq": s.seq, "type": "unsubscribed"}).decode())
            self._update_client_event()
            return
        # update_subscription
        sids = params.get("sids")
        if sids is None and params.get("sid") is not None:
            sids = [params["sid"]]
        if not isinstance(sids, list) or len(sids) != 1:
            return self._k_error(c, cid, 12, "Exactly one subscription ID is required")
        s = c.ksubs.get(sids[0])
        if s is None:
            return self._k_error(c, cid, 7, "Unknown subscription ID")
        action = params.get("action")
        if not action:
            return self._k_error(c, cid, 15, "Action required")
        if action not in ("add_markets", "delete_markets", "get_snapshot"):
            return self._k_error(c, cid, 13, "Unsupported action", sub=s)
        ticks = params.get("market_tickers")
        if ticks is None and params.get("market_ticker"):
            ticks = [params["market_ticker"]]
        if not ticks or not isinstance(ticks, list):
            return self._k_error(c, cid, 14, "Market ticker required")
        if action == "get_snapshot":
            if s.channel != "orderbook_delta":
                return self._k_error(c, cid, 13, "Unsupported action", sub=s)
            for t in ticks:
                if not self._k_market_ok(t):
                    return self._k_error(c, cid, 16, "Market not found", market_ticker=t)
            for t in ticks:
                if t in self.k_books:
                    self._k_send_snapshot(c, s, t, cid)
            return
        for t in ticks:
            if action == "add_markets" and not self._k_market_ok(t):
                return self._k_error(c, cid, 16, "Market not found", market_ticker=t)
        if s.markets is None:
            s.markets = set()
        if action == "add_markets":
            new = [t for t in ticks if t not in s.markets]
            s.markets.update(new)
            s.seq += 1
            c.put(_enc({"id": cid, "sid": s.sid, "seq": s.seq, "type": "ok",
                        "msg": {"market_tickers": sorted(s.markets)}}).decode())
            if s.channel == "orderbook_delta":
                for t in new:
                    self._k_send_snapshot(c, s, t)
        else:
            for t in ticks:
                s.markets.discard(t)
                s.awaiting.discard(t)
            s.seq += 1
            c.put(_enc({"id": cid, "sid": s.sid, "seq": s.seq, "type": "ok",
                        "msg": {"market_tickers": sorted(s.markets)}}).decode())

    async def _k_session(self, c: _Conn) -> None:
        pinger = asyncio.create_task(self._k_pinger(c))
        try:
            async for raw in c.ws:
                self._k_command(c, raw)
        finally:
            pinger.cancel()

    async def _k_pinger(self, c: _Conn) -> None:
        with contextlib.suppress(ConnectionClosed, asyncio.CancelledError):
            while c.alive:
                await asyncio.sleep(self.ping_interval)
                if self._stalled_until > time.monotonic():
                    continue
                await c.ws.ping(b"heartbeat")

    # ------------------------------------------------------------------------------------------ HTTP

    def _process_request(self, connection: ServerConnection, request):
        path, _, query = request.path.partition("?")
        if self.source == "kalshi" and (path == REST_PREFIX or path.startswith(REST_PREFIX + "/")):
            self.counters["rest_requests"] += 1
            try:
                return self._rest(path[len(REST_PREFIX):], urllib.parse.parse_qs(query))
            except Exception as e:  # noqa: BLE001
                self.log.warning("rest_error", path=path, error=str(e))
                return _json_response(400, {"error": {"code": "bad_request", "message": str(e)}})
        if self.source == "kalshi":
            if path != WS_PATH:
                return _json_response(404, {"error": {"code": "not_found", "message": path}})
            try:
                kalshi_auth.verify_headers(request.headers, self.kalshi_public_key, "GET", WS_PATH,
                                           max_skew_ms=self.auth_max_skew_ms)
            except kalshi_auth.KalshiAuthError as e:
                self.counters["auth_rejected"] += 1
                self.log.info("auth_rejected", reason=str(e))
                return _json_response(401, {"error": {"code": "authentication_error", "message": str(e)}})
        return None

    def _at_present(self, m: KalshiMarketSpec) -> KalshiMarketSpec:
        """The contract as REST shows it: its times moved by the same base shift as the frames."""
        b = self._base_shift_ns
        return dataclasses.replace(m, open_ns=m.open_ns + b, close_ns=m.close_ns + b) if b else m

    def _market_obj(self, m: KalshiMarketSpec) -> dict:
        o = market_object(self._at_present(m), self.clock_ns + self._base_shift_ns)
        if m.floor_strike is None:
            for k in ("floor_strike", "cap_strike", "strike_type"):
                o.pop(k, None)
            o["title"] = m.ticker
        return o

    @staticmethod
    def _page(items: list, q: dict, default: int, cap: int) -> tuple[list, str]:
        limit = int((q.get("limit") or [default])[0])
        limit = max(1, min(limit, cap))
        cur = (q.get("cursor") or [""])[0]
        off = int(base64.urlsafe_b64decode(cur.encode()).decode()) if cur else 0
        page = items[off:off + limit]
        nxt = off + limit
        return page, base64.urlsafe_b64encode(str(nxt).encode()).decode() if nxt < len(items) else ""

    def _status_ok(self, m: KalshiMarketSpec, wanted: set | None) -> bool:
        if not wanted:
            return True
        t = self.clock_ns
        st = "unopened" if t < m.open_ns else ("open" if t < m.close_ns else "closed")
        return st in wanted or (st == "closed" and "settled" in wanted and t >= m.close_ns + 3600 * 10**9)

    def _rest(self, path: str, q: dict) -> Response:
        parts = [p for p in path.split("/") if p]

        def one(k):
            v = q.get(k)
            return v[0] if v else None

        wanted = set(one("status").split(",")) if one("status") else None
        mk = sorted(self.k_markets.values(), key=lambda m: (m.open_ns, m.ticker))
        if parts == ["markets"]:
            ser, ev = one("series_ticker"), one("event_ticker")
            ticks = set(one("tickers").split(",")) if one("tickers") else None
            sel = [m for m in mk if (not ser or m.series_ticker == ser) and (not ev or m.event_ticker == ev)
                   and (ticks is None or m.ticker in ticks) and self._status_ok(m, wanted)
                   and (one("min_close_ts") is None or m.close_ns + self._base_shift_ns >= int(one("min_close_ts")) * 10**9)
                   and (one("max_close_ts") is None or m.close_ns + self._base_shift_ns <= int(one("max_close_ts")) * 10**9)]
            page, cur = self._page(sel, q, 100, 1000)
            return _json_response(200, {"cursor": cur, "markets": [self._market_obj(m) for m in page]})
        if len(parts) == 2 and parts[0] == "markets":
            m = self.k_markets.get(parts[1])
            if m is None:
                return _json_response(404, {"error": {"code": "not_found", "message": "market not found"}})
            return _json_response(200, {"market": self._market_obj(m)})
        if len(parts) == 3 and parts[0] == "markets" and parts[2] == "orderbook":
            if parts[1] not in self.k_markets and parts[1] not in self.k_books:
                return _json_response(404, {"error": {"code": "not_found", "message": "market not found"}})
            msg = self._k_snapshot_msg(parts[1], False)
            depth = int(one("depth") or 0)
            ob = {}
            for side in ("yes", "no"):
                lv = msg.get(f"{side}_dollars_fp", [])
                ob[f"{side}_dollars"] = lv[-depth:] if depth else lv
            return _json_response(200, {"orderbook_fp": ob})
        if parts == ["events"]:
            ser = one("series_ticker")
            nested = (one("with_nested_markets") or "").lower() == "true"
            events: dict[str, list] = {}
            for m in mk:
                if (not ser or m.series_ticker == ser):
                    events.setdefault(m.event_ticker, []).append(m)
            out = []
            for ev, ms in events.items():
                ms_ok = [m for m in ms if self._status_ok(m, wanted)]
                if wanted and not ms_ok:
                    continue
                o = {"event_ticker": ev, "series_ticker": ms[0].series_ticker, "title": ev,
                     "strike_date": self._market_obj(ms[0])["close_time"], "mutually_exclusive": True}
                if nested:
                    o["markets"] = [self._market_obj(m) for m in ms_ok or ms]
                out.append(o)
            page, cur = self._page(out, q, 100, 200)
            return _json_response(200, {"cursor": cur, "events": page})
        if len(parts) == 2 and parts[0] == "series":
            if not any(m.series_ticker == parts[1] for m in mk):
                return _json_response(404, {"error": {"code": "not_found", "message": "series not found"}})
            return _json_response(200, {"series": {"ticker": parts[1], "frequency": "hourly",
                                                   "title": f"{parts[1]} price range", "category": "Crypto"}})
        if parts == ["exchange", "status"]:
            return _json_response(200, {"exchange_active": True, "trading_active": True})
        return _json_response(404, {"error": {"code": "not_found", "message": "/".join(parts)}})

    # ------------------------------------------------------------------------------------------ WS handler

    async def _handler(self, ws: ServerConnection) -> None:
        self._next_cid += 1
        c = _Conn(self, ws, self._next_cid)
        self._conns.add(c)
        self.counters["connections"] += 1
        self.log.info("client_connected", conn=c.id, peer=str(ws.remote_address))
        wt = asyncio.create_task(c.writer())
        try:
            if self.source == "coinbase":
                await self._cb_session(c)
            else:
                await self._k_session(c)
        except ConnectionClosed:
            pass
        finally:
            c.alive = False
            self._conns.discard(c)
            self._update_client_event()
            c.q.put_nowait(_STOP)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(wt, 2)
            wt.cancel()
            self.log.info("client_disconnected", conn=c.id, close_code=ws.close_code)


# ---------------------------------------------------------------------------------------------- helpers


_LOOP_TRADE_ID_STEP = 10**12  # Coinbase trade ids on a looped pass: above every id of the passes before


_SHIFTED: dict[tuple[str, int], str | None] = {}  # (whole-second prefix, shift) -> shifted prefix


def _shift_rfc3339(s: str, shift_ns: int) -> str:
    """An RFC 3339 UTC time moved by a whole number of seconds, its fraction kept as written (one
    conversion per distinct second: looped passes run at full replay speed). A time that does not
    parse is sent as it is: the collector's own checks deal with it."""
    if len(s) < 20 or s[-1] not in "Zz" or s[19] not in ".Zz":
        return s
    key = (s[:19], shift_ns)
    head = _SHIFTED.get(key)
    if head is None and key not in _SHIFTED:
        try:
            t = parse_ts(s[:19] + "Z")
            head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((t + shift_ns) // 10**9))
        except (ValueError, IndexError):
            head = None
        if len(_SHIFTED) > 100_000:
            _SHIFTED.clear()
        _SHIFTED[key] = head
    return s if head is None else head + s[19:]


def _parse_time_ns(s) -> int:
    if isinstance(s, (int, float)):
        return int(s * 10**9) if s < 10**12 else int(s)
    t = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


def _strike(ticker: str) -> float | None:
    last = ticker.rsplit("-", 1)[-1]
    if last[:1] in ("B", "T"):
        try:
            return float(last[1:])
        except ValueError:
            return None
    return None


def _ticker_close_ns(ticker: str) -> int | None:
    """Close time encoded in the event part (YYMONDDHH[MM], US Eastern)."""
    m = _TICKER_RE.match(ticker)
    if not m or m.group(2) not in _MONTHS:
        return None
    yy, mon, dd, hh, mm = m.groups()
    try:
        local = dt.datetime(2000 + int(yy), _MONTHS.index(mon) + 1, int(dd), int(hh), int(mm or 0),
                            tzinfo=US_EASTERN, fold=1)  # an hour that repeats (November): its second pass, EST
    except ValueError:
        return None
    return int(local.timestamp()) * 10**9


# ---------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine replay-exchange",
                                 description="Serve a capture over a local WebSocket in the exchange's protocol.")
    ap.add_argument("--source", choices=("coinbase", "kalshi"), required=True)
    ap.add_argument("--capture", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible, X = X times real time")
    ap.add_argument("--faults", default="", help="comma separated, e.g. drop@100,stall@500:3,close@800")
    ap.add_argument("--kalshi-public-key", default=None, help="PEM file; WS auth signatures must verify")
    ap.add_argument("--loop", action="store_true", help="play the capture again when it ends, as fresh data: exchange times moved on by whole capture lengths, new trade ids")
    ap.add_argument("--as-recorded", action="store_true",
                    help="send the capture's own exchange times (default: moved by whole seconds to the present)")
    a = ap.parse_args(argv)
    faults = [f for f in a.faults.split(",") if f.strip()]
    for f in faults:
        parse_fault(f)

    async def main() -> int:
        srv = ReplayServer(a.source, a.capture, host=a.host, port=a.port, speed=a.speed, faults=faults,
                           kalshi_public_key=a.kalshi_public_key, loop_capture=a.loop,
                           at_present=not a.as_recorded)
        await srv.start()
        print(f"replay-exchange {a.source} listening on {srv.ws_url}"
              + (f" (REST {srv.rest_url})" if srv.rest_url else ""), file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await srv.stop()
        return 0

    return asyncio.run(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli(sys.argv[1:]))
