"""The index of every lake file: an append-only, fsynced JSON-lines log plus an in-memory index.

The log is the truth; the index (table → source → market → date → files, with per-partition
aggregates) is rebuilt from it at start-up without touching the object store, and refreshed
incrementally, so several processes (collector, Dagster, notebooks) share one catalog.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import msgspec
import polars as pl

from engine.log import get_logger
from engine.paths import is_pattern, match, pattern_regex
from engine.timeutil import now_ns

log = get_logger(component="catalog")


class FileEntry(msgspec.Struct, kw_only=True):
    key: str
    table: str
    source: str
    market: str
    date: str
    rows: int
    bytes: int
    sha256: str
    min_ts: int | None = None
    max_ts: int | None = None
    min_recv_ts: int | None = None
    max_recv_ts: int | None = None
    min_seq: int | None = None
    max_seq: int | None = None
    local: bool = True
    remote: bool = False
    compacted: bool = False
    created_ns: int = 0
    schema_version: int = 1


class Op(msgspec.Struct, kw_only=True, omit_defaults=True):
    op: str  # add | remote | local_deleted | compact | purged | watermark
    at: int = 0
    file: FileEntry | None = None
    key: str | None = None
    keys: list[str] | None = None
    source: str | None = None
    ts: int | None = None
    spool_key: str | None = None
    spool_upto: int | None = None


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Op)

Partition = tuple[str, str, str, str]  # table, source, market, date


class _Agg:
    __slots__ = ("rows", "bytes", "files", "min_ts", "max_ts")

    def __init__(self):
        self.rows = self.bytes = self.files = 0
        self.min_ts = self.max_ts = None

    def add(self, e: FileEntry) -> None:
        self.rows += e.rows
        self.bytes += e.bytes
        self.files += 1
        if e.min_ts is not None:
            self.min_ts = e.min_ts if self.min_ts is None else min(self.min_ts, e.min_ts)
            self.max_ts = e.max_ts if self.max_ts is None else max(self.max_ts, e.max_ts)


class ReadOnlyCatalogError(RuntimeError):
    pass


class Catalog:
    def __init__(self, log_path: Path | None):
        """`None`: an in-memory catalog (a reader's copy of the store's manifest) that takes no writes."""
        self.path = Path(log_path) if log_path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch(exist_ok=True)
        self._lock = threading.RLock()
        self._offset = 0
        self.version = 0
        self.by_key: dict[str, FileEntry] = {}
        self.retired: dict[str, tuple[int, FileEntry]] = {}  # key → (retired_at, entry), awaiting purge
        self.replaced_by: dict[str, str] = {}  # retired key → key of the compacted file that replaced it
        self.parts: dict[Partition, dict[str, FileEntry]] = defaultdict(dict)
        self._aggs: dict[Partition, _Agg] = {}
        self.watermarks: dict[str, int] = {}
        self.writer_watermarks: dict[str, int] = {}  # a manifest reader: the writer's own (local) ones
        self.spool_hw: dict[str, int] = {}
        self._summary_cache: tuple[int, pl.DataFrame] | None = None
        self.torn_lines = 0
        self.refresh(startup=True)

    # ---- log reading -------------------------------------------------------------------
    def refresh(self, startup: bool = False) -> int:
        """Apply log lines written since the last read (by this or another process)."""
        with self._lock:
            if self.path is None or not self.path.exists():
                return 0
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            if not data:
                return 0
            end = data.rfind(b"\n") + 1
            tail = data[end:]
            if tail and startup:
                self.torn_lines += 1
                log.warning("catalog_torn_tail_ignored", path=str(self.path), bytes=len(tail))
            n = 0
            for line in data[:end].splitlines():
                if not line.strip():
                    continue
                try:
                    op = _dec.decode(line)
                except msgspec.DecodeError as e:
                    self.torn_lines += 1
                    log.warning("catalog_bad_line_ignored", error=str(e), head=line[:120].decode(errors="replace"))
                    continue
                self._apply(op)
                n += 1
            self._offset += end
            if n:
                self.version += 1
            return n

    def _apply(self, op: Op) -> None:
        if op.op == "add":
            self._add(op.file)
            if op.spool_key is not None:
                self.spool_hw[op.spool_key] = max(self.spool_hw.get(op.spool_key, -1), op.spool_upto)
        elif op.op == "remote":
            e = self.by_key.get(op.key) or (self.retired.get(op.key) or (0, None))[1]
            if e is not None:
                e.remote = True
        elif op.op == "local_deleted":
            for k in op.keys or [op.key]:
                e = self.by_key.get(k) or (self.retired.get(k) or (0, None))[1]
                if e is not None:
                    e.local = False
        elif op.op == "compact":
            for k in op.keys or []:
                e = self._remove(k)
                if e is not None:
                    self.retired[k] = (op.at, e)
                    self.replaced_by[k] = op.file.key
            self._add(op.file)
        elif op.op == "purged":
            for k in op.keys or []:
                self.retired.pop(k, None)
                self.replaced_by.pop(k, None)
        elif op.op == "watermark":
            self.watermarks[op.source] = max(self.watermarks.get(op.source, 0), op.ts)

    def _add(self, e: FileEntry) -> None:
        part = (e.table, e.source, e.market, e.date)
        old = self.by_key.get(e.key)
        if old is not None:
            self._remove(e.key)
        self.retired.pop(e.key, None)
        self.replaced_by.pop(e.key, None)
        self.by_key[e.key] = e
        self.parts[part][e.key] = e
        self._aggs.setdefault(part, _Agg()).add(e)

    def _remove(self, key: str) -> FileEntry | None:
        e = self.by_key.pop(key, None)
        if e is None:
            return None
        part = (e.table, e.source, e.market, e.date)
        files = self.parts.get(part, {})
        files.pop(key, None)
        if files:
            agg = _Agg()
            for f in files.values():
                agg.add(f)
            self._aggs[part] = agg
        else:
            self.parts.pop(part, None)
            self._aggs.pop(part, None)
        return e

    # ---- log writing -------------------------------------------------------------------
    def append(self, *ops: Op) -> None:
        """Durably append ops (one write, fsync) under an exclusive lock shared by all processes."""
        if not ops:
            return
        if self.path is None:
            raise ReadOnlyCatalogError("this catalog is a reader's copy of the store's manifest; writes go "
                                       "through the writing machine's home")
        for op in ops:
            op.at = op.at or now_ns()
        payload = b"".join(_enc.encode(op) + b"\n" for op in ops)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size:
                    # A torn tail can only come from a writer that died mid-line (it was never
                    # acknowledged); cut it so the new line is not glued to it.
                    with open(self.path, "rb") as f:
                        f.seek(max(0, size - 1))
                        if f.read(1) != b"\n":
                            f.seek(0)
                            keep = f.read().rfind(b"\n") + 1
                            os.ftruncate(fd, keep)
                            log.warning("catalog_torn_tail_truncated", bytes=size - keep)
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            self.refresh()

    def add_file(self, e: FileEntry, spool_key: str | None = None, spool_upto: int | None = None) -> None:
        self.append(Op(op="add", file=e, spool_key=spool_key, spool_upto=spool_upto))

    def mark_remote(self, key: str) -> None:
        self.append(Op(op="remote", key=key))

    def mark_local_deleted(self, keys: list[str]) -> None:
        if keys:
            self.append(Op(op="local_deleted", keys=list(keys)))

    def swap(self, new: FileEntry, old_keys: list[str]) -> None:
        """Replace `old_keys` by `new` in one log line: readers see either all old or the new."""
        self.append(Op(op="compact", file=new, keys=list(old_keys)))

    def mark_purged(self, keys: list[str]) -> None:
        if keys:
            self.append(Op(op="purged", keys=list(keys)))

    def set_watermark(self, source: str, ts: int) -> None:
        if ts > self.watermarks.get(source, 0):
            self.append(Op(op="watermark", source=source, ts=ts))

    # ---- questions ---------------------------------------------------------------------
    def partitions(self, table=None, source=None, market=None, start=None, end=None) -> list[Partition]:
        self.refresh()
        out = []
        for part, agg in self._aggs.items():
            t, s, m, _ = part
            if table is not None and t != table:
                continue
            if not (match(s, source) and match(m, market)):
                continue
            if start is not None and agg.max_ts is not None and agg.max_ts < start:
                continue
            if end is not None and agg.min_ts is not None and agg.min_ts >= end:
                continue
            out.append(part)
        return sorted(out)

    def files_in(self, part: Partition) -> list[FileEntry]:
        return sorted(self.parts.get(part, {}).values(), key=lambda e: e.key)

    def files(self, table: str, source=None, market=None, start=None, end=None) -> list[FileEntry]:
        """Live files of `table` whose [min_ts, max_ts] overlaps [start, end); exact or `*` filters."""
        from engine.timeutil import to_ns

        start, end = to_ns(start, name="start"), to_ns(end, name="end")
        out = []
        for part in self.partitions(table, source, market, start, end):
            for e in self.parts[part].values():
                if start is not None and e.max_ts is not None and e.max_ts < start:
                    continue
                if end is not None and e.min_ts is not None and e.min_ts >= end:
                    continue
                out.append(e)
        out.sort(key=lambda e: e.key)
        return out

    def markets(self, table: str | None = None) -> list[tuple[str, str]]:
        self.refresh()
        return sorted({(s, m) for (t, s, m, _) in self._aggs if table is None or t == table})

    def _summary_all(self) -> pl.DataFrame:
        if self._summary_cache and self._summary_cache[0] == self.version:
            return self._summary_cache[1]
        keys = sorted(self._aggs)
        aggs = [self._aggs[k] for k in keys]
        df = pl.DataFrame(
            {
                "table": [k[0] for k in keys],
                "source": [k[1] for k in keys],
                "market": [k[2] for k in keys],
                "date": [k[3] for k in keys],
                "rows": [a.rows for a in aggs],
                "bytes": [a.bytes for a in aggs],
                "files": [a.files for a in aggs],
                "min_ts": [a.min_ts for a in aggs],
                "max_ts": [a.max_ts for a in aggs],
            },
            schema={
                "table": pl.String, "source": pl.String, "market": pl.String, "date": pl.String,
                "rows": pl.Int64, "bytes": pl.Int64, "files": pl.Int64, "min_ts": pl.Int64, "max_ts": pl.Int64,
            },
        )
        self._summary_cache = (self.version, df)
        return df

    def summary(self, table=None, source=None, market=None, start=None, end=None, raw_ns: bool = False) -> pl.DataFrame:
        """Rows, bytes, files and time range per (table, source, market, date), from the index alone;
        min_ts/max_ts as Datetime("ns", "UTC") (int64 ns with `raw_ns=True`)."""
        from engine.schema import time_cols
        from engine.timeutil import result_times, to_ns

        self.refresh()
        return result_times(filter_summary(self._summary_all(), table, source, market, to_ns(start, name="start"),
                                           to_ns(end, name="end")), time_cols("summary"), raw_ns=raw_ns)

    def replacement(self, key: str) -> FileEntry | None:
        """The live file holding a retired file's rows now (following later compactions), or None."""
        with self._lock:
            seen = set()
            while key in self.replaced_by and key not in seen:
                seen.add(key)
                key = self.replaced_by[key]
            return self.by_key.get(key)

    def watermark(self, source: str) -> int:
        self.refresh()
        return self.watermarks.get(source, 0)

    def last_recv_ts(self, source: str) -> int | None:
        self.refresh()
        vals = [e.max_recv_ts for e in self.by_key.values() if e.source == source and e.max_recv_ts is not None]
        return max(vals) if vals else None

    def entries(self) -> Iterable[FileEntry]:
        self.refresh()
        return list(self.by_key.values())


def filter_summary(df: pl.DataFrame, table=None, source=None, market=None, start=None, end=None,
                   lo: str = "min_ts", hi: str = "max_ts") -> pl.DataFrame:
    """Rows of a per-partition (or per-file) frame matching exact or `*` filters and overlapping
    [start, end); a row without a time range is kept."""
    preds = []
    if table is not None:
        preds.append(pl.col("table") == table)
    for col, pat in (("source", source), ("market", market)):
        if pat is None:
            continue
        if is_pattern(pat):
            preds.append(pl.col(col).str.contains(pattern_regex(pat)))
        else:
            preds.append(pl.col(col) == pat)
    if start is not None:
        preds.append(pl.col(hi).is_null() | (pl.col(hi) >= start))
    if end is not None:
        preds.append(pl.col(lo).is_null() | (pl.col(lo) < end))
    return df.filter(*preds) if preds else df
