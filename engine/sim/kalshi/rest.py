"""Kalshi market discovery on the replay exchange: which contracts a capture holds, and the REST
answers about them.

The contracts come from the `markets` list given to the server, else from `<capture>.markets.json`
beside a capture file, else from the capture itself: each contract opens when it first appears
(or at the capture's start if it is in the initial snapshot burst) and closes when an `ok` answer
drops it, else at the close time its ticker encodes, else an hour after the capture ends; range
strikes come from the tickers. REST (`GET` under `/trade-api/v2`): `/markets`, `/markets/{ticker}`,
`/markets/{ticker}/orderbook`, `/events`, `/series/{ticker}`, `/exchange/status`, with cursor
pagination; market status follows the replay clock (contracts open and expire as it advances) and
times carry the server's `at_present` shift.
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
from engine.sim.kalshi.markets import KalshiMarketSpec, market_object, ticker_close_ns, ticker_strike
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
        if t in _DATA_TYPES and tick:
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


def markets_from_scan(sc: CaptureScan, market_ids: dict[str, str]) -> dict[str, KalshiMarketSpec]:
    """Contracts inferred from the capture alone (no market list)."""
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

    def _at_present(self, m: KalshiMarketSpec) -> KalshiMarketSpec:
        """The contract as REST shows it: its times moved by the same base shift as the frames."""
        b = self.server.base_shift_ns
        return dataclasses.replace(m, open_ns=m.open_ns + b, close_ns=m.close_ns + b) if b else m

    def _market_obj(self, m: KalshiMarketSpec) -> dict:
        o = market_object(self._at_present(m), self.server.clock_ns + self.server.base_shift_ns)
        if m.floor_strike is None:
            for k in ("floor_strike", "cap_strike", "strike_type"):
                o.pop(k, None)
            o["title"] = m.ticker
        return o

    def _status_ok(self, m: KalshiMarketSpec, wanted: set | None) -> bool:
        if not wanted:
            return True
        t = self.server.clock_ns
        st = "unopened" if t < m.open_ns else ("open" if t < m.close_ns else "closed")
        return st in wanted or (st == "closed" and "settled" in wanted and t >= m.close_ns + 3600 * 10**9)

    def _markets(self, mk: list[KalshiMarketSpec], q: dict, wanted: set | None) -> Response:
        ser, ev = _one(q, "series_ticker"), _one(q, "event_ticker")
        ticks = set(_one(q, "tickers").split(",")) if _one(q, "tickers") else None
        b = self.server.base_shift_ns
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
