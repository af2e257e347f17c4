"""Kraken spot WebSocket v2 on the wire: names, endpoint, subscription messages and the msgspec
Structs frames decode into (protocol definitions only; the book is in `book`, normalization in
`normalize`). docs/kraken-protocol.md has the message shapes and where they come from.

Book prices and quantities are JSON numbers whose decimal text matters (the checksum is computed
over it, trailing zeros included: `"qty":0.00100000`), so book levels decode them as `msgspec.Raw`
(the exact bytes sent); trades and reference data decode numbers as floats.
"""

from __future__ import annotations

from typing import Iterable, Union

import msgspec
from msgspec import Raw, Struct

SOURCE = "kraken"
DEFAULT_PAIRS = ("BTC/USD", "ETH/USD", "SOL/USD")
DEFAULT_URL = "wss://ws.kraken.com/v2"
DEPTHS = (10, 25, 100, 500, 1000)  # the book depths v2 offers
DEFAULT_DEPTH = 1000  # the deepest
CHECKSUM_LEVELS = 10  # the checksum covers the best 10 levels per side, whatever the depth
TRADE_SNAPSHOT = 50  # trades in a `trade` snapshot (the most recent)
# channels that are valid on this feed but not collected: counted as ignored, never as bad input
IGNORED_CHANNELS = frozenset({"ticker", "ohlc", "level3", "executions", "balances"})


def market_of(symbol: str) -> str:
    """The lake's market (partition key) of a Kraken symbol: `BTC/USD` -> `BTC-USD`, so Coinbase
    and Kraken markets of one pair line up."""
    return symbol.replace("/", "-")


def symbol_of(pair: str) -> str:
    """A pair as the user may write it (`BTC/USD` or `BTC-USD`) -> Kraken's v2 symbol `BTC/USD`."""
    return pair if "/" in pair else pair.replace("-", "/")


# ---- wire Structs (fields in wire order: msgspec matches keys fastest that way) ---------------
class Level(Struct, gc=False):
    """One price level: the exact decimal text of price and quantity (`bytes(level.price)`,
    `float(level.price)`); qty 0 removes the level."""

    price: Raw
    qty: Raw


class BookData(Struct, gc=False):
    symbol: str
    bids: list[Level] = []
    asks: list[Level] = []
    checksum: int | None = None  # CRC32 (unsigned) of the best 10 levels per side after this message
    timestamp: str = ""  # RFC 3339


class BookMsg(Struct, tag_field="channel", tag="book", gc=False):
    type: str  # snapshot | update
    data: list[BookData]


class Trade(Struct, kw_only=True, gc=False):
    symbol: str
    side: str  # the taker's side: buy | sell
    price: float
    qty: float
    ord_type: str = ""  # the taker's order type: limit | market
    trade_id: int  # sequential per pair
    timestamp: str = ""


class TradeMsg(Struct, tag_field="channel", tag="trade", gc=False):
    type: str  # snapshot (the last 50, on subscribe) | update
    data: list[Trade]


class Pair(Struct, kw_only=True, gc=False):
    """A tradable pair of the `instrument` channel (the fields the lake keeps, and the precisions)."""

    symbol: str
    base: str | None = None
    quote: str | None = None
    status: str | None = None  # online, cancel_only, delisted, limit_only, maintenance, post_only, reduce_only, work_in_progress
    qty_precision: int | None = None
    qty_increment: float | None = None
    price_precision: int | None = None
    cost_precision: int | None = None
    cost_min: float | None = None
    tick_size: float | None = None
    price_increment: float | None = None
    qty_min: float | None = None


class InstrumentData(Struct, gc=False):
    pairs: list[Pair] = []  # `assets` is not kept (not decoded)


class InstrumentMsg(Struct, tag_field="channel", tag="instrument", gc=False):
    type: str  # snapshot | update
    data: InstrumentData


class HeartbeatMsg(Struct, tag_field="channel", tag="heartbeat", gc=False):
    pass


class StatusMsg(Struct, tag_field="channel", tag="status", gc=False):
    type: str = "update"
    data: Raw = Raw(b"null")  # system status (online, maintenance, ...), api version, connection id


class Probe(Struct, gc=False):
    """Lenient view of a frame the typed decoder refused: method responses (acks, pong, errors)
    and bad frames, classified by their envelope."""

    channel: str | None = None
    type: str | None = None
    method: str | None = None
    success: bool | None = None
    error: str | None = None
    symbol: str | None = None
    result: dict | None = None
    data: object = None
    req_id: int | None = None


decoder = msgspec.json.Decoder(Union[BookMsg, TradeMsg, InstrumentMsg, HeartbeatMsg, StatusMsg])
book_decoder = msgspec.json.Decoder(BookMsg)
probe_decoder = msgspec.json.Decoder(Probe)
_enc = msgspec.json.Encoder()


# ---- requests ---------------------------------------------------------------------------------
def request(method: str, channel: str, symbols: Iterable[str] | None = None, **params) -> str:
    p: dict = {"channel": channel}
    if symbols is not None:
        p["symbol"] = list(symbols)
    p.update(params)
    return _enc.encode({"method": method, "params": p}).decode()


def subscribe_messages(symbols: Iterable[str], depth: int = DEFAULT_DEPTH) -> list[str]:
    """book first (its snapshot starts the book), then trades (their snapshot covers the moments
    in between), then reference data for every pair (the normalizer keeps the collected ones)."""
    s = list(symbols)
    return [
        request("subscribe", "book", s, depth=depth, snapshot=True),
        request("subscribe", "trade", s, snapshot=True),
        request("subscribe", "instrument", snapshot=True),
    ]


def book_resubscribe(symbol: str, depth: int = DEFAULT_DEPTH) -> list[str]:
    """A fresh book snapshot of one pair on the same connection: unsubscribe, then subscribe again."""
    return [request("unsubscribe", "book", [symbol], depth=depth),
            request("subscribe", "book", [symbol], depth=depth, snapshot=True)]
