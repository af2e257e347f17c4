"""`data-engine collect`: the long-running collector (one asyncio task per exchange connection).

Per source a `SourceRunner` owns one WebSocket connection, the source's normalizer and `Link` (its
protocol: subscription, resync, discovery; see `engine.collect.source`) and an optional raw capture.
Frames are read on the event loop a socket read at a time (`engine.collect.wsconn`), captured,
normalized column-wise, and the accumulated chunks are handed to the Engine on a single background thread (so storage never
blocks the socket reader: Kalshi kills slow consumers with error 25).

Gaps: every reconnect records a `disconnect` (or `stale`) gap when the new connection opens; a
sequence jump records a `sequence` gap at once; a start records a `restart` gap from the lake's
last receive time. Counters go to the log every minute and atomically to {home}/status/{source}.json
(written on a thread of its own, off the event loop).
SIGTERM/SIGINT: final flush and exit 0. SIGUSR1 or the file {home}/status/flush.request: flush now.
Nothing here knows an exchange by name: every per-exchange decision is the `Source`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.collect import memory, registry, shards
from engine.collect.append import append_tables
from engine.collect.base import CHUNK_ROWS, tune_gc
from engine.collect.capture import CaptureWriter
from engine.collect.rest import rest_meta
from engine.collect.source import AuthError, Reconnect
from engine.collect.status import _atomic_write, request_flush, status_cli, status_dir  # noqa: F401 - their old address
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS
from engine.collect.wsconn import BatchConnection
from engine.log import get_logger
from engine.timeutil import NS

MAX_FRAME = 32 * 1024 * 1024
log = get_logger(component="collector")


class Backoff:
    """Jittered exponential backoff; reset once a connection has lived long enough."""

    def __init__(self, base: float = 0.5, cap: float = 30.0):
        self.base, self.cap, self.n = base, cap, 0

    def next(self) -> float:
        d = min(self.cap, self.base * (2 ** self.n))
        self.n = min(self.n + 1, 30)
        return d * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.n = 0


class SourceRunner:
    def __init__(self, source: str, eng, cfg: argparse.Namespace, appender: ThreadPoolExecutor):
        self.source = source
        self.eng = eng
        self.cfg = cfg
        self.appender = appender
        self.log = get_logger(component="collector", source=source)
        self.src = src = registry.get(source)
        skew = int(cfg.max_skew * NS) if cfg.max_skew else DEFAULT_MAX_SKEW_NS
        self.markets = src.markets(cfg)
        self.norm = src.normalizer(self.markets, max_skew_ns=skew)
        self.url = src.url(cfg)
        self.stall_s = src.stall_limit(cfg)
        self.lock = threading.RLock()
        self.capture = CaptureWriter(Path(cfg.capture_dir), source, compress=not cfg.capture_plain) if cfg.capture_dir else None
        self.conn_id = 0
        self.reconnects = 0
        self.backoff = Backoff(cfg.backoff_base, cfg.backoff_max)
        self.auth_problem: str | None = None  # why the credentials cannot sign, already logged
        self.ws = None
        self.last_frame = time.monotonic()
        self.close_reason: str | None = None
        self.connected_since: float | None = None
        self.pending_futures: list = []
        self.started_ns = time.time_ns()
        self._rest_last: dict[str, bytes] = {}  # request key -> digest of its last answer (see rest())
        self.rest_unchanged = 0
        self._status_write = None  # the status file write under way on the status thread
        self.link = src.link(self)

    # ---- shared helpers -----------------------------------------------------------------------
    def submit_rows(self, flush: bool = False) -> None:
        with self.lock:
            tables = self.norm.take()
        if tables:
            self.pending_futures.append(self.appender.submit(self._append, tables))
        if flush:
            self.pending_futures.append(self.appender.submit(self.eng.flush))
        self._reap()

    def _append(self, tables: dict) -> int:
        try:
            return append_tables(self.eng, tables)
        except Exception as e:  # noqa: BLE001 - never lose the collector to one bad batch; logged
            self.log.error("append_failed", error=repr(e)[:500], tables={k: v.num_rows for k, v in tables.items()})
            return 0

    def _reap(self) -> None:
        fs = self.pending_futures
        if len(fs) > 64:
            self.pending_futures = [f for f in fs if not f.done()]

    def rest(self, name: str, body: str, key: str | None = None) -> bool:
        """A REST answer the Link fetched (reference data): recorded in the capture as a `rest` meta
        line and handed to the normalizer, as `ingest` does with that line (live == offline).
        `key` names the request (e.g. its URL): an answer equal to the last one of the same key says
        nothing new and is neither recorded nor normalized, so a poll costs no capture space until
        something changes. Returns whether the answer was taken."""
        if key is not None:
            digest = hashlib.blake2b(body.encode(), digest_size=16).digest()
            if self._rest_last.get(key) == digest:
                self.rest_unchanged += 1
                return False
            if len(self._rest_last) >= 4096:  # bounded: the oldest request key goes
                self._rest_last.pop(next(iter(self._rest_last)))
            self._rest_last[key] = digest
        now = time.time_ns()
        with self.lock:
            if self.capture:
                self.capture.meta(now, rest_meta(name, body))
            try:
                self.norm.rest(now, name, body)
            except Exception as e:  # noqa: BLE001 - a normalizer bug must not stop collection
                self.norm.skip(body, f"internal_error: {type(e).__name__}", e)
                self.log.exception("normalizer_error", rest=name)
        return True

    def restart_gap(self) -> None:
        last = self.eng.last_recv_ts(self.source)
        if last is None:
            return
        now = time.time_ns()
        with self.lock:
            self.norm.restart_gaps(self.markets, last, now, "collector restart: no data between the last stored row and this start")
        self.submit_rows()

    def status(self) -> dict[str, Any]:
        self.norm.c.last_recv_ns = self.norm.last_frame_recv
        c = self.norm.c.as_dict()
        c.update(
            source=self.source,
            pid=os.getpid(),
            updated_ns=time.time_ns(),
            started_ns=self.started_ns,
            connected=self.ws is not None,
            connection=self.conn_id,
            reconnects=self.reconnects,
            rows=c["rows_l2"] + c["rows_trades"],
            pending_appends=sum(1 for f in self.pending_futures if not f.done()),
            rest_unchanged=self.rest_unchanged,
        )
        c.update(self.link.status())
        return c

    def write_status(self, home: str, writer: ThreadPoolExecutor | None = None) -> None:
        """The counters to {home}/status/{source}.json (atomically) and the log. With `writer`, the
        file is written (and synced) on that thread, off the event loop; a write still under way
        there makes this one skipped (the next interval's is fresher)."""
        st = self.status()
        text = json.dumps(st, indent=1, sort_keys=True)
        path = status_dir(home) / f"{self.source}.json"
        if writer is None:
            _atomic_write(path, text)
        elif self._status_write is None or self._status_write.done():
            self._status_write = writer.submit(self._write_status_file, path, text)
        self.log.info("counters", **{k: v for k, v in st.items() if k not in ("skip_reasons",)}, skip_reasons=st["skip_reasons"])

    def _write_status_file(self, path: Path, text: str) -> None:
        try:
            _atomic_write(path, text)
        except OSError as e:  # a full disk must not stop collection; the next interval tries again
            self.log.warning("status_write_failed", error=repr(e)[:200])

    # ---- connection ---------------------------------------------------------------------------
    def _auth_failed(self, e: Exception) -> str:
        """Log why the credentials cannot sign once (again only if the cause changes); run() then waits
        the longest backoff between attempts, asking the source again each time so a fix is picked up."""
        problem = e.problem if isinstance(e, AuthError) else f"cannot sign requests: {type(e).__name__}"
        if problem != self.auth_problem:
            self.log.error(f"{self.source}_key_unusable", **self.src.auth_fields(self.cfg), problem=problem,
                           retry_every_s=self.backoff.cap, hint="fix the file; the collector retries without restarting")
        self.auth_problem = problem
        return f"auth: {problem}"

    async def run(self, stop: asyncio.Event) -> None:
        self.restart_gap()
        tasks = [asyncio.create_task(c) for c in self.link.tasks(stop)]
        try:
            while not stop.is_set():
                try:
                    reason = await self._session(stop)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - keep the connection loop alive whatever happens
                    self.log.exception("session_failed")
                    reason = f"disconnect: session failed: {type(e).__name__}: {str(e)[:200]}"
                    if self.ws is not None:
                        self.ws = None
                        await self._on_close(reason)
                if stop.is_set():
                    break
                if self.connected_since is not None and time.monotonic() - self.connected_since > 10.0:
                    self.backoff.reset()
                delay = self.backoff.next()
                if self.auth_problem is not None:  # a bad key does not fix itself: slowest retry, logged once
                    delay = self.backoff.cap
                    self.log.debug("reconnecting", reason=reason, delay_s=round(delay, 3))
                else:
                    self.log.warning("reconnecting", reason=reason, delay_s=round(delay, 3))
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            for t in tasks:
                t.cancel()

    async def _session(self, stop: asyncio.Event) -> str:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        self.close_reason = None
        self.connected_since = None
        try:
            headers = self.src.auth_headers(self.cfg)
        except Exception as e:  # noqa: BLE001 - a bad key must not stop the other sources
            return self._auth_failed(e)
        if self.auth_problem is not None:
            self.log.info(f"{self.source}_key_ok", **self.src.auth_fields(self.cfg))
            self.auth_problem = None
        ping = self.src.ping_interval
        reason = "closed"
        try:
            async with connect(
                self.url, max_size=MAX_FRAME, additional_headers=headers, open_timeout=10, ping_interval=ping,
                ping_timeout=20, close_timeout=2, max_queue=4096, create_connection=BatchConnection,
            ) as ws:
                try:
                    await self._on_open(ws)
                    reason = await self._read(ws, stop)
                except ConnectionClosed as e:
                    reason = f"disconnect: connection closed ({e.rcvd.code if e.rcvd else 'no close frame'})"
                finally:
                    if self.close_reason is not None:
                        reason = self.close_reason
                    elif stop.is_set():
                        reason = "shutdown"
                    if self.ws is not None:
                        self.ws = None
                        await self._on_close(reason)
                return reason
        except Reconnect as e:
            return str(e)
        except ConnectionClosed as e:
            reason = self.close_reason or f"disconnect: connection closed ({e.rcvd.code if e.rcvd else 'no close frame'})"
        except (OSError, asyncio.TimeoutError, InvalidHandshake) as e:
            reason = f"disconnect: connect failed: {type(e).__name__}: {str(e)[:200]}"
            self.log.warning("connect_failed", error=reason)
        return reason

    async def _on_open(self, ws) -> None:
        self.ws = ws
        self.conn_id += 1
        if self.conn_id > 1:
            self.reconnects += 1
            self.norm.c.reconnects = self.reconnects
        now = time.time_ns()
        self.last_frame = time.monotonic()
        self.connected_since = time.monotonic()
        meta = {"type": "connect", "source": self.source, "conn": self.conn_id, **self.src.connect_meta(self.cfg)}
        with self.lock:
            if self.capture:
                self.capture.meta(now, meta)
            self.norm.on_connect(now, conn=self.conn_id, **self.src.connect_kwargs(meta))
        self.log.info("connected", url=self.url, conn=self.conn_id)
        await self.link.on_open(ws)

    async def _on_close(self, reason: str) -> None:
        now = time.time_ns()
        with self.lock:
            if self.capture:
                self.capture.meta(now, {"type": "disconnect", "conn": self.conn_id, "reason": reason})
            self.norm.on_disconnect(now, reason)
        self.submit_rows()
        self.log.warning("disconnected", conn=self.conn_id, reason=reason)

    async def _read(self, ws, stop: asyncio.Event) -> str:
        """Read until the connection ends. Every socket read's messages come as one batch (see
        `wsconn`): captured and normalized under one lock acquisition, in order; a normalizer's
        action is carried out before the messages after the one that asked for it."""
        from websockets.exceptions import ConnectionClosedOK

        watchdog = asyncio.create_task(self._watchdog(ws))
        ws.tick_s = getattr(self.cfg, "read_tick_ms", 2.0) / 1000
        norm = self.norm
        l2, trades = norm.l2, norm.trades
        try:
            while True:
                try:
                    batches = await ws.take()
                except ConnectionClosedOK:
                    break
                self.last_frame = time.monotonic()
                for now, frames in batches:
                    i, n = 0, len(frames)
                    while i < n:
                        i = self._feed(now, frames, i)
                        if norm.actions:
                            await self._act(ws, norm.pop_actions())
                if l2.rows >= CHUNK_ROWS or trades.rows >= CHUNK_ROWS:
                    self.submit_rows()
            return self.close_reason or "disconnect: server closed the connection"
        except Reconnect as e:
            self.close_reason = str(e)
            return str(e)
        finally:
            watchdog.cancel()
            if self.close_reason is not None:
                try:
                    await asyncio.wait_for(ws.close(), 2)
                except Exception:  # noqa: BLE001
                    pass

    def _feed(self, recv_ns: int, frames: list, i: int) -> int:
        """Capture and normalize `frames[i:]` up to the first that asks for an action; returns the
        index after the last one fed."""
        norm = self.norm
        feed = norm.feed
        n, start = len(frames), i
        with self.lock:
            while i < n:
                frame = frames[i]
                i += 1
                try:
                    feed(recv_ns, frame)
                except Exception as e:  # noqa: BLE001 - a normalizer bug must not stop collection
                    norm.skip(frame, f"internal_error: {type(e).__name__}", e)
                    self.log.exception("normalizer_error")
                if norm.actions:
                    break
            if self.capture is not None:
                self.capture.frames(recv_ns, frames if start == 0 and i == n else frames[start:i])
        return i

    async def _watchdog(self, ws) -> None:
        while True:
            await asyncio.sleep(min(0.25, self.stall_s / 4))
            silent = time.monotonic() - self.last_frame
            if silent > self.stall_s:
                self.close_reason = f"stale: no frame for {silent:.1f} s (limit {self.stall_s} s)"
                self.log.warning("stale_feed", silent_s=round(silent, 2))
                try:
                    await asyncio.wait_for(ws.close(), 2)
                except Exception:  # noqa: BLE001
                    pass
                try:  # make sure the reader wakes up even if the close handshake hangs
                    ws.transport.abort()
                except Exception:  # noqa: BLE001
                    pass
                return
            overdue = self.link.overdue()  # e.g. a snapshot request not answered in time
            if overdue is not None:
                self.close_reason = overdue
                await ws.close()
                return

    async def _act(self, ws, actions) -> None:
        for a in actions:
            if a.kind == "reconnect":
                raise Reconnect(a.args.get("reason", "resync"))
            await self.link.act(ws, a)  # the source's resync policy: get_snapshot, exchange errors

    # ---- shutdown -----------------------------------------------------------------------------
    def final(self) -> None:
        with self.lock:
            if self.ws is not None or self.norm.conn is not None:
                now = time.time_ns()
                if self.capture:
                    self.capture.meta(now, {"type": "disconnect", "conn": self.conn_id, "reason": "shutdown"})
                self.norm.on_disconnect(now, "shutdown")
        self.submit_rows()
        if self.capture:
            self.capture.close()


class Collector:
    """Runs the requested sources against one Engine until stopped."""

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.home = cfg.home
        self.runners: list[SourceRunner] = []
        self.appender = ThreadPoolExecutor(1, thread_name_prefix="append")
        self.status_writer = ThreadPoolExecutor(1, thread_name_prefix="status")  # status files, off the event loop
        self.eng = None
        self.stop: asyncio.Event | None = None
        self.pid_file = status_dir(self.home) / f"collector-{os.getpid()}.pid"

    def _sources(self) -> list[str]:
        out = []
        for s in self.cfg.source:
            reason = registry.get(s).unusable(self.cfg)
            if reason is not None:
                log.warning(f"{s}_skipped", reason=reason)
                continue
            if s not in out:
                out.append(s)
        return out

    def request_flush_now(self) -> None:
        log.info("flush_requested")
        for r in self.runners:
            r.submit_rows()
        self.appender.submit(self.eng.flush)

    async def _housekeeping(self) -> None:
        ctl = status_dir(self.home) / "flush.request"
        last_status = last_release = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            if time.monotonic() - last_release >= memory.RELEASE_EVERY_S:  # on the append thread: off the loop
                last_release = time.monotonic()
                self.appender.submit(memory.release)
            for r in self.runners:
                if r.norm.rows_pending():
                    r.submit_rows()
                if r.capture:
                    with r.lock:
                        r.capture.flush()
            if ctl.exists():
                try:
                    ctl.unlink()
                except OSError:
                    pass
                self.request_flush_now()
            if time.monotonic() - last_status >= self.cfg.status_interval:
                last_status = time.monotonic()
                for r in self.runners:
                    r.write_status(self.home, self.status_writer)

    async def main(self) -> int:
        from engine.api import Engine

        sources = self._sources()
        if not sources:
            log.error("nothing_to_collect", requested=self.cfg.source)
            return 1
        log.info("memory_tuned", **memory.tune())
        self.eng = Engine.open(home=self.home, writer=True, book_anchors=True)
        tune_gc()
        self.runners = [SourceRunner(s, self.eng, self.cfg, self.appender) for s in sources]
        for r in self.runners:
            r.src.seed(self.eng, r.norm)
        _atomic_write(self.pid_file, str(os.getpid()))
        loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
            loop.add_signal_handler(signal.SIGUSR1, self.request_flush_now)
        except (RuntimeError, ValueError):  # not the main thread (embedded use): no signals
            log.info("signals_not_installed")
        tasks = [asyncio.create_task(r.run(self.stop), name=f"conn-{r.source}") for r in self.runners]
        hk = asyncio.create_task(self._housekeeping())
        log.info("collector_started", sources=sources, home=str(self.home), pid=os.getpid())
        try:
            if self.cfg.duration:
                try:
                    await asyncio.wait_for(self.stop.wait(), self.cfg.duration)
                except asyncio.TimeoutError:
                    pass
            else:
                await self.stop.wait()
        finally:
            self.stop.set()
            hk.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, hk, return_exceptions=True)
            for r in self.runners:
                r.final()
            self.appender.shutdown(wait=True)
            self.eng.close()
            self.status_writer.shutdown(wait=True)  # then the last status, written here: it has the final counters
            for r in self.runners:
                r.write_status(self.home)
            try:
                self.pid_file.unlink()
            except OSError:
                pass
            log.info("collector_stopped", sources=sources, peak_rss_mb=memory.peak_rss_mb())
        return 0


def build_parser() -> argparse.ArgumentParser:
    names = registry.names()
    ap = argparse.ArgumentParser(prog="data-engine collect", description=f"Collect {', '.join(names)} market data into the lake.")
    ap.add_argument("--source", nargs="+", choices=names, default=names)
    ap.add_argument("--capture-dir", default=None, help="write raw frames here (hourly files)")
    ap.add_argument("--capture-plain", action="store_true", help="plain .jsonl captures instead of .jsonl.zst")
    ap.add_argument("--home", default=os.environ.get("ENGINE_HOME", "./lake"))
    ap.add_argument("--for", dest="duration", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--max-skew", type=float, default=None, help="seconds an exchange timestamp may differ from recv")
    ap.add_argument("--backoff-base", type=float, default=0.5)
    ap.add_argument("--backoff-max", type=float, default=30.0)
    ap.add_argument("--status-interval", type=float, default=60.0)
    ap.add_argument("--read-tick-ms", type=float, default=2.0,
                    help="read each socket at most once per this many ms (a busy feed in a few large reads; 0 = every message at once)")
    for name in names:  # each source's own options: markets, URL, stall limit, ...
        registry.get(name).add_arguments(ap)
    shards.add_arguments(ap)
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(cfg: argparse.Namespace) -> int:
    try:
        shards.configure(cfg)  # --shard-id/--shards: this shard's markets; the home records its id
    except ValueError as e:
        log.error("shard_config_refused", error=str(e))
        print(f"data-engine collect: error: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(Collector(cfg).main())


def cli(argv: list[str]) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli(sys.argv[1:]))
