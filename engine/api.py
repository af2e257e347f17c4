"""`Engine`: the public face of a lake — append, flush, upload, compact and query."""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engine import schema
from engine.fsio import tmp_path_for
from engine.lake import shard as shard_id
from engine.lake import staging
from engine.lake.buffer import Buffer
from engine.lake.catalog import Catalog, FileEntry
from engine.lake.spool import Damaged, Spool, SpoolLockedError
from engine.lake.store import ReadCache, open_store
from engine.lake.writer import write_parquet
from engine.log import get_logger
from engine.paths import Layout, buffer_key, date_of_ns, default_home, file_key, key_part_problem, parse_key
from engine.schema import NS_PER_HOUR
from engine.timeutil import iso, now_ns, result_times

log = get_logger(component="engine")

DEFAULT_FLUSH_ROWS = 5_000_000
HOUR_CLOSE_GRACE_S = 2.0
APPEND_LAG_NS = 60 * 10**9  # rows a collector received but has not appended yet are at most this old
FLUSH_RETRY_S = 30.0  # a buffer that could not be written is retried in the background this often
# the lake home takes no writes at all: opening fails with the error rather than running without a disk
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class SyncBoundaryWarning(UserWarning):
    """A query reached past a source's watermark; the newest rows are left out."""


class ReadOnlyError(RuntimeError):
    """A write on an engine opened as a reader: readers never take the lake's spool lock, so a
    notebook cannot lock out the collector."""

    def __init__(self, method: str, home: Path):
        super().__init__(
            f"{method}() needs the writer role, but this engine of {home} was opened read-only; "
            "open it with Engine.open(..., writer=True) (one writer per lake home: the collector, ingest "
            "or a writing CLI command)"
        )
        self.method = method


class FlushError(OSError):
    """Buffers that could not be written; their rows stay buffered and in the spool, and the next
    flush (or start) writes them. Carries the errno of the first OS error behind it."""

    def __init__(self, failed: list[tuple[str, BaseException]]):
        first = next((e for _, e in failed if isinstance(e, OSError) and e.errno), None)
        msg = (f"{len(failed)} buffer(s) not written, rows kept buffered and in the spool: "
               + "; ".join(f"{k}: {e}" for k, e in failed))[:2000]
        super().__init__(*((first.errno, msg) if first is not None else (msg,)))
        self.failed = failed


@dataclass
class _Group:
    """Rows of one append for one buffer: one (table, source, market, hour)."""

    table: str
    key: str
    source: str
    market: str
    hour: int
    rows: pa.Table
    lo: int
    hi: int


def _group(table: str, t: pa.Table) -> _Group:
    source, market = _first(t.column("source")), _first(t.column("market"))
    mm = pc.min_max(t.column(schema.spec(table).part_col))
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    return _Group(table, buffer_key(table, source, market), source, market, lo // NS_PER_HOUR, t, lo, hi)


class Engine:
    """One lake home (catalog, spool, staging, cache) bound to one object store.

    A reader by default; `writer=True` allows append, flush, upload, compact and publishing."""

    def __init__(self, home: Path, store=None, *, flush_rows: int = DEFAULT_FLUSH_ROWS, background: bool = True,
                 cache_bytes: int = 2 << 30, book_anchors: bool = False, flush_age_s: float | None = None,
                 writer: bool = False, refresh_s: float = 60.0, from_store: bool | None = None):
        self.home = Path(home).resolve()
        self.writer = writer
        self.layout = Layout(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        # a collector shard's home: its id names the files it writes and the manifest part it publishes
        self.shard_identity = shard_id.read(self.layout)
        self.shard = self.shard_identity.shard if self.shard_identity is not None else None
        if store is None and not os.environ.get("ENGINE_STORE") and self.shard_identity is not None:
            store = self.shard_identity.store  # where the shard uploads, whoever opens its home
        self.store = open_store(store, self.layout.default_store)
        self.cache = ReadCache(self.layout.cache, self.store, cache_bytes)
        self.refresh_s = refresh_s
        self._manifest = None
        self._warned: dict[str, int] = {}
        if from_store if from_store is not None else (not writer and self._reads_from_store()):
            if writer:
                raise ValueError("a writer keeps its own catalog log: from_store=True is for readers")
            from engine.lake.manifest import ManifestReader

            # a home that never wrote, on a shared store: the bucket's manifest is the catalog
            self._manifest = ManifestReader(self.store, self.layout.catalog_dir)
            self.catalog = self._manifest.fetch(None)
        else:
            self.catalog = Catalog(self.layout.catalog_log)
        self.flush_rows = flush_rows
        # Optional age trigger (e.g. the demo's 15 s) on top of row count and hour close.
        env_age = os.environ.get("ENGINE_FLUSH_AGE_S")
        self.flush_age_s = flush_age_s if flush_age_s is not None else (float(env_age) if env_age else None)
        self.book_anchors = book_anchors  # collectors and ingest turn this on (design: Book anchors)
        self._lock = threading.RLock()
        self._buffers: dict[str, Buffer] = {}  # the buffer rows of each key go to now
        self._closing: dict[str, list[Buffer]] = {}  # older buffers of a key not written yet, oldest first
        self._retry_at: dict[str, float] = {}
        self._spool: Spool | None = None
        self._next_batch = 0
        self._background = background
        self._bg: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._books: dict[str, pa.Table] = {}  # l2 bufkey → book at the end of the last file (anchor)
        # one thread seals buffer chunks (Parquet row groups or zstd IPC) while appends go on
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-encode")
        self.flush_count = 0
        self._seen_max: dict[str, int] = {}

    # ---- lifecycle -----------------------------------------------------------------------
    @classmethod
    def open(cls, home: str | os.PathLike | None = None, store: str | None = None, *, writer: bool = False,
             **kw) -> "Engine":
        """A reader of the lake, or with `writer=True` its writer, which first recovers the spool a
        crashed writer left (unless a live writer holds it). A reader never takes the spool lock."""
        eng = cls(Path(home) if home is not None else default_home(), store, writer=writer, **kw)
        if writer and any(eng.layout.spool.glob("*.arrow")):
            try:
                eng._writer()  # a crashed writer left a spool: recover it now
            except SpoolLockedError:
                # a live writer (the collector) owns it; this engine reads
                log.debug("spool_owned_by_live_writer", home=str(eng.home))
        return eng

    def _reads_from_store(self) -> bool:
        """`from_store=None`: a home where no writer ever opened (no catalog log), on a store that is
        not the home's own directory, is a second machine and reads the store's manifest; so does a
        reader of a collector shard's home, since the lake is every shard's manifest part."""
        if self.shard_identity is not None:
            return True  # a collector shard's home holds only its part of the lake: read all shards' parts
        if self.layout.catalog_log.exists():
            return False  # a writer's home: its log is the truth, even before the first file
        return not (self.store.is_local and self.store.root == self.layout.default_store.resolve())

    @property
    def remote_reader(self) -> bool:
        """True when this home reads the store's manifest (a second machine), not a catalog log."""
        return self._manifest is not None

    def refresh(self) -> bool:
        """Pick up what changed since the last look: the store's manifest (one conditional GET) on a
        reader home, the catalog log otherwise. True when something changed."""
        if self._manifest is not None:
            cat = self._manifest.fetch(self.catalog)
            if cat is None:
                return False
            self.catalog = cat
            return True
        return self.catalog.refresh() > 0

    def warn_clamped(self, table: str, source: str, wm: int) -> None:
        """Once per source and watermark: the result stops at the sync boundary."""
        if self._warned.get(source) == wm:
            return
        self._warned[source] = wm
        behind = max(0, now_ns() - wm) / 1e9
        where = ("the store's manifest: rows received later are not uploaded yet" if self._manifest is not None
                 else "this home's catalog: rows received later are not in a finished file yet")
        msg = (f"{table}: source {source} is complete up to {iso(wm)} ({behind:,.0f} s ago) per {where}; they are "
               "left out (pass allow_unsealed=True to read whatever exists)")
        log.warning("query_clamped", table=table, source=source, watermark=iso(wm), behind_s=round(behind, 1))
        warnings.warn(msg, SyncBoundaryWarning, stacklevel=4)

    def _maybe_refresh(self) -> None:
        if self._manifest is not None and time.monotonic() - self._manifest.checked >= self.refresh_s:
            self.refresh()

    def require_writer(self, method: str) -> None:
        """Raise ReadOnlyError unless this engine was opened with the writer role."""
        if not self.writer:
            raise ReadOnlyError(method, self.home)

    def _writer(self) -> Spool:
        """The spool is taken lazily, on the first append of a writer: an engine that only uploads
        or compacts never locks the lake."""
        self.require_writer("append")
        if self._spool is None:
            with self._lock:
                if self._spool is None:
                    self._spool = Spool(self.layout.spool)
                    try:
                        staging.settle(self, self._spool)  # before replay: an adopted file's batches are durable
                        self._recover()
                    except BaseException:
                        # release the lock: a later open (after the cause is fixed) must recover again
                        self._spool.close(rotate=False)
                        self._spool = None
                        self._buffers.clear()
                        self._closing.clear()
                        raise
                    if self._background:
                        self._bg = threading.Thread(target=self._background_loop, name="engine-flush", daemon=True)
                        self._bg.start()
        return self._spool

    def _recover(self) -> None:
        """Replay the spool into buffers and write them. Damaged records are quarantined and
        reported; a buffer that cannot be written stays (retried later) unless the disk takes no
        writes at all."""
        sp = self._spool
        hw = self.catalog.spool_hw
        recovered = skipped = 0
        max_id = max(hw.values(), default=-1)
        damaged: list[Damaged] = []
        for rec in sp.replay():
            if isinstance(rec, Damaged):
                damaged.append(rec)
                continue
            table, key, bid, t = rec
            max_id = max(max_id, bid)
            if bid <= hw.get(key, -1):
                skipped += t.num_rows
                continue
            self._buffer(_group(table, t), bid)
            recovered += t.num_rows
        self._next_batch = max([max_id, sp.max_batch_id()] + [d.meta["batch"] for d in damaged if d.meta]) + 1
        if recovered or skipped:
            log.info("spool_recovered", rows=recovered, already_durable_rows=skipped, damaged_records=len(damaged))
        self._report_damage(damaged)
        _, failed = self._flush_all()
        if any(isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS for _, e in failed):
            raise FlushError(failed)
        sp.collect(self.catalog.spool_hw)

    def _report_damage(self, damaged: list[Damaged]) -> None:
        """Each damaged spool record: a `corrupt` gap over its rows (made durable first), its bytes
        in spool/quarantine/, one log line. A record found in quarantine was reported before."""
        sp, hw = self._spool, self.catalog.spool_hw
        gaps: dict[int, list[dict]] = {}  # id of each newly found record → its gap rows
        for d in damaged:
            if sp.quarantine_path(d).exists():
                continue
            durable = d.meta is not None and d.meta["batch"] <= hw.get(d.meta["key"], -1)  # rows already in a file
            gaps[id(d)] = [] if durable else _corrupt_gaps(d, sp.quarantine_path(d).name)
        rows = [r for g in gaps.values() for r in g]
        if rows:
            plain = pa.schema([pa.field(f.name, pa.string() if pa.types.is_dictionary(f.type) else f.type)
                               for f in schema.GAPS_SCHEMA])
            self._ingest("gaps", schema.check_rows("gaps", schema.validate("gaps", pa.Table.from_pylist(rows, schema=plain))))
            self._spool.sync()
        for d in damaged:
            m = d.meta or {}
            table, source, market = (m.get("key") or f"{d.table}|?|?").split("|")
            fields = dict(segment=d.segment, offset=d.offset, bytes=len(d.raw), why=d.why, table=table, source=source,
                          market=market, batch=m.get("batch"), rows=m.get("rows"))
            if id(d) in gaps:
                log.error("spool_record_quarantined", quarantined=str(sp.quarantine(d)),
                          gaps=[(g["market"], g["start_ts"], g["end_ts"]) for g in gaps[id(d)]], **fields)
            else:
                log.warning("spool_record_already_quarantined", **fields)
        sp.release()

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._bg is not None:
            self._bg.join(timeout=30)
        try:
            if self._spool is not None:
                self.flush()  # a FlushError is raised after the spool is closed: its rows stay there
        finally:
            if self._spool is not None:
                self._spool.close()
            self._encoder.shutdown(wait=True)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- write path ----------------------------------------------------------------------
    def append(self, table: str, data) -> int:
        """Validate, spool (durable within a second) and buffer `data`; returns rows accepted.

        All or nothing: the whole batch is checked before any row is spooled, and once spooled it
        is accepted (a buffer that cannot be written now is kept and retried, never raised here),
        so a refused batch can be fixed and sent again without duplicates."""
        if table not in schema.RAW_TABLES:
            raise schema.SchemaError(f"unknown table {table!r} for append; raw tables are: {', '.join(schema.RAW_TABLES)}")
        self.require_writer("append")
        t = schema.check_rows(table, schema.validate(table, data))
        if t.num_rows == 0:
            return 0
        self._writer()
        with self._lock:
            self._ingest(table, t)
        return t.num_rows

    def _ingest(self, table: str, t: pa.Table) -> None:
        """Spool and buffer validated rows (caller holds the lock)."""
        groups = [_group(table, g) for g in _split(t, schema.spec(table).part_col)]
        first = self._next_batch
        self._spool.write(table, [(g.key, first + i, g.rows, g.lo, g.hi) for i, g in enumerate(groups)])
        self._next_batch += len(groups)
        for i, g in enumerate(groups):
            self._buffer(g, first + i)
        if table == "gaps":  # a hole: the carried book is stale until the exchange's fresh snapshot
            for g in groups:
                self._books.pop(buffer_key("l2", g.source, g.market), None)

    def _buffer(self, g: _Group, batch_id: int) -> None:
        """Add one group's rows (already spooled) to its buffer; an hour change or a full buffer
        hands the buffer over to be written."""
        buf = self._buffers.get(g.key)
        if buf is not None and buf.hour != g.hour:
            self._close_buffer(g.key)
            buf = None
        if buf is None:
            buf = self._buffers[g.key] = self._new_buffer(g.key, g.table, g.source, g.market, g.hour)
        buf.add(g.rows, batch_id, g.lo, g.hi)
        if buf.rows >= self.flush_rows:
            self._close_buffer(g.key)

    def _close_buffer(self, key: str) -> None:
        """Queue the key's buffer to be written and write the key's queue now if possible; a failure
        is logged and retried later (the rows are in the spool)."""
        self._closing.setdefault(key, []).append(self._buffers.pop(key))
        try:
            self._flush_key(key)
        except Exception as e:  # noqa: BLE001 - logged; the buffer stays queued for a retry
            self._retry_at[key] = time.monotonic() + FLUSH_RETRY_S
            log.error("flush_failed", key=key, error=str(e), hint="rows stay buffered and in the spool; retried later")

    def _pending(self) -> Iterator[Buffer]:
        return itertools.chain(self._buffers.values(), *self._closing.values())

    def flush(self) -> int:
        """Write every buffer to Parquet now; returns the number of files written. Buffers that
        cannot be written do not stop the others; they are reported together (FlushError)."""
        self.require_writer("flush")
        if self._spool is None:
            return 0
        with self._lock:
            n, failed = self._flush_all()
        if failed:
            raise FlushError(failed)
        return n

    def _flush_all(self) -> tuple[int, list[tuple[str, BaseException]]]:
        n, failed = 0, []
        for key in list(dict.fromkeys([*self._closing, *self._buffers])):
            try:
                n += self._flush_key(key)
            except Exception as e:  # noqa: BLE001 - one buffer must not block the others
                failed.append((key, e))
                self._retry_at[key] = time.monotonic() + FLUSH_RETRY_S
                log.error("flush_failed", key=key, error=str(e), hint="rows stay buffered and in the spool")
        return n, failed

    def _flush_key(self, key: str) -> int:
        """Write the key's queued buffers, oldest first, then its current one. Stops at the first
        failure (raised), so the spool's high-water mark never passes rows not yet in a file."""
        n = 0
        while self._closing.get(key):
            n += self._write(key, self._closing[key][0])
        self._closing.pop(key, None)
        if key in self._buffers:
            n += self._write(key, self._buffers[key])
        self._retry_at.pop(key, None)
        return n

    def _write(self, key: str, buf: Buffer) -> int:
        """Write one buffer as a catalogued file. On any failure the buffer stays (and its rows stay
        in the spool), so a later flush or a restart writes them: a failed flush loses nothing."""
        if not buf.rows:
            self._swap(key, buf, None)
            return 0
        date = date_of_ns(buf.hour * NS_PER_HOUR)
        path, fkey = self._free_path(buf.table, buf.source, buf.market, date)
        t0 = time.perf_counter()
        # the spool batches the file holds: a lost catalog line can be redone without doubling them
        meta = {staging.SPOOL_KEY: key, staging.SPOOL_FROM: str(buf.first_batch), staging.SPOOL_UPTO: str(buf.last_batch)}
        try:
            wf = buf.finish(path, meta)
        except Exception as e:  # noqa: BLE001 - e.g. disk full: rebuild from the spool, write once more
            log.error("flush_failed_rebuilding_from_spool", key=fkey, error=str(e), table=buf.table,
                      source=buf.source, market=buf.market)
            buf.discard()
            buf = self._swap(key, buf, self._rebuild_from_spool(key, buf))
            wf = buf.finish(path, meta)  # a second failure propagates; the rebuilt buffer stays for a retry
        entry = FileEntry(
            key=fkey, table=buf.table, source=buf.source, market=buf.market, date=date, rows=wf.rows,
            bytes=wf.bytes, sha256=wf.sha256, created_ns=now_ns(), schema_version=schema.SCHEMA_VERSION, **wf.stats,
        )
        self.catalog.add_file(entry, spool_key=key, spool_upto=buf.last_batch)
        self._swap(key, buf, None)
        if buf.book is not None:  # only l2 buffers of an anchoring engine track their book
            self._books[key] = buf.book
        self.flush_count += 1
        log.info("file_written", key=fkey, rows=wf.rows, bytes=wf.bytes, seconds=round(time.perf_counter() - t0, 3),
                 table=buf.table, source=buf.source, market=buf.market)
        self._spool.rotate()
        self._spool.collect(self.catalog.spool_hw)
        self._advance_watermark(buf.source, buf.max_recv_ts)
        pa.default_memory_pool().release_unused()  # the buffer's rows, read back and sorted, are freed: give the pages back
        return 1

    def _new_buffer(self, key: str, table: str, source: str, market: str, hour: int, stream: bool = True) -> Buffer:
        """A buffer for one hour; l2 files open with the carried book (design: Book anchors), known
        only once every older buffer of the key is written. `stream=False`: never written as rows
        arrive (a rebuild after a failed stream)."""
        anchors = table == "l2" and self.book_anchors
        anchor = self._books.get(key) if anchors and stream and not self._closing.get(key) else None
        if anchors and stream and self._closing.get(key):
            log.warning("book_anchor_unavailable", key=key, hint="an older buffer of this market is not written yet")
        elif anchors and not stream:  # a rebuild is always of the oldest unwritten buffer
            anchor = self._books.get(key)
        first = self.layout.staged(file_key(table, source, market, date_of_ns(hour * NS_PER_HOUR), 0, self.shard))
        return Buffer(table, source, market, hour, self._encoder, stream_tmp=tmp_path_for(first) if stream else None,
                      anchor=anchor, track_book=anchors)

    def _swap(self, key: str, old: Buffer, new: Buffer | None) -> Buffer | None:
        """Put `new` where `old` was (current or queued); None removes `old`."""
        if self._buffers.get(key) is old:
            if new is None:
                del self._buffers[key]
            else:
                self._buffers[key] = new
        else:
            q = self._closing[key]
            i = next(i for i, b in enumerate(q) if b is old)
            if new is None:
                del q[i]
            else:
                q[i] = new
        return new

    def _free_path(self, table: str, source: str, market: str, date: str) -> tuple[Path, str]:
        """The next file name of a partition: never one catalogued, retired or left on disk."""
        part = (table, source, market, date)
        self.catalog.refresh()  # another process (compaction) may have written to this partition
        existing = [parse_key(e.key).seq for e in self.catalog.files_in(part)]
        existing += [parse_key(k).seq for k, (_, e) in self.catalog.retired.items()
                     if (e.table, e.source, e.market, e.date) == part]
        seq = 1 + max((n for n in existing if n is not None), default=0)
        while True:
            fkey = file_key(table, source, market, date, seq, self.shard)
            path = self.layout.staged(fkey)
            if not path.exists() and not (self.layout.quarantine / fkey).exists():  # never a name in use
                return path, fkey
            seq += 1

    def _rebuild_from_spool(self, key: str, failed: Buffer) -> Buffer:
        """The failed buffer's rows again, read back from the spool, kept for a sorted write."""
        buf = self._new_buffer(key, failed.table, failed.source, failed.market, failed.hour, stream=False)
        for bid, t in self._spool.batches(key, failed.first_batch, failed.last_batch):
            mm = pc.min_max(t.column(schema.spec(failed.table).part_col))
            buf.add(t, bid, mm["min"].as_py(), mm["max"].as_py())
        if buf.rows != failed.rows:  # never flush a partial buffer: that would mark the rest durable
            raise RuntimeError(f"spool holds {buf.rows} of the {failed.rows} buffered rows of {key}; "
                               "they stay in the spool and are written at the next start")
        return buf

    def _advance_watermark(self, source: str, flushed_max: int | None) -> None:
        """Sealed watermark: below the oldest buffered row of the source, else past everything seen."""
        if flushed_max is not None:
            self._seen_max[source] = max(self._seen_max.get(source, flushed_max), flushed_max)
        pending = [b.min_recv_ts for b in self._pending() if b.source == source and b.rows]
        seen = self._seen_max.get(source)
        if pending:
            wm = min(pending)
        else:  # nothing buffered: sealed up to now, less what a collector may still hold before appending
            wm = max(seen + 1 if seen is not None else 0, now_ns() - APPEND_LAG_NS)
        if wm is not None:
            self.catalog.set_watermark(source, wm)

    def _background_loop(self) -> None:
        """Flush buffers whose UTC hour has closed by the wall clock and went quiet, or that are too
        old, and retry buffers that could not be written; one failing key never stops the others."""
        while not self._stop.wait(1.0):
            now_hour = now_ns() // NS_PER_HOUR
            with self._lock:
                now = time.monotonic()
                due = [k for k in self._closing if now >= self._retry_at.get(k, 0.0)]
                for key, buf in self._buffers.items():
                    closed = buf.hour < now_hour and now - buf.touched > HOUR_CLOSE_GRACE_S
                    old = self.flush_age_s is not None and now - buf.created >= self.flush_age_s
                    if buf.rows and (closed or old) and now >= self._retry_at.get(key, 0.0):
                        due.append(key)
                for key in dict.fromkeys(due):
                    try:
                        self._flush_key(key)
                    except Exception as e:  # noqa: BLE001 - the loop must survive; error logged
                        self._retry_at[key] = time.monotonic() + FLUSH_RETRY_S
                        log.error("background_flush_failed", key=key, error=str(e))

    def sealed_until(self, source: str) -> int:
        """Receive time below which every row of `source` is in a catalogued file.

        The catalog's watermark, or — when no writer holds this lake's spool and the spool is
        empty (the collector stopped cleanly) — the present: nothing can still be pending."""
        wm = self.catalog.watermark(source)
        if self._spool is not None or any(self.layout.spool.glob("*.arrow")):
            return wm
        import fcntl

        self.layout.spool.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.layout.spool / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return wm  # a live writer: trust its watermark
        finally:
            os.close(fd)  # closing releases the lock
        return max(wm, now_ns() - APPEND_LAG_NS)

    def last_recv_ts(self, source: str) -> int | None:
        """Newest receive time catalogued or buffered for `source` (the start of a `restart` gap)."""
        vals = [b.max_recv_ts for b in self._pending() if b.source == source and b.rows]
        cat = self.catalog.last_recv_ts(source)
        if cat is not None:
            vals.append(cat)
        return max(vals) if vals else None

    def buffered_rows(self) -> int:
        return sum(b.rows for b in self._pending())

    def buffer_bytes(self) -> int:
        return sum(b.nbytes() for b in self._pending())

    # ---- file access ---------------------------------------------------------------------
    def local_path(self, e: FileEntry) -> Path:
        """A readable local path for a catalogued file: staging, the local store, or the read cache."""
        p = self.layout.staged(e.key)
        if p.exists():
            return p
        if self.store.is_local:
            sp = self.store.path(e.key)
            if sp.exists():
                return sp
            raise FileNotFoundError(f"lake file {e.key} is catalogued but missing from staging and {self.store.url}")
        return self.cache.get(e.key, e.sha256)

    def corrupt(self, key: str, path, why: str) -> Exception:
        """The error for a damaged lake file; a damaged cached copy is dropped so that a retry fetches it again."""
        from engine.errors import CorruptFileError

        dropped = self.cache.discard(Path(path))
        log.error("corrupt_file", key=key, path=str(path), error=why, cached_copy_dropped=dropped)
        return CorruptFileError(key, why)

    # ---- maintenance (delegated) ---------------------------------------------------------
    def upload(self, **filters) -> dict:
        from engine.lake.uploader import upload

        return upload(self, **filters)

    def compact(self, **kw) -> list:
        from engine.lake.compaction import compact

        return compact(self, **kw)

    def publish_manifest(self) -> str:
        from engine.lake.manifest import publish

        return publish(self)

    def verify(self, repair: bool = False, **filters) -> list:
        from engine.lake.verify import verify

        return verify(self, repair=repair, **filters)

    # ---- queries (delegated to engine.research.query) ---------------------------------------------
    def _q(self):
        from engine.research.query import Query

        self._maybe_refresh()
        return Query(self)

    # Results carry time columns as Datetime("ns", "UTC"); raw_ns=True gives the stored int64 ns
    # (what the engine's own code asks for: its arithmetic is on ints).
    def l2(self, *, raw_ns: bool = False, **kw) -> pl.DataFrame:
        return self.read("l2", raw_ns=raw_ns, **kw)

    def trades(self, *, raw_ns: bool = False, **kw) -> pl.DataFrame:
        return self.read("trades", raw_ns=raw_ns, **kw)

    def gaps(self, *, raw_ns: bool = False, **kw) -> pl.DataFrame:
        return self.read("gaps", raw_ns=raw_ns, **kw)

    def read(self, table: str, *, raw_ns: bool = False, **kw) -> pl.DataFrame:
        return result_times(self._q().table(table, **kw), schema.time_cols(table), raw_ns=raw_ns)

    def sql(self, query: str, *, raw_ns: bool = False, **filters) -> pl.DataFrame:
        """Int64 result columns named `ts` or `*_ts` are the time columns (views hold int64 ns)."""
        df = self._q().sql(query, **filters)
        return result_times(df, [c for c in df.columns if schema.is_time_name(c)], raw_ns=raw_ns)

    def scan(self, table: str, *, raw_ns: bool = False, **kw) -> pl.LazyFrame:
        """Lazy: files are read (and fetched from the store) one at a time when collected."""
        return self._q().scan(table, raw_ns=raw_ns, **kw)

    def scan_l2(self, **kw) -> pl.LazyFrame:
        return self.scan("l2", **kw)

    def scan_trades(self, **kw) -> pl.LazyFrame:
        return self.scan("trades", **kw)

    # ---- research toolkit (engine.research; each function takes the engine first) --------
    def quotes(self, *args, **kw) -> pl.DataFrame:
        from engine.research.quotes import quotes

        return quotes(self, *args, **kw)

    def book(self, *args, **kw):
        from engine.research.books import book

        return book(self, *args, **kw)

    def books(self, *args, **kw) -> pl.DataFrame:
        from engine.research.books import books

        return books(self, *args, **kw)

    def asof(self, *args, **kw) -> pl.DataFrame:
        from engine.research.asof import asof

        return asof(self, *args, **kw)

    def bars(self, *args, **kw) -> pl.DataFrame:
        from engine.research.bars import bars

        return bars(self, *args, **kw)

    def valid(self, *args, **kw) -> pl.DataFrame:
        from engine.research.windows import valid

        return valid(self, *args, **kw)

    def coverage(self, *args, **kw) -> pl.DataFrame:
        from engine.research.coverage import coverage

        return coverage(self, *args, **kw)

    def instruments(self, *args, **kw) -> pl.DataFrame:
        from engine.research.reference import instruments

        return instruments(self, *args, **kw)

    def related(self, *args, **kw) -> pl.DataFrame:
        from engine.research.reference import related

        return related(self, *args, **kw)

    def export(self, table: str, **kw):
        """Stream a table range into a Parquet, CSV or Arrow file (engine.research.export)."""
        from engine.research.export import export

        return export(self, table, **kw)

    @property
    def plot(self):
        """Pictures: `eng.plot.quotes(...)`, `.depth(...)`, `.coverage(...)` (engine.research.plot; needs matplotlib)."""
        from engine.research.plot import Plots

        return Plots(self)

    def unsettled(self, *args, **kw) -> pl.DataFrame:
        from engine.research.reference import unsettled

        return unsettled(self, *args, **kw)

    def contract_view(self, *args, **kw) -> pl.DataFrame:
        from engine.research.contracts import contract_view

        return contract_view(self, *args, **kw)


def _first(col: pa.ChunkedArray) -> str:
    """First value of a dictionary column (all rows of a split group share it)."""
    chunk = next(c for c in col.chunks if len(c))
    return chunk.dictionary[chunk.indices[0].as_py()].as_py()


def _ranks(col: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Each row's rank among the column's distinct values in sort order, and how many values there
    are: a sort key read off the dictionary indices (no string per row)."""
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    col = pa.table({"c": col}).unify_dictionaries().column("c")
    chunks = [c for c in col.chunks if len(c)]
    values = chunks[0].dictionary.to_pylist() if chunks else []
    rank = np.empty(len(values), np.int64)
    rank[sorted(range(len(values)), key=lambda i: (values[i] is None, values[i] or ""))] = np.arange(len(values))
    idx = [c.indices.fill_null(0).to_numpy(zero_copy_only=False) for c in chunks]
    return (rank[np.concatenate(idx)] if idx else np.zeros(0, np.int64)), max(len(values), 1)


def _split(t: pa.Table, part_col: str):
    """Split a validated batch into groups of one (source, market, hour), in time order (hour,
    then source and market by name); a stable sort of one integer key per row, so each group
    keeps arrival order and is a zero-copy slice of one reordered table."""
    col = t.column(part_col)
    if not t.num_rows:
        yield t
        return
    hours = (col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)).to_numpy(zero_copy_only=False) // NS_PER_HOUR
    s, ns = _ranks(t.column("source"))
    m, nm = _ranks(t.column("market"))
    key = (hours - hours.min()) * (ns * nm) + s * nm + m
    if key.min() == key.max():
        yield t
        return
    order = np.argsort(key, kind="stable")
    t = t.take(pa.array(order))
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), t.num_rows]):
        yield t.slice(lo, hi - lo)


def _corrupt_gaps(d: Damaged, quarantined: str) -> list[dict]:
    """Gap rows for a damaged spool record: its own market and time range when its header or
    trailer survived, else every market of the records around it, between them."""
    where = f"spool {d.segment}@{d.offset} ({d.why}); bytes in spool/quarantine/{quarantined}"
    if d.meta is not None:
        spans = [(d.meta["key"], d.meta["lo"], d.meta["hi"],
                  f"damaged spool record: {d.meta['rows']} {d.table} row(s) of batch {d.meta['batch']} lost; {where}")]
    else:  # between the records around it: any of their markets may have lost rows
        prev, nxt = d.near
        ends = ([prev["hi"]] if prev else []) + ([nxt["lo"]] if nxt else [])
        keys = dict.fromkeys(m["key"] for m in (prev, nxt) if m)
        spans = [(k, min(ends), max(ends), f"unidentified damaged spool record ({d.table}) after batch "
                  f"{prev['batch'] if prev else None} lost; {where}") for k in keys]
    out = []
    for key, lo, hi, detail in spans:
        table, source, market = key.split("|")
        if key_part_problem(source) or key_part_problem(market):
            log.error("corrupt_gap_not_recordable", key=key, hint="names not valid for a partition")
            continue
        out.append({"source": source, "market": market, "instrument": None, "start_ts": lo, "end_ts": max(hi, lo),
                    "kind": "corrupt", "detail": detail[:500]})
    return out
