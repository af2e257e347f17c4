"""Kalshi reference data: what a REST market object or a `market_lifecycle_v2` event says about a
contract, as the columns of the `instruments` table (`engine.schema.INSTRUMENTS_SCHEMA`).

- market = the series (`KXBTC`), instrument = the ticker, kind = binary, quote = USD, `underlying` the
  canonical asset of the series (`underlying_of`: BTC for KXBTC, KXBTCD, KXBTC15M);
- strikes as Kalshi names them (`strike_type` greater / less / between / ...; open-ended `T`
  contracts carry only one of `floor_strike` / `cap_strike`);
- times in ns: `open_ts`, `close_ts`, `expiration_ts` = the expected expiration (when the result is
  due; `expected_expiration_time`, else `expiration_time`), `settled_ts`;
- `status` in the REST vocabulary (initialized, active, inactive, closed, determined, finalized, ...);
  lifecycle events, which carry no status, map to the same words;
- `result` yes / no (void or scalar as Kalshi sends it; "" is null), `settlement_value` in dollars
  (REST `settlement_value_dollars`, lifecycle dollar strings; integers are legacy cents);
- `tick_size` = the smallest step of `price_ranges` (else the legacy `tick_size` in cents, else the
  `price_level_structure`'s smallest step).
"""

from __future__ import annotations

from typing import Any

from engine.collect.kalshi.wire import LifecycleBody, RestMarket, series_of
from engine.collect.timestamps import parse_ts
from engine.timeutil import NS

QUOTE = "USD"
KIND = "binary"
# series whose name does not follow the rule below (none of the defaults); series -> asset
UNDERLYING: dict[str, str] = {"KXBTC": "BTC", "KXETH": "ETH", "KXSOL": "SOL"}
# assets recognised at the start of a series name after `KX` (longest first: DOGE before DOG...)
ASSETS = ("SHIBA", "DOGE", "AVAX", "LINK", "BTC", "ETH", "SOL", "XRP", "ADA", "LTC", "BCH", "BNB", "HYPE", "SUI")
_STRUCTURE_TICK = {"linear_cent": 0.01, "deci_cent": 0.001, "tapered_deci_cent": 0.001}
_LIFECYCLE_STATUS = {"activated": "active", "determined": "determined", "settled": "finalized"}


class BadReference(ValueError):
    """A market object or lifecycle event whose fields cannot be read (counted as a skip)."""


def underlying_of(series: str) -> str | None:
    """The canonical asset a series is about: the table above, else the asset code that follows
    `KX` in the series name (KXBTCD -> BTC, KXETH15M -> ETH); None when neither says."""
    s = series.upper()
    if s in UNDERLYING:
        return UNDERLYING[s]
    if s.startswith("KX"):
        rest = s[2:]
        for a in sorted(ASSETS, key=len, reverse=True):
            if rest.startswith(a):
                return "SHIB" if a == "SHIBA" else a
    return None


def _ts(s: str | None) -> int | None:
    if not s:
        return None
    try:
        return parse_ts(s)
    except (ValueError, IndexError) as e:
        raise BadReference(f"bad time {s!r}") from e


def _secs(v: int | None) -> int | None:
    return None if v is None else int(v) * NS


def _result(v: str | None) -> str | None:
    return (v.strip().lower() or None) if v else None


def _dollars(v: str | int | float | None) -> float | None:
    """A dollar string (`"1.0000"`) or legacy integer cents (100) as dollars."""
    if v is None or v == "":
        return None
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError as e:
            raise BadReference(f"bad dollar amount {v!r}") from e
    return float(v) / 100.0


def _tick(m: RestMarket) -> float | None:
    if m.price_ranges:
        try:
            steps = [float(r.step) for r in m.price_ranges]
        except ValueError as e:
            raise BadReference(f"bad price_ranges step in {m.ticker}") from e
        steps = [x for x in steps if x > 0]
        if steps:
            return min(steps)
    if m.tick_size:
        return float(m.tick_size) / 100.0
    return _STRUCTURE_TICK.get(m.price_level_structure or "")


def base_fields(ticker: str) -> tuple[str, dict[str, Any]]:
    """(market, the columns every Kalshi contract has) for a ticker."""
    series = series_of(ticker)
    return series, {"quote": QUOTE, "underlying": underlying_of(series)}


def market_fields(m: RestMarket) -> tuple[str, dict[str, Any]]:
    """(market, columns) of one REST market object: a complete version of the contract."""
    series, f = base_fields(m.ticker)
    f.update(
        tick_size=_tick(m),
        status=m.status or None,
        strike_type=m.strike_type or None,
        floor_strike=m.floor_strike,
        cap_strike=m.cap_strike,
        open_ts=_ts(m.open_time),
        close_ts=_ts(m.close_time),
        expiration_ts=_ts(m.expected_expiration_time or m.expiration_time),
        result=_result(m.result),
        settlement_value=(_dollars(m.settlement_value_dollars) if m.settlement_value_dollars
                          else _dollars(m.settlement_value)),
        settled_ts=_ts(m.settlement_ts),
        title=m.title or None,
    )
    return series, f


def lifecycle_fields(prev: dict[str, Any] | None, b: LifecycleBody, recv_ns: int) -> tuple[str, dict[str, Any]]:
    """(market, columns) after a lifecycle event: the last known version (`prev`, may be None) with
    what the event changes. Returns the columns unchanged for an event that changes nothing."""
    series, f = base_fields(b.market_ticker)
    if prev:
        f.update({k: v for k, v in prev.items() if k not in ("market", "instrument", "kind")})
        f["quote"], f["underlying"] = QUOTE, underlying_of(series)
    ev = b.event_type
    if b.open_ts is not None:
        f["open_ts"] = _secs(b.open_ts)
    if b.close_ts is not None:
        f["close_ts"] = _secs(b.close_ts)
    md = b.additional_metadata
    if md is not None:
        if md.strike_type:
            f["strike_type"] = md.strike_type
        if md.floor_strike is not None or md.cap_strike is not None or md.strike_type:
            f["floor_strike"], f["cap_strike"] = md.floor_strike, md.cap_strike
        if md.expected_expiration_ts is not None:
            f["expiration_ts"] = _secs(md.expected_expiration_ts)
        if md.title:
            f["title"] = md.title
    if f.get("tick_size") is None and b.price_level_structure:
        f["tick_size"] = _STRUCTURE_TICK.get(b.price_level_structure)
    if ev == "created":
        opened = f.get("open_ts")
        f["status"] = "active" if opened is not None and opened <= recv_ns else "initialized"
    elif ev == "deactivated":
        f["status"] = "inactive" if b.is_deactivated is not False else "active"
    elif ev in _LIFECYCLE_STATUS:
        f["status"] = _LIFECYCLE_STATUS[ev]
    if ev == "determined" or b.result:
        f["result"] = _result(b.result)
        if b.settlement_value is not None:
            f["settlement_value"] = _dollars(b.settlement_value)
    if b.settled_ts is not None:
        f["settled_ts"] = _secs(b.settled_ts)
    return series, f
