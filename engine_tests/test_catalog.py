"""The catalog log against real files: damaged lines, and the snapshot + tail checkpoint."""

from __future__ import annotations

import msgspec
import pytest

from engine.catalog import Catalog, FileEntry, Op
from engine.paths import file_key
from engine.timeutil import to_ns
from engine_defs.lake import read_log

H = 3_600 * 10**9
T0 = to_ns("2025-03-01")
_enc = msgspec.json.Encoder()


def entry(i: int, market: str = "BTC-USD", table: str = "l2", **kw) -> FileEntry:
    ts = T0 + i * H
    date = f"2025-03-{1 + i // 24:02d}"
    return FileEntry(key=file_key(table, "coinbase", market, date, i % 24 + 1), table=table, source="coinbase",
                     market=market, date=date, rows=100 + i, bytes=1000 + i, sha256=f"{i:064x}", min_ts=ts,
                     max_ts=ts + H - 1, min_recv_ts=ts, max_recv_ts=ts + H - 1, created_ns=i, **kw)


def line(op: Op) -> bytes:
    return _enc.encode(op) + b"\n"


INCOMPLETE = [
    b'{"op":"add"}',
    b'{"op":"watermark"}',
    b'{"op":"watermark","source":"coinbase"}',
    b'{"op":"compact","keys":["data/l2/source=coinbase/market=BTC-USD/date=2025-03-01/0001.parquet"]}',
    b'{"op":"remote"}',
    b'{"op":"purged"}',
    b'{"op":"local_deleted"}',
    b'{"op":"no-such-op","key":"x"}',
]


def test_incomplete_lines_are_skipped_with_a_warning(tmp_path):
    """Valid JSON that lacks what its op needs is skipped like a torn line, by the catalog and by
    the sensor's log reader; everything around it is applied."""
    log = tmp_path / "catalog" / "log.jsonl"
    log.parent.mkdir()
    half = Op(op="add", file=entry(1), spool_key="l2|coinbase|BTC-USD")  # a spool key without its batch
    body = line(Op(op="add", file=entry(0))) + b"\n".join(INCOMPLETE) + b"\n" + line(half)
    body += line(Op(op="watermark", source="coinbase", ts=T0 + H)) + line(Op(op="remote", key=entry(0).key))
    log.write_bytes(body)
    cat = Catalog(log)
    bad = len(INCOMPLETE) + 1
    assert cat.torn_lines == bad
    assert [e.key for e in cat.entries()] == [entry(0).key] and cat.by_key[entry(0).key].remote
    assert cat.watermark("coinbase") == T0 + H and cat.spool_hw == {}
    r = read_log(log, 0)
    assert r.bad_lines == bad and [op.op for _, op in r.ops] == ["add", "watermark", "remote"]
    assert r.offset == len(body)
    cat.add_file(entry(2))  # the log stays writable; a fresh open agrees
    again = Catalog(log)
    assert again.torn_lines == bad and sorted(again.by_key) == sorted([entry(0).key, entry(2).key])
