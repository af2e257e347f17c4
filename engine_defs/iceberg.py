"""`iceberg_tables`: the lake's uploaded files published as Apache Iceberg tables (engine.lake.iceberg),
after the catalog manifest. Unpartitioned: one publish covers every table and is incremental."""

import dagster as dg

from engine_defs.assets import CATALOG_KEY, GROUP
from engine_defs.resources import EngineResource, _env_overlay


@dg.asset(
    name="iceberg_tables",
    deps=[CATALOG_KEY],
    group_name=GROUP,
    kinds={"iceberg", "parquet"},
    description="Every lake table as an Apache Iceberg table (l2, trades, gaps, instruments, quotes): the uploaded "
                "Parquet files registered in place, no copy; new files appended, files a compaction replaced swapped "
                "for the compacted one in one snapshot. SQLite catalog under the lake home, or the REST catalog of "
                "ENGINE_ICEBERG_REST_URI. Read with polars.scan_iceberg, pyiceberg, Spark, Trino or DuckDB.",
)
def iceberg_tables(context: dg.AssetExecutionContext, engine: EngineResource) -> dg.MaterializeResult:
    from engine.lake import iceberg

    eng = engine.engine(writer=True)
    config = iceberg.IcebergConfig.from_env()
    with _env_overlay(engine._credentials()):  # the store's FileIO needs the S3 credentials too
        results = iceberg.publish(eng, config=config)
    rows = [f"| {config.namespace}.{r.table} | {r.files} | {r.rows} | +{r.added} / -{r.removed} | {r.snapshot_id} |"
            for r in results]
    table_md = "\n".join(["| table | files | rows | this run | snapshot |", "|---|---|---|---|---|", *rows])
    context.log.info(f"iceberg: {sum(r.added for r in results)} file(s) added, "
                     f"{sum(r.removed for r in results)} replaced, catalog {config.describe()}")
    return dg.MaterializeResult(metadata={
        "tables": dg.MetadataValue.md(table_md),
        "catalog": dg.MetadataValue.text(config.describe()),
        "warehouse": dg.MetadataValue.text(f"{iceberg.warehouse_uri(eng.store)}/{config.namespace}"),
        "files_registered": dg.MetadataValue.int(sum(r.files for r in results)),
        "files_added": dg.MetadataValue.int(sum(r.added for r in results)),
        "files_removed": dg.MetadataValue.int(sum(r.removed for r in results)),
        "dagster/row_count": dg.MetadataValue.int(sum(r.rows for r in results)),
        "snapshot_ids": dg.MetadataValue.json({r.table: r.snapshot_id for r in results}),
        "publish_s": dg.MetadataValue.float(round(sum(r.seconds for r in results), 3)),
    })
