"""Wires the engine's Dagster definitions together (workspace.yaml points here). Nothing else."""

import dagster as dg

from engine_defs.assets import all_assets
from engine_defs.checks import all_checks
from engine_defs.iceberg import iceberg_tables
from engine_defs.jobs import compact_job, flush_job, upload_job
from engine_defs.resources import EngineResource
from engine_defs.schedules import nightly_compaction
from engine_defs.sensors import catalog_sensor

defs = dg.Definitions(
    assets=[*all_assets, iceberg_tables],
    asset_checks=all_checks,
    jobs=[upload_job, compact_job, flush_job],
    sensors=[catalog_sensor],
    schedules=[nightly_compaction],
    resources={"engine": EngineResource.from_env()},
    executor=dg.in_process_executor,  # steps are I/O on one lake: one process per run, one Engine per run
)
