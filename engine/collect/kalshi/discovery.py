"""Kalshi market discovery over the REST API: the open contracts of a series, and the state of
given contracts (blocking calls; the live link runs them on an executor). The answers are returned
as the pages' text too, so the link can record them in the capture as reference data."""

from __future__ import annotations

import json
import urllib.parse

import msgspec

from engine.collect.rest import get_text
from engine.collect.timestamps import parse_ts as _p
from engine.timeutil import NS

_cursor = msgspec.json.Decoder(dict)


def market_pages(rest_url: str, series: str | None = None, status: str | None = "open", tickers=None,
                 timeout: float = 10.0, page_limit: int = 1000) -> list[str]:
    """GET /markets (`series_ticker`, `status`, `tickers` filters) following `cursor` until it is
    empty; returns each page's body text (blocking)."""
    out: list[str] = []
    cursor = ""
    for _ in range(1000):
        q = {"limit": str(page_limit)}
        if series:
            q["series_ticker"] = series
        if status:
            q["status"] = status
        if tickers:
            q["tickers"] = ",".join(tickers)
        if cursor:
            q["cursor"] = cursor
        body = get_text(rest_url.rstrip("/") + "/markets?" + urllib.parse.urlencode(q), timeout=timeout)
        out.append(body)
        cursor = _cursor.decode(body).get("cursor") or ""
        if not cursor:
            break
    return out


# market-data fields of a market object: quotes, activity and their update time (the WebSocket carries
# them, and they change on every poll); everything else is the contract's reference data
_MARKET_DATA = ("yes_bid", "yes_ask", "no_bid", "no_ask", "last_price", "previous_", "volume", "open_interest",
                "liquidity", "dollar_", "updated_time")


def reference_page(body: str) -> str:
    """A `/markets` page without the market-data fields of its objects, so that an answer with
    nothing new about the contracts is the same text as the last one (and is not recorded again).
    A body that is not a JSON object is returned as it is (the normalizer counts it as bad)."""
    try:
        d = json.loads(body)
    except ValueError:
        return body
    if not isinstance(d, dict):
        return body
    for m in d.get("markets") or []:
        if isinstance(m, dict):
            for k in [k for k in m if k.startswith(_MARKET_DATA)]:
                del m[k]
    return json.dumps(d, separators=(",", ":"))


def markets_of(body: str) -> list[dict]:
    """The market objects of one `/markets` page."""
    d = json.loads(body)
    return list(d.get("markets") or []) if isinstance(d, dict) else []


def fetch_markets(rest_url: str, series: str, status: str = "open", timeout: float = 10.0, page_limit: int = 1000) -> list[dict]:
    """GET /markets?series_ticker=..&status=.. following `cursor` until it is empty (blocking)."""
    out: list[dict] = []
    for body in market_pages(rest_url, series, status, timeout=timeout, page_limit=page_limit):
        out.extend(markets_of(body))
    return out


def open_tickers(markets: list[dict], series: str, now_s: float | None = None) -> set[str]:
    """Tickers of `series` that are open (membership by ticker prefix incl. the hyphen).

    The status filter is applied by the server (`status=open`) and again here on the returned
    status vocabulary; with `now_s` the open/close times are also checked against that clock.
    """
    keep = set()
    prefix = series + "-"
    for m in markets:
        t = m.get("ticker") or ""
        if not t.startswith(prefix):
            continue
        st = (m.get("status") or "").lower()
        if st in ("closed", "settled", "determined", "finalized", "initialized", "unopened"):
            continue
        if now_s is None:
            keep.add(t)
            continue
        ct = m.get("close_time")
        if ct:
            try:
                if _p(ct) <= now_s * NS:
                    continue
            except (ValueError, IndexError):
                pass
        ot = m.get("open_time")
        if ot:
            try:
                if _p(ot) > now_s * NS:
                    continue
            except (ValueError, IndexError):
                pass
        keep.add(t)
    return keep

