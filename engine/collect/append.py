"""Normalized rows into the lake, the same way live and offline: shared by the collector
(`engine.collect.runner`) and `ingest`, so the live path never imports the offline one."""

from __future__ import annotations

from engine.log import get_logger
from engine.timeutil import NS

log = get_logger(component="collect")


def seed_trade_ids(eng, norm, source: str, lookback_ns: int = 2 * 86400 * NS) -> None:
    """Max stored (integer) trade_id per instrument of `source` to `norm.seed_trade_ids`, so re-sent
    trade snapshots are not stored twice."""
    last = eng.last_recv_ts(source)
    if last is None:
        return
    try:
        df = eng.trades(source=source, start=last - lookback_ns, allow_unsealed=True, raw_ns=True)
    except Exception as e:  # noqa: BLE001 - a lake without trades or a query error must not stop collection
        log.warning("trade_seed_failed", error=repr(e)[:200])
        return
    if df is None or df.height == 0:
        return
    import polars as pl

    agg = (
        df.select(pl.col("instrument").cast(pl.Utf8), pl.col("trade_id").cast(pl.Int64, strict=False))
        .group_by("instrument")
        .agg(pl.col("trade_id").max())
    )
    seeds = {r[0]: int(r[1]) for r in agg.iter_rows() if r[1] is not None}
    norm.seed_trade_ids(seeds)
    log.info("trade_ids_seeded", products=len(seeds))


def append_tables(eng, tables: dict) -> int:
    n = 0
    for name in ("gaps", "l2", "trades", "instruments"):
        t = tables.get(name)
        if t is not None and t.num_rows:
            n += eng.append(name, t)
    return n
