"""Wires the engine's Dagster definitions together (workspace.yaml points here). Nothing else."""

import dagster as dg

from engine_defs.assets import all_assets
from engine_defs.checks import all_checks
from engine_defs.derived import derived_assets
from engine_defs.iceberg import iceberg_tables
from engine_defs.jobs import compact_job, flush_job, upload_job
from engine_defs.reference import (
    reference_assets, reference_checks, reference_jobs, reference_schedules, reference_sensors,
)
from engine_defs.research import research_assets
from engine_defs.resources import EngineResource
from engine_defs.schedules import nightly_compaction
from engine_defs.sensors import catalog_sensor

defs = dg.Definitions(
    assets=[*all_assets, *derived_assets, *research_assets, *reference_assets, iceberg_tables],
    asset_checks=[*all_checks, *reference_checks],
    jobs=[upload_job, compact_job, flush_job, *reference_jobs],
    sensors=[catalog_sensor, *reference_sensors],
    schedules=[nightly_compaction, *reference_schedules],
    resources={"engine": EngineResource.from_env()},  # lake assets carry their IO manager (engine_defs.io)
    executor=dg.in_process_executor,  # steps are I/O on one lake: one process per run, one Engine per run
)
