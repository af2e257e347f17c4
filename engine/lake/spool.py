"""Write-ahead spool: every appended batch lands in a spool segment before append returns.

Segments are fsynced at least once a second by a background thread, so a SIGKILL loses at most
the last second. A segment is a sequence of framed records, one per buffered group:

    MAGIC | meta length, meta crc32 | meta | payload | meta | meta length, meta crc32 | END

The payload is a self-contained Arrow IPC stream; the meta (JSON: buffer key, batch id, rows, the
group's time range, payload length and crc32) is written before and after it, so a record whose
header is damaged is still identified by its trailer, and the next record is found again by its
magic. Replay checks every payload (crc32, full IPC validation, canonical schema, row checks):
a damaged record is returned as `Damaged` for the engine to quarantine and report, never parsed
into rows. The catalog records, per buffer key, the highest batch id whose rows are in catalogued
files (`spool_hw`); replay skips what is already durable and a segment is deleted once all its
batches are.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import pyarrow as pa
import pyarrow.compute as pc

from engine import schema
from engine.fsio import atomic_write_bytes, fsync_dir
from engine.log import get_logger

log = get_logger(component="spool")
SYNC_INTERVAL_S = 0.5
# A reader's probe (Engine.sealed_until) holds the lock for an instant: a writer starting then waits it out.
LOCK_WAIT_S = 1.0
MAGIC = b"\x89SPL\r\n\x1a\n"
END = b"\n\x1a\n\rLPS\x89"
_LEN = struct.Struct("<II")  # meta length, crc32 of meta
_MAX_META = 4096


class SpoolLockedError(RuntimeError):
    pass


@dataclass
class Damaged:
    """A spool record that failed its checks: its bytes are quarantined, its rows reported lost."""

    segment: str
    table: str
    offset: int
    raw: bytes
    why: str
    meta: dict | None  # the record's own header or trailer (key, batch, rows, lo, hi), if one survived
    near: tuple[dict | None, dict | None] = (None, None)  # the records before and after an unidentified one


Record = Union[tuple[str, str, int, pa.Table], Damaged]


class _Segment:
    __slots__ = ("no", "path", "table", "fd", "size", "maxids", "dirty")

    def __init__(self, no: int, path: Path, table: str):
        self.no, self.path, self.table = no, path, table
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fsync_dir(path.parent)  # the segment must still be found after a power loss
        self.size = 0
        self.maxids: dict[str, int] = {}
        self.dirty = False


def _frame(key: str, batch_id: int, t: pa.Table, lo: int, hi: int) -> list:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    payload = sink.getvalue()
    meta = json.dumps({"key": key, "batch": batch_id, "rows": t.num_rows, "lo": lo, "hi": hi,
                       "len": payload.size, "crc": zlib.crc32(payload)}, separators=(",", ":")).encode()
    head = _LEN.pack(len(meta), zlib.crc32(meta))
    return [MAGIC, head, meta, payload, meta, head, END]


def _write_all(fd: int, parts: list[memoryview]) -> None:
    """writev until every part is written (no copy into one buffer; a short write resumes)."""
    while parts:
        n = os.writev(fd, parts[:1024])
        while n:
            if n >= parts[0].nbytes:
                n -= parts.pop(0).nbytes
            else:
                parts[0], n = parts[0][n:], 0
        while parts and not parts[0].nbytes:
            parts.pop(0)


class Spool:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lockfd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self._lockfd)
                    raise SpoolLockedError(
                        f"another process is appending to this lake ({self.dir}); one writer per lake home"
                    ) from None
                time.sleep(0.02)
        self._lock = threading.Lock()
        self._current: dict[str, _Segment] = {}
        self._closed_segments: dict[Path, dict[str, int]] = {}
        self._held: set[Path] = set()  # segments with damage not yet reported: never deleted
        existing = self.segment_paths()
        self._next_no = (int(existing[-1].name.split(".")[0]) + 1) if existing else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, name="spool-sync", daemon=True)
        self._thread.start()

    def segment_paths(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.arrow"))

    # ---- writing -------------------------------------------------------------------
    def write(self, table: str, records: list[tuple[str, int, pa.Table, int, int]]) -> None:
        """Append one record per (buffer key, batch id, rows, min, max part time), all or nothing:
        a failed write (disk full) is cut off again so the segment stays a clean sequence."""
        parts = [memoryview(p) for r in records for p in _frame(*r)]
        size = sum(p.nbytes for p in parts)
        with self._lock:
            seg = self._current.get(table)
            if seg is None:
                seg = _Segment(self._next_no, self.dir / f"{self._next_no:010d}.{table}.arrow", table)
                self._next_no += 1
                self._current[table] = seg
            try:
                _write_all(seg.fd, parts)
            except BaseException:
                os.ftruncate(seg.fd, seg.size)
                raise
            seg.size += size
            for key, bid, *_ in records:
                seg.maxids[key] = max(seg.maxids.get(key, -1), bid)
            seg.dirty = True

    def sync(self) -> None:
        with self._lock:
            for seg in self._current.values():
                if seg.dirty:
                    os.fsync(seg.fd)
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
                os.fsync(seg.fd)
                os.close(seg.fd)
                self._closed_segments[seg.path] = dict(seg.maxids)
            self._current.clear()

    def collect(self, spool_hw: dict[str, int]) -> int:
        """Delete closed segments whose every batch is in a catalogued file."""
        removed = 0
        with self._lock:
            for path, maxids in list(self._closed_segments.items()):
                if path not in self._held and all(spool_hw.get(k, -1) >= v for k, v in maxids.items()):
                    path.unlink(missing_ok=True)
                    del self._closed_segments[path]
                    removed += 1
        return removed

    # ---- recovery ------------------------------------------------------------------
    def replay(self) -> Iterator[Record]:
        """Every record of every old segment: (table, bufkey, batch_id, rows), or `Damaged`.

        Called at open before new writes; old segments are adopted as closed segments so the
        normal rule deletes them once their rows are durable (a segment with damage only after
        `release`, once the engine has reported it)."""
        for path in self.segment_paths():
            maxids: dict[str, int] = {}
            for rec in _read_segment(path):
                if isinstance(rec, Damaged):
                    self._held.add(path)
                else:
                    maxids[rec[1]] = max(maxids.get(rec[1], -1), rec[2])
                yield rec
            self._closed_segments[path] = maxids

    def quarantine_path(self, d: Damaged) -> Path:
        """Where a damaged record's bytes are kept (named by content, so a second recovery of the
        same segment finds it already reported)."""
        return self.dir / "quarantine" / f"{d.segment}.{d.offset:012d}.{zlib.crc32(d.raw):08x}.bad"

    def quarantine(self, d: Damaged) -> Path:
        path = self.quarantine_path(d)
        atomic_write_bytes(path, d.raw)
        return path

    def release(self) -> None:
        """The damage found by `replay` is reported: its segments may be deleted as usual."""
        self._held.clear()

    def pending_keys(self, spool_hw: dict[str, int]) -> set[str]:
        """Buffer keys with spooled batches not yet in a catalogued file (reads, changes nothing)."""
        out: set[str] = set()
        for path in self.segment_paths():
            for rec in _read_segment(path, quiet=True):
                if isinstance(rec, Damaged):
                    if rec.meta and rec.meta["batch"] > spool_hw.get(rec.meta["key"], -1):
                        out.add(rec.meta["key"])
                elif rec[2] > spool_hw.get(rec[1], -1):
                    out.add(rec[1])
        return out

    def batches(self, bufkey: str, first: int, last: int) -> Iterator[tuple[int, pa.Table]]:
        """Batches of one buffer with ids in [first, last], read back (a flush failed after the
        buffer handed its rows to the encoder; the spool still has them)."""
        for path in self.segment_paths():
            for rec in _read_segment(path, quiet=True):
                if not isinstance(rec, Damaged) and rec[1] == bufkey and first <= rec[2] <= last:
                    yield rec[2], rec[3]

    def max_batch_id(self) -> int:
        return max((v for m in self._closed_segments.values() for v in m.values()), default=-1)

    def close(self, rotate: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if rotate:
            self.rotate()
        else:
            for seg in self._current.values():
                os.close(seg.fd)
            self._current.clear()
        os.close(self._lockfd)


# ---- reading -----------------------------------------------------------------------------

def _read_segment(path: Path, quiet: bool = False) -> Iterator[Record]:
    """Every record of one segment, in order; a record cut short by a crash ends it (logged)."""
    table = path.name.split(".")[1]
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with mm:
        if mm[:4] == b"\xff\xff\xff\xff":  # written before records were framed: a plain IPC stream
            yield from _read_legacy(path, table)
        else:
            yield from _scan(mm, path.name, table, quiet)


def _head(mm: mmap.mmap, pos: int) -> tuple[dict | None, int]:
    """(meta, payload offset) of a valid record header at `pos`, else (None, 0)."""
    if mm[pos:pos + 8] != MAGIC or pos + 16 > len(mm):
        return None, 0
    n, crc = _LEN.unpack(mm[pos + 8:pos + 16])
    raw = mm[pos + 16:pos + 16 + n]
    if n > _MAX_META or len(raw) != n or zlib.crc32(raw) != crc:
        return None, 0
    try:
        return json.loads(raw), pos + 16 + n
    except ValueError:
        return None, 0


def _tail(mm: mmap.mmap, stop: int, lo: int) -> dict | None:
    """Meta of a valid record trailer ending at `stop` and starting after `lo`, else None."""
    if stop - 16 < lo or mm[stop - 8:stop] != END:
        return None
    n, crc = _LEN.unpack(mm[stop - 16:stop - 8])
    if n > _MAX_META or stop - 16 - n < lo:
        return None
    raw = mm[stop - 16 - n:stop - 16]
    try:
        return json.loads(raw) if zlib.crc32(raw) == crc else None
    except ValueError:
        return None


def _next_head(mm: mmap.mmap, start: int) -> int | None:
    while (i := mm.find(MAGIC, start)) >= 0:
        if _head(mm, i)[0] is not None:
            return i
        start = i + 1
    return None


def _decode(table: str, meta: dict, payload: bytes) -> tuple[pa.Table | None, str | None]:
    """The record's rows, fully validated, or why they cannot be trusted."""
    try:
        t = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
        if not t.schema.equals(schema.spec(table).schema):
            return None, f"schema differs from table {table}'s"
        for b in t.to_batches():
            b.validate(full=True)
    except (pa.ArrowException, ValueError, OSError) as e:
        return None, f"invalid Arrow IPC: {e}"[:300]
    if t.num_rows != meta.get("rows"):
        return None, f"{t.num_rows} rows, the record says {meta.get('rows')}"
    faults = schema.row_faults(table, t)
    if faults:
        return None, f"rows refused: column {faults[0][0]} {faults[0][1]}"[:300]
    return t, None


def _scan(mm: mmap.mmap, name: str, table: str, quiet: bool) -> Iterator[Record]:
    pos, size, prev = 0, len(mm), None
    while pos < size:
        meta, body = _head(mm, pos)
        if meta is not None:
            end = body + meta["len"] + (body - pos)  # the trailer is as long as the header
            if end > size:
                if not quiet:
                    log.warning("spool_torn_tail", segment=name, offset=pos, bytes=size - pos,
                                hint="a write cut short by a crash, never acknowledged")
                return
            payload = mm[body:body + meta["len"]]
            t, why = (None, "checksum mismatch") if zlib.crc32(payload) != meta["crc"] else _decode(table, meta, payload)
            if t is None:
                yield Damaged(name, table, pos, mm[pos:end], why, meta)
            else:
                yield table, meta["key"], meta["batch"], t
            prev, pos = meta, end
            continue
        nxt = _next_head(mm, pos + 1)
        stop = size if nxt is None else nxt
        own = _tail(mm, stop, pos)
        if nxt is None and own is None and mm[pos:pos + 8] == MAGIC[:size - pos]:
            if not quiet:
                log.warning("spool_torn_tail", segment=name, offset=pos, bytes=size - pos,
                            hint="a header cut short by a crash, never acknowledged")
            return
        near = (prev, _head(mm, nxt)[0] if nxt is not None else None)
        yield Damaged(name, table, pos, mm[pos:stop], "unreadable record header", own, near)
        pos = stop


def _read_legacy(path: Path, table: str) -> Iterator[Record]:
    """A segment of plain IPC batches (bufkey, batch id as custom metadata): no checksums, so
    a batch failing validation ends what can be read of it."""
    prev = None
    try:
        with open(path, "rb") as f:
            reader = pa.ipc.open_stream(f)
            while True:
                try:
                    batch, meta = reader.read_next_batch_with_custom_metadata()
                except StopIteration:
                    return
                batch.validate(full=True)
                if not batch.schema.equals(schema.spec(table).schema):
                    raise ValueError(f"schema differs from table {table}'s")
                t = pa.Table.from_batches([batch])
                mm = pc.min_max(t.column(schema.spec(table).part_col))
                m = {"key": meta[b"bufkey"].decode(), "batch": int(meta[b"batch"]), "rows": t.num_rows,
                     "lo": mm["min"].as_py(), "hi": mm["max"].as_py()}
                faults = schema.row_faults(table, t)  # e.g. a name too long for a file, stored before it was refused
                if faults:
                    yield Damaged(path.name, table, f.tell(), b"".join(map(bytes, _frame(m["key"], m["batch"], t, m["lo"], m["hi"]))),
                                  f"rows refused: column {faults[0][0]} {faults[0][1]}"[:300], m)
                    continue
                prev = m
                yield table, m["key"], m["batch"], t
    except (pa.ArrowException, ValueError, OSError, KeyError) as e:
        raw = path.read_bytes()
        yield Damaged(path.name, table, 0, raw, f"legacy segment unreadable after batch "
                      f"{prev['batch'] if prev else None}: {e}"[:300], None, (prev, None))
