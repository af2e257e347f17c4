"""Kalshi on the wire: names, endpoints, subscription commands, the msgspec Structs frames decode into
and the exact decimal units (protocol definitions only; normalization is in `normalize`)."""

from __future__ import annotations

import json
from typing import Any, Iterable, Union

import msgspec
from msgspec import Struct

from engine.collect.base import fixed_units

SOURCE = "kalshi"
DEFAULT_SERIES = ("KXBTC", "KXETH", "KXSOL")
DEFAULT_WS_URL = "wss://api.elections.kalshi.com/trade-api/ws/v2"
DEFAULT_REST_URL = "https://api.elections.kalshi.com/trade-api/v2"
WS_SIGN_PATH = "/trade-api/ws/v2"
FATAL_SUB_ERRORS = frozenset({10, 17, 25})
IGNORED_TYPES = frozenset(
    {"ticker", "ticker_v2", "event_lifecycle", "event_fee_update", "multivariate_lookup", "fill", "market_position"}
)
LIFECYCLE_CHANNEL = "market_lifecycle_v2"  # every market's lifecycle (no market filter): reference data
ONE = 10_000  # 1 dollar in price units (1e-4 dollars)


# ---- wire Structs ---------------------------------------------------------------------------
class SnapshotBody(Struct, kw_only=True, gc=False):
    market_ticker: str
    yes_dollars_fp: list[tuple[str, str]] | None = None
    no_dollars_fp: list[tuple[str, str]] | None = None
    yes_dollars: list[tuple[str, float]] | None = None
    no_dollars: list[tuple[str, float]] | None = None
    yes: list[tuple[int, float]] | None = None
    no: list[tuple[int, float]] | None = None


class SnapshotMsg(Struct, kw_only=True, tag_field="type", tag="orderbook_snapshot", gc=False):
    sid: int
    msg: SnapshotBody
    seq: int | None = None
    id: int | None = None


class DeltaBody(Struct, kw_only=True, gc=False):
    market_ticker: str
    side: str
    price_dollars: str | None = None
    delta_fp: str | None = None
    price: int | None = None
    delta: float | None = None
    ts_ms: int | None = None
    ts: str | None = None


class DeltaMsg(Struct, kw_only=True, tag_field="type", tag="orderbook_delta", gc=False):
    sid: int
    msg: DeltaBody
    seq: int | None = None


class TradeBody(Struct, kw_only=True, gc=False):
    trade_id: str
    market_ticker: str
    taker_side: str
    yes_price_dollars: str | None = None
    yes_price: int | None = None
    count_fp: str | None = None
    count: float | None = None
    ts_ms: int | None = None
    ts: int | None = None


class TradeMsg(Struct, kw_only=True, tag_field="type", tag="trade", gc=False):
    sid: int
    msg: TradeBody
    seq: int | None = None


class SubBody(Struct, kw_only=True, gc=False):
    channel: str
    sid: int


class SubscribedMsg(Struct, kw_only=True, tag_field="type", tag="subscribed", gc=False):
    msg: SubBody
    id: int | None = None


class OkMsg(Struct, kw_only=True, tag_field="type", tag="ok"):
    id: int | None = None
    sid: int | None = None
    seq: int | None = None
    msg: Any = None


class UnsubscribedMsg(Struct, kw_only=True, tag_field="type", tag="unsubscribed", gc=False):
    id: int | None = None
    sid: int | None = None
    seq: int | None = None


class ErrBody(Struct, kw_only=True, gc=False):
    code: int | None = None
    msg: str | None = None
    market_ticker: str | None = None


class ErrorMsg(Struct, kw_only=True, tag_field="type", tag="error", gc=False):
    id: int | None = None
    sid: int | None = None
    seq: int | None = None
    msg: ErrBody | None = None


class LifecycleMeta(Struct, kw_only=True, gc=False):
    """`additional_metadata` of a `created` (or `metadata_updated`) lifecycle event."""

    event_ticker: str | None = None
    title: str | None = None
    strike_type: str | None = None
    floor_strike: float | None = None
    cap_strike: float | None = None
    expected_expiration_ts: int | None = None  # Unix seconds


class LifecycleBody(Struct, kw_only=True, gc=False):
    """One market's lifecycle event; times are Unix seconds (§2.9). `settlement_value` is a dollar
    string, or (legacy) an integer number of cents."""

    market_ticker: str
    event_type: str
    open_ts: int | None = None
    close_ts: int | None = None
    result: str | None = None
    determination_ts: int | None = None
    settlement_value: str | int | float | None = None
    settled_ts: int | None = None
    is_deactivated: bool | None = None
    price_level_structure: str | None = None
    additional_metadata: LifecycleMeta | None = None


class LifecycleMsg(Struct, kw_only=True, tag_field="type", tag=LIFECYCLE_CHANNEL, gc=False):
    sid: int | None = None
    msg: LifecycleBody


# ---- REST market objects (GET /markets, /markets/{ticker}) ------------------------------------
class PriceRange(Struct, kw_only=True, gc=False):
    start: str
    end: str
    step: str


class RestMarket(Struct, kw_only=True, gc=False):
    """The fields of a REST market object the reference data uses (times RFC 3339)."""

    ticker: str
    event_ticker: str | None = None
    market_type: str | None = None
    title: str | None = None
    status: str | None = None
    open_time: str | None = None
    close_time: str | None = None
    expected_expiration_time: str | None = None
    expiration_time: str | None = None
    strike_type: str | None = None
    floor_strike: float | None = None
    cap_strike: float | None = None
    result: str | None = None
    settlement_value_dollars: str | None = None
    settlement_value: int | float | None = None  # legacy cents
    settlement_ts: str | None = None
    tick_size: int | float | None = None  # legacy cents
    price_level_structure: str | None = None
    price_ranges: list[PriceRange] | None = None


class MarketsPage(Struct, kw_only=True, gc=False):
    """`GET /markets` (one page) or `GET /markets/{ticker}`; markets stay raw so one bad object costs
    only itself."""

    markets: list[msgspec.Raw] | None = None
    market: msgspec.Raw = msgspec.Raw(b"null")  # (Raw takes no union with None)
    cursor: str | None = None


class Probe(Struct, kw_only=True, gc=False):
    type: str | None = None
    sid: int | None = None
    seq: int | None = None

decoder = msgspec.json.Decoder(
    Union[DeltaMsg, SnapshotMsg, TradeMsg, SubscribedMsg, OkMsg, ErrorMsg, UnsubscribedMsg, LifecycleMsg]
)
probe_decoder = msgspec.json.Decoder(Probe)
page_decoder = msgspec.json.Decoder(MarketsPage)
market_decoder = msgspec.json.Decoder(RestMarket)


def p4(s: str) -> int:
    """Dollar price string -> 1e-4 dollar units, exactly."""
    i = s.find(".")
    if i > 0 and len(s) - i == 5:
        return int(s[:i] + s[i + 1 :])
    return fixed_units(s, 4)


def q2(s: str) -> int:
    """Contract count string (possibly signed) -> 1e-2 contract units, exactly."""
    i = s.find(".")
    if i > 0 and len(s) - i == 3:
        return int(s[:i] + s[i + 1 :])
    return fixed_units(s, 2)


def series_of(ticker: str) -> str:
    return ticker.split("-", 1)[0]


def subscribe_cmd(cmd_id: int, tickers: Iterable[str], use_yes_price: bool) -> str:
    return json.dumps(
        {
            "id": cmd_id,
            "cmd": "subscribe",
            "params": {"channels": ["orderbook_delta", "trade"], "market_tickers": sorted(tickers), "use_yes_price": use_yes_price},
        }
    )


def lifecycle_cmd(cmd_id: int) -> str:
    """Subscribe to `market_lifecycle_v2` (all markets: the channel takes no market filter)."""
    return json.dumps({"id": cmd_id, "cmd": "subscribe", "params": {"channels": [LIFECYCLE_CHANNEL]}})


def update_cmd(cmd_id: int, sid: int, tickers: Iterable[str], action: str) -> str:
    return json.dumps(
        {"id": cmd_id, "cmd": "update_subscription", "params": {"sids": [sid], "market_tickers": sorted(tickers), "action": action}}
    )

