"""Replay exchange core: serves a capture over a real local WebSocket in the exchange's own protocol.

The exchange's protocol (subscribe handshake, snapshots, sequence numbers, REST) is a
`ReplayProtocol` looked up by source name in `engine.sim.registry` (built in: `coinbase`,
`kalshi`, `kraken`; see their modules for what each says). This core is the same for every exchange:

One playback clock per server: it advances while at least one client is subscribed (paused
otherwise), at `speed` × real time from the captures' `recv_ns` spacing (0 = as fast as possible).
With `at_present` (the default), exchange times are moved by whole seconds so that the capture's
first frame reads as happening now (REST open/close times move with them): a capture recorded or
generated on another day is still fresh data to a collector, which refuses exchange times a day
away from its receive time. `stats()["shift_ns"]` is that shift.
With `loop_capture`, each pass after the first moves the exchange times of the frames it sends
forward by whole capture lengths and gives its trades new ids, so a looped capture reads as fresh
data (not the same minutes again, nor trades a collector drops as duplicates); the REST answers
follow the capture's own clock with their times moved like the frames', so contracts reopen on
each pass, at that pass's times.

Faults (`inject()` at runtime from any thread, or `faults=["drop@100", "stall@500:3", "close@800"]`
keyed by the capture frame index): `drop[:N]` (the next N frames are not sent but consume sequence
numbers → the client sees a jump), `seq_jump[:N]` (sequence numbers jump by N, default 5),
`malformed[:N]` (N non-JSON frames), `stall:SECONDS` (nothing sent, no pings), `close` (TCP abort),
`corrupt[:N]` (the next N book messages carry a damaged level under their original checksum; the
protocol does it, for a venue that sends book checksums).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from engine.log import get_logger
from engine.sim import registry
from engine.sim.capture import read_capture
from engine.sim.replay.conn import ABORT, STOP, Conn
from engine.sim.replay.faults import MALFORMED_FRAMES, parse_fault
from engine.sim.replay.protocol import json_response

__all__ = ["ABORT", "STOP", "Conn", "ReplayServer"]


class ReplayServer:
    conn_cls: type[Conn] = Conn  # a subclass may count or alter what each connection is sent

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
        sim = registry.get(source)  # ValueError naming the known sources
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
        self.kalshi_public_key = kalshi_public_key  # the protocol that verifies auth loads a PEM path
        self.markets = markets  # REST market list for protocols that serve one (default: from the capture)
        self.ws_url = ""
        self.rest_url = ""
        self.log = get_logger(component="replay", source=source)
        self.counters: dict[str, int] = dict.fromkeys(
            ("frames_read", "frames_sent", "bytes_sent", "dropped", "seq_jumps", "malformed_sent", "stalls",
             "closes", "connections", "snapshots_sent", "errors_sent", "auth_rejected", "rest_requests",
             "loops", "corrupted"), 0)
        self.done = threading.Event()  # set when the capture is exhausted (and not looping)
        self.clock_ns = 0
        self._scheduled: dict[int, list[tuple[str, float | None]]] = {}
        for f in faults or []:
            name, val, at = parse_fault(f)
            self._scheduled.setdefault(at if at is not None else 0, []).append((name, val))
        self._pending: deque = deque()
        self._drop_left = 0
        self._stalled_until = 0.0
        self._conns: set[Conn] = set()
        self._next_cid = 0
        self._server = None
        self._feed_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._have_clients: asyncio.Event | None = None
        self._wall0: float | None = None  # pacing: wall time and recv_ns of the first paced frame
        self._rec0 = 0
        self.protocol = sim.protocol(self)

    # ------------------------------------------------------------------------------------------ for protocols

    @property
    def conns(self) -> set[Conn]:
        return self._conns

    @property
    def shift_ns(self) -> int:
        """Added to the exchange times of the frames sent now: the `at_present` shift + looped passes."""
        return self._shift_ns

    @property
    def base_shift_ns(self) -> int:
        """The `at_present` shift alone (REST times move by it; looped passes do not)."""
        return self._base_shift_ns

    @property
    def shift_pass(self) -> int:
        """0 on the first pass over the capture, then 1, 2, ... (`loop_capture`)."""
        return self._shift_pass

    @property
    def stalled(self) -> bool:
        return self._stalled_until > time.monotonic()

    def records(self) -> Iterator[dict]:
        if isinstance(self.capture, (list, tuple)):
            yield from self.capture
        else:
            yield from read_capture(self.capture)

    def deliver(self, targets: list, make: Callable[[Conn, Any], str]) -> None:
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

    def clients_changed(self) -> None:
        """A client (un)subscribed: the clock runs while any connection is subscribed."""
        if self._have_clients is None:
            return
        if any(c.alive and c.subscribed for c in self._conns):
            self._have_clients.set()
        else:
            self._have_clients.clear()

    # ------------------------------------------------------------------------------------------ lifecycle

    def _prescan(self) -> None:
        first = self.protocol.prescan(self.records())
        self._first_recv = first
        self.clock_ns = first or 0
        if self.at_present and first is not None:
            # a capture recorded (or generated) on another day plays as if it were happening now:
            # collectors refuse exchange times a day away from the receive time
            self._base_shift_ns = (time.time_ns() - first) // 10**9 * 10**9
            self._shift_ns = self._base_shift_ns

    async def start(self) -> ReplayServer:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._have_clients = asyncio.Event()
        await asyncio.to_thread(self._prescan)
        self._server = await serve(
            self._handler, self.host, self.port, process_request=self._process_request,
            compression=None, ping_interval=None, max_size=1 << 20, close_timeout=2,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.ws_url = f"ws://{self.host}:{self.port}{self.protocol.ws_path}"
        if self.protocol.rest_prefix:
            self.rest_url = f"http://{self.host}:{self.port}{self.protocol.rest_prefix}"
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
            c.put(STOP)
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

    def stats(self) -> dict[str, int]:
        d = dict(self.counters)
        d["clients"] = sum(1 for c in self._conns if c.alive)
        d["clock_ns"] = self.clock_ns
        d["shift_ns"] = self._base_shift_ns
        return d

    # ------------------------------------------------------------------------------------------ faults

    def inject(self, fault: str) -> None:
        """Apply a fault now (thread-safe): drop[:N], seq_jump[:N], malformed[:N], stall:S, close, corrupt[:N]."""
        name, val, _ = parse_fault(fault)
        if self._loop is None:
            self._pending.append((name, val))
            return
        if threading.get_ident() == self._loop_thread:
            self._inject_now(name, val)
        else:
            self._loop.call_soon_threadsafe(self._inject_now, name, val)

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
                    self.protocol.jump_seq(c, k)
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
            elif name == "corrupt":
                k = n or 1
                if self.protocol.corrupt(k):
                    self.log.info("fault_corrupt", messages=k)
                else:
                    self.log.warning("fault_unsupported", fault="corrupt", reason="this exchange sends no book checksum")

    # ------------------------------------------------------------------------------------------ feed

    def _prime(self) -> tuple[list, Iterator[dict], int]:
        """Apply the capture's preamble (the protocol's `is_preamble` frames: Kalshi's acks and
        initial snapshot burst) before any client connects, so a first subscribe is answered with
        snapshots at once (Kalshi snapshots carry no timestamp, so a synthesized one is identical
        to the captured one)."""
        it = iter(self.records())
        proto = self.protocol
        if not proto.has_preamble:
            return [], it, 0
        n = 0
        for rec in it:
            meta = rec.get("meta")
            if meta is not None:
                proto.on_meta(meta)
                continue
            fr = rec.get("frame") or ""
            if not proto.is_preamble(fr) or n in self._scheduled:
                return [rec], it, n
            self.clock_ns = max(self.clock_ns, rec.get("recv_ns", 0))
            self.counters["frames_read"] += 1
            proto.on_frame(fr)
            n += 1
        return [], it, n

    async def _feed(self) -> None:
        try:
            head, it, idx = self._primed
            source: Any = chain(head, it)
            while True:
                idx = await self._play(source, idx)
                if not self.loop_capture:
                    break
                self._next_pass()
                source = self.records()
            self.log.info("replay_capture_exhausted", frames=self.counters["frames_read"])
            self.done.set()
            if self._pending:
                self._apply_pending()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("replay_feed_failed")
            self.done.set()

    def _next_pass(self) -> None:
        """`loop_capture`: the next pass's exchange times move on by the capture's length."""
        self.counters["loops"] += 1
        if self._first_recv is not None:
            # the capture's length (the clock stops at its last recv_ns), rounded up to whole s
            period = -(-(self.clock_ns - self._first_recv + 10**9) // 10**9) * 10**9
            self._shift_pass = self.counters["loops"]
            self._shift_ns = self._base_shift_ns + self._shift_pass * period
            self.clock_ns = self._first_recv  # the capture clock restarts with the pass
        else:
            self._wall0 = None
            self._rec0 = 0

    async def _play(self, records, idx: int) -> int:
        """One pass over `records` (the hot loop): wait for subscribers, apply due faults, pace at
        `speed`, hand each frame to the protocol, keep connection queues bounded. Returns the next
        frame index."""
        on_frame, on_meta = self.protocol.on_frame, self.protocol.on_meta
        counters = self.counters
        for rec in records:
            if not self._have_clients.is_set():
                t0 = time.monotonic()
                await self._have_clients.wait()
                if self._wall0 is not None:
                    self._wall0 += time.monotonic() - t0
            meta = rec.get("meta")
            if meta is not None:
                on_meta(meta)
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
                if self._wall0 is not None:
                    self._wall0 += time.monotonic() - t0
            if self.speed > 0:
                if self._wall0 is None:
                    self._wall0, self._rec0 = time.monotonic(), r
                # a looped pass is paced at its shifted times: exchange times keep up with the wall clock
                delay = (self._wall0 + (r + self._shift_ns - self._base_shift_ns - self._rec0) / 1e9 / self.speed
                         - time.monotonic())
                if delay > 0:
                    await asyncio.sleep(delay)
            self.clock_ns = max(self.clock_ns, r)
            counters["frames_read"] += 1
            idx += 1
            if frame is not None:
                try:
                    on_frame(frame)
                except Exception as e:  # a bad capture line must not kill the feed
                    self.log.warning("capture_frame_skipped", error=str(e), head=frame[:80])
            # backpressure: keep per-connection queues bounded at full speed
            for c in list(self._conns):
                while c.alive and c.q.qsize() > 2000:
                    await asyncio.sleep(0.002)
            if idx % 32 == 0:
                await asyncio.sleep(0)
        return idx

    # ------------------------------------------------------------------------------------------ WebSocket + HTTP

    def _process_request(self, connection: ServerConnection, request):
        path, _, query = request.path.partition("?")
        prefix = self.protocol.rest_prefix
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            self.counters["rest_requests"] += 1
            try:
                return self.protocol.rest(path[len(prefix):], urllib.parse.parse_qs(query))
            except Exception as e:  # noqa: BLE001
                self.log.warning("rest_error", path=path, error=str(e))
                return json_response(400, {"error": {"code": "bad_request", "message": str(e)}})
        return self.protocol.check_request(path, request)

    async def _handler(self, ws: ServerConnection) -> None:
        self._next_cid += 1
        c = self.conn_cls(self, ws, self._next_cid)
        self._conns.add(c)
        self.counters["connections"] += 1
        self.log.info("client_connected", conn=c.id, peer=str(ws.remote_address))
        wt = asyncio.create_task(c.writer())
        try:
            await self.protocol.session(c)
        except ConnectionClosed:
            pass
        finally:
            c.alive = False
            self._conns.discard(c)
            self.clients_changed()
            c.q.put_nowait(STOP)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(wt, 2)
            wt.cancel()
            self.log.info("client_disconnected", conn=c.id, close_code=ws.close_code)

    # ------------------------------------------------------------------------------------------ compatibility

    def _cb_next(self, c: Conn, text: str, d: dict) -> str:
        """Coinbase: a captured data frame's text for `c`, its `sequence_num` the connection's next.
        A hook of the one-class server that subclasses still override (the Coinbase protocol calls
        it when they do; engine_tests/test_faults.py sends duplicates through it)."""
        return self.protocol.next_frame(c, text, d)
