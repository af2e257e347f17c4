"""Columnar in-memory buffer of one (table, source, market) for the current hour.

Rows arrive as Arrow batches; every ~64k rows the hot batches are sealed into a zstd-compressed
Arrow IPC blob, so millions of buffered rows cost a few bytes each (zstd both compresses better
and, in pyarrow, decompresses faster than LZ4 frames on this data).
"""

from __future__ import annotations

import time

import pyarrow as pa

SEAL_ROWS = 65_536
_IPC_OPTS = pa.ipc.IpcWriteOptions(compression="zstd")
_READ_OPTS = pa.ipc.IpcReadOptions(use_threads=False)


class Buffer:
    __slots__ = ("table", "source", "market", "hour", "hot", "hot_rows", "sealed", "rows", "last_batch",
                 "min_recv_ts", "max_recv_ts", "touched", "created", "schema")

    def __init__(self, table: str, source: str, market: str, hour: int, schema: pa.Schema):
        self.table, self.source, self.market, self.hour, self.schema = table, source, market, hour, schema
        self.hot: list[pa.Table] = []
        self.hot_rows = 0
        self.sealed: list[pa.Buffer] = []
        self.rows = 0
        self.last_batch = -1
        self.min_recv_ts: int | None = None
        self.max_recv_ts: int | None = None
        self.touched = self.created = time.monotonic()

    def add(self, t: pa.Table, batch_id: int, min_recv: int, max_recv: int) -> None:
        self.hot.append(t)
        self.hot_rows += t.num_rows
        self.rows += t.num_rows
        self.last_batch = batch_id
        self.min_recv_ts = min_recv if self.min_recv_ts is None else min(self.min_recv_ts, min_recv)
        self.max_recv_ts = max_recv if self.max_recv_ts is None else max(self.max_recv_ts, max_recv)
        self.touched = time.monotonic()
        if self.hot_rows >= SEAL_ROWS:
            self._seal()

    def _seal(self) -> None:
        t = pa.concat_tables(self.hot).unify_dictionaries().combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema, options=_IPC_OPTS) as w:
            w.write_table(t)
        self.sealed.append(sink.getvalue())
        self.hot, self.hot_rows = [], 0

    def nbytes(self) -> int:
        return sum(b.size for b in self.sealed) + sum(t.nbytes for t in self.hot)

    def to_table(self) -> pa.Table:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=4) as ex:  # pyarrow releases the GIL while decompressing
            parts = list(ex.map(lambda b: pa.ipc.open_stream(b, options=_READ_OPTS).read_all(), self.sealed))
        parts += self.hot
        if not parts:
            return self.schema.empty_table()
        return pa.concat_tables(parts).unify_dictionaries()
