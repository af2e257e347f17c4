"""Project-local DAGSTER_HOME: SQLite storage, telemetry and the first-visit pop-up off, a small run
queue, run monitoring and tick retention. `python -m engine_defs.instance [DIR]` creates it and prints its path.

    export DAGSTER_HOME=$(python -m engine_defs.instance)   # default: <repo>/.dagster_home

`ensure_workspace` writes the workspace of `./scripts/run`: one code server (`code_server_args`,
`dagster api grpc`) that the webserver and the daemon share, instead of each starting its own from
the repo's workspace.yaml; the daemon would also start a fresh one every 60 s (its workspace
refresh), the old one living on while it runs a run: two or three copies of the definitions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = ROOT / ".dagster_home"

DAGSTER_YAML = """\
# Written by engine_defs/instance.py; rewritten when its settings change.
telemetry:
  enabled: false
nux:
  enabled: false
storage:  # Dagster's SQLite storage, event batches in one transaction (engine_defs/event_storage.py)
  custom:
    module: engine_defs.event_storage
    class: EngineSqliteStorage
    config:
      base_dir: {home}/storage
local_artifact_storage:
  module: dagster._core.storage.root
  class: LocalArtifactStorage
  config:
    base_dir: {home}
compute_logs:  # a run's stdout/stderr in files, without two tail + watcher processes per run (engine_defs/compute_logs.py)
  module: engine_defs.compute_logs
  class: FileComputeLogManager
  config:
    base_dir: {home}/logs
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: {max_runs}
    dequeue_interval_seconds: {dequeue_s}
    tag_concurrency_limits:  # a backfill runs one (multi-partition) run at a time: bounded memory, uploads go on
      - key: dagster/backfill
        limit: {backfill_runs}
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_resume_run_attempts: 0
  poll_interval_seconds: {monitor_s}
run_retries:
  enabled: false
auto_materialize:  # Dagster's default; stated because engine_defs/daemon.py shortens the constant it falls back on
  minimum_interval_seconds: 30
sensors:
  use_threads: true
  num_workers: 2
schedules:
  use_threads: true
  num_workers: 2
retention:
  schedule:
    purge_after_days: 30
  sensor:
    purge_after_days:
      skipped: 1
      failure: 30
      success: 7
"""


def instance_yaml(home: Path, max_concurrent_runs: int | None = None) -> str:
    return DAGSTER_YAML.format(
        home=Path(home).resolve(),
        max_runs=max_concurrent_runs or int(os.environ.get("ENGINE_DAGSTER_MAX_RUNS", "2")),
        dequeue_s=int(os.environ.get("ENGINE_DAGSTER_DEQUEUE_S", "1")),  # a backfill's next run starts within 1 s
        backfill_runs=int(os.environ.get("ENGINE_DAGSTER_BACKFILL_RUNS", "1")),
        monitor_s=int(os.environ.get("ENGINE_DAGSTER_MONITOR_S", "30")),
    )


def ensure_instance(home: str | os.PathLike | None = None, max_concurrent_runs: int | None = None) -> Path:
    """Create (or update) DAGSTER_HOME with the engine's dagster.yaml; returns its absolute path."""
    home = Path(home or os.environ.get("DAGSTER_HOME") or DEFAULT_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    (home / "storage").mkdir(exist_ok=True)
    text = instance_yaml(home, max_concurrent_runs)
    path = home / "dagster.yaml"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return home


CODE_LOCATION = "engine"  # the location name of the repo's workspace.yaml: same sensor and schedule state
DEFS_MODULE = "engine_defs.definitions"

WORKSPACE_YAML = """\
# Written by engine_defs/instance.py: the one code server of ./scripts/run (`dagster api grpc` on this
# port), shared by dagster-webserver, dagster-daemon and the dagster CLI (-w this file).
load_from:
  - grpc_server:
      host: 127.0.0.1
      port: {port}
      location_name: {location}
"""


def code_server_args(port: int) -> list[str]:
    """Arguments of `dagster` for the shared code server: the engine's definitions served over gRPC
    on 127.0.0.1:`port`. Runs are launched through it (DefaultRunLauncher): run workers are its children."""
    return ["api", "grpc", "--module-name", DEFS_MODULE, "--host", "127.0.0.1", "--port", str(port),
            "--location-name", CODE_LOCATION]


def ensure_workspace(home: str | os.PathLike, port: int) -> Path:
    """DAGSTER_HOME/code_server_workspace.yaml pointing at the shared code server on `port`; its path."""
    from engine.fsio import atomic_write_bytes

    path = Path(home).resolve() / "code_server_workspace.yaml"
    atomic_write_bytes(path, WORKSPACE_YAML.format(port=int(port), location=CODE_LOCATION).encode())
    return path


def main(argv: list[str]) -> int:
    print(ensure_instance(argv[0] if argv else None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
