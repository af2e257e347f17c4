"""Columnar buffer of one (table, source, market) for the current hour, sealed off the append path.

Rows arrive as Arrow batches and wait in a small hot list. Each arrival is a zero-copy slice of an
append's batch, often of a few dozen rows (a quiet market, appended every 0.25 s), and each costs
some 7 KB of C++ objects (table, columns, arrays, dictionaries) against ~60 bytes a row of data: a
minute of a hundred such markets took ~5x its size. So every `HOT_COMPACT` arrivals are copied into
one table, merged with the previous one while that is no larger (a binary counter: a few tables per
buffer, each row copied a few times, ~0.25 µs a row). Each full chunk is handed to the
engine's encoder thread (pyarrow releases the GIL, so on two cores appends and encoding overlap):
- while rows arrive in file order (one instrument, non-decreasing sort keys: a feed's normal
  case) every chunk is encoded once, straight into the Parquet file it will end up in, so a flush
  only writes the footer;
- once they do not, chunks are kept as zstd Arrow IPC blobs (a few bytes per row; zstd both
  compresses better and, in pyarrow, decompresses faster than LZ4 here) and the flush sorts.
For l2 with book anchors, the file opens with the carried book and the book at the end of the
buffer is folded chunk by chunk, in arrival order, in the same thread.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine import schema
from engine.lake.anchors import anchor_rows, end_book
from engine.lake.writer import ROW_GROUP_ROWS, StreamWriter, WrittenFile, key_array, keys_sorted, write_parquet

SEAL_ROWS = 65_536  # chunk size once out of order (IPC blobs)
HOT_COMPACT = 16  # hot arrivals copied into one table (see the module doc)
MAX_PENDING = 4  # chunks queued for the encoder per buffer before append waits: bounds memory
_IPC_OPTS = pa.ipc.IpcWriteOptions(compression="zstd")
_READ_OPTS = pa.ipc.IpcReadOptions(use_threads=False)


def _combine(parts: list[pa.Table]) -> pa.Table:
    """One table of contiguous buffers (a copy), dictionaries unified."""
    return pa.concat_tables(parts).unify_dictionaries().combine_chunks()


class Buffer:
    def __init__(self, table: str, source: str, market: str, hour: int, encoder: Executor, *,
                 stream_tmp: Path | None = None, anchor: pa.Table | None = None, track_book: bool = False):
        self.table, self.source, self.market, self.hour = table, source, market, hour
        self.schema = schema.spec(table).schema
        self._sort_keys = schema.spec(table).sort_keys
        self._encoder = encoder
        self.hot: list[pa.Table] = []
        self.hot_rows = 0
        self._loose = 0  # hot[_loose:] are arrivals as they came, hot[:_loose] compacted tables
        self.rows = 0
        self.first_batch: int | None = None
        self.last_batch = -1
        self.min_recv_ts: int | None = None
        self.max_recv_ts: int | None = None
        self.touched = self.created = time.monotonic()
        # file order so far: the single value of each dictionary sort key, the last numeric keys
        self._stream_tmp = stream_tmp
        self.ordered = stream_tmp is not None
        self._fixed: dict[str, object] = {}
        self._last: list[np.ndarray] | None = None
        self._anchor, self._track_book = anchor, track_book
        # owned by the encoder thread until every future is done
        self.stream: StreamWriter | None = None
        self.book: pa.Table | None = None
        self.encoded_bytes = 0
        self._futures: list[Future] = []  # results: None for streamed chunks, zstd IPC blobs otherwise
        self._error: BaseException | None = None

    # ---- append (caller's thread) ----------------------------------------------------------
    def add(self, t: pa.Table, batch_id: int, min_recv: int, max_recv: int) -> None:
        if self._anchor is not None:
            a = anchor_rows(self._anchor, t) if self._anchor.num_rows else None
            self._anchor = None
            if a is not None and a.num_rows:
                self._take(a)
        self._take(t)
        self.rows += t.num_rows
        if self.first_batch is None:
            self.first_batch = batch_id
        self.last_batch = batch_id
        self.min_recv_ts = min_recv if self.min_recv_ts is None else min(self.min_recv_ts, min_recv)
        self.max_recv_ts = max_recv if self.max_recv_ts is None else max(self.max_recv_ts, max_recv)
        self.touched = time.monotonic()
        if self.ordered:
            while self.hot_rows >= ROW_GROUP_ROWS:  # whole row groups, the rest stays hot
                t = pa.concat_tables(self.hot)
                self.hot, self.hot_rows, self._loose = [t.slice(ROW_GROUP_ROWS)], t.num_rows - ROW_GROUP_ROWS, 0
                self._submit([t.slice(0, ROW_GROUP_ROWS)])
        elif self.hot_rows >= SEAL_ROWS:
            self._seal()

    def _take(self, t: pa.Table) -> None:
        if self.ordered and not self._in_order(t):
            self.ordered = False
        self.hot.append(t)
        self.hot_rows += t.num_rows
        if len(self.hot) - self._loose >= HOT_COMPACT:
            self._compact()

    def _compact(self) -> None:
        """The loose arrivals into one table, merged with the compacted ones before it while those
        are no larger; row order is kept."""
        done = self.hot[:self._loose]
        t = _combine(self.hot[self._loose:])
        while done and done[-1].num_rows <= t.num_rows:
            t = _combine([done.pop(), t])
        done.append(t)
        self.hot, self._loose = done, len(done)

    def _in_order(self, t: pa.Table) -> bool:
        """Whether `t` continues the file order, so the file can be written as rows arrive."""
        nums = []
        for k in self._sort_keys:
            col = t.column(k)
            if pa.types.is_dictionary(col.type):
                vals = col.unique()
                if len(vals) != 1 or self._fixed.setdefault(k, vals[0].as_py()) != vals[0].as_py():
                    return False
            else:
                nums.append(key_array(col))
        if self._last is not None:
            nums = [np.concatenate([last, n]) for last, n in zip(self._last, nums)]
        if not keys_sorted(nums):
            return False
        self._last = [n[-1:] for n in nums]
        return True

    def _seal(self) -> None:
        if self.hot_rows:
            parts, self.hot, self.hot_rows, self._loose = self.hot, [], 0, 0
            self._submit(parts)

    def _submit(self, parts: list[pa.Table]) -> None:
        if len(self._futures) > MAX_PENDING:  # the encoder runs tasks in order: wait for an older one
            wait([self._futures[-MAX_PENDING - 1]])
        fut = self._encoder.submit(self._encode, parts, self.ordered)
        fut.in_bytes = sum(t.nbytes for t in parts)  # memory held until encoded
        self._futures.append(fut)

    # ---- encoder thread --------------------------------------------------------------------
    def _encode(self, parts: list[pa.Table], to_stream: bool) -> pa.Buffer | None:
        if self._error is not None:
            return None
        try:
            t = _combine(parts)
            if self._track_book:
                self._fold_book(t)
            if to_stream:
                if self.stream is None:
                    self.stream = StreamWriter(self.table, self._stream_tmp)
                self.stream.write(t)
                self.encoded_bytes = self.stream.bytes_written()
                return None
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, t.schema, options=_IPC_OPTS) as w:
                w.write_table(t)
            blob = sink.getvalue()
            self.encoded_bytes += blob.size
            return blob
        except BaseException as e:
            self._error = e
            raise

    def _fold_book(self, t: pa.Table) -> None:
        if self.book is not None and self.book.num_rows:
            t = pa.concat_tables([anchor_rows(self.book, t), t]).unify_dictionaries()
        self.book = end_book(t)

    # ---- flush (caller's thread) -----------------------------------------------------------
    def finish(self, path: Path, extra_meta: dict[str, str] | None = None) -> WrittenFile:
        """Write every buffered row as the file at `path` (footer with `extra_meta`); raises the
        encoder's error, if any."""
        self._seal()
        blobs = [b for b in (f.result() for f in self._futures) if b is not None]
        if self.ordered and self.stream is not None:
            return self.stream.finish(path, extra_meta)
        parts = [self.stream.read_back()] if self.stream is not None else []
        with ThreadPoolExecutor(max_workers=2) as ex:  # decompression releases the GIL
            parts += ex.map(lambda b: pa.ipc.open_stream(b, options=_READ_OPTS).read_all(), blobs)
        t = pa.concat_tables(parts).unify_dictionaries() if parts else self.schema.empty_table()
        return write_parquet(self.table, t, path, extra_meta=extra_meta)

    def discard(self) -> None:
        """Drop the partial file of a failed buffer (its rows are still in the spool)."""
        wait(self._futures)
        if self.stream is not None:
            self.stream.discard()

    def nbytes(self) -> int:
        """Bytes held for this buffer: encoded so far, queued for the encoder, and hot."""
        queued = sum(f.in_bytes for f in self._futures[-MAX_PENDING - 1:] if not f.done())
        return self.encoded_bytes + queued + sum(t.nbytes for t in self.hot)
