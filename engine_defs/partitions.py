"""date (daily, UTC, end_offset=1) × market (dynamic "markets") partitions and their key rules.

A market key names source and stream, `coinbase:BTC-USD` or `kalshi:KXBTC`, because Dagster allows
only two dimensions. Keys may not contain `|` or `,` (they break multi-partition keys in the UI and
CLI); each half must also be a valid lake path segment.
"""

from __future__ import annotations

import datetime as dt
import os

import dagster as dg

from engine.paths import check_key_part

START_DATE = os.environ.get("ENGINE_DAGSTER_START_DATE", "2026-01-01")
MARKETS = "markets"

date_partitions = dg.DailyPartitionsDefinition(start_date=START_DATE, end_offset=1, timezone="UTC")
market_partitions = dg.DynamicPartitionsDefinition(name=MARKETS)
partitions_def = dg.MultiPartitionsDefinition({"date": date_partitions, "market": market_partitions})


class PartitionKeyError(ValueError):
    pass


def market_key(source: str, market: str) -> str:
    """`coinbase`, `BTC-USD` → `coinbase:BTC-USD` (validated)."""
    key = f"{source}:{market}"
    validate_market_key(key)
    return key


def validate_market_key(key: str) -> str:
    if "|" in key or "," in key:
        raise PartitionKeyError(f"market partition key {key!r} contains '|' or ',', which break Dagster partition keys")
    source, sep, market = key.partition(":")
    if not sep or ":" in market:
        raise PartitionKeyError(f"market partition key {key!r} must look like source:market, e.g. coinbase:BTC-USD")
    try:
        check_key_part("source", source)
        check_key_part("market", market)
    except ValueError as e:
        raise PartitionKeyError(f"market partition key {key!r}: {e}") from None
    return key


def parse_market_key(key: str) -> tuple[str, str]:
    validate_market_key(key)
    source, _, market = key.partition(":")
    return source, market


def partition_key(date: str, source: str, market: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"date": date, "market": market_key(source, market)})


def split_partition_key(pk) -> tuple[str, str, str]:
    """A (date, market) multi-partition key (object or `date|market` string) → (date, source, market)."""
    if isinstance(pk, dg.MultiPartitionKey):
        dims = pk.keys_by_dimension
        date, mk = dims["date"], dims["market"]
    else:
        date, sep, mk = str(pk).partition("|")  # dimensions are ordered by name: date, market
        if not sep:
            raise PartitionKeyError(f"partition key {pk!r} is not date|source:market")
    source, market = parse_market_key(mk)
    return date, source, market


def date_in_range(date: str, now: dt.datetime | None = None) -> bool:
    """Whether a daily key exists in the date dimension (start date … tomorrow, given end_offset=1)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    last = (now + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    return START_DATE <= date <= last
