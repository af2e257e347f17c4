"""Kalshi as a `Source`: series, API-key auth, REST discovery of contracts, subscription management
and the resync policy (get_snapshot on the sid, resubscribe when it is not answered).

Contracts are discovered per series through the REST API every `--discovery-interval` seconds and
the subscription follows: new contracts are added to the open sids, expired ones deleted.
Reference data: every discovery page goes to the normalizer (and the capture) as a REST answer,
without its quote fields and only when it changed;
`market_lifecycle_v2` is subscribed on every connection (open, close-date changes, determination,
settlement); contracts past their close without a known result are asked for by ticker each round
(`GET /markets?tickers=`) for a day, so a settlement missed on the socket still arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from engine.collect.base import Action
from engine.collect.kalshi import wire
from engine.collect.kalshi.discovery import market_pages, markets_of, open_tickers, reference_page
from engine.collect.kalshi.normalize import KalshiNormalizer
from engine.collect.source import AuthError, Demo, Link, Reconnect, Source
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS
from engine.timeutil import NS

RESULT_POLL_AFTER_S = 60.0  # ask REST for a closed contract's result once the lifecycle channel had this long
RESULT_POLL_FOR_S = 86400.0  # ... and for at most this long after its close (then the settlement check warns)
RESULT_BATCH = 50  # tickers per `GET /markets?tickers=` request


class KalshiLink(Link):
    """Subscription state of one runner: the contracts discovery wants (`desired`) and those asked for
    on the current connection (`subscribed`); get_snapshot requests awaiting their snapshots."""

    def __init__(self, source: "KalshiSource", runner: Any):
        super().__init__(source, runner)
        self.desired: set[str] = set()
        self.subscribed: set[str] = set()
        self.cmd_id = 0
        self.snapshot_requested: dict[int, float] = {}
        self.markets_added = 0
        self.markets_dropped = 0
        self.results_polled = 0

    async def on_open(self, ws) -> None:
        self.subscribed = set()
        self.snapshot_requested = {}
        self.cmd_id += 1
        await ws.send(wire.lifecycle_cmd(self.cmd_id))  # reference data: every market's lifecycle
        if self.desired:
            await self._subscribe(ws)

    async def act(self, ws, a: Action) -> None:
        r = self.runner
        if a.kind == "get_snapshot":
            self.cmd_id += 1
            await ws.send(wire.update_cmd(self.cmd_id, a.args["sid"], a.args["tickers"], "get_snapshot"))
            self.snapshot_requested[a.args["sid"]] = time.monotonic()
            r.log.info("get_snapshot_sent", sid=a.args["sid"], markets=len(a.args["tickers"]))
        elif a.kind == "error":
            code = a.args.get("code")
            if code in wire.FATAL_SUB_ERRORS:
                raise Reconnect(f"disconnect: kalshi error {code} ({a.args.get('msg')}): resubscribing")
            if code == 16 and a.args.get("market_ticker"):
                self.desired.discard(a.args["market_ticker"])
                self.subscribed.discard(a.args["market_ticker"])
            if code == 27:
                await asyncio.sleep(1.0)

    def overdue(self) -> str | None:
        """get_snapshot not answered in time: fall back to a fresh subscription (reconnect)."""
        for sid, t0 in list(self.snapshot_requested.items()):
            if self._books_valid(sid):
                del self.snapshot_requested[sid]
            elif time.monotonic() - t0 > self.runner.cfg.snapshot_timeout:
                return f"disconnect: get_snapshot on sid {sid} not answered, resubscribing"
        return None

    def _books_valid(self, sid: int) -> bool:
        r = self.runner
        with r.lock:
            ts = r.norm.sid_tickers.get(sid, set())
            return all(t in r.norm.valid for t in ts)

    def tasks(self, stop: asyncio.Event) -> list:
        return [self._discovery_loop(stop)]

    def status(self) -> dict[str, Any]:
        return {"subscribed_markets": len(self.subscribed), "markets_added": self.markets_added,
                "markets_dropped": self.markets_dropped, "results_polled": self.results_polled}

    # ---- subscription management ------------------------------------------------------------
    def _sids(self) -> dict[str, int]:
        r = self.runner
        with r.lock:
            return {ch: sid for sid, ch in r.norm.sid_channel.items()}

    async def _subscribe(self, ws) -> None:
        self.cmd_id += 1
        tickers = sorted(self.desired)
        await ws.send(wire.subscribe_cmd(self.cmd_id, tickers, self.runner.cfg.use_yes_price))
        self.markets_added += len(set(tickers) - self.subscribed)
        self.subscribed = set(tickers)
        self.runner.log.info("subscribed", markets=len(tickers))

    async def _update(self) -> None:
        ws = self.runner.ws
        if ws is None:
            return
        if not self.subscribed:
            if self.desired:
                await self._subscribe(ws)
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
                await ws.send(wire.update_cmd(self.cmd_id, sid, add, "add_markets"))
            if drop:
                self.cmd_id += 1
                await ws.send(wire.update_cmd(self.cmd_id, sid, drop, "delete_markets"))
        if add or drop:
            self.markets_added += len(add)
            self.markets_dropped += len(drop)
            self.runner.log.info("subscription_updated", added=add, dropped=drop)
        self.subscribed = (self.subscribed | set(add)) - set(drop)

    async def _discovery_loop(self, stop: asyncio.Event) -> None:
        r, cfg = self.runner, self.runner.cfg
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                found: set[str] = set()
                for s in self.source.markets(cfg):
                    pages = await loop.run_in_executor(None, market_pages, cfg.kalshi_rest_url, s)
                    mk = []
                    for i, body in enumerate(pages):
                        body = reference_page(body)  # quotes dropped: the socket has them
                        r.rest("markets", body, key=f"{s}/{i}")  # captured and normalized, like ingest does
                        mk += markets_of(body)
                    found |= open_tickers(mk, s, time.time() if cfg.discovery_wall_clock else None)
                if found != self.desired:
                    r.log.info("discovery", markets=len(found), new=len(found - self.desired), gone=len(self.desired - found))
                self.desired = found
                await self._update()
            except Exception as e:  # noqa: BLE001 - discovery errors keep the current set
                r.log.warning("discovery_failed", error=repr(e)[:300])
            try:
                await self._results(loop)
            except Exception as e:  # noqa: BLE001 - the next round asks again
                r.log.warning("result_poll_failed", error=repr(e)[:300])
            try:
                await asyncio.wait_for(stop.wait(), cfg.discovery_interval)
            except asyncio.TimeoutError:
                pass

    async def _results(self, loop) -> None:
        """Closed contracts whose result or settlement is not known yet (from this run or seeded from
        the lake), asked for by ticker: their market objects then carry status, result and settlement."""
        r = self.runner
        now = time.time_ns()
        with r.lock:
            todo = r.norm.unresolved(now - int(RESULT_POLL_AFTER_S * NS), now - int(RESULT_POLL_FOR_S * NS))
        for i in range(0, len(todo), RESULT_BATCH):
            batch = todo[i:i + RESULT_BATCH]
            pages = await loop.run_in_executor(None, lambda b=batch: market_pages(
                r.cfg.kalshi_rest_url, status=None, tickers=b))
            for i, body in enumerate(pages):
                r.rest("markets", reference_page(body), key=f"tickers={','.join(batch)}/{i}")
        self.results_polled += len(todo)


class KalshiSource(Source):
    name = wire.SOURCE
    title = "Kalshi"
    markets_option = "--series"
    markets_help = "series"
    default_markets = wire.DEFAULT_SERIES
    default_url = wire.DEFAULT_WS_URL
    stall_s = 120.0  # quiet contracts send nothing for minutes
    ping_interval = 10.0
    credentials_env = ("KALSHI_API_KEY_ID", "KALSHI_PRIVATE_KEY_PATH")
    link_class = KalshiLink

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        super().add_arguments(ap)
        g = ap.add_argument_group("Kalshi discovery and subscription")
        g.add_argument("--kalshi-rest-url", default=os.environ.get("KALSHI_REST_URL", wire.DEFAULT_REST_URL))
        g.add_argument("--discovery-interval", type=float, default=30.0, help="Kalshi market re-discovery period (s)")
        g.add_argument("--discovery-wall-clock", action="store_true",
                       help="also drop Kalshi markets whose open/close times are outside this host's clock")
        g.add_argument("--snapshot-timeout", type=float, default=15.0, help="resubscribe when get_snapshot is not answered (s)")
        g.add_argument("--use-yes-price", dest="use_yes_price", action=argparse.BooleanOptionalAction, default=True,
                       help="Kalshi use_yes_price sent on every subscribe and recorded in the capture")
        ap.set_defaults(kalshi_key_id=os.environ.get("KALSHI_API_KEY_ID", ""),
                        kalshi_key_path=os.environ.get("KALSHI_PRIVATE_KEY_PATH", ""))

    def unusable(self, cfg: argparse.Namespace) -> str | None:
        if not cfg.kalshi_key_id or not cfg.kalshi_key_path:
            return "KALSHI_API_KEY_ID and KALSHI_PRIVATE_KEY_PATH are not both set; Kalshi needs an API key"
        if not Path(cfg.kalshi_key_path).is_file():
            return "KALSHI_PRIVATE_KEY_PATH does not name a readable file"
        return None

    def auth_headers(self, cfg: argparse.Namespace) -> dict[str, str]:
        from engine.collect.kalshi.auth import KalshiKeyError, load_private_key, sign_headers

        try:
            key = load_private_key(cfg.kalshi_key_path)
            return sign_headers(cfg.kalshi_key_id, key, "GET", wire.WS_SIGN_PATH)
        except KalshiKeyError as e:
            raise AuthError(e.problem) from None
        except Exception as e:  # noqa: BLE001 - the cause is named, key material never
            raise AuthError(f"cannot sign requests: {type(e).__name__}") from None

    def auth_fields(self, cfg: argparse.Namespace) -> dict[str, Any]:
        return {"key_path": cfg.kalshi_key_path}

    def normalizer(self, markets: Iterable[str] = (), max_skew_ns: int = DEFAULT_MAX_SKEW_NS, log=None) -> KalshiNormalizer:
        return KalshiNormalizer(max_skew_ns=max_skew_ns, series=markets, log=log)

    def connect_meta(self, cfg: argparse.Namespace) -> dict[str, Any]:
        # neither is restated by the frames: the capture must say (series: whose lifecycle events are kept)
        return {"use_yes_price": cfg.use_yes_price, "series": sorted(self.markets(cfg))}

    def connect_kwargs(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {"use_yes_price": bool(meta.get("use_yes_price", False))}  # Kalshi's documented default
        if isinstance(meta.get("series"), list):
            kw["series"] = [str(x) for x in meta["series"]]
        return kw

    def local_args(self, port: int) -> list[str]:
        return ["--kalshi-url", f"ws://127.0.0.1:{port}{urlsplit(wire.DEFAULT_WS_URL).path}",
                "--kalshi-rest-url", f"http://127.0.0.1:{port}{urlsplit(wire.DEFAULT_REST_URL).path}"]

    def demo(self, directory: Path) -> Demo:
        """A throw-away key pair: the collector signs with the private half, the replay exchange
        verifies with the public one."""
        from engine.collect.kalshi.auth import generate_keypair

        priv, pub = generate_keypair(Path(directory) / "keys", name="demo")
        return Demo(env={"KALSHI_API_KEY_ID": "demo-key-id", "KALSHI_PRIVATE_KEY_PATH": str(priv)},
                    replay_args=["--kalshi-public-key", str(pub)],
                    files={"private_key": Path(priv), "public_key": Path(pub)})


SOURCE = KalshiSource()
