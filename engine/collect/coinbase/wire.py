"""Coinbase Advanced Trade on the wire: names, endpoints, subscription messages and the msgspec
Structs frames decode into (protocol definitions only; normalization is in `normalize`)."""

from __future__ import annotations

import enum
from typing import ClassVar, Iterable, Union

import msgspec
from msgspec import Struct

SOURCE = "coinbase"
DEFAULT_PRODUCTS = ("BTC-USD", "ETH-USD", "SOL-USD")
DEFAULT_URL = "wss://advanced-trade-ws.coinbase.com"
# Exchange REST API (public): GET /products and /products/{id} give each product's increments
DEFAULT_REST_URL = "https://api.exchange.coinbase.com"
# channels that are valid on this feed but not collected: counted as ignored, never as bad input
IGNORED_CHANNELS = frozenset({"ticker", "ticker_batch", "candles", "status", "level2_batch", "user", "futures_balance_summary"})


# ---- wire Structs (numeric strings decoded to float by the decoder: strict=False) -------------
class Side(enum.Enum):
    """A level's side as sent: decoded to these members (no string per row; an unknown side is rejected)."""

    BID = "bid"
    OFFER = "offer"
    ASK = "ask"


# Fields in wire order (msgspec matches keys fastest that way).
class L2Update(Struct, kw_only=True, gc=False):
    """One level change. One class for every side, so reading a field out of a list of them stays a
    specialized (monomorphic) attribute load."""

    side: Side
    event_time: str = ""
    price_level: float  # decimal strings parsed by msgspec (correctly rounded, same values as Arrow's cast)
    new_quantity: float


class L2Event(Struct, tag_field="type", gc=False):
    """One product's updates; the class is the event type (no string per event, unknown types rejected)."""

    product_id: str
    updates: list[L2Update]


class UpdateEvent(L2Event, tag="update"):
    type: ClassVar[str] = "update"


class SnapshotEvent(L2Event, tag="snapshot"):
    type: ClassVar[str] = "snapshot"


class L2Msg(Struct, tag_field="channel", tag="l2_data", kw_only=True, gc=False):
    timestamp: str = ""
    sequence_num: int
    events: list[Union[UpdateEvent, SnapshotEvent]]


# Fallback view of an l2_data frame the typed decoder rejects: an unknown side or event type (reported
# for this frame's products only), or numbers msgspec's float parser rejects (e.g. "+1", ".5", "1e400"): the
# decimal strings are kept raw and converted exactly as Arrow's string -> float64 cast does (what
# every l2 number went through before msgspec parsed them).
class RawL2Update(Struct, gc=False):
    side: str
    price_level: str
    new_quantity: str
    event_time: str = ""


class RawL2Event(Struct, gc=False):
    type: str
    product_id: str
    updates: list[RawL2Update]


class RawL2Msg(Struct, tag_field="channel", tag="l2_data", gc=False):
    sequence_num: int
    events: list[RawL2Event]
    timestamp: str = ""


class Trade(Struct, gc=False):
    product_id: str
    trade_id: str
    price: float
    size: float
    side: str
    time: str = ""


class TradeEvent(Struct, gc=False):
    trades: list[Trade]
    type: str = "update"


class TradesMsg(Struct, tag_field="channel", tag="market_trades", gc=False):
    sequence_num: int
    events: list[TradeEvent]
    timestamp: str = ""


class HeartbeatsMsg(Struct, tag_field="channel", tag="heartbeats", gc=False):
    sequence_num: int
    timestamp: str = ""


class SubsEvent(Struct, gc=False):
    subscriptions: dict[str, list[str]] = {}


class SubsMsg(Struct, tag_field="channel", tag="subscriptions", gc=False):
    sequence_num: int
    events: list[SubsEvent] = []
    timestamp: str = ""


class Probe(Struct, gc=False):
    """Lenient view used to classify a frame the typed decoder rejected."""

    channel: str | None = None
    type: str | None = None
    sequence_num: int | None = None
    message: str | None = None
    reason: str | None = None
    timestamp: str | None = None


class Product(Struct, kw_only=True, gc=False):
    """A product of the Exchange REST API (`GET /products/{id}`, or each item of `GET /products`).
    Increments stay decimal strings here; `base_min_size` was removed from the API in 2022 and is
    read when present."""

    id: str
    base_currency: str
    quote_currency: str
    quote_increment: str
    base_increment: str
    base_min_size: str | None = None
    status: str | None = None
    display_name: str | None = None


decoder = msgspec.json.Decoder(Union[L2Msg, TradesMsg, HeartbeatsMsg, SubsMsg], strict=False)
raw_decoder = msgspec.json.Decoder(Union[RawL2Msg, TradesMsg, HeartbeatsMsg, SubsMsg], strict=False)
probe_decoder = msgspec.json.Decoder(Probe)
product_decoder = msgspec.json.Decoder(Product)
products_decoder = msgspec.json.Decoder(list[msgspec.Raw])
SIDE_OF = {x.value: x for x in Side}


def subscribe_messages(products: Iterable[str]) -> list[str]:
    """level2 first (its snapshot is the book's starting point), then trades (their snapshot covers
    the moments in between), then heartbeats (keeps the other channels open, liveness signal)."""
    p = list(products)
    enc = msgspec.json.encode
    return [
        enc({"type": "subscribe", "product_ids": p, "channel": "level2"}).decode(),
        enc({"type": "subscribe", "product_ids": p, "channel": "market_trades"}).decode(),
        enc({"type": "subscribe", "channel": "heartbeats"}).decode(),
    ]

