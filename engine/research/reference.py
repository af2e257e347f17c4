"""Reference data questions: which version of an instrument was in force, and which markets of every
venue trade one asset.

The `instruments` table (`engine.schema.INSTRUMENTS_SCHEMA`) is append-only: a version holds from
its `valid_from` until the next version of the same (source, instrument). Spot instruments name
their asset in `base`; contracts in `underlying`. Here both are read as one `underlying` column, so
`BTC` maps Kalshi's KXBTC contracts and every venue's BTC spot markets alike, with no venue named.
"""

from __future__ import annotations

import polars as pl

from engine.schema import time_cols
from engine.timeutil import result_times, to_ns


def instruments(eng, source: str | None = None, market: str | None = None, instrument: str | None = None,
                at=None, *, history: bool = False, raw_ns: bool = False) -> pl.DataFrame:
    """One row per instrument: the version in force at `at` (any time form the engine takes), or the
    latest when `at` is None. `history=True` returns every version instead (then `at` bounds them).
    `underlying` is filled from `base` for spot instruments."""
    df = eng.read("instruments", source=source, market=market, instrument=instrument, raw_ns=True)
    if df.is_empty():
        return result_times(df, time_cols("instruments"), raw_ns=raw_ns)
    df = df.with_columns(
        pl.col("source").cast(pl.Utf8), pl.col("market").cast(pl.Utf8), pl.col("instrument").cast(pl.Utf8),
        pl.col("kind").cast(pl.Utf8),
        pl.coalesce(pl.col("underlying"), pl.col("base")).alias("underlying"),
    )
    if at is not None:
        df = df.filter(pl.col("valid_from") <= to_ns(at))
    df = df.sort(["source", "instrument", "valid_from"], maintain_order=True)
    if not history:
        df = df.group_by(["source", "instrument"], maintain_order=True).last()
    return result_times(df.sort(["source", "market", "instrument"], maintain_order=True), time_cols("instruments"),
                        raw_ns=raw_ns)


def related(eng, asset: str, at=None) -> pl.DataFrame:
    """Every market of one asset across venues: (source, market, kind, key = "source:market",
    instruments = how many instruments of that market), e.g. `related("BTC")` lists
    coinbase:BTC-USD, kraken:BTC-USD and kalshi:KXBTC."""
    df = instruments(eng, at=at, raw_ns=True)
    if df.is_empty():
        return pl.DataFrame(schema={"source": pl.Utf8, "market": pl.Utf8, "kind": pl.Utf8, "key": pl.Utf8,
                                    "instruments": pl.UInt32})
    return (
        df.filter(pl.col("underlying").str.to_uppercase() == asset.upper())
        .group_by(["source", "market", "kind"], maintain_order=True)
        .agg(pl.len().alias("instruments"))
        .with_columns(pl.concat_str([pl.col("source"), pl.col("market")], separator=":").alias("key"))
        .select(["source", "market", "kind", "key", "instruments"])
        .sort(["kind", "source", "market"])
    )
