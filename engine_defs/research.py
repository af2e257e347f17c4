"""An example research asset: 1-minute realized volatility per (date, market), gap-aware.

`minute_vol` takes the quotes of a partition (the `quotes` asset, loaded through the lake IO
manager) and returns one row per instrument and minute: the mid at the minute's close (the last
quote in force, carried over quiet minutes), the log return from the previous close, and `valid`:
the trailing 1-minute window ending at the close saw a book started by a snapshot and no gap
(`eng.valid`, engine/research/windows.py), so a return across a disconnect is never counted.

The asset's value is that frame (stored by the default IO manager); its metadata summarises the
valid returns: 1-minute volatility (root mean square of the returns), scaled to a day and a year,
the share of valid minutes, per instrument and per hour.
"""

import math
from typing import TYPE_CHECKING

import dagster as dg

from engine.timeutil import NS, to_ns
from engine_defs import lake
from engine_defs.derived import QUOTES_KEY
from engine_defs.display import RULER, sparkline
from engine_defs.partitions import partitions_def, split_partition_key
from engine_defs.resources import EngineResource

if TYPE_CHECKING:  # imported where used: loading the definitions (code server, every run) stays light
    import polars as pl

GROUP = "research"
MINUTE = 60 * NS
MINUTES_PER_DAY = 1440
MINUTES_PER_YEAR = 525_600  # crypto trades around the clock
MAX_TABLE_ROWS = 20


def out_schema() -> dict:
    """Columns and types of `minute_vol`'s frame."""
    import polars as pl

    return {"source": pl.String, "market": pl.String, "instrument": pl.String, "minute": pl.Datetime("ns", "UTC"),
            "close_ts": pl.Datetime("ns", "UTC"), "quotes": pl.UInt32, "mid": pl.Float64, "ret": pl.Float64,
            "valid": pl.Boolean}


def minute_vol(eng, q: "pl.DataFrame", end=None, window: str = "1m") -> "pl.DataFrame":
    """Per (instrument, minute): quotes in the minute, mid at its close, log return from the previous
    close, and whether the trailing `window` ending at the close is valid. Minutes run from each
    instrument's first quote to its last; a minute closing after `end` (the data's end: sealed
    watermark or day end) is left out, its close not yet seen."""
    import polars as pl

    schema = out_schema()
    mids = (
        q.filter((pl.col("bid_price") > 0) & (pl.col("ask_price") > 0))
        .select(pl.col("source").cast(pl.String), pl.col("market").cast(pl.String),
                pl.col("instrument").cast(pl.String), "ts",
                ((pl.col("bid_price") + pl.col("ask_price")) / 2).alias("mid"))
    )
    if mids.height == 0:
        return pl.DataFrame(schema=schema)
    keys = ["source", "market", "instrument"]
    per_min = (
        mids.sort(keys + ["ts"], maintain_order=True)
        .with_columns(pl.col("ts").dt.truncate("1m").alias("minute"))
        .group_by(keys + ["minute"], maintain_order=True)
        .agg(pl.len().alias("quotes"), pl.col("mid").last())
    )
    grid = (
        per_min.group_by(keys).agg(pl.col("minute").min().alias("lo"), pl.col("minute").max().alias("hi"))
        .with_columns(pl.datetime_ranges("lo", "hi", interval="1m").alias("minute"))
        .explode("minute").drop("lo", "hi")
    )
    out = (
        grid.join(per_min, on=keys + ["minute"], how="left")
        .sort(keys + ["minute"])
        .with_columns(pl.col("quotes").fill_null(0).cast(pl.UInt32),
                      pl.col("mid").forward_fill().over(keys),
                      (pl.col("minute") + pl.duration(minutes=1)).alias("close_ts"))
        .with_columns((pl.col("mid") / pl.col("mid").shift(1)).log().over(keys).alias("ret"))
    )
    if end is not None:
        out = out.filter(pl.col("close_ts").dt.epoch("ns") <= to_ns(end))
    if out.height == 0:
        return pl.DataFrame(schema=schema)
    out = eng.valid(out.rename({"close_ts": "ts"}), window=window).rename({"ts": "close_ts"})
    out = out.with_columns((pl.col("valid") & pl.col("ret").is_not_null()).alias("valid"))
    return out.select(list(schema)).cast(schema)


def summary(df: "pl.DataFrame") -> dict:
    """Figures of the valid returns: count, valid share, 1-minute vol (RMS return) and its day/year scaling."""
    import polars as pl

    with_ret = df.filter(pl.col("ret").is_not_null())
    good = df.filter(pl.col("valid"))["ret"]
    n = good.len()
    vol = math.sqrt(float((good**2).mean())) if n else None
    return {
        "minutes": with_ret.height,
        "valid_minutes": n,
        "valid_share": (n / with_ret.height) if with_ret.height else 0.0,
        "vol_1m": vol,
        "vol_day": vol * math.sqrt(MINUTES_PER_DAY) if vol is not None else None,
        "vol_annualized": vol * math.sqrt(MINUTES_PER_YEAR) if vol is not None else None,
        "max_abs_ret": float(good.abs().max()) if n else None,
    }


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.3g} %"


def instruments_table(df: "pl.DataFrame") -> str:
    rows = []
    for (inst,), g in df.group_by(["instrument"]):
        s = summary(g)
        rows.append((s["valid_minutes"], inst, s))
    rows.sort(key=lambda r: (-r[0], r[1]))
    lines = ["| instrument | minutes | valid | 1-min vol | daily vol | annualized |", "|---|---|---|---|---|---|"]
    for _, inst, s in rows[:MAX_TABLE_ROWS]:
        lines.append(f"| {inst} | {s['minutes']} | {100 * s['valid_share']:.1f} % | {_pct(s['vol_1m'])} | "
                     f"{_pct(s['vol_day'])} | {_pct(s['vol_annualized'])} |")
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"\n… {len(rows) - MAX_TABLE_ROWS} more instruments")
    return "\n".join(lines)


def hourly_valid_markdown(df: "pl.DataFrame") -> str:
    """Valid share of minutes per UTC hour as a sparkline (· = no minutes that hour)."""
    import polars as pl

    h = (df.filter(pl.col("ret").is_not_null()).group_by(pl.col("minute").dt.hour().alias("h"))
         .agg(pl.col("valid").mean().alias("share"), pl.len().alias("n")))
    share = {r["h"]: r["share"] for r in h.iter_rows(named=True)}
    line = sparkline([share.get(i) for i in range(24)], top=1.0, empty=" ")
    line = "".join("_" if i in share and share[i] == 0 else c for i, c in enumerate(line))
    return (f"```\n{line}\n{RULER}(UTC hour)\n```\nshare of valid minutes per hour "
            "(█ = all valid, _ = none valid, blank = no minutes)")


@dg.asset(
    name="realized_vol_1m",
    ins={"quotes": dg.AssetIn(QUOTES_KEY)},
    partitions_def=partitions_def,
    group_name=GROUP,
    kinds={"polars"},
    description="Example research asset: per instrument and minute, the mid at the close, its log return and "
                "whether the trailing minute is gap-free (eng.valid); metadata: 1-minute realized volatility of the "
                "valid returns and the share of valid minutes. Takes `quotes` through the lake IO manager.",
)
def realized_vol_1m(context: dg.AssetExecutionContext, engine: EngineResource, quotes) -> dg.Output:
    """`quotes`: the partition's polars.DataFrame, from the lake IO manager (unannotated: an annotation
    would make Dagster import polars when the definitions load)."""
    date, source, market = split_partition_key(context.partition_key)
    eng = engine.engine()
    day0, day1 = lake.day_bounds(date)
    end = min(day1, eng.catalog.watermark(source))
    df = minute_vol(eng, quotes, end=end)
    s = summary(df)
    md = {
        "dagster/row_count": dg.MetadataValue.int(df.height),
        "quotes": dg.MetadataValue.int(quotes.height),
        "instruments": dg.MetadataValue.int(df["instrument"].n_unique() if df.height else 0),
        "minutes": dg.MetadataValue.int(s["minutes"]),
        "valid_minutes": dg.MetadataValue.int(s["valid_minutes"]),
        "valid_share": dg.MetadataValue.float(round(s["valid_share"], 6)),
        "vol_1m": dg.MetadataValue.float(s["vol_1m"]) if s["vol_1m"] is not None else dg.MetadataValue.null(),
        "vol_day": dg.MetadataValue.float(s["vol_day"]) if s["vol_day"] is not None else dg.MetadataValue.null(),
        "vol_annualized": (dg.MetadataValue.float(s["vol_annualized"]) if s["vol_annualized"] is not None
                           else dg.MetadataValue.null()),
        "max_abs_ret": dg.MetadataValue.float(s["max_abs_ret"]) if s["max_abs_ret"] is not None
        else dg.MetadataValue.null(),
        "window_end": dg.MetadataValue.text(lake.fmt_ts(end)),  # day end or the sealed watermark
    }
    if df.height:
        md["by_instrument"] = dg.MetadataValue.md(instruments_table(df))
        md["valid_per_hour"] = dg.MetadataValue.md(hourly_valid_markdown(df))
    context.log.info(f"{source}:{market} {date}: {s['minutes']} minute returns, {100 * s['valid_share']:.1f} % valid, "
                     f"1-min vol {_pct(s['vol_1m'])}")
    return dg.Output(df, metadata=md)


research_assets = [realized_vol_1m]
