"""`data-engine collect`: the long-running collector (one asyncio task per exchange connection).

Per source a `SourceRunner` owns one WebSocket connection, a normalizer (engine.collect.sources.*) and an
optional raw capture. Frames are read on the event loop, captured, normalized column-wise, and the
accumulated chunks are handed to the Engine on a single background thread (so storage never
blocks the socket reader: Kalshi kills slow consumers with error 25).

Gaps: every reconnect records a `disconnect` (or `stale`) gap when the new connection opens; a
sequence jump records a `sequence` gap at once; a start records a `restart` gap from the lake's
last receive time. Counters go to the log every minute and atomically to {home}/status/{source}.json.
SIGTERM/SIGINT: final flush and exit 0. SIGUSR1 or the file {home}/status/flush.request: flush now.
"""

from __future__ import annotations

import argparse
import asyncio
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

from engine.collect.append import append_tables, seed_coinbase_trades
from engine.collect.capture import CaptureWriter
from engine.collect.sources import CHUNK_ROWS, DEFAULT_MAX_SKEW_NS, make_normalizer, tune_gc
from engine.collect.sources import coinbase as cb
from engine.collect.sources import kalshi as ks
from engine.log import get_logger
from engine.timeutil import NS

MAX_FRAME = 32 * 1024 * 1024
log = get_logger(component="collector")


class _Reconnect(Exception):
    pass


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


def status_dir(home: str | os.PathLike) -> Path:
    return Path(home) / "status"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SourceRunner:
    def __init__(self, source: str, eng, cfg: argparse.Namespace, appender: ThreadPoolExecutor):
        self.source = source
        self.eng = eng
        self.cfg = cfg
        self.appender = appender
        self.log = get_logger(component="collector", source=source)
        skew = int(cfg.max_skew * NS) if cfg.max_skew else DEFAULT_MAX_SKEW_NS
        if source == "coinbase":
            self.products = list(cfg.products)
            self.norm = make_normalizer(source, max_skew_ns=skew, products=self.products)
            self.url = cfg.coinbase_url
            self.stall_s = cfg.coinbase_stall
        else:
            self.series = list(cfg.series)
            self.norm = make_normalizer(source, max_skew_ns=skew, series=self.series)
            self.url = cfg.kalshi_url
            self.stall_s = cfg.kalshi_stall
            self.desired: set[str] = set()
            self.subscribed: set[str] = set()
            self.cmd_id = 0
            self.discovered_once = asyncio.Event()
            self.snapshot_requested: dict[int, float] = {}
            self.markets_added = 0
            self.markets_dropped = 0
        self.lock = threading.RLock()
        self.capture = CaptureWriter(Path(cfg.capture_dir), source, compress=not cfg.capture_plain) if cfg.capture_dir else None
        self.conn_id = 0
        self.reconnects = 0
        self.backoff = Backoff(cfg.backoff_base, cfg.backoff_max)
        self.auth_problem: str | None = None  # why the Kalshi key cannot sign, already logged
        self.ws = None
        self.last_frame = time.monotonic()
        self.close_reason: str | None = None
        self.connected_since: float | None = None
        self.pending_futures: list = []
        self.started_ns = time.time_ns()

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

    def restart_gap(self) -> None:
        last = self.eng.last_recv_ts(self.source)
        if last is None:
            return
        now = time.time_ns()
        markets = self.products if self.source == "coinbase" else self.series
        with self.lock:
            self.norm.restart_gaps(markets, last, now, "collector restart: no data between the last stored row and this start")
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
        )
        if self.source == "kalshi":
            c["subscribed_markets"] = len(self.subscribed)
            c["markets_added"] = self.markets_added
            c["markets_dropped"] = self.markets_dropped
        return c

    def write_status(self, home: str) -> None:
        st = self.status()
        _atomic_write(status_dir(home) / f"{self.source}.json", json.dumps(st, indent=1, sort_keys=True))
        self.log.info("counters", **{k: v for k, v in st.items() if k not in ("skip_reasons",)}, skip_reasons=st["skip_reasons"])

    # ---- connection ---------------------------------------------------------------------------
    def _headers(self) -> dict[str, str] | None:
        if self.source != "kalshi":
            return None
        from engine.collect.kalshi_auth import load_private_key, sign_headers

        key = load_private_key(self.cfg.kalshi_key_path)
        return sign_headers(self.cfg.kalshi_key_id, key, "GET", ks.WS_SIGN_PATH)

    def _auth_failed(self, e: Exception) -> str:
        """Log why the key cannot sign once (again only if the cause changes); run() then waits the
        longest backoff between attempts, re-reading the file each time so a fixed key is picked up."""
        from engine.collect.kalshi_auth import KalshiKeyError

        problem = e.problem if isinstance(e, KalshiKeyError) else f"cannot sign requests: {type(e).__name__}"
        if problem != self.auth_problem:
            self.log.error("kalshi_key_unusable", key_path=self.cfg.kalshi_key_path, problem=problem,
                           retry_every_s=self.backoff.cap, hint="fix the file; the collector retries without restarting")
        self.auth_problem = problem
        return f"auth: {problem}"

    async def run(self, stop: asyncio.Event) -> None:
        self.restart_gap()
        tasks = []
        if self.source == "kalshi":
            tasks.append(asyncio.create_task(self._discovery_loop(stop)))
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
            headers = self._headers()
        except Exception as e:  # noqa: BLE001 - a bad key must not stop the other sources
            return self._auth_failed(e)
        if self.auth_problem is not None:
            self.log.info("kalshi_key_ok", key_path=self.cfg.kalshi_key_path)
            self.auth_problem = None
        ping = 10.0 if self.source == "kalshi" else 20.0
        reason = "closed"
        try:
            async with connect(
                self.url, max_size=MAX_FRAME, additional_headers=headers, open_timeout=10, ping_interval=ping,
                ping_timeout=20, close_timeout=2, max_queue=4096,
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
        except _Reconnect as e:
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
        meta = {"type": "connect", "source": self.source, "conn": self.conn_id}
        if self.source == "kalshi":
            meta["use_yes_price"] = self.cfg.use_yes_price
        with self.lock:
            if self.capture:
                self.capture.meta(now, meta)
            kw = {"use_yes_price": self.cfg.use_yes_price} if self.source == "kalshi" else {}
            self.norm.on_connect(now, conn=self.conn_id, **kw)
        self.log.info("connected", url=self.url, conn=self.conn_id)
        if self.source == "coinbase":
            for m in cb.subscribe_messages(self.products):
                await ws.send(m)
        else:
            self.subscribed = set()
            self.snapshot_requested = {}
            if self.desired:
                await self._kalshi_subscribe(ws)

    async def _on_close(self, reason: str) -> None:
        now = time.time_ns()
        with self.lock:
            if self.capture:
                self.capture.meta(now, {"type": "disconnect", "conn": self.conn_id, "reason": reason})
            self.norm.on_disconnect(now, reason)
        self.submit_rows()
        self.log.warning("disconnected", conn=self.conn_id, reason=reason)

    async def _read(self, ws, stop: asyncio.Event) -> str:
        watchdog = asyncio.create_task(self._watchdog(ws))
        norm, lock, cap = self.norm, self.lock, self.capture
        l2 = norm.l2
        try:
            async for frame in ws:
                now = time.time_ns()
                self.last_frame = time.monotonic()
                with lock:
                    if cap is not None:
                        cap.frame(now, frame)
                    try:
                        norm.feed(now, frame)
                    except Exception as e:  # noqa: BLE001 - a normalizer bug must not stop collection
                        norm.skip(frame, f"internal_error: {type(e).__name__}", e)
                        self.log.exception("normalizer_error")
                if norm.actions:
                    await self._act(ws, norm.pop_actions())
                if l2.rows >= CHUNK_ROWS or norm.trades.rows >= CHUNK_ROWS:
                    self.submit_rows()
            return self.close_reason or "disconnect: server closed the connection"
        except _Reconnect as e:
            self.close_reason = str(e)
            return str(e)
        finally:
            watchdog.cancel()
            if self.close_reason is not None:
                try:
                    await asyncio.wait_for(ws.close(), 2)
                except Exception:  # noqa: BLE001
                    pass

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
            if self.source == "kalshi" and self.snapshot_requested:
                # get_snapshot not answered: fall back to a fresh subscription (reconnect)
                for sid, t0 in list(self.snapshot_requested.items()):
                    if self._books_valid(sid):
                        del self.snapshot_requested[sid]
                    elif time.monotonic() - t0 > self.cfg.snapshot_timeout:
                        self.close_reason = f"disconnect: get_snapshot on sid {sid} not answered, resubscribing"
                        await ws.close()
                        return

    def _books_valid(self, sid: int) -> bool:
        with self.lock:
            ts = self.norm.sid_tickers.get(sid, set())
            return all(t in self.norm.valid for t in ts)

    async def _act(self, ws, actions) -> None:
        for a in actions:
            if a.kind == "reconnect":
                raise _Reconnect(a.args.get("reason", "resync"))
            if a.kind == "get_snapshot":
                self.cmd_id += 1
                await ws.send(ks.update_cmd(self.cmd_id, a.args["sid"], a.args["tickers"], "get_snapshot"))
                self.snapshot_requested[a.args["sid"]] = time.monotonic()
                self.log.info("get_snapshot_sent", sid=a.args["sid"], markets=len(a.args["tickers"]))
            elif a.kind == "error":
                if self.source == "coinbase":
                    raise _Reconnect(f"disconnect: exchange error: {a.args.get('message')} {a.args.get('reason') or ''}")
                code = a.args.get("code")
                if code in ks.FATAL_SUB_ERRORS:
                    raise _Reconnect(f"disconnect: kalshi error {code} ({a.args.get('msg')}): resubscribing")
                if code == 16 and a.args.get("market_ticker"):
                    self.desired.discard(a.args["market_ticker"])
                    self.subscribed.discard(a.args["market_ticker"])
                if code == 27:
                    await asyncio.sleep(1.0)

    # ---- Kalshi subscription management ---------------------------------------------------------
    def _sids(self) -> dict[str, int]:
        with self.lock:
            return {ch: sid for sid, ch in self.norm.sid_channel.items()}

    async def _kalshi_subscribe(self, ws) -> None:
        self.cmd_id += 1
        tickers = sorted(self.desired)
        await ws.send(ks.subscribe_cmd(self.cmd_id, tickers, self.cfg.use_yes_price))
        self.markets_added += len(set(tickers) - self.subscribed)
        self.subscribed = set(tickers)
        self.log.info("subscribed", markets=len(tickers))

    async def _kalshi_update(self) -> None:
        ws = self.ws
        if ws is None:
            return
        if not self.subscribed:
            if self.desired:
                await self._kalshi_subscribe(ws)
            return
        sids = self._sids()
        add = sorted(self.desired - self.subscribed)
        drop = sorted(self.subscribed - self.desired)
        if not sids:
            return  # acks not in yet; next round
        for ch in ("orderbook_delta", "trade"):
            sid = sids.get(ch)
            if sid is None:
                continue
            if add:
                self.cmd_id += 1
                await ws.send(ks.update_cmd(self.cmd_id, sid, add, "add_markets"))
            if drop:
                self.cmd_id += 1
                await ws.send(ks.update_cmd(self.cmd_id, sid, drop, "delete_markets"))
        if add or drop:
            self.markets_added += len(add)
            self.markets_dropped += len(drop)
            self.log.info("subscription_updated", added=add, dropped=drop)
        self.subscribed = (self.subscribed | set(add)) - set(drop)

    async def _discovery_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                found: set[str] = set()
                for s in self.series:
                    mk = await loop.run_in_executor(None, ks.fetch_markets, self.cfg.kalshi_rest_url, s)
                    found |= ks.open_tickers(mk, s, time.time() if self.cfg.discovery_wall_clock else None)
                if found != self.desired:
                    self.log.info("discovery", markets=len(found), new=len(found - self.desired), gone=len(self.desired - found))
                self.desired = found
                await self._kalshi_update()
            except Exception as e:  # noqa: BLE001 - discovery errors keep the current set
                self.log.warning("discovery_failed", error=repr(e)[:300])
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.discovery_interval)
            except asyncio.TimeoutError:
                pass

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
        self.eng = None
        self.stop: asyncio.Event | None = None
        self.pid_file = status_dir(self.home) / f"collector-{os.getpid()}.pid"

    def _sources(self) -> list[str]:
        out = []
        for s in self.cfg.source:
            if s == "kalshi":
                kid = self.cfg.kalshi_key_id
                kpath = self.cfg.kalshi_key_path
                if not kid or not kpath:
                    log.warning("kalshi_skipped", reason="KALSHI_API_KEY_ID and KALSHI_PRIVATE_KEY_PATH are not both set; Kalshi needs an API key")
                    continue
                if not Path(kpath).is_file():
                    log.warning("kalshi_skipped", reason="KALSHI_PRIVATE_KEY_PATH does not name a readable file")
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
        last_status = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
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
                    r.write_status(self.home)

    async def main(self) -> int:
        from engine.api import Engine

        sources = self._sources()
        if not sources:
            log.error("nothing_to_collect", requested=self.cfg.source)
            return 1
        self.eng = Engine.open(home=self.home, writer=True, book_anchors=True)
        tune_gc()
        self.runners = [SourceRunner(s, self.eng, self.cfg, self.appender) for s in sources]
        for r in self.runners:
            if r.source == "coinbase":
                seed_coinbase_trades(self.eng, r.norm)
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
            for r in self.runners:
                r.write_status(self.home)
            try:
                self.pid_file.unlink()
            except OSError:
                pass
            log.info("collector_stopped", sources=sources)
        return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="data-engine collect", description="Collect Coinbase / Kalshi market data into the lake.")
    ap.add_argument("--source", nargs="+", choices=["coinbase", "kalshi"], default=["coinbase", "kalshi"])
    ap.add_argument("--products", nargs="+", default=list(cb.DEFAULT_PRODUCTS), help="Coinbase products")
    ap.add_argument("--series", nargs="+", default=list(ks.DEFAULT_SERIES), help="Kalshi series")
    ap.add_argument("--coinbase-url", default=os.environ.get("COINBASE_WS_URL", cb.DEFAULT_URL))
    ap.add_argument("--kalshi-url", default=os.environ.get("KALSHI_WS_URL", ks.DEFAULT_WS_URL))
    ap.add_argument("--kalshi-rest-url", default=os.environ.get("KALSHI_REST_URL", ks.DEFAULT_REST_URL))
    ap.add_argument("--capture-dir", default=None, help="write raw frames here (hourly files)")
    ap.add_argument("--capture-plain", action="store_true", help="plain .jsonl captures instead of .jsonl.zst")
    ap.add_argument("--home", default=os.environ.get("ENGINE_HOME", "./lake"))
    ap.add_argument("--for", dest="duration", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--coinbase-stall", type=float, default=5.0, help="seconds without a frame before a Coinbase `stale` reconnect")
    ap.add_argument("--kalshi-stall", type=float, default=120.0, help="seconds without a frame before a Kalshi `stale` reconnect")
    ap.add_argument("--discovery-interval", type=float, default=30.0, help="Kalshi market re-discovery period (s)")
    ap.add_argument("--discovery-wall-clock", action="store_true",
                    help="also drop Kalshi markets whose open/close times are outside this host's clock")
    ap.add_argument("--snapshot-timeout", type=float, default=15.0, help="resubscribe when get_snapshot is not answered (s)")
    ap.add_argument("--use-yes-price", dest="use_yes_price", action=argparse.BooleanOptionalAction, default=True,
                    help="Kalshi use_yes_price sent on every subscribe and recorded in the capture")
    ap.add_argument("--max-skew", type=float, default=None, help="seconds an exchange timestamp may differ from recv")
    ap.add_argument("--backoff-base", type=float, default=0.5)
    ap.add_argument("--backoff-max", type=float, default=30.0)
    ap.add_argument("--status-interval", type=float, default=60.0)
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    a.kalshi_key_id = os.environ.get("KALSHI_API_KEY_ID", "")
    a.kalshi_key_path = os.environ.get("KALSHI_PRIVATE_KEY_PATH", "")
    return a


def run(cfg: argparse.Namespace) -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(Collector(cfg).main())


def cli(argv: list[str]) -> int:
    return run(parse_args(argv))


# ---- status / flush ---------------------------------------------------------------------------


def _alive_collector(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"collect" in cmd or b"engine" in cmd
    except OSError:
        return True


def request_flush(home: str | os.PathLike) -> int:
    """Ask every running collector of this lake to flush now (SIGUSR1); returns how many were asked."""
    n = 0
    for p in sorted(status_dir(home).glob("collector-*.pid")):
        try:
            pid = int(p.read_text().strip())
        except (OSError, ValueError):
            continue
        if not _alive_collector(pid):
            try:
                p.unlink()
            except OSError:
                pass
            continue
        try:
            os.kill(pid, signal.SIGUSR1)
            n += 1
        except OSError:
            pass
    if n == 0:  # no live pid file: leave a control file for a collector that is starting
        try:
            status_dir(home).mkdir(parents=True, exist_ok=True)
            (status_dir(home) / "flush.request").touch()
        except OSError:
            pass
    return n


def status_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine status", description="Show collector counters.")
    ap.add_argument("--home", default=os.environ.get("ENGINE_HOME", "./lake"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    files = sorted(status_dir(a.home).glob("*.json"))
    if not files:
        print(f"no collector status in {status_dir(a.home)}")
        return 1
    out = []
    for f in files:
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        st["running"] = _alive_collector(int(st.get("pid", 0) or 0)) and (time.time_ns() - st.get("updated_ns", 0)) < 3600 * NS
        out.append(st)
    if a.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    cols = ["source", "running", "frames", "bytes", "rows", "skipped_frames", "gaps", "reconnects", "feed_lag_ms", "age_s"]
    print("  ".join(f"{c:>14}" for c in cols))
    now = time.time_ns()
    for st in out:
        lag = st.get("feed_lag_ns")
        vals = [
            st.get("source"), st.get("running"), st.get("frames"), st.get("bytes"), st.get("rows"), st.get("skipped_frames"),
            st.get("gaps"), st.get("reconnects"), None if lag is None else round(lag / 1e6, 1),
            round((now - st.get("updated_ns", now)) / 1e9, 1),
        ]
        print("  ".join(f"{str(v):>14}" for v in vals))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli(sys.argv[1:]))
