"""Write-ahead spool: every appended batch lands in an Arrow IPC segment before append returns.

Segments are fsynced at least once a second by a background thread, so a SIGKILL loses at most
the last second. Each batch carries (buffer key, batch id) as IPC custom metadata; the catalog
records, per buffer key, the highest batch id whose rows are in catalogued files (`spool_hw`).
Replay skips what is already durable and a segment is deleted once all its batches are.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from engine.log import get_logger

log = get_logger(component="spool")
SYNC_INTERVAL_S = 0.5


class SpoolLockedError(RuntimeError):
    pass


class _Segment:
    __slots__ = ("no", "path", "table", "fh", "writer", "maxids", "dirty")

    def __init__(self, no: int, path: Path, table: str, schema: pa.Schema):
        self.no, self.path, self.table = no, path, table
        self.fh = open(path, "wb")
        self.writer = pa.ipc.new_stream(self.fh, schema)
        self.maxids: dict[str, int] = {}
        self.dirty = False


class Spool:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lockfd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfd)
            raise SpoolLockedError(
                f"another process is appending to this lake ({self.dir}); one writer per lake home"
            ) from None
        self._lock = threading.Lock()
        self._current: dict[str, _Segment] = {}
        self._closed_segments: dict[Path, dict[str, int]] = {}
        existing = self.segment_paths()
        self._next_no = (int(existing[-1].name.split(".")[0]) + 1) if existing else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, name="spool-sync", daemon=True)
        self._thread.start()

    def segment_paths(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.arrow"))

    # ---- writing -------------------------------------------------------------------
    def write(self, table: str, bufkey: str, batch_id: int, t: pa.Table) -> None:
        meta = {"bufkey": bufkey, "batch": str(batch_id)}
        with self._lock:
            seg = self._current.get(table)
            if seg is None:
                seg = _Segment(self._next_no, self.dir / f"{self._next_no:010d}.{table}.arrow", table, t.schema)
                self._next_no += 1
                self._current[table] = seg
            for b in t.to_batches():
                seg.writer.write_batch(b, custom_metadata=meta)
            seg.fh.flush()
            seg.maxids[bufkey] = batch_id
            seg.dirty = True

    def sync(self) -> None:
        with self._lock:
            for seg in self._current.values():
                if seg.dirty:
                    os.fsync(seg.fh.fileno())
                    seg.dirty = False

    def _sync_loop(self) -> None:
        while not self._stop.wait(SYNC_INTERVAL_S):
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - keep syncing; the error is logged
                log.error("spool_sync_failed", error=str(e))

    def rotate(self) -> None:
        """Close the current segments so they become deletable once their batches are durable."""
        with self._lock:
            for seg in self._current.values():
                seg.writer.close()
                seg.fh.flush()
                os.fsync(seg.fh.fileno())
                seg.fh.close()
                self._closed_segments[seg.path] = dict(seg.maxids)
            self._current.clear()

    def collect(self, spool_hw: dict[str, int]) -> int:
        """Delete closed segments whose every batch is in a catalogued file."""
        removed = 0
        with self._lock:
            for path, maxids in list(self._closed_segments.items()):
                if all(spool_hw.get(k, -1) >= v for k, v in maxids.items()):
                    path.unlink(missing_ok=True)
                    del self._closed_segments[path]
                    removed += 1
        return removed

    # ---- recovery ------------------------------------------------------------------
    def replay(self) -> Iterator[tuple[str, str, int, pa.Table]]:
        """Yield (table, bufkey, batch_id, rows) for every readable batch of every old segment.

        Called at open before new writes; old segments are adopted as closed segments so the
        normal rule deletes them once their rows are durable.
        """
        for path in self.segment_paths():
            maxids: dict[str, int] = {}
            for table, key, bid, t in _read_segment(path):
                maxids[key] = max(maxids.get(key, -1), bid)
                yield table, key, bid, t
            self._closed_segments[path] = maxids

    def pending_keys(self, spool_hw: dict[str, int]) -> set[str]:
        """Buffer keys with spooled batches not yet in a catalogued file (reads, changes nothing)."""
        out: set[str] = set()
        for path in self.segment_paths():
            for _, key, bid, _t in _read_segment(path):
                if bid > spool_hw.get(key, -1):
                    out.add(key)
        return out

    def batches(self, bufkey: str, first: int, last: int) -> Iterator[tuple[int, pa.Table]]:
        """Batches of one buffer with ids in [first, last], read back (a flush failed after the
        buffer handed its rows to the encoder; the spool still has them)."""
        with self._lock:
            for seg in self._current.values():
                seg.fh.flush()
        for path in self.segment_paths():
            for _, key, bid, t in _read_segment(path):
                if key == bufkey and first <= bid <= last:
                    yield bid, t

    def max_batch_id(self) -> int:
        return max((v for m in self._closed_segments.values() for v in m.values()), default=-1)

    def close(self, rotate: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if rotate:
            self.rotate()
        else:
            for seg in self._current.values():
                seg.fh.close()
            self._current.clear()
        os.close(self._lockfd)


def _read_segment(path: Path) -> Iterator[tuple[str, str, int, pa.Table]]:
    """(table, bufkey, batch_id, rows) of every readable batch of one segment; a torn tail ends it."""
    table = path.name.split(".")[1]
    try:
        with open(path, "rb") as f:
            reader = pa.ipc.open_stream(f)
            while True:
                try:
                    batch, meta = reader.read_next_batch_with_custom_metadata()
                except StopIteration:
                    break
                yield table, meta[b"bufkey"].decode(), int(meta[b"batch"]), pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as e:
        log.warning("spool_torn_segment", segment=path.name, error=str(e))
