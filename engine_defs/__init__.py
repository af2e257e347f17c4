"""Dagster definitions for the market-data engine (the core `engine` package never imports Dagster).

Modules follow Dagster's own project layout: `partitions`, `resources`, `assets`, `checks`,
`sensors`, `schedules`, `jobs`, and `definitions` (which only wires them into `Definitions`).
`instance` creates the project-local DAGSTER_HOME.
"""
