"""The process supervisor behind `./scripts/run` (collectors, replay exchanges, Dagster processes).

Standard library and `engine` only: Dagster runs in the child processes it starts, never in here.
"""
