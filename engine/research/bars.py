"""Bars from trades: time bars aligned to UTC (empty intervals kept), volume bars, tick bars.

Columns: source, market, instrument, ts (bar start: the UTC-aligned interval start for time bars,
the first trade's ts otherwise), end_ts (exclusive interval end for time bars; the last trade's ts
otherwise), open, high, low, close, volume, vwap, count, buy_volume, sell_volume.
An empty time interval has count 0, volume 0 and null prices.

Volume bars: a trade belongs to bar floor(volume before it / V) of its instrument, so the trade
that reaches the threshold closes its bar (bars are not split). Tick bars: `ticks` trades each.
Trades are taken in (instrument, ts, seq) order, the lake's order.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from engine import schema
from engine.research import parse_duration
from engine.timeutil import result_times, to_ns

KEYS = ["source", "market", "instrument"]


def _aggs():
    p, s = pl.col("price"), pl.col("size")
    return [
        p.first().alias("open"), p.max().alias("high"), p.min().alias("low"), p.last().alias("close"),
        s.sum().alias("volume"), ((p * s).sum() / s.sum()).alias("vwap"), pl.len().cast(pl.Int64).alias("count"),
        pl.when(pl.col("side") == "buy").then(s).otherwise(0.0).sum().alias("buy_volume"),
        pl.when(pl.col("side") == "sell").then(s).otherwise(0.0).sum().alias("sell_volume"),
    ]


def bars(eng, table: str = "trades", every=None, *, volume: float | None = None, ticks: int | None = None,
         source=None, market=None, instrument=None, start=None, end=None, data: pl.DataFrame | None = None,
         allow_unsealed: bool = False, raw_ns: bool = False) -> pl.DataFrame:
    """OHLCV, VWAP and trade count per bar (see module doc). Exactly one of every/volume/ticks.
    `ts`/`end_ts` are Datetime("ns", "UTC"); int64 ns with `raw_ns=True`."""
    out = _bars(eng, table, every, volume, ticks, source, market, instrument, start, end, data, allow_unsealed)
    return result_times(out, schema.time_cols("bars"), raw_ns=raw_ns)


def _bars(eng, table, every, volume, ticks, source, market, instrument, start, end, data, allow_unsealed) -> pl.DataFrame:
    if sum(x is not None for x in (every, volume, ticks)) != 1:
        raise ValueError("bars: give exactly one of every= (e.g. '1m'), volume= or ticks=")
    if table != "trades" and data is None:
        raise ValueError("bars: only the trades table has prices and sizes to aggregate (or pass data=)")
    start, end = to_ns(start, name="start"), to_ns(end, name="end")
    if data is None:
        df = eng.trades(source=source, market=market, instrument=instrument, start=start, end=end,
                        columns=["ts", "source", "market", "instrument", "side", "price", "size", "seq"],
                        allow_unsealed=allow_unsealed, raw_ns=True)
    else:
        df = result_times(data, ["ts"], raw_ns=True)  # a frame of Datetime or int ns times
        if start is not None:
            df = df.filter(pl.col("ts") >= start)
        if end is not None:
            df = df.filter(pl.col("ts") < end)
    for k in KEYS + ["side"]:
        if k not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.String).alias(k))
    df = df.with_columns(pl.col(k).cast(pl.String) for k in KEYS + ["side"])
    sort_cols = KEYS + ["ts"] + (["seq"] if "seq" in df.columns else [])
    df = df.sort(sort_cols, nulls_last=False, maintain_order=True)
    if every is not None:
        return _time_bars(df, parse_duration(every, name="every"), start, end)
    if volume is not None:
        if not volume > 0:
            raise ValueError("bars: volume must be > 0")
        before = pl.col("size").cum_sum().over(KEYS) - pl.col("size")
        df = df.with_columns(_bar=(before / volume).floor().cast(pl.Int64))
    else:
        if int(ticks) < 1:
            raise ValueError("bars: ticks must be >= 1")
        df = df.with_columns(_bar=(pl.int_range(pl.len()).over(KEYS) // int(ticks)).cast(pl.Int64))
    out = df.group_by(KEYS + ["_bar"], maintain_order=True).agg(
        pl.col("ts").first().alias("ts"), pl.col("ts").last().alias("end_ts"), *_aggs()
    )
    return out.drop("_bar").select(KEYS + ["ts", "end_ts", "open", "high", "low", "close", "volume", "vwap", "count",
                                           "buy_volume", "sell_volume"])


def _time_bars(df: pl.DataFrame, step: int, start: int | None, end: int | None) -> pl.DataFrame:
    df = df.with_columns(_b=pl.col("ts") - pl.col("ts").mod(step))  # floor to UTC-aligned multiples
    agg = df.group_by(KEYS + ["_b"]).agg(*_aggs())
    # the full grid per instrument: [floor(start or first trade), end or last trade]
    ext = df.group_by(KEYS).agg(pl.col("_b").min().alias("lo"), pl.col("_b").max().alias("hi"))
    if start is not None:
        ext = ext.with_columns(lo=pl.lit(start - start % step, dtype=pl.Int64))
    if end is not None:
        last = (end - 1) - (end - 1) % step
        ext = ext.with_columns(hi=pl.lit(last, dtype=pl.Int64))
    grid = ext.with_columns(_b=pl.int_ranges("lo", pl.col("hi") + 1, step, dtype=pl.Int64)).explode("_b").drop("lo", "hi")
    out = grid.join(agg, on=KEYS + ["_b"], how="left", nulls_equal=True)
    out = out.with_columns(
        pl.col("count").fill_null(0), pl.col("volume").fill_null(0.0), pl.col("buy_volume").fill_null(0.0),
        pl.col("sell_volume").fill_null(0.0), (pl.col("_b") + step).alias("end_ts"),
    ).rename({"_b": "ts"})
    out = out.sort(KEYS + ["ts"], nulls_last=False)
    return out.select(KEYS + ["ts", "end_ts", "open", "high", "low", "close", "volume", "vwap", "count",
                              "buy_volume", "sell_volume"])


__all__ = ["bars", "np"]
