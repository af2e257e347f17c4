"""Kalshi market discovery over the REST API: the open contracts of a series (blocking calls; the
live link runs them on an executor)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

from engine.collect.timestamps import parse_ts as _p
from engine.timeutil import NS


def fetch_markets(rest_url: str, series: str, status: str = "open", timeout: float = 10.0, page_limit: int = 1000) -> list[dict]:
    """GET /markets?series_ticker=..&status=.. following `cursor` until it is empty (blocking)."""
    out: list[dict] = []
    cursor = ""
    for _ in range(1000):
        q = {"series_ticker": series, "status": status, "limit": str(page_limit)}
        if cursor:
            q["cursor"] = cursor
        url = rest_url.rstrip("/") + "/markets?" + urllib.parse.urlencode(q)
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = json.loads(r.read())
        out.extend(body.get("markets") or [])
        cursor = body.get("cursor") or ""
        if not cursor:
            break
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

