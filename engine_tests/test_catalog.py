"""The catalog log against real files: damaged lines, and the snapshot + tail checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest

from engine.lake.catalog import Catalog, FileEntry, Op
from engine.paths import file_key
from engine.timeutil import to_ns
from engine_defs.lake import read_log

ROOT = Path(__file__).resolve().parents[1]
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
    body += b'{"op":"local_deleted","keys":[]}\n'  # complete, and changes nothing
    log.write_bytes(body)
    cat = Catalog(log)
    bad = len(INCOMPLETE) + 1
    assert cat.torn_lines == bad
    assert [e.key for e in cat.entries()] == [entry(0).key] and cat.by_key[entry(0).key].remote
    assert cat.watermark("coinbase") == T0 + H and cat.spool_hw == {}
    r = read_log(log, 0)
    assert r.bad_lines == bad and [op.op for _, op in r.ops] == ["add", "watermark", "remote", "local_deleted"]
    assert r.offset == len(body)
    cat.add_file(entry(2))  # the log stays writable; a fresh open agrees
    again = Catalog(log)
    assert again.torn_lines == bad and sorted(again.by_key) == sorted([entry(0).key, entry(2).key])
    assert again.checkpoint() and Catalog(log).torn_lines == bad  # the count survives a checkpoint


# ---- snapshot + tail ------------------------------------------------------------------------------


def state(cat: Catalog) -> dict:
    """Everything a catalog answers, as plain values, for comparing two catalogs."""
    ents = sorted((msgspec.structs.asdict(e) for e in cat.entries()), key=lambda d: d["key"])
    return {
        "entries": ents,
        "count": len(cat.by_key),
        "lookup": [msgspec.structs.asdict(cat.by_key[d["key"]]) for d in ents],
        "retired": sorted((k, at, msgspec.structs.asdict(e)) for k, (at, e) in cat.retired.items()),
        "watermarks": dict(cat.watermarks),
        "spool_hw": dict(cat.spool_hw),
        "summary": cat.summary().rows(),
        "summary_kx": cat.summary(market="E*", start=T0 + 30 * H).rows(),
        "partitions": cat.partitions(),
        "partitions_l2": cat.partitions("l2", source="coinbase", market="BTC-USD", start=T0 + 10 * H, end=T0 + 40 * H),
        "files": [e.key for e in cat.files("l2", market="*", start=T0 + 5 * H, end=T0 + 50 * H)],
        "files_in": [[e.key for e in cat.files_in(p)] for p in cat.partitions()],
        "markets": cat.markets(), "markets_trades": cat.markets("trades"),
        "last_recv": cat.last_recv_ts("coinbase"),
        "pending": sorted(e.key for e in cat.pending_upload()),
    }


def build_history(cat: Catalog, lo: int, hi: int) -> None:
    """Every kind of op over entries lo..hi: adds (with spool ranges), uploads, local deletes,
    a compaction swap, a purge and watermarks."""
    for i in range(lo, hi):
        cat.add_file(entry(i, market=("BTC-USD", "ETH-USD")[i % 2]), spool_key=f"l2|coinbase|{i % 2}", spool_upto=i)
        if i % 3 == 0:
            cat.add_file(entry(i, table="trades"))
        if i % 4 == 1:
            cat.mark_remote(entry(i, market=("BTC-USD", "ETH-USD")[i % 2]).key)
        if i % 5 == 2:
            cat.mark_local_deleted([entry(i, table="trades").key])  # not catalogued: ignored
        if i % 7 == 0:  # keys that do not name their partition (found through the catalog, not the path)
            cat.add_file(msgspec.structs.replace(entry(i, table="gaps"), key=f"odd/{i}.parquet"))
            cat.add_file(msgspec.structs.replace(entry(i, table="gaps"), key=entry(i + 1).key.replace("0", "9")))
            cat.mark_remote(f"odd/{i - 7}.parquet")
        cat.set_watermark("coinbase", T0 + i * H)
    day = [e for e in cat.files_in(("l2", "coinbase", "BTC-USD", entry(lo).date))]
    new = msgspec.structs.replace(day[0], key=day[0].key.replace(".parquet", "-c.parquet"), rows=sum(e.rows for e in day),
                                  compacted=True, remote=True)
    cat.swap(new, [e.key for e in day])
    cat.mark_purged([e.key for e in day[:2]])
    cat.mark_remote(new.key)


def test_snapshot_plus_tail_answers_like_the_whole_log(tmp_path):
    """A checkpoint then more ops (some changing files the snapshot holds): opening from snapshot
    + tail answers every question exactly as replaying the whole log does."""
    log = tmp_path / "catalog" / "log.jsonl"
    cat = Catalog(log)
    build_history(cat, 0, 60)
    assert cat.checkpoint()
    assert cat.snapshot_path.exists()
    build_history(cat, 48, 90)  # re-adds, uploads and a swap over partitions the snapshot holds
    for k in [entry(i).key for i in range(0, 30, 2)]:
        cat.mark_remote(k)
    full = state(Catalog(log, snapshot=False))
    snap = Catalog(log)
    assert snap.snapshot_offset > 0 and 0 < snap.tail_ops < snap.snapshot_offset
    assert state(snap) == full
    assert state(cat) == full  # the process that wrote it keeps answering the same
    snap.checkpoint()  # a second generation, written from a catalog that loaded the first
    assert Catalog(log).tail_ops == 0 and state(Catalog(log)) == full


def test_checkpoint_every_n_ops_keeps_the_log_append_only(tmp_path):
    """Appends checkpoint on their own every N ops; log.jsonl is only ever appended to, so a byte
    cursor (the Dagster sensor's) stays valid across checkpoints."""
    log = tmp_path / "catalog" / "log.jsonl"
    cat = Catalog(log, snapshot_every=25)
    prefixes, cursor, seen = [], 0, 0
    for i in range(100):
        cat.add_file(entry(i))
        prefixes.append(log.read_bytes())
        r = read_log(log, cursor)
        cursor, seen = r.offset, seen + len(r.ops)
    assert seen == 100
    data = log.read_bytes()
    assert all(data.startswith(p) for p in prefixes)
    again = Catalog(log, snapshot_every=25)
    assert again.snapshot_offset > 0 and again.tail_ops < 25
    assert state(again) == state(Catalog(log, snapshot=False))


@pytest.mark.parametrize("damage", ["truncated", "rewritten", "garbage_snapshot", "torn_snapshot"])
def test_a_snapshot_that_does_not_match_the_log_is_ignored(tmp_path, damage):
    """A snapshot is used only for the log it was taken from: a log cut below its offset or
    rewritten (a rebuild), or a damaged snapshot file, is noticed and the log replayed whole."""
    log = tmp_path / "catalog" / "log.jsonl"
    cat = Catalog(log)
    build_history(cat, 0, 30)
    cat.checkpoint()
    snap = cat.snapshot_path
    if damage == "truncated":
        data = log.read_bytes()
        log.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1])  # the last line is lost
    elif damage == "rewritten":  # rebuilt: other content, the same length and then more
        lines = log.read_bytes().splitlines(keepends=True)
        log.write_bytes(b"".join(lines[1:]) + lines[0] + line(Op(op="add", file=entry(77))))
    elif damage == "garbage_snapshot":
        snap.write_bytes(b"ARROW1" + b"\0" * 100)
    else:
        snap.write_bytes(snap.read_bytes()[: snap.stat().st_size // 2])
    reopened = Catalog(log)
    assert reopened.snapshot_offset == 0
    assert state(reopened) == state(Catalog(log, snapshot=False))


def test_a_failing_checkpoint_never_fails_the_append(tmp_path):
    """The snapshot cannot be written (a directory holds its name): appends still succeed, the
    failure is logged, and opening replays the log. An empty catalog checkpoints too."""
    log = tmp_path / "catalog" / "log.jsonl"
    empty = Catalog(log)
    empty.set_watermark("kalshi", T0)
    assert empty.checkpoint() and state(Catalog(log)) == state(empty)
    Catalog(log).snapshot_path.unlink()
    Catalog(log).snapshot_path.mkdir()
    cat = Catalog(log, snapshot_every=5)
    for i in range(20):
        cat.add_file(entry(i))
    assert not cat.checkpoint()
    again = Catalog(log)
    assert again.snapshot_offset == 0 and len(again.by_key) == 20
    assert state(again) == state(Catalog(log, snapshot=False))


CHILD = textwrap.dedent(r"""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import engine.fsio
    from engine.lake.catalog import Catalog
    from engine_tests.test_catalog import entry
    log, nth = sys.argv[1], int(sys.argv[2])
    real, calls = engine.fsio.commit, [0]
    def commit(tmp, path):  # the snapshot is written under its temporary name: die before the rename
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        real(tmp, path)
    engine.fsio.commit = commit
    cat = Catalog(log, snapshot_every=10)
    for i in range(100):
        cat.add_file(entry(i))
""")


@pytest.mark.parametrize("nth", [1, 2])
def test_sigkill_while_writing_a_snapshot(tmp_path, nth):
    """Killed while writing the first (or second) snapshot: the old snapshot, if any, still
    serves with its tail; the answers equal a whole-log replay; the next checkpoint removes the
    dead writer's temporary file."""
    log = tmp_path / "catalog" / "log.jsonl"
    p = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(log), str(nth)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    temps = list(log.parent.glob(".snapshot.arrow.tmp-*"))
    assert len(temps) == 1
    cat = Catalog(log)
    assert (cat.snapshot_offset > 0) == (nth == 2)
    assert len(cat.by_key) == 10 * nth and state(cat) == state(Catalog(log, snapshot=False))
    cat.add_file(entry(500))
    assert cat.checkpoint() and not temps[0].exists()
    assert state(Catalog(log)) == state(Catalog(log, snapshot=False))
