"""`Engine`: the public face of a lake — append, flush, upload, compact and query."""

from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engine import schema
from engine.buffer import Buffer
from engine.catalog import Catalog, FileEntry
from engine.fsio import tmp_path_for
from engine.log import get_logger
from engine.paths import Layout, check_key_part, date_of_ns, default_home, file_key, parse_key
from engine.schema import NS_PER_HOUR
from engine.spool import Spool, SpoolLockedError
from engine.store import ReadCache, open_store
from engine.timeutil import iso, now_ns, result_times
from engine.writer import write_parquet

log = get_logger(component="engine")

DEFAULT_FLUSH_ROWS = 5_000_000
HOUR_CLOSE_GRACE_S = 2.0
APPEND_LAG_NS = 60 * 10**9  # rows a collector received but has not appended yet are at most this old


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


def _bufkey(table: str, source: str, market: str) -> str:
    return f"{table}|{source}|{market}"


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
        self.store = open_store(store, self.layout.default_store)
        self.cache = ReadCache(self.layout.cache, self.store, cache_bytes)
        self.refresh_s = refresh_s
        self._manifest = None
        self._warned: dict[str, int] = {}
        if from_store if from_store is not None else (not writer and self._reads_from_store()):
            if writer:
                raise ValueError("a writer keeps its own catalog log: from_store=True is for readers")
            from engine.manifest import ManifestReader

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
        self._buffers: dict[str, Buffer] = {}
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
        not the home's own directory, is a second machine and reads the store's manifest."""
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
                        self._recover()
                    except BaseException:
                        # release the lock: a later open (after the cause is fixed) must recover again
                        self._spool.close(rotate=False)
                        self._spool = None
                        self._buffers.clear()
                        raise
                    self._sweep_staging()
                    if self._background:
                        self._bg = threading.Thread(target=self._background_loop, name="engine-flush", daemon=True)
                        self._bg.start()
        return self._spool

    def _recover(self) -> None:
        sp = self._spool
        hw = self.catalog.spool_hw
        recovered = skipped = 0
        max_id = max(hw.values(), default=-1)
        for table, key, bid, t in sp.replay():
            max_id = max(max_id, bid)
            if bid <= hw.get(key, -1):
                skipped += t.num_rows
                continue
            self._add_rows(table, t, bid, spool=False)
            recovered += t.num_rows
        self._next_batch = max(max_id, sp.max_batch_id()) + 1
        if recovered or skipped:
            log.info("spool_recovered", rows=recovered, already_durable_rows=skipped)
        self._flush_all()
        sp.collect(self.catalog.spool_hw)

    def _sweep_staging(self) -> None:
        """Remove what a killed writer left in staging: temp files and files never catalogued.
        Their rows are in the spool (just replayed) or were never acknowledged."""
        self.catalog.refresh()
        known = set(self.catalog.by_key) | set(self.catalog.retired)
        removed = 0
        for p in self.layout.staging.rglob("*"):
            if not p.is_file():
                continue
            key = str(p.relative_to(self.layout.staging))
            if (p.name.startswith(".") and ".tmp-" in p.name) or (p.suffix == ".parquet" and key not in known):
                p.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("staging_swept", files=removed, hint="left by a writer killed mid-flush")

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._bg is not None:
            self._bg.join(timeout=30)
        if self._spool is not None:
            self.flush()
            self._spool.close()
        self._encoder.shutdown(wait=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- write path ----------------------------------------------------------------------
    def append(self, table: str, data) -> int:
        """Validate, spool (durable within a second) and buffer `data`; returns rows accepted."""
        if table not in schema.RAW_TABLES:
            raise schema.SchemaError(f"unknown table {table!r} for append; raw tables are: {', '.join(schema.RAW_TABLES)}")
        self.require_writer("append")
        t = schema.validate(table, data)
        if t.num_rows == 0:
            return 0
        self._writer()
        sp = schema.spec(table)
        with self._lock:
            for group in _split(t, sp.part_col):
                self._add_rows(table, group, None, spool=True)
            if table == "gaps":  # a hole: the carried book is stale until the exchange's fresh snapshot
                for src, mkt in set(zip(t.column("source").to_pylist(), t.column("market").to_pylist())):
                    self._books.pop(_bufkey("l2", src, mkt), None)
        return t.num_rows

    def _add_rows(self, table: str, t: pa.Table, batch_id: int | None, spool: bool) -> None:
        """Add rows of one (source, market, hour) to their buffer, flushing the previous hour first."""
        sp = schema.spec(table)
        source, market = _first(t.column("source")), _first(t.column("market"))
        check_key_part("source", source)
        check_key_part("market", market)
        mm = pc.min_max(t.column(sp.part_col))
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        hour = lo // NS_PER_HOUR
        key = _bufkey(table, source, market)
        buf = self._buffers.get(key)
        if buf is not None and buf.hour != hour and buf.rows:
            self._flush_key(key)
            buf = None
        if buf is None or buf.hour != hour:
            buf = self._new_buffer(key, table, source, market, hour)
        if batch_id is None:
            batch_id = self._next_batch
            self._next_batch += 1
        if spool:
            self._spool.write(table, key, batch_id, t)
        buf.add(t, batch_id, lo, hi)
        if buf.rows >= self.flush_rows:
            self._flush_key(key)

    def flush(self) -> int:
        """Write every buffer to Parquet now; returns the number of files written."""
        self.require_writer("flush")
        if self._spool is None:
            return 0
        with self._lock:
            return self._flush_all()

    def _flush_all(self) -> int:
        n = 0
        for key in list(self._buffers):
            if self._buffers[key].rows:
                n += self._flush_key(key)
        return n

    def _flush_key(self, key: str) -> int:
        """Write one buffer as a catalogued file. On any failure the buffer stays (and its rows stay
        in the spool), so a later flush or a restart writes them: a failed flush loses nothing."""
        buf = self._buffers[key]
        if not buf.rows:
            del self._buffers[key]
            return 0
        date = date_of_ns(buf.hour * NS_PER_HOUR)
        path, fkey = self._free_path(buf.table, buf.source, buf.market, date)
        t0 = time.perf_counter()
        try:
            wf = buf.finish(path)
        except Exception as e:  # noqa: BLE001 - e.g. disk full: rebuild from the spool, write once more
            log.error("flush_failed_rebuilding_from_spool", key=fkey, error=str(e), table=buf.table,
                      source=buf.source, market=buf.market)
            buf.discard()
            buf = self._rebuild_from_spool(key, buf)
            wf = buf.finish(path)  # a second failure propagates; the rebuilt buffer stays for a retry
        entry = FileEntry(
            key=fkey, table=buf.table, source=buf.source, market=buf.market, date=date, rows=wf.rows,
            bytes=wf.bytes, sha256=wf.sha256, created_ns=now_ns(), schema_version=schema.SCHEMA_VERSION, **wf.stats,
        )
        self.catalog.add_file(entry, spool_key=key, spool_upto=buf.last_batch)
        del self._buffers[key]
        if buf.book is not None:  # only l2 buffers of an anchoring engine track their book
            self._books[key] = buf.book
        self.flush_count += 1
        log.info("file_written", key=fkey, rows=wf.rows, bytes=wf.bytes, seconds=round(time.perf_counter() - t0, 3),
                 table=buf.table, source=buf.source, market=buf.market)
        self._spool.rotate()
        self._spool.collect(self.catalog.spool_hw)
        self._advance_watermark(buf.source, buf.max_recv_ts)
        return 1

    def _new_buffer(self, key: str, table: str, source: str, market: str, hour: int, stream: bool = True) -> Buffer:
        """A buffer for one hour; l2 files open with the carried book (design: Book anchors).
        `stream=False`: never written as rows arrive (a rebuild after a failed stream)."""
        anchors = table == "l2" and self.book_anchors
        first = self.layout.staged(file_key(table, source, market, date_of_ns(hour * NS_PER_HOUR), 0))
        buf = Buffer(table, source, market, hour, self._encoder, stream_tmp=tmp_path_for(first) if stream else None,
                     anchor=self._books.get(key) if anchors else None, track_book=anchors)
        self._buffers[key] = buf
        return buf

    def _free_path(self, table: str, source: str, market: str, date: str) -> tuple[Path, str]:
        """The next file name of a partition: never one catalogued, retired or left on disk."""
        part = (table, source, market, date)
        self.catalog.refresh()  # another process (compaction) may have written to this partition
        existing = [parse_key(k).name for k in self.catalog.parts.get(part, {})]
        existing += [parse_key(k).name for k, (_, e) in self.catalog.retired.items()
                     if (e.table, e.source, e.market, e.date) == part]
        seq = 1 + max((int(n) for n in existing if n.isdigit()), default=0)
        while True:
            fkey = file_key(table, source, market, date, seq)
            path = self.layout.staged(fkey)
            if not path.exists():  # a file left by a crash between write and catalog: never overwrite
                return path, fkey
            seq += 1

    def _rebuild_from_spool(self, key: str, failed: Buffer) -> Buffer:
        """The failed buffer's rows again, read back from the spool, kept for a sorted write."""
        buf = self._new_buffer(key, failed.table, failed.source, failed.market, failed.hour, stream=False)
        for bid, t in self._spool.batches(key, failed.first_batch, failed.last_batch):
            mm = pc.min_max(t.column(schema.spec(failed.table).part_col))
            buf.add(t, bid, mm["min"].as_py(), mm["max"].as_py())
        if buf.rows != failed.rows:
            self._buffers[key] = failed  # never flush a partial buffer: that would mark the rest durable
            raise RuntimeError(f"spool holds {buf.rows} of the {failed.rows} buffered rows of {key}; "
                               "they stay in the spool and are written at the next start")
        return buf

    def _advance_watermark(self, source: str, flushed_max: int | None) -> None:
        """Sealed watermark: below the oldest buffered row of the source, else past everything seen."""
        if flushed_max is not None:
            self._seen_max[source] = max(self._seen_max.get(source, flushed_max), flushed_max)
        pending = [b.min_recv_ts for b in self._buffers.values() if b.source == source and b.rows]
        seen = self._seen_max.get(source)
        if pending:
            wm = min(pending)
        else:  # nothing buffered: sealed up to now, less what a collector may still hold before appending
            wm = max(seen + 1 if seen is not None else 0, now_ns() - APPEND_LAG_NS)
        if wm is not None:
            self.catalog.set_watermark(source, wm)

    def _background_loop(self) -> None:
        """Flush buffers whose UTC hour has closed by the wall clock and went quiet, or that are too old."""
        while not self._stop.wait(1.0):
            try:
                now_hour = now_ns() // NS_PER_HOUR
                with self._lock:
                    for key, buf in list(self._buffers.items()):
                        if not buf.rows:
                            continue
                        closed = buf.hour < now_hour and time.monotonic() - buf.touched > HOUR_CLOSE_GRACE_S
                        old = self.flush_age_s is not None and time.monotonic() - buf.created >= self.flush_age_s
                        if closed or old:
                            self._flush_key(key)
            except Exception as e:  # noqa: BLE001 - the loop must survive; error logged
                log.error("background_flush_failed", error=str(e))

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
        vals = [b.max_recv_ts for b in self._buffers.values() if b.source == source and b.rows]
        cat = self.catalog.last_recv_ts(source)
        if cat is not None:
            vals.append(cat)
        return max(vals) if vals else None

    def buffered_rows(self) -> int:
        return sum(b.rows for b in self._buffers.values())

    def buffer_bytes(self) -> int:
        return sum(b.nbytes() for b in self._buffers.values())

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
        from engine.uploader import upload

        return upload(self, **filters)

    def compact(self, **kw) -> list:
        from engine.compaction import compact

        return compact(self, **kw)

    def publish_manifest(self) -> str:
        from engine.manifest import publish

        return publish(self)

    def verify(self, repair: bool = False, **filters) -> list:
        from engine.verify import verify

        return verify(self, repair=repair, **filters)

    # ---- queries (delegated to engine.query) ---------------------------------------------
    def _q(self):
        from engine.query import Query

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


def _first(col: pa.ChunkedArray) -> str:
    """First value of a dictionary column (all rows of a split group share it)."""
    chunk = next(c for c in col.chunks if len(c))
    return chunk.dictionary[chunk.indices[0].as_py()].as_py()


def _split(t: pa.Table, part_col: str):
    """Split a validated batch into groups of one (source, market, hour), in time order."""
    hours = pc.divide(t.column(part_col), NS_PER_HOUR)
    src = t.column("source")
    mkt = t.column("market")
    one_key = (
        len(pc.unique(src)) == 1 and len(pc.unique(mkt)) == 1 and pc.min_max(hours)["min"] == pc.min_max(hours)["max"]
    )
    if one_key:
        yield t
        return
    keys = pl.from_arrow(pa.table({"s": src.cast(pa.string()), "m": mkt.cast(pa.string()), "h": hours}))
    order = keys.with_row_index("i").sort(["h", "s", "m"], maintain_order=True)  # stable: arrival order kept
    t = t.take(order["i"].to_arrow())  # one pass, then each group is a zero-copy slice
    sizes = order.group_by(["h", "s", "m"], maintain_order=True).len()["len"].to_list()
    off = 0
    for n in sizes:
        yield t.slice(off, n)
        off += n
