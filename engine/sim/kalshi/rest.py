"""Kalshi market discovery on the replay exchange: which contracts a capture holds, and the REST
answers about them.

The contracts come from the `markets` list given to the server, else from `<capture>.markets.json`
beside a capture file, else from the capture itself: each contract opens when it first appears
(or at the capture's start if it is in the initial snapshot burst) and closes when an `ok` answer
drops it, else at the close time its ticker encodes, else an hour after the capture ends; range
strikes come from the tickers (or a `created` lifecycle event). REST (`GET` under `/trade-api/v2`):
`/markets` (filters `series_ticker`, `event_ticker`, `tickers`, `status`, close times),
`/markets/{ticker}`, `/markets/{ticker}/orderbook`, `/events`, `/series/{ticker}`,
`/exchange/status`, with cursor pagination; market status follows the replay clock (contracts open
and expire as it advances, and are determined and settled as the capture's `market_lifecycle_v2`
events played so far say, with `result` and settlement fields) and times carry the server's shift
(the `at_present` shift plus the looped passes, like the frames).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
from websockets.http11 import Response

from engine.sim.fmt import parse_time_ns
from engine.sim.kalshi.markets import (
    KalshiMarketSpec,
    Lifecycle,
    market_object,
    market_status,
    ticker_close_ns,
    ticker_strike,
)
from engine.sim.replay.protocol import dec, json_response

if TYPE_CHECKING:  # pragma: no cover
    from engine.sim.kalshi.replay import KalshiProtocol

_DATA_TYPES = ("orderbook_snapshot", "orderbook_delta", "trade", "ticker")


@dataclass
class CaptureScan:
    """What a Kalshi capture says about its contracts."""

    first: int | None = None  # first and last recv_ns
    last: int | None = None
    opened: dict[str, int] = field(default_factory=dict)  # ticker -> recv_ns it appeared
    closed: dict[str, int] = field(default_factory=dict)  # ticker -> recv_ns an `ok` answer dropped it
    market_ids: dict[str, str] = field(default_factory=dict)
    lifecycle: dict[str, list[tuple[int, dict]]] = field(default_factory=dict)  # ticker -> (recv_ns, msg)


def lifecycle_at(events: list[tuple[int, dict]], at_ns: int) -> Lifecycle:
    """What a contract's lifecycle events received by `at_ns` (capture clock) said (times in ns of the
    capture; the caller shifts them)."""
    life = Lifecycle()
    for recv, msg in events:
        if recv > at_ns:
            break
        ev = msg.get("event_type")
        if ev == "close_date_updated" and msg.get("close_ts") is not None:
            life.close_ns = int(msg["close_ts"]) * 10**9
        elif ev == "deactivated":
            life.deactivated = msg.get("is_deactivated") is not False
        elif ev == "activated":
            life.deactivated = False
        elif ev == "determined":
            life.result = msg.get("result")
            sv = msg.get("settlement_value")
            life.settlement_value = sv if isinstance(sv, str) else (f"{sv / 100:.4f}" if sv is not None else None)
            life.determined_ns = int(msg.get("determination_ts") or recv // 10**9) * 10**9
        elif ev == "settled":
            life.settled_ns = int(msg.get("settled_ts") or recv // 10**9) * 10**9
    return life


def scan_capture(records: Iterable[dict]) -> CaptureScan:
    sc = CaptureScan()
    prev: dict[int, set] = {}  # sid -> its tickers as of the last `ok`
    in_preamble = True
    for rec in records:
        r = rec.get("recv_ns")
        if r is None:
            continue
        sc.first = r if sc.first is None else sc.first
        sc.last = r
        fr = rec.get("frame")
        if not fr:
            continue
        try:
            d = dec(fr)
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
        if t == "market_lifecycle_v2" and tick:
            sc.lifecycle.setdefault(tick, []).append((r, msg))
        elif t in _DATA_TYPES and tick:
            if t != "orderbook_snapshot":
                in_preamble = False
            if tick not in sc.opened:
                # contracts in the capture's initial snapshot burst were open before it started
                sc.opened[tick] = sc.first if in_preamble else r
            if msg.get("market_id"):
                sc.market_ids.setdefault(tick, msg["market_id"])
            if sid is not None:
                prev.setdefault(sid, set()).add(tick)
        elif t == "ok" and isinstance(msg.get("market_tickers"), list) and sid is not None:
            now = set(msg["market_tickers"])
            for tk in prev.get(sid, set()) - now:
                sc.closed.setdefault(tk, r)
            prev[sid] = now
    return sc


def markets_from_list(objs: list[dict], market_ids: dict[str, str]) -> dict[str, KalshiMarketSpec]:
    """Contracts from REST-style market objects (a `markets` list or a `.markets.json` file)."""
    out = {}
    for m in objs:
        out[m["ticker"]] = KalshiMarketSpec(
            m["ticker"], m.get("event_ticker") or m["ticker"].rsplit("-", 1)[0],
            m.get("series_ticker") or m["ticker"].split("-", 1)[0],
            parse_time_ns(m["open_time"]), parse_time_ns(m["close_time"]),
            m.get("floor_strike"), m.get("cap_strike"), market_ids.get(m["ticker"], ""))
    return out


def _created(sc: CaptureScan, tk: str) -> dict | None:
    return next((m for _, m in sc.lifecycle.get(tk, ()) if m.get("event_type") == "created"), None)


def markets_from_scan(sc: CaptureScan, market_ids: dict[str, str]) -> dict[str, KalshiMarketSpec]:
    """Contracts inferred from the capture alone (no market list); a `created` lifecycle event says
    a contract's times and strikes exactly."""
    end = sc.last or 0
    by_event: dict[str, list[str]] = {}
    for tk in sc.opened:
        by_event.setdefault(tk.rsplit("-", 1)[0], []).append(tk)
    out = {}
    for ev, ticks in by_event.items():
        strikes = sorted(s for s in (ticker_strike(t) for t in ticks) if s is not None)
        width = min((b - a for a, b in zip(strikes, strikes[1:]) if b > a), default=None)
        for tk in ticks:
            close = sc.closed.get(tk)
            if close is None:
                close = ticker_close_ns(tk)
                if close is None or close <= end:
                    close = end + 3600 * 10**9
            s = ticker_strike(tk)
            floor = cap = None
            if s is not None and width:
                floor, cap = s - width / 2, s + width / 2 - 0.01
            out[tk] = KalshiMarketSpec(tk, ev, tk.split("-", 1)[0], sc.opened[tk], close, floor, cap,
                                       market_ids.get(tk, ""))
    for tk in sc.lifecycle:
        c = _created(sc, tk)
        if c is None or c.get("open_ts") is None or c.get("close_ts") is None:
            continue
        md = c.get("additional_metadata") or {}
        old = out.get(tk)
        out[tk] = KalshiMarketSpec(tk, md.get("event_ticker") or tk.rsplit("-", 1)[0], tk.split("-", 1)[0],
                                   int(c["open_ts"]) * 10**9, int(c["close_ts"]) * 10**9,
                                   md.get("floor_strike", old.floor_strike if old else None),
                                   md.get("cap_strike", old.cap_strike if old else None), market_ids.get(tk, ""))
    return out


# ---------------------------------------------------------------------------------------------- REST


def _one(q: dict, k: str) -> str | None:
    v = q.get(k)
    return v[0] if v else None


def _page(items: list, q: dict, default: int, cap: int) -> tuple[list, str]:
    limit = int((q.get("limit") or [default])[0])
    limit = max(1, min(limit, cap))
    cur = (q.get("cursor") or [""])[0]
    off = int(base64.urlsafe_b64decode(cur.encode()).decode()) if cur else 0
    page = items[off:off + limit]
    nxt = off + limit
    return page, base64.urlsafe_b64encode(str(nxt).encode()).decode() if nxt < len(items) else ""


def _not_found(what: str) -> Response:
    return json_response(404, {"error": {"code": "not_found", "message": what}})


class KalshiRest:
    """The REST answers of one Kalshi replay protocol (its contracts, books and the server's clock)."""

    def __init__(self, proto: KalshiProtocol):
        self.proto = proto
        self.server = proto.server

    def answer(self, path: str, q: dict[str, list[str]]) -> Response:
        parts = [p for p in path.split("/") if p]
        status = _one(q, "status")
        wanted = set(status.split(",")) if status else None
        mk = sorted(self.proto.markets.values(), key=lambda m: (m.open_ns, m.ticker))
        if parts == ["markets"]:
            return self._markets(mk, q, wanted)
        if len(parts) == 2 and parts[0] == "markets":
            m = self.proto.markets.get(parts[1])
            if m is None:
                return _not_found("market not found")
            return json_response(200, {"market": self._market_obj(m)})
        if len(parts) == 3 and parts[0] == "markets" and parts[2] == "orderbook":
            return self._orderbook(parts[1], q)
        if parts == ["events"]:
            return self._events(mk, q, wanted)
        if len(parts) == 2 and parts[0] == "series":
            if not any(m.series_ticker == parts[1] for m in mk):
                return _not_found("series not found")
            return json_response(200, {"series": {"ticker": parts[1], "frequency": "hourly",
                                                  "title": f"{parts[1]} price range", "category": "Crypto"}})
        if parts == ["exchange", "status"]:
            return json_response(200, {"exchange_active": True, "trading_active": True})
        return _not_found("/".join(parts))

    def _now(self, m: KalshiMarketSpec) -> tuple[KalshiMarketSpec, Lifecycle | None]:
        """The contract and its lifecycle as of the replay clock, in capture time (a moved close applied)."""
        events = self.proto.lifecycle.get(m.ticker)
        if not events:
            return m, None
        life = lifecycle_at(events, self.server.clock_ns)
        if life.close_ns is not None:
            m = dataclasses.replace(m, close_ns=life.close_ns)
        return m, life

    def _market_obj(self, m: KalshiMarketSpec) -> dict:
        """The contract as REST shows it: its times moved by the same shift as the frames."""
        m, life = self._now(m)
        b = self.server.shift_ns
        if b:
            m = dataclasses.replace(m, open_ns=m.open_ns + b, close_ns=m.close_ns + b)
            if life is not None:
                life = dataclasses.replace(
                    life, determined_ns=life.determined_ns + b if life.determined_ns is not None else None,
                    settled_ns=life.settled_ns + b if life.settled_ns is not None else None)
        o = market_object(m, self.server.clock_ns + b, life)
        if m.floor_strike is None:
            for k in ("floor_strike", "cap_strike", "strike_type"):
                o.pop(k, None)
        return o

    def _status_ok(self, m: KalshiMarketSpec, wanted: set | None) -> bool:
        """The `status` filter's words: unopened, open, paused, closed (past close, not finalized),
        settled (finalized; without lifecycle events: an hour after close)."""
        if not wanted:
            return True
        t = self.server.clock_ns
        m, life = self._now(m)
        word = {"initialized": "unopened", "active": "open", "inactive": "paused", "finalized": "settled"}
        st = word.get(market_status(m, t, life), "closed")
        if st == "closed" and life is None and t >= m.close_ns + 3600 * 10**9 and "settled" in wanted:
            return True
        return st in wanted

    def _markets(self, mk: list[KalshiMarketSpec], q: dict, wanted: set | None) -> Response:
        ser, ev = _one(q, "series_ticker"), _one(q, "event_ticker")
        ticks = set(_one(q, "tickers").split(",")) if _one(q, "tickers") else None
        b = self.server.shift_ns
        lo, hi = _one(q, "min_close_ts"), _one(q, "max_close_ts")
        sel = [m for m in mk if (not ser or m.series_ticker == ser) and (not ev or m.event_ticker == ev)
               and (ticks is None or m.ticker in ticks) and self._status_ok(m, wanted)
               and (lo is None or m.close_ns + b >= int(lo) * 10**9)
               and (hi is None or m.close_ns + b <= int(hi) * 10**9)]
        page, cur = _page(sel, q, 100, 1000)
        return json_response(200, {"cursor": cur, "markets": [self._market_obj(m) for m in page]})

    def _orderbook(self, tick: str, q: dict) -> Response:
        if tick not in self.proto.markets and tick not in self.proto.books:
            return _not_found("market not found")
        msg = self.proto.snapshot_msg(tick, False)
        depth = int(_one(q, "depth") or 0)
        ob = {}
        for side in ("yes", "no"):
            lv = msg.get(f"{side}_dollars_fp", [])
            ob[f"{side}_dollars"] = lv[-depth:] if depth else lv
        return json_response(200, {"orderbook_fp": ob})

    def _events(self, mk: list[KalshiMarketSpec], q: dict, wanted: set | None) -> Response:
        ser = _one(q, "series_ticker")
        nested = (_one(q, "with_nested_markets") or "").lower() == "true"
        events: dict[str, list] = {}
        for m in mk:
            if not ser or m.series_ticker == ser:
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
        page, cur = _page(out, q, 100, 200)
        return json_response(200, {"cursor": cur, "events": page})
