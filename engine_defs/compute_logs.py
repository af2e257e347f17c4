"""`FileComputeLogManager`: a run's stdout and stderr captured in files (the UI's stdout/stderr
views), like Dagster's `LocalComputeLogManager`, without mirroring them back to the terminal.

The local manager mirrors each stream with a `tail -F` process watched by a Python
`watch_orphans` process: four processes started for every run, two of them Python interpreters
(~11 MB each, 26 MB in all beside a run worker, and their start-up time in every run of a
backfill). Runs here start under the shared code server, whose terminal is a log file that the
captured files duplicate, so the mirror is dropped: the files, their paths and the UI are the same.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Sequence
from contextlib import contextmanager

from dagster._core.execution.compute_logs import redirect_to_file
from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._utils import ensure_file, touch_file


class FileComputeLogManager(LocalComputeLogManager):
    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        outpath = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDOUT])
        errpath = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDERR])
        ensure_file(outpath)
        ensure_file(errpath)
        with redirect_to_file(sys.stdout, outpath), redirect_to_file(sys.stderr, errpath):
            yield CapturedLogContext(log_key)
        touch_file(self.complete_artifact_path(log_key))  # the capture is complete

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> FileComputeLogManager:
        return cls(inst_data=inst_data, **config_value)
