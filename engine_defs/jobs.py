"""Jobs: uploads (targeted by the catalog sensor), compaction (targeted by the nightly schedule and
backfills) and a flush job that asks running collectors to flush their buffers now."""


import dagster as dg

from engine_defs.assets import CATALOG_KEY, TABLES, compacted_key, uploaded_key
from engine_defs.resources import EngineResource

# One process per run: the steps (a few tables and the manifest) share one interpreter and one
# Engine open instead of a subprocess each, which cost ~2 s and ~250 MB per step.
upload_job = dg.define_asset_job(
    "upload_job",
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.assets(*[uploaded_key(t) for t in TABLES], CATALOG_KEY),
    description="Upload a (date, market) partition's new raw files, run the gap/coverage checks and republish "
                "the manifest. The catalog sensor requests one run per touched partition.",
)

compact_job = dg.define_asset_job(
    "compact_job",
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.assets(*[compacted_key(t) for t in TABLES], CATALOG_KEY),
    description="Compact a closed (date, market) partition (integrity-checked before upload) and republish the "
                "manifest. Nightly schedule; backfill any date × market range from the UI or the CLI (up to "
                "ENGINE_DAGSTER_BACKFILL_PARTITIONS partitions per run).",
)


class FlushError(RuntimeError):
    pass


@dg.op(description="Ask every running collector of the lake to flush its buffers to Parquet now (SIGUSR1).")
def request_collector_flush(context: dg.OpExecutionContext, engine: EngineResource) -> int:
    from engine.collect.status import request_flush

    n = request_flush(engine.home)
    if n == 0:
        context.log.warning(
            f"no running collector found for lake {engine.home}: nothing was flushed now; a flush request file was "
            "left for the next collector that starts. Start one with `data-engine collect` (or ./scripts/run)."
        )
    else:
        context.log.info(f"asked {n} running collector(s) of {engine.home} to flush; the catalog sensor will see "
                         "their files within its next ticks")
    context.add_output_metadata({"collectors_signalled": n, "lake": engine.home})
    return n


@dg.job(description="Ask running collectors to flush now (their files then flow through the sensor's upload runs).")
def flush_job():
    request_collector_flush()
