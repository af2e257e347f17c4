"""`quotes`: the derived best bid/ask table per (date, market), downstream of `compacted_l2`.

Compaction stores each closed day's quotes (`engine.lake.derived.derive_partition`); this asset
stores them for a compacted day that has none current (compacted before quotes existed, or a
derivation that failed) and reports the partition. A day not compacted yet stays unstored: its
quotes are derived from l2 when read. Loading the asset (`engine_defs.io`) returns
`eng.quotes(...)` for the partition either way.
"""


import dagster as dg

from engine_defs import lake
from engine_defs.assets import GROUP, compacted_key, stats_metadata
from engine_defs.io import lake_asset
from engine_defs.partitions import partitions_def, split_partition_key
from engine_defs.resources import EngineResource

QUOTES_KEY = dg.AssetKey("quotes")


def stored_quotes_current(eng, source: str, market: str, date: str) -> bool:
    from engine.research.quotes import _is_current

    return _is_current(eng, source, market, date)


@lake_asset(
    name="quotes",
    deps=[compacted_key("l2")],
    partitions_def=partitions_def,
    group_name=GROUP,
    kinds={"parquet", "polars"},
    description="Best bid/ask per change, derived from l2. Stored per compacted day (compaction writes it; this "
                "asset fills a compacted day without current quotes); an open day's quotes are derived when read. "
                "Load it by name for eng.quotes(...) of the partition.",
)
def quotes(context: dg.AssetExecutionContext, engine: EngineResource) -> dg.MaterializeResult:
    date, source, market = split_partition_key(context.partition_key)
    eng = engine.engine()
    l2 = eng.catalog.files_in(("l2", source, market, date))
    compacted = len(l2) == 1 and l2[0].compacted
    if compacted and not stored_quotes_current(eng, source, market, date):
        from engine.lake.derived import derive_partition

        w = engine.engine(writer=True)
        e = derive_partition(w, source, market, date)
        state = f"derived from the compacted l2 day and stored as {e.key}"
        eng.catalog.refresh()
    elif stored_quotes_current(eng, source, market, date):
        state = "stored and current (written after every l2 file of the day)"
    elif l2:
        state = "not stored: the l2 day is not compacted yet, so quotes are derived from l2 when loaded"
    else:
        state = "no l2 in this partition"
    context.log.info(f"quotes {source}:{market} {date}: {state}")
    md = {"state": dg.MetadataValue.text(state)}
    if stored_quotes_current(eng, source, market, date):
        md.update(stats_metadata(quotes_stats(eng, source, market, date)))
    md["l2_rows"] = dg.MetadataValue.int(sum(e.rows for e in l2))
    return dg.MaterializeResult(metadata=md)


def quotes_stats(eng, source: str, market: str, date: str) -> lake.PartStats:
    """Catalog figures of the stored quotes partition, with its rows per hour (receive time)."""
    from engine_defs.display import hourly_counts

    st = lake.part_stats(eng, "quotes", source, market, date, read_rows=False)
    files = eng.catalog.files_in(("quotes", source, market, date))
    st.hourly_rows = hourly_counts(lake.read_column(eng, files, "recv_ts"), lake.day_bounds(date)[0])
    return st


derived_assets = [quotes]
