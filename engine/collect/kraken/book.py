"""Kraken's order book per pair and its CRC32 checksum: one implementation for the normalizer, the
replay exchange and the capture generator, so all three agree on every checksum.

The checksum (Kraken's "Book checksum (WebSocket v2)" guide, docs/kraken-protocol.md): for each of
the best 10 asks (price low to high), then each of the best 10 bids (high to low), the price's
decimal text without `.` and without leading zeros, then the quantity's the same way; all
concatenated; CRC32, unsigned. The text is the one Kraken sent (`"qty":0.00100000` -> `100000`),
which is why levels keep it (`wire.Level`, msgspec.Raw) instead of a float.

A side keeps its levels in a dict by sort key (the price for asks, minus the price for bids, so
both ascend from the best) and the keys in a sorted list, plus the checksum tokens of its best 10,
updated by the changes that reach them (a change deeper than the 10th level costs one comparison;
one in the best 10 one token), so verifying every message costs little beside keeping the book.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left, insort
from itertools import islice
from typing import Iterable, Iterator

from msgspec import Raw

from engine.collect.kraken.wire import CHECKSUM_LEVELS, Level

INF = float("inf")
TOP = CHECKSUM_LEVELS
_crc = zlib.crc32


def token(text: bytes | str | Raw) -> bytes:
    """A price's or quantity's part of the checksum string: its decimal text without `.` and
    without leading zeros (`45285.2` -> `452852`, `0.00100000` -> `100000`)."""
    b = text.encode() if isinstance(text, str) else bytes(text)
    return b.replace(b".", b"").lstrip(b"0")


def level_token(level: Level) -> bytes:
    return bytes(level.price).replace(b".", b"").lstrip(b"0") + bytes(level.qty).replace(b".", b"").lstrip(b"0")


def checksum(asks: Iterable[tuple], bids: Iterable[tuple]) -> int:
    """Kraken's checksum of a book given best first: `asks` (price low to high) and `bids` (high to
    low) as (price_text, qty_text) pairs; only the first 10 of each count."""
    parts = []
    for side in (asks, bids):
        for p, q in islice(side, TOP):
            parts.append(token(p))
            parts.append(token(q))
    return _crc(b"".join(parts))


def make_level(price: bytes | str, qty: bytes | str) -> Level:
    """A level from decimal texts (for the generator and the replay exchange)."""
    return Level(Raw(price.encode() if isinstance(price, str) else price), Raw(qty.encode() if isinstance(qty, str) else qty))


class Side:
    """One side of a book, best first. `keys` ascend (price for asks, -price for bids), `lv` maps a
    key to its `Level` (the text as sent), `toks` holds the checksum tokens of the best 10 levels
    (`level_token`, in `keys` order), kept up to date by each change that reaches them, so a
    checksum costs one token per such change, not ten; `top` is their join, rebuilt when `dirty`.
    The normalizer does `put`/`remove` inline (its hot path, same logic)."""

    __slots__ = ("keys", "lv", "toks", "top", "dirty", "ptok")

    def __init__(self):
        self.keys: list[float] = []
        self.lv: dict[float, Level] = {}
        self.toks: list[bytes] = []
        self.top = b""
        self.dirty = False
        self.ptok: dict[float, bytes] = {}  # key -> token of its price text (the normalizer's cache; one pair, one precision)

    def __len__(self) -> int:
        return len(self.keys)

    def put(self, k: float, level: Level) -> None:
        """Set the level at key `k` (quantity > 0)."""
        keys, lv = self.keys, self.lv
        edge = keys[TOP - 1] if len(keys) > TOP else INF  # the 10th best key: beyond it the checksum does not see
        if k in lv:
            lv[k] = level
            if k <= edge:
                self.toks[bisect_left(keys, k)] = level_token(level)
                self.dirty = True
        else:
            insort(keys, k)
            lv[k] = level
            if k < edge:
                toks = self.toks
                toks.insert(bisect_left(keys, k), level_token(level))
                if len(toks) > TOP:
                    del toks[TOP]
                self.dirty = True

    def remove(self, k: float) -> bool:
        """Remove the level at key `k`; False if there was none."""
        keys, lv = self.keys, self.lv
        if k not in lv:
            return False
        edge = keys[TOP - 1] if len(keys) > TOP else INF
        r = bisect_left(keys, k)
        del lv[k]
        del keys[r]
        if k <= edge:
            toks = self.toks
            del toks[r]
            if len(keys) >= TOP:  # the next level enters the best 10
                toks.append(level_token(lv[keys[TOP - 1]]))
            self.dirty = True
        return True

    def truncate(self, depth: int) -> list[float]:
        """Drop the levels beyond `depth` (>= 10; the venue sends no removal for them); their keys, best first."""
        keys = self.keys
        if len(keys) <= depth:
            return []
        cut = keys[depth:]
        del keys[depth:]
        lv = self.lv
        for k in cut:
            del lv[k]
        return cut  # beyond the best 10: `toks` unchanged

    def top_string(self) -> bytes:
        """The checksum string of the best 10 levels."""
        if self.dirty:
            self.top = b"".join(self.toks)
            self.dirty = False
        return self.top

    def levels(self) -> Iterator[Level]:
        """The levels, best first."""
        lv = self.lv
        return (lv[k] for k in self.keys)


class Book:
    """A pair's book: `bids` and `asks` sides; `checksum()` is Kraken's (kept until a side changes
    among its best 10)."""

    __slots__ = ("bids", "asks", "crc", "ask_crc")

    def __init__(self):
        self.bids = Side()
        self.asks = Side()
        self.crc: int | None = None  # the checksum, until a change reaches the best 10
        self.ask_crc = 0  # CRC32 of the asks' part alone: the start value of the bids' part

    def apply(self, ask: bool, level: Level) -> tuple[float, float]:
        """One level as sent (quantity 0 removes it); returns (price, qty) as floats. Raises
        ValueError for a level that is not a positive price and a non-negative quantity."""
        p, q = float(level.price), float(level.qty)
        if not (0.0 < p < INF and 0.0 <= q < INF):
            raise ValueError(f"absurd level: price {bytes(level.price)!r}, qty {bytes(level.qty)!r}")
        side, k = (self.asks, p) if ask else (self.bids, -p)
        if q:
            side.put(k, level)
        else:
            side.remove(k)
        return p, q

    def truncate(self, depth: int) -> tuple[list[float], list[float]]:
        """Levels beyond `depth` dropped: (bid prices, ask prices) removed."""
        return [-k for k in self.bids.truncate(depth)], self.asks.truncate(depth)

    def checksum(self) -> int:
        b, a = self.bids, self.asks
        if b.dirty or a.dirty or self.crc is None:
            if a.dirty or self.crc is None:
                self.ask_crc = _crc(a.top_string())
            self.crc = _crc(b.top_string(), self.ask_crc)
        return self.crc

    def best(self, ask: bool) -> Level | None:
        s = self.asks if ask else self.bids
        return s.lv[s.keys[0]] if s.keys else None
