"""The index of every lake file: an append-only, fsynced JSON-lines log, checkpointed.

The log is the truth; the index (table → source → market → date → files, with per-partition
aggregates) is the log replayed, without touching the object store, and refreshed incrementally,
so several processes (collector, Dagster, notebooks) share one catalog. A checkpoint
(`snapshot.arrow` beside the log) holds the index as of a byte offset of the log: opening maps
the snapshot and replays only the lines after it, so it stays flat as files accumulate. The
snapshot is one Arrow row per partition (its aggregates, and its files packed as msgpack that is
decoded only when the partition is asked for). The log is never rewritten, so readers following
it from a byte cursor (the Dagster sensor) are unaffected.
"""

from __future__ import annotations

import bisect
import fcntl
import functools
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engine.lake import instruments as inst
from engine.fsio import atomic_path, tmp_owner_alive
from engine.log import get_logger
from engine.paths import is_pattern, parse_key, pattern_regex
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
    instruments: str | None = None  # per-instrument figures (engine.lake.instruments.encode); None: not recorded


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

# What each op must carry to be applied; valid JSON can still lack it (a hand edit, a foreign writer).
_NEEDS: dict[str, tuple[str, ...]] = {
    "add": ("file",), "compact": ("file",), "remote": ("key",), "local_deleted": (),
    "purged": ("keys",), "watermark": ("source", "ts"),
}


class BadLine(ValueError):
    """A log line that cannot be applied: torn, not JSON, or missing what its op needs."""


def problem(op: Op) -> str | None:
    """Why a decoded op cannot be applied, or None."""
    if op.op == "add" and op.file is not None and op.spool_key is None and op.spool_upto is None:
        return None  # the common line, checked first: opening replays every one
    if op.op not in _NEEDS:
        return f"unknown op {op.op!r}"
    missing = [f for f in _NEEDS[op.op] if getattr(op, f) is None]
    if op.op == "local_deleted" and op.key is None and op.keys is None:
        missing.append("key or keys")
    if (op.spool_key is None) != (op.spool_upto is None):
        missing.append("spool_key with spool_upto")
    return f"{op.op} without {', '.join(missing)}" if missing else None


def encode_ops(*ops: Op) -> bytes:
    """Ops as catalog log lines (one JSON object a line), exactly as `Catalog.append` writes them."""
    return b"".join(_enc.encode(op) + b"\n" for op in ops)


def decode_op(line: bytes) -> Op:
    """One log line as an Op; raises BadLine for a line that cannot be applied."""
    try:
        op = _dec.decode(line)
    except msgspec.DecodeError as e:
        raise BadLine(str(e)) from None
    why = problem(op)
    if why is not None:
        raise BadLine(why)
    return op

Partition = tuple[str, str, str, str]  # table, source, market, date

SNAPSHOT_EVERY = 10_000  # log lines after the snapshot before an append writes a new one
SNAPSHOT_NAME = "snapshot.arrow"
_SNAP_FORMAT = 2  # 2: per-instrument figures per partition (a format-1 snapshot is ignored: the log is replayed)
_MARK_BYTES = 4096  # the log bytes whose hashes tie a snapshot to the log it was taken from
_FINDS_BEFORE_LIST = 1_000  # ~13 µs a lookup on the mapped column, ~2 µs on a list (70 ms to copy 1M)
_PARTS_BEFORE_PRUNING = 16  # an instrument query over more partitions picks those holding it from their figures
_SEP = "\x1f"  # below every character a key part may hold: pkey order is partition tuple order

# FileEntry as a msgpack array: a partition's files are stored in half the bytes of a map
_Packed = msgspec.defstruct("_Packed", [(f.name, f.type, f.default) if not f.required else (f.name, f.type)
                                         for f in msgspec.structs.fields(FileEntry)], array_like=True, kw_only=True)
_pack = msgspec.msgpack.Encoder()
_unpack = msgspec.msgpack.Decoder(list[_Packed])
_unpack_retired = msgspec.msgpack.Decoder(list[tuple[str, int, _Packed]])


class _SnapMeta(msgspec.Struct):
    format: int
    offset: int  # log bytes the snapshot covers (whole lines)
    head: str  # sha256 of the first up-to-4 KiB of the log
    tail: str  # sha256 of the up-to-4 KiB just before `offset`
    bad_lines: int
    watermarks: dict[str, int]
    spool_hw: dict[str, int]
    odd: dict[str, tuple[str, str, str, str]]  # keys whose path does not name their partition
    replaced_by: dict[str, str] = msgspec.field(default_factory=dict)  # retired key → its compacted file


_SNAP_SCHEMA = pa.schema([
    ("pkey", pa.string()), ("table", pa.string()), ("source", pa.string()), ("market", pa.string()),
    ("date", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("files", pa.int64()),
    ("pending", pa.int64()), ("min_ts", pa.int64()), ("max_ts", pa.int64()), ("max_recv_ts", pa.int64()),
    ("entries", pa.large_binary()), ("instruments", inst.ARROW_TYPE),
])
_AGG_COLS = ("rows", "bytes", "files", "pending", "min_ts", "max_ts", "max_recv_ts")
_FRAME_SCHEMA = {"pkey": pl.String, "table": pl.String, "source": pl.String, "market": pl.String,
                 "date": pl.String, **{c: pl.Int64 for c in _AGG_COLS}}


def _pkey(part: Partition) -> str:
    return _SEP.join(part)


def _names(key: str, part: Partition) -> bool:
    """Whether `key` is a file path inside `part` (the usual case, checked without a regex)."""
    prefix = f"data/{part[0]}/source={part[1]}/market={part[2]}/date={part[3]}/"
    return key.startswith(prefix) and key.endswith(".parquet") and "/" not in key[len(prefix):]


def _part_of(key: str) -> Partition | None:
    try:
        kp = parse_key(key)
    except (ValueError, TypeError):  # not a data key (or none: `{"op":"local_deleted","keys":[]}`)
        return None
    return kp.table, kp.source, kp.market, kp.date


def _columns(parts: list[Partition], aggs: list["_Agg"]) -> dict[str, list]:
    """Partition rows as columns (the snapshot's and the frame's layout, without the files)."""
    cols: dict[str, list] = {"pkey": [_pkey(p) for p in parts]}
    for i, c in enumerate(("table", "source", "market", "date")):
        cols[c] = [p[i] for p in parts]
    for c in _AGG_COLS:
        cols[c] = [getattr(a, c) for a in aggs]
    return cols


def _entries_of(blob: bytes) -> list[FileEntry]:
    return msgspec.convert(_unpack.decode(blob), list[FileEntry], from_attributes=True)


class _Agg:
    """Per-partition figures, so summaries and filters never visit files."""

    __slots__ = _AGG_COLS

    def __init__(self, entries: Iterable[FileEntry] = ()):
        self.rows = self.bytes = self.files = self.pending = 0
        self.min_ts = self.max_ts = self.max_recv_ts = None
        for e in entries:
            self.add(e)

    def add(self, e: FileEntry) -> None:
        self.rows += e.rows
        self.bytes += e.bytes
        self.files += 1
        self.pending += not e.remote
        if e.min_ts is not None:
            self.min_ts = e.min_ts if self.min_ts is None else min(self.min_ts, e.min_ts)
            self.max_ts = e.max_ts if self.max_ts is None else max(self.max_ts, e.max_ts)
        if e.max_recv_ts is not None:
            self.max_recv_ts = e.max_recv_ts if self.max_recv_ts is None else max(self.max_recv_ts, e.max_recv_ts)


class _Base:
    """A loaded snapshot: partitions as memory-mapped Arrow columns, files decoded on demand."""

    def __init__(self, path: Path):
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        md = reader.schema.metadata or {}
        self.meta = msgspec.json.decode(md[b"engine.snapshot"], type=_SnapMeta)
        if self.meta.format != _SNAP_FORMAT:
            raise ValueError(f"snapshot format {self.meta.format}, this engine reads {_SNAP_FORMAT}")
        if not reader.schema.remove_metadata().equals(_SNAP_SCHEMA):
            raise ValueError("snapshot columns differ from this engine's")
        self.retired = {k: (at, e) for k, at, e in msgspec.convert(
            _unpack_retired.decode(md[b"engine.retired"]), list[tuple[str, int, FileEntry]], from_attributes=True)}
        self.table = reader.read_all().replace_schema_metadata(None)
        self.n = self.table.num_rows
        self._pkeys = self.table.column("pkey").combine_chunks() if self.n else pa.array([], pa.string())
        self._blobs = self.table.column("entries")
        self.alive = np.ones(self.n, dtype=bool)  # False: the partition now lives in the catalog's dicts
        self._df: pl.DataFrame | None = None
        self._figures: pl.DataFrame | None = None
        self._finds = 0
        self._list: list[str] | None = None

    def find(self, part: Partition) -> int | None:
        """Row of a partition: binary search on the mapped column, or, once many lookups have
        been asked for (a long tail to replay), on the column copied into a list."""
        k = _pkey(part)
        self._finds += 1
        if self._list is None and self._finds > _FINDS_BEFORE_LIST:
            self._list = self._pkeys.to_pylist()
        if self._list is not None:
            i = bisect.bisect_left(self._list, k)
            return i if i < self.n and self._list[i] == k else None
        i = bisect.bisect_left(self._pkeys, k, key=lambda s: s.as_py())
        return i if i < self.n and self._pkeys[i].as_py() == k else None

    def entries(self, i: int) -> list[FileEntry]:
        return _entries_of(self._blobs[i].as_buffer())

    def figures(self, rows: np.ndarray, positions: np.ndarray) -> pl.DataFrame:
        """Per-instrument figures of snapshot rows `rows`, `_p` = `positions`: the whole column is
        flattened once (zero-copy from the map), then picked by row."""
        if self._figures is None:
            self._figures = inst.flatten(self.table.column("instruments"), np.arange(self.n))
        remap = np.full(self.n, -1, np.int64)
        remap[rows] = positions
        r = remap[self._figures["_p"].to_numpy()]
        keep = r >= 0
        df = self._figures if keep.all() else self._figures.filter(pl.Series(keep))
        return df.with_columns(_p=pl.Series(r[keep], dtype=pl.Int64))

    def df(self) -> pl.DataFrame:
        """The partition columns as a polars frame (built once, on the first question)."""
        if self._df is None:
            self._df = pl.from_arrow(self.table.drop_columns(["entries", "instruments"]),
                                     schema_overrides=_FRAME_SCHEMA).with_row_index("_i")
        return self._df


def _locked(fn):
    """Questions run under the catalog's lock: a checkpoint swaps the index wholesale."""

    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        with self._lock:
            return fn(self, *a, **kw)

    return wrapper


class _Keys(Mapping):
    """`by_key`: every live file by key, looked up through its partition (no global dict to build)."""

    def __init__(self, cat: "Catalog"):
        self._cat = cat

    def __getitem__(self, key: str) -> FileEntry:
        with self._cat._lock:
            e = self._cat._files(self._cat._where(key)).get(key)
        if e is None:
            raise KeyError(key)
        return e

    def __len__(self) -> int:
        with self._cat._lock:
            return int(self._cat._frame()["files"].sum())

    def __iter__(self) -> Iterator[str]:
        return (e.key for e in self._cat.entries())


class Catalog:
    def __init__(self, log_path: Path, *, snapshot: bool = True, snapshot_every: int = SNAPSHOT_EVERY):
        self.path = Path(log_path)
        self.snapshot_path = self.path.with_name(SNAPSHOT_NAME)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self.snapshots, self.snapshot_every = snapshot, snapshot_every
        self._lock = threading.RLock()
        self._offset = 0
        self.version = 0
        self.by_key = _Keys(self)
        self.retired: dict[str, tuple[int, FileEntry]] = {}  # key → (retired_at, entry), awaiting purge
        self.replaced_by: dict[str, str] = {}  # retired key → key of the compacted file that replaced it
        self.watermarks: dict[str, int] = {}
        self.writer_watermarks: dict[str, int] = {}  # only a manifest reader has these (the writer's own)
        self.spool_hw: dict[str, int] = {}
        self._bad_lines = 0  # bad whole lines (kept in the snapshot)
        self._torn_tail = 0  # a torn last line seen at start-up (the next append cuts it)
        self.snapshot_offset = 0  # log bytes covered by the loaded snapshot
        self.tail_ops = 0  # log lines read since then
        self._reset(None)
        if snapshot:
            self._load_snapshot()
        self.refresh(startup=True)
        if snapshot and self.tail_ops >= snapshot_every:
            self.checkpoint()

    @property
    def torn_lines(self) -> int:
        """Log lines skipped: bad whole lines, and a torn last line seen at start-up."""
        return self._bad_lines + self._torn_tail

    def _reset(self, base: _Base | None) -> None:
        self._base = base
        self._live: dict[Partition, dict[str, FileEntry]] = {}  # partitions changed since the snapshot
        self._aggs: dict[Partition, _Agg] = {}  # of the live partitions
        self._decoded: dict[int, dict[str, FileEntry]] = {}  # snapshot partitions read, unchanged
        self._odd: dict[str, Partition] = dict(base.meta.odd) if base else {}
        self._frame_cache: tuple[int, pl.DataFrame] | None = None
        self._summary_cache: tuple[int, pl.DataFrame] | None = None
        self._inst_parts: dict[Partition, inst.Figures] = {}  # instrument figures of live partitions, on demand
        self._inst_cache: tuple[tuple, pl.DataFrame] | None = None  # (version, question) → the last answer

    # ---- snapshot ----------------------------------------------------------------------
    def _load_snapshot(self) -> None:
        try:
            base = _Base(self.snapshot_path)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, pa.ArrowException, msgspec.MsgspecError) as e:
            log.warning("catalog_snapshot_unreadable", path=str(self.snapshot_path), error=str(e),
                        hint="replaying the whole log; the next checkpoint replaces it")
            return
        m = base.meta
        if self._log_marks(m.offset) != (m.head, m.tail):
            log.warning("catalog_snapshot_stale", path=str(self.snapshot_path), offset=m.offset,
                        log_bytes=self.path.stat().st_size, hint="the log was cut or rewritten: replaying it whole")
            return
        self._install(base)

    def _install(self, base: _Base) -> None:
        m = base.meta
        self._reset(base)
        self.retired = base.retired
        self.replaced_by = dict(m.replaced_by)
        self.watermarks, self.spool_hw = dict(m.watermarks), dict(m.spool_hw)
        self._bad_lines = m.bad_lines
        self._offset = self.snapshot_offset = m.offset
        self.tail_ops = 0
        self.version += 1

    def _log_marks(self, offset: int) -> tuple[str, str] | None:
        """Hashes of the log's first bytes and of the bytes before `offset` (None: log too short)."""
        with open(self.path, "rb") as f:
            head = f.read(min(offset, _MARK_BYTES))
            f.seek(max(0, offset - _MARK_BYTES))
            tail = f.read(min(offset, _MARK_BYTES))
        if len(tail) < min(offset, _MARK_BYTES):
            return None
        return hashlib.sha256(head).hexdigest(), hashlib.sha256(tail).hexdigest()

    def checkpoint(self) -> bool:
        """Write the index as of the log offset read so far (temp, fsync, rename) and serve from it.
        Returns False when another process is writing one right now or the write failed (logged)."""
        with self._lock:
            if self.snapshot_offset == self._offset and self._base is not None:
                return True
            fd = os.open(self.path.with_name(SNAPSHOT_NAME + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                for old in self.path.parent.glob(f".{SNAPSHOT_NAME}.tmp-*"):  # left by a killed checkpoint
                    if not tmp_owner_alive(old.name):
                        old.unlink(missing_ok=True)
                t = self._snapshot_table()
                with atomic_path(self.snapshot_path) as tmp:
                    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
                        w.write_table(t)
                self._install(_Base(self.snapshot_path))
            except Exception as e:  # noqa: BLE001 - best effort: the log holds everything, and an append
                # whose line is durable must not look failed (its caller would write the rows again)
                log.warning("catalog_checkpoint_failed", path=str(self.snapshot_path), error=repr(e),
                            hint="opening replays more of the log until a checkpoint succeeds")
                return False
            finally:
                os.close(fd)  # releases the lock
            log.info("catalog_checkpoint", offset=self._offset, partitions=t.num_rows,
                     snapshot_bytes=self.snapshot_path.stat().st_size)
            return True

    def _snapshot_table(self) -> pa.Table:
        head, tail = self._log_marks(self._offset)
        meta = _SnapMeta(_SNAP_FORMAT, self._offset, head, tail, self._bad_lines, self.watermarks, self.spool_hw,
                         self._odd, self.replaced_by)
        retired = [(k, at, msgspec.structs.astuple(e)) for k, (at, e) in self.retired.items()]
        parts = sorted(p for p, d in self._live.items() if d)
        cols = _columns(parts, [self._aggs[p] for p in parts])
        cols["entries"] = [_pack.encode([msgspec.structs.astuple(e) for e in self._live[p].values()]) for p in parts]
        cols["instruments"] = inst.figures_arrow(self._part_figures(parts))
        live = pa.table(cols, schema=_SNAP_SCHEMA)
        t = live
        if self._base is not None and self._base.n:
            t = pa.concat_tables([self._base.table.filter(pa.array(self._base.alive)), live])
            t = t.take(pc.sort_indices(t, [("pkey", "ascending")]))
        md = {b"engine.snapshot": msgspec.json.encode(meta), b"engine.retired": _pack.encode(retired)}
        return t.combine_chunks().replace_schema_metadata(md)

    # ---- log reading -------------------------------------------------------------------
    def refresh(self, startup: bool = False) -> int:
        """Apply log lines written since the last read (by this or another process)."""
        with self._lock:
            if not self.path.exists():
                return 0
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            if not data:
                return 0
            end = data.rfind(b"\n") + 1
            tail = data[end:]
            if tail and startup:
                self._torn_tail += 1
                log.warning("catalog_torn_tail_ignored", path=str(self.path), bytes=len(tail))
            n = 0
            for line in data[:end].splitlines():
                if not line.strip():
                    continue
                self.tail_ops += 1
                try:
                    op = decode_op(line)
                except BadLine as e:
                    self._bad_lines += 1
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
            self._update(op.key, remote=True)
        elif op.op == "local_deleted":
            for k in op.keys or [op.key]:
                self._update(k, local=False)
        elif op.op == "compact":
            for k in op.keys or []:
                e = self._remove(k)
                if e is not None:
                    self.retired[k] = (op.at, e)
                    self.replaced_by[k] = op.file.key
            self._add(op.file)
        elif op.op == "purged":
            for k in op.keys:
                self.retired.pop(k, None)
                self.replaced_by.pop(k, None)
        elif op.op == "watermark":
            self.watermarks[op.source] = max(self.watermarks.get(op.source, 0), op.ts)

    # ---- the index ---------------------------------------------------------------------
    def _where(self, key: str) -> Partition | None:
        return self._odd.get(key) or _part_of(key)

    def _files(self, part: Partition | None) -> dict[str, FileEntry]:
        """The files of a partition, for reading: changed ones from the dicts, others from the snapshot."""
        live = self._live.get(part)
        if live is not None or self._base is None or part is None:
            return live if live is not None else {}
        return self._base_files(self._base.find(part))

    def _base_files(self, i: int | None) -> dict[str, FileEntry]:
        if i is None or not self._base.alive[i]:
            return {}
        d = self._decoded.get(i)
        if d is None:
            d = self._decoded[i] = {e.key: e for e in self._base.entries(i)}
        return d

    def _changing(self, part: Partition) -> dict[str, FileEntry]:
        """The files of a partition, for changing: moved out of the snapshot into the dicts."""
        d = self._live.get(part)
        if d is None:
            i = self._base.find(part) if self._base is not None else None
            d = self._live[part] = dict(self._base_files(i))
            if i is not None:
                self._base.alive[i] = False
                self._decoded.pop(i, None)
            if d:
                self._aggs[part] = _Agg(d.values())
        return d

    def _settle(self, part: Partition, d: dict[str, FileEntry]) -> None:
        if d:
            self._aggs[part] = _Agg(d.values())
        else:
            self._aggs.pop(part, None)

    def _add(self, e: FileEntry) -> None:
        part = (e.table, e.source, e.market, e.date)
        regular = _names(e.key, part)
        if not regular or e.key in self._odd:
            if self._where(e.key) != part:
                self._remove(e.key)  # the same key catalogued under another partition before
        d = self._live.get(part)
        if d is None:
            d = self._changing(part)
        self.retired.pop(e.key, None)
        self.replaced_by.pop(e.key, None)
        replaced = e.key in d
        d[e.key] = e
        self._inst_parts.pop(part, None)
        if not regular:
            self._odd[e.key] = part
        if replaced:
            self._settle(part, d)
        else:
            self._aggs.setdefault(part, _Agg()).add(e)

    def _remove(self, key: str) -> FileEntry | None:
        part = self._where(key)
        if key not in self._files(part):
            return None
        d = self._changing(part)
        e = d.pop(key)
        self._inst_parts.pop(part, None)
        self._odd.pop(key, None)
        self._settle(part, d)
        return e

    def _update(self, key: str, **changes) -> None:
        part = self._where(key)
        if key in self._files(part):
            d = self._changing(part)
            for k, v in changes.items():
                setattr(d[key], k, v)
            self._settle(part, d)
        elif key in self.retired:
            for k, v in changes.items():
                setattr(self.retired[key][1], k, v)

    def _frame(self) -> pl.DataFrame:
        """One row per partition with files (snapshot rows not changed since, then the changed),
        sorted by partition; rebuilt when the catalog changes."""
        if self._frame_cache and self._frame_cache[0] == self.version:
            return self._frame_cache[1]
        parts = sorted(p for p, d in self._live.items() if d)
        df = pl.DataFrame(_columns(parts, [self._aggs[p] for p in parts]), schema=_FRAME_SCHEMA)
        df = df.select(pl.lit(None, pl.UInt32).alias("_i"), pl.all())  # `_i`: the snapshot row, null when changed
        if self._base is not None and self._base.n:
            base = self._base.df()
            if not self._base.alive.all():
                base = base.filter(pl.Series(self._base.alive))
            df = base.merge_sorted(df, "pkey") if df.height else base
        self._frame_cache = (self.version, df)
        return df

    def _part_figures(self, parts: list[Partition]) -> list[inst.Figures]:
        """Per-instrument figures of live partitions, from their files' recorded figures (no data
        read); those not known yet are computed together, and kept until the partition changes."""
        todo = [p for p in parts if p not in self._inst_parts]
        if todo:
            self._inst_parts.update(zip(todo, inst.partitions_figures([self._live[p].values() for p in todo])))
        return [self._inst_parts[p] for p in parts]

    def _inst_rows(self, parts: pl.DataFrame) -> pl.DataFrame:
        """Per-instrument figures of the partitions `parts` (rows of `_frame()`), `_p` their row in
        `parts`: the snapshot's flattened from its mapped column, the changed ones' from their files."""
        frames = []
        i = parts["_i"]
        if self._base is not None and i.null_count() < len(i):
            pos = np.flatnonzero(i.is_not_null().to_numpy())
            frames.append(self._base.figures(i.gather(pos).to_numpy().astype(np.int64), pos))
        if i.null_count():
            pos = np.flatnonzero(i.is_null().to_numpy())
            frames.append(inst.figures_frame(self._part_figures(self._parts_of(parts[pos])), pos))
        if not frames:
            return pl.DataFrame(schema=inst.ROWS_SCHEMA)
        return pl.concat([f.select(inst.ROWS_SCHEMA.keys()).cast(inst.ROWS_SCHEMA) for f in frames])

    def _parts_of(self, df: pl.DataFrame) -> list[Partition]:
        return list(zip(*(df[c].to_list() for c in ("table", "source", "market", "date"))))

    # ---- log writing -------------------------------------------------------------------
    def append(self, *ops: Op) -> None:
        """Durably append ops (one write, fsync) under an exclusive lock shared by all processes."""
        if not ops:
            return
        for op in ops:
            op.at = op.at or now_ns()
        payload = encode_ops(*ops)
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
            if self.snapshots and self.tail_ops >= self.snapshot_every:
                self.checkpoint()

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
    def _filtered(self, table=None, source=None, market=None, start=None, end=None) -> pl.DataFrame:
        """Partitions matching the filters; a partition without times matches any time range."""
        return filter_summary(self._frame(), table, source, market, start, end)

    @_locked
    def partitions(self, table=None, source=None, market=None, start=None, end=None) -> list[Partition]:
        self.refresh()
        return self._parts_of(self._filtered(table, source, market, start, end))

    @_locked
    def files_in(self, part: Partition) -> list[FileEntry]:
        return sorted(self._files(part).values(), key=lambda e: e.key)

    @_locked
    def files(self, table: str, source=None, market=None, start=None, end=None, instrument=None) -> list[FileEntry]:
        """Live files of `table` whose [min_ts, max_ts] overlaps [start, end); exact or `*` filters.
        `instrument` (exact or `*`): only files holding a matching instrument with rows in the range
        (by their recorded figures; a file catalogued without them is always kept)."""
        from engine.timeutil import to_ns

        start, end = to_ns(start, name="start"), to_ns(end, name="end")
        self.refresh()
        df = self._filtered(table, source, market, start, end)
        whole: set[int] = set()  # partitions whose every file holds a match inside the window: no decoding
        if instrument is not None and df.height > _PARTS_BEFORE_PRUNING:  # partitions holding it, first
            df, whole = self._holding(df, instrument, start, end)
        out = []
        for i, part in enumerate(self._parts_of(df)):
            for e in self._files(part).values():
                if start is not None and e.max_ts is not None and e.max_ts < start:
                    continue
                if end is not None and e.min_ts is not None and e.min_ts >= end:
                    continue
                if instrument is not None and i not in whole and e.instruments is not None:
                    st = inst.figures_of(e)
                    if st is not None and not st.matching(instrument, start, end):
                        continue
                out.append(e)
        out.sort(key=lambda e: e.key)
        return out

    def _holding(self, df: pl.DataFrame, instrument: str, start, end) -> tuple[pl.DataFrame, set[int]]:
        """The partitions of `df` with a matching instrument in [start, end) by their figures, or with
        files without figures (null instrument: always read); and which of them (by new row) have it
        in every file, inside the window."""
        rows = self._inst_rows(df)
        unknown = rows.filter(pl.col("instrument").is_null())["_p"].to_numpy()
        hit = inst.instrument_filter(rows, instrument)
        if start is not None:
            hit = hit.filter(pl.col("max_ts").is_null() | (pl.col("max_ts") >= start))
        if end is not None:
            hit = hit.filter(pl.col("min_ts").is_null() | (pl.col("min_ts") < end))
        keep = np.union1d(hit["_p"].to_numpy(), unknown)
        inside = hit.filter(pl.col("files") == pl.Series(df["files"].to_numpy()[hit["_p"].to_numpy()]))
        if start is not None:
            inside = inside.filter(pl.col("min_ts") >= start)
        if end is not None:
            inside = inside.filter(pl.col("max_ts") < end)
        whole = set(np.searchsorted(keep, np.setdiff1d(inside["_p"].to_numpy(), unknown)).tolist())
        return df[keep], whole

    @_locked
    def pending_upload(self, table=None, source=None, market=None, date=None) -> list[FileEntry]:
        """Live files not yet in the object store, by key (only partitions that have some are read)."""
        self.refresh()
        df = self._filtered(table, source, market).filter(pl.col("pending") > 0)
        if date is not None:
            df = df.filter(pl.col("date") == date)
        out = [e for p in self._parts_of(df) for e in self._files(p).values() if not e.remote]
        return sorted(out, key=lambda e: e.key)

    @_locked
    def markets(self, table: str | None = None) -> list[tuple[str, str]]:
        self.refresh()
        df = self._filtered(table).select("source", "market").unique()
        return sorted(zip(df["source"].to_list(), df["market"].to_list()))

    @_locked
    def summary(self, table=None, source=None, market=None, start=None, end=None, raw_ns: bool = False, *,
                by: str = "date", instrument=None) -> pl.DataFrame:
        """Rows, bytes, files and time range per (table, source, market, date), from the index alone;
        times as Datetime("ns", "UTC") (int64 ns with `raw_ns=True`).
        `by="instrument"`: rows, files holding it, min/max `ts` and `recv_ts` per (table, source,
        market, instrument) instead, from the files' per-instrument figures: over the (partition,
        instrument) figures matching the filters (`instrument` exact or glob) and overlapping
        [start, end), whole, not cut at the range. A null instrument stands for rows without one
        (whole-market gaps) and for files catalogued without figures."""
        from engine.schema import time_cols
        from engine.timeutil import result_times, to_ns

        self.refresh()
        if by != "date" or instrument is not None:
            return result_times(self._by_instrument(("table", "source", "market"), by, table, source, market,
                                                    to_ns(start, name="start"), to_ns(end, name="end"), instrument),
                                time_cols("summary"), raw_ns=raw_ns)
        if not (self._summary_cache and self._summary_cache[0] == self.version):
            cols = ("table", "source", "market", "date", "rows", "bytes", "files", "min_ts", "max_ts")
            self._summary_cache = (self.version, self._frame().select(cols))
        return result_times(filter_summary(self._summary_cache[1], table, source, market, to_ns(start, name="start"),
                                           to_ns(end, name="end")), time_cols("summary"), raw_ns=raw_ns)

    @_locked
    def instruments(self, table=None, source=None, market=None, start=None, end=None, instrument=None,
                    raw_ns: bool = False) -> pl.DataFrame:
        """The instruments seen, with their first and last times, from the index alone (see `instrument_list`)."""
        from engine.timeutil import to_ns

        self.refresh()
        return instrument_list(self._by_instrument(("source", "market"), "instrument", table, source, market,
                                                   to_ns(start, name="start"), to_ns(end, name="end"), instrument), raw_ns=raw_ns)

    def _by_instrument(self, keys, by, table, source, market, start, end, instrument) -> pl.DataFrame:
        check_by(by)
        args = (keys, table, source, market, start, end, instrument)
        if self._inst_cache and self._inst_cache[0] == (self.version, args):
            return self._inst_cache[1]
        parts = self._filtered(table, source, market, start, end)
        out = inst.reduce(parts, self._inst_rows(parts), list(keys), start, end, instrument)
        self._inst_cache = ((self.version, args), out)
        return out

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

    @_locked
    def last_recv_ts(self, source: str) -> int | None:
        self.refresh()
        return self._frame().filter(pl.col("source") == source)["max_recv_ts"].max()

    @_locked
    def entries(self) -> Iterable[FileEntry]:
        """Every live file (reads every partition: questions about a few should use `files`)."""
        self.refresh()
        return [e for p in self._parts_of(self._frame()) for e in self._files(p).values()]


def filter_summary(df: pl.DataFrame, table=None, source=None, market=None, start=None, end=None) -> pl.DataFrame:
    """Rows of a per-partition (or per-file) frame matching exact or `*` filters and overlapping
    [start, end); a row without a time range matches any range."""
    preds = []
    if table is not None:
        preds.append(pl.col("table") == table)
    for col, pat in (("source", source), ("market", market)):
        if pat is None:
            continue
        preds.append(pl.col(col).str.contains(pattern_regex(pat)) if is_pattern(pat) else pl.col(col) == pat)
    if start is not None:
        preds.append(pl.col("max_ts").is_null() | (pl.col("max_ts") >= start))
    if end is not None:
        preds.append(pl.col("min_ts").is_null() | (pl.col("min_ts") < end))
    return df.filter(*preds) if preds else df


def check_by(by: str) -> None:
    if by != "instrument":
        raise ValueError(f"by={by!r}: a summary is by 'date' (per partition) or by 'instrument'; "
                         "an instrument filter needs by='instrument'")


def instrument_list(df: pl.DataFrame, raw_ns: bool = False) -> pl.DataFrame:
    """Per (source, market, instrument) seen: first and last `ts` and `recv_ts` (named instruments
    only), as Datetime("ns", "UTC") or, with `raw_ns`, int64 ns."""
    from engine.timeutil import result_times

    out = df.filter(pl.col("instrument").is_not_null()).select(
        "source", "market", "instrument", pl.col("min_ts").alias("first_ts"), pl.col("max_ts").alias("last_ts"),
        pl.col("min_recv_ts").alias("first_recv_ts"), pl.col("max_recv_ts").alias("last_recv_ts"))
    return result_times(out, ("first_ts", "last_ts", "first_recv_ts", "last_recv_ts"), raw_ns=raw_ns)
