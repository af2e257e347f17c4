"""Reference data questions: which version of an instrument was in force, which markets of every
venue trade one asset, which contracts are past their expiration without a result.

The `instruments` table (`engine.schema.INSTRUMENTS_SCHEMA`) is append-only: a version holds from
its `valid_from` until the next version of the same (source, instrument). Spot instruments name
their asset in `base`; contracts in `underlying`. Here both are read as one `underlying` column, so
`BTC` maps Kalshi's KXBTC contracts and every venue's BTC spot markets alike, with no venue named.
"""

from __future__ import annotations

import polars as pl

from engine.schema import INSTRUMENTS_SCHEMA, time_cols
from engine.timeutil import now_ns, parse_duration, result_times, to_ns

_UNSETTLED_COLS = ["source", "market", "instrument", "status", "expiration_ts", "close_ts", "valid_from", "hours_late"]


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
        df = df.group_by(["source", "instrument"], maintain_order=True).last().select(INSTRUMENTS_SCHEMA.names)
    return result_times(df.sort(["source", "market", "instrument", "valid_from"], maintain_order=True),
                        time_cols("instruments"), raw_ns=raw_ns)


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


def unsettled(eng, grace="6h", at=None, *, raw_ns: bool = False) -> pl.DataFrame:
    """Binary contracts (any venue) whose `expiration_ts` lies more than `grace` before `at` (default
    now) and whose version in force at `at` has no `result`: settlements that should have arrived.
    Columns: source, market, instrument, status, expiration_ts, close_ts, valid_from (of that
    version), hours_late (since expiration)."""
    g = parse_duration(grace, name="grace")
    t = now_ns() if at is None else to_ns(at)
    df = instruments(eng, at=t, raw_ns=True)
    empty = pl.DataFrame(schema={"source": pl.Utf8, "market": pl.Utf8, "instrument": pl.Utf8, "status": pl.Utf8,
                                 "expiration_ts": pl.Int64, "close_ts": pl.Int64, "valid_from": pl.Int64,
                                 "hours_late": pl.Float64})
    if not df.is_empty():
        df = (df.filter((pl.col("kind") == "binary") & pl.col("expiration_ts").is_not_null()
                        & pl.col("result").is_null() & (pl.col("expiration_ts") <= t - g))
              .with_columns(((t - pl.col("expiration_ts")) / 3.6e12).alias("hours_late"))
              .select(_UNSETTLED_COLS).sort(["expiration_ts", "source", "instrument"]))
    out = df if not df.is_empty() else empty
    return result_times(out, ("expiration_ts", "close_ts", "valid_from"), raw_ns=raw_ns)


def summary(eng) -> dict:
    """Figures of the reference table: versions (rows), instruments per source and kind, contracts
    with a result, and the latest `valid_from` (int ns, None when empty)."""
    df = eng.read("instruments", raw_ns=True)
    if df.is_empty():
        return {"versions": 0, "instruments": {}, "by_kind": {}, "resolved": 0, "latest_valid_from": None}
    latest = (df.with_columns(pl.col("source").cast(pl.Utf8), pl.col("kind").cast(pl.Utf8))
              .sort(["source", "instrument", "valid_from"]).group_by(["source", "instrument"]).last())
    per_source = latest.group_by("source").len().sort("source")
    per_kind = latest.group_by("kind").len().sort("kind")
    return {
        "versions": df.height,
        "instruments": {r[0]: int(r[1]) for r in per_source.iter_rows()},
        "by_kind": {r[0]: int(r[1]) for r in per_kind.iter_rows()},
        "resolved": int(latest["result"].is_not_null().sum()),
        "latest_valid_from": int(df["valid_from"].max()),
    }
