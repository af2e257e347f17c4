"""`python -m engine_defs.daemon run -w WORKSPACE`: `dagster-daemon`, with the backfill daemon looking
for new backfills every BACKFILL_INTERVAL_S seconds instead of Dagster's fixed 30.

A backfill launched from the UI (or GraphQL, or the CLI) waits for the backfill daemon's next
iteration before its first run is even created: 0–30 s, 15 s on average, on top of a
30 days × 6 markets compaction that itself takes ~30 s. Dagster has no setting for that loop's
interval (`dagster._daemon.backfill.execute_backfill_iteration_loop` reads the module constant
`DEFAULT_DAEMON_INTERVAL_SECONDS` when it starts), so this entry point sets the constant before
the daemon starts. An iteration with no backfill in progress is one query; one in progress is
evaluated each time (~0.1 s of daemon CPU). The only other user of the constant, the asset daemon,
gets its 30 s back through `auto_materialize.minimum_interval_seconds` in dagster.yaml (instance.py).
Everything else is `dagster-daemon` unchanged: same arguments, same daemons.
"""

from __future__ import annotations

import os
import sys

BACKFILL_INTERVAL_S = int(os.environ.get("ENGINE_DAGSTER_BACKFILL_INTERVAL_S", "2"))


def set_backfill_interval(seconds: int = BACKFILL_INTERVAL_S) -> None:
    """Make the backfill daemon (once started in this process) iterate every `seconds`."""
    from dagster._daemon import controller

    if not hasattr(controller, "DEFAULT_DAEMON_INTERVAL_SECONDS"):  # a Dagster upgrade moved it: say so
        raise RuntimeError("dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS is gone; "
                           "engine_defs/daemon.py needs updating for this Dagster version")
    controller.DEFAULT_DAEMON_INTERVAL_SECONDS = max(1, int(seconds))


def main(argv: list[str] | None = None) -> int:
    from dagster._daemon.cli import main as dagster_daemon

    set_backfill_interval()
    sys.argv = ["dagster-daemon", *(sys.argv[1:] if argv is None else argv)]
    return dagster_daemon() or 0


def daemon_cmd(workspace: str) -> list[str]:
    """The command that starts the daemon on `workspace` (./scripts/run, benchmarks, tests)."""
    return [sys.executable, "-m", "engine_defs.daemon", "run", "-w", str(workspace)]


if __name__ == "__main__":
    sys.exit(main())
