"""Fault matrix: each fault asserts exactly what was lost (nothing beyond the spool window) and
which gap rows were recorded.

Kills are real SIGKILLs of child processes. Where a kill must land at a precise point (inside a
Parquet write, an upload, compaction's swap), the child script wraps that one call so that it
kills its own process there: the component under test runs for real up to that instant.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import Engine
from engine.schema import NS_PER_HOUR
from engine.sim import synth
from engine.timeutil import to_ns

ROOT = Path(__file__).resolve().parents[1]
DAY = "2026-11-03"
START = to_ns(DAY)
N_BATCHES = 12
BATCH = 5_000


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALSHI_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _batch(i: int, market: str = "BTC-USD") -> pa.Table:
    """Batch i: 5,000 l2 rows with globally unique seq (i*5000 ...), within one hour of DAY."""
    return synth.l2_rows("coinbase", market, START + (i % 20) * 60 * 10**9, BATCH, 60 * 10**9, seed=i,
                         seq_start=i * BATCH)


def _expected_seqs(n=N_BATCHES) -> set[int]:
    return set(range(n * BATCH))


# A child: append N_BATCHES batches (spooled), optionally flush/upload/compact, with one call
# wrapped to SIGKILL the process at the chosen point.
CHILD = textwrap.dedent(r"""
    import os, signal, sys, json
    sys.path.insert(0, {root!r})
    from engine import Engine
    from engine_tests.test_faults import _batch, N_BATCHES
    home, store, point, nth = sys.argv[1], sys.argv[2] or None, sys.argv[3], int(sys.argv[4])

    def killer(orig, when="before"):
        calls = [0]
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == nth and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            r = orig(*a, **k)
            if calls[0] == nth and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return r
        return wrapped

    import engine.fsio, engine.lake.writer, engine.lake.catalog, engine.lake.store, engine.api
    if point == "parquet_write":          # a data file written under its temporary name, not yet renamed
        engine.fsio.commit = killer(engine.fsio.commit, "before")
    elif point == "catalog_add":          # file renamed into place, catalog line not yet written
        engine.lake.catalog.Catalog.add_file = killer(engine.lake.catalog.Catalog.add_file, "before")
    elif point == "catalog_line":         # half of the catalog line written, then killed
        real_write = os.write
        state = [0]
        def torn(fd, data):
            if data[:10] == b'{{"op":"add' and state[0] == nth - 1:
                real_write(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            if data[:10] == b'{{"op":"add':
                state[0] += 1
            return real_write(fd, data)
        engine.lake.catalog.os.write = torn
    eng = Engine.open(home, store, background=False, flush_rows=10**9, writer=True)
    if point == "upload_put":             # mid-upload: bytes sent, object verified, catalog not told
        eng.store.put_file = killer(eng.store.put_file, "after")
    elif point == "upload_body":          # the PUT itself is interrupted
        eng.store.client.put_object = killer(eng.store.client.put_object, "before")
    elif point == "compact_swap":         # compacted object uploaded, catalog swap not written
        eng.catalog.swap = killer(eng.catalog.swap, "before")
    elif point == "compact_after_swap":   # swap written, nothing after it done
        eng.catalog.swap = killer(eng.catalog.swap, "after")
    for i in range(N_BATCHES):
        eng.append("l2", _batch(i))
        if i % 4 == 3:
            eng.flush()   # three files in the partition
    print(json.dumps({{"appended": N_BATCHES}}), flush=True)
    if point.startswith("upload"):
        eng.upload()
    if point.startswith("compact"):
        eng.upload()
        eng.compact(grace_s=0)
    print(json.dumps({{"done": True}}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # never a clean close: recovery must not depend on it
""")


def _run_child(home: Path, store: str | None, point: str, nth: int, env=None) -> tuple[int, list]:
    script = CHILD.format(root=str(ROOT))
    p = subprocess.run([sys.executable, "-c", script, str(home), store or "", point, str(nth)],
                       capture_output=True, text=True, timeout=120, env=env or _env(), cwd=ROOT)
    out = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    return p.returncode, out


def _check_lake(home: Path, store: str | None, want: set[int]) -> Engine:
    """Reopen (spool recovery), then: every row exactly once, verify clean, spool empty."""
    eng = Engine.open(home, store, background=False, writer=True)
    got = eng.read("l2", allow_unsealed=True)
    seqs = got["seq"].to_list()
    assert len(seqs) == len(set(seqs)), f"{len(seqs) - len(set(seqs))} duplicate rows after recovery"
    missing = want - set(seqs)
    assert not missing, f"{len(missing)} rows lost"
    assert eng.verify() == []
    assert sum(e.rows for e in eng.catalog.entries() if e.table == "l2") == len(want)
    assert not list(eng.layout.spool.glob("*.arrow")), "spool not cleaned after recovery"
    return eng


# ------------------------------------------------------------------------------------------ kills in the write path

@pytest.mark.parametrize("point,nth", [("parquet_write", 2), ("catalog_add", 2), ("catalog_line", 2)])
def test_sigkill_inside_parquet_write_and_catalog_add(tmp_path, point, nth):
    """Killed while writing the 2nd file (inside the write / before its catalog line / mid-line):
    zero rows lost, none duplicated. A half-written temp file is swept (its rows come back from the
    spool); a complete file whose catalog line is missing is adopted under its own name, and the
    spool batches its footer names are not replayed a second time."""
    home = tmp_path / "h"
    rc, out = _run_child(home, None, point, nth)
    assert rc == -signal.SIGKILL and out == [], out  # died at the hook, before the end of the appends
    cat_lines = (home / "catalog" / "log.jsonl").read_bytes()
    if point == "catalog_line":
        assert not cat_lines.endswith(b"\n"), "the kill should have left a torn catalog line"
    eng = _check_lake(home, None, set(range(8 * BATCH)))  # batches 0..7 were appended before the 2nd flush
    if point == "catalog_line":
        assert eng.catalog.torn_lines == 1
        # the next write repairs the torn tail: the log is whole lines again
        eng.append("l2", _batch(99))
        eng.flush()
        assert (home / "catalog" / "log.jsonl").read_bytes().endswith(b"\n")
        from engine.lake.catalog import Catalog

        assert Catalog(home / "catalog" / "log.jsonl").torn_lines == 0
    staged = sorted(p.name for p in (home / "staging").rglob("*.parquet"))
    catalogued = sorted(e.key.rsplit("/", 1)[1] for e in eng.catalog.entries())
    want = ["0001.parquet", "0002.parquet"] + (["0003.parquet"] if point == "catalog_line" else [])  # + batch 99
    assert catalogued == want, catalogued  # 0002: adopted, or (parquet_write) written from the spool
    assert staged == catalogued, (staged, catalogued)
    assert [p.name for p in (home / "staging").rglob(".*tmp*")] == []
    eng.close()


def test_catalog_log_truncated_mid_line_tolerated_and_repaired(tmp_path):
    """A catalog log cut in the middle of its last line (here a watermark line) opens with a
    warning; nothing catalogued before it is lost; the next write truncates the torn tail."""
    home = tmp_path / "h"
    eng = Engine.open(home, background=False, writer=True)
    for i in range(4):
        eng.append("l2", _batch(i))
        eng.flush()
    eng.close()
    log = home / "catalog" / "log.jsonl"
    data = log.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    log.write_bytes(data[: last + (len(data) - last) // 2])  # half of the last line
    eng = Engine.open(home, background=False, writer=True)
    assert eng.catalog.torn_lines == 1
    assert eng.read("l2", allow_unsealed=True).height == 4 * BATCH
    eng.append("l2", _batch(4))
    eng.flush()
    assert log.read_bytes().endswith(b"\n")
    eng.close()
    eng = _check_lake(home, None, set(range(5 * BATCH)))
    eng.close()


def _cut_last_add_line(log: Path) -> None:
    """Cut the log in the middle of its last `add` line (what follows it goes too)."""
    data = log.read_bytes()
    start = data.rfind(b'{"op":"add"')
    end = data.index(b"\n", start)
    log.write_bytes(data[: start + (end - start) // 2])


def _staged_names(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "staging").rglob("*.parquet"))


@pytest.mark.parametrize("snapshot", [False, True])
def test_torn_last_add_line_file_is_adopted_not_deleted(tmp_path, snapshot):
    """The catalog line of a complete file is torn after its rows left the spool: the next writer
    adopts the file (verified) instead of deleting it, and never reuses its name. A catalog
    snapshot that covered the lost line no longer matches the log and is not used."""
    home = tmp_path / "h"
    eng = Engine.open(home, background=False, writer=True)
    for i in range(4):
        eng.append("l2", _batch(i))
        if i % 2:
            eng.flush()  # two files, the spool emptied after each
    if snapshot:
        assert eng.catalog.checkpoint()
    eng.close()
    assert not list((home / "spool").glob("*.arrow"))
    _cut_last_add_line(home / "catalog" / "log.jsonl")
    eng = Engine.open(home, background=False, writer=True)
    assert eng.catalog.torn_lines == 1 and len(eng.catalog.entries()) == 1
    eng.append("l2", _batch(4))  # takes the writer role: staging is settled first
    eng.flush()
    keys = sorted(e.key.rsplit("/", 1)[1] for e in eng.catalog.entries())
    assert keys == ["0001.parquet", "0002.parquet", "0003.parquet"], keys  # 0002 adopted, 0003 new
    assert _staged_names(home) == keys
    eng.close()
    _check_lake(home, None, set(range(5 * BATCH))).close()


def test_unreadable_uncatalogued_file_is_quarantined_never_deleted(tmp_path):
    """Uncatalogued files that cannot be adopted (not Parquet, another table's rows) are moved to
    quarantine, byte for byte; their names are not reused. A readable one is adopted."""
    from engine.lake.writer import write_parquet

    home = tmp_path / "h"
    eng = Engine.open(home, background=False, writer=True)
    eng.append("l2", _batch(0))
    eng.flush()
    part = eng.layout.staged(eng.catalog.entries()[0].key).parent
    eng.close()
    junk = b"PAR1 this is not a parquet file"
    (part / "0002.parquet").write_bytes(junk)
    trades = synth.trade_rows("coinbase", "BTC-USD", START, 100, 60 * 10**9, seed=1)
    write_parquet("trades", trades, part / "0003.parquet")  # a trades file in an l2 partition
    write_parquet("l2", _batch(1), part / "0004.parquet")  # readable, no spool range: an older writer's
    eng = Engine.open(home, background=False, writer=True)
    eng.append("l2", _batch(2))
    eng.flush()
    q = home / "quarantine" / part.relative_to(home / "staging")
    assert sorted(p.name for p in q.iterdir()) == ["0002.parquet", "0003.parquet"]
    assert (q / "0002.parquet").read_bytes() == junk
    keys = sorted(e.key.rsplit("/", 1)[1] for e in eng.catalog.entries())
    assert keys == ["0001.parquet", "0004.parquet", "0005.parquet"], keys
    eng.close()
    _check_lake(home, None, set(range(3 * BATCH))).close()


def test_file_whose_catalog_append_failed_is_not_adopted_twice(tmp_path, monkeypatch):
    """The catalog append fails after the file is in place (the disk filled up just then), the
    writer carries on and its next flush stores the same rows in another file. The first file's
    spool batches are then durable: the next writer quarantines it, and no row doubles."""
    import errno

    home = tmp_path / "h"
    eng = Engine.open(home, background=False, writer=True)
    eng.append("l2", _batch(0))
    eng.flush()
    eng.append("l2", _batch(1))
    real_write = os.write

    def full(fd, data):
        if data.startswith(b'{"op":"add"'):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        eng.flush()
    monkeypatch.setattr(os, "write", real_write)
    eng.append("l2", _batch(2))
    eng.flush()
    eng.close()
    assert _staged_names(home) == ["0001.parquet", "0002.parquet", "0003.parquet"]
    eng = Engine.open(home, background=False, writer=True)
    eng.append("l2", _batch(3))  # the writer role: staging settled
    eng.flush()
    assert [p.name for p in (home / "quarantine").rglob("*.parquet")] == ["0002.parquet"]
    eng.close()
    _check_lake(home, None, set(range(4 * BATCH))).close()


def test_uncatalogued_file_without_spool_range_is_not_adopted_over_a_spool(tmp_path):
    """A file from a writer that did not record its spool batches, while the spool still holds
    rows of its buffer: adopting it and replaying could store rows twice, so it is quarantined and
    the rows come back from the spool once."""
    from engine.lake.writer import write_parquet

    home = tmp_path / "h"
    eng = Engine.open(home, background=False, writer=True)
    eng.append("l2", _batch(0))
    eng._spool.sync()
    shutil.copytree(home / "spool", tmp_path / "spool")  # the crash state: rows spooled, none catalogued
    shutil.copy(home / "catalog" / "log.jsonl", tmp_path / "log.jsonl")
    eng.close()
    [e] = eng.catalog.entries()
    path = eng.layout.staged(e.key)
    write_parquet("l2", pq.read_table(path), path)  # the same file as an older writer wrote it (no spool range)
    shutil.rmtree(home / "spool")
    shutil.copytree(tmp_path / "spool", home / "spool")
    shutil.copy(tmp_path / "log.jsonl", home / "catalog" / "log.jsonl")
    eng = Engine.open(home, background=False, writer=True)  # recovers the spool
    assert [p.name for p in (home / "quarantine").rglob("*.parquet")] == ["0001.parquet"]
    assert [e.key.rsplit("/", 1)[1] for e in eng.catalog.entries()] == ["0002.parquet"]
    eng.close()
    _check_lake(home, None, set(range(BATCH))).close()


# ------------------------------------------------------------------------------------------ kills in upload / compaction

@pytest.mark.parametrize("point,nth", [("upload_put", 2), ("upload_body", 2)])
def test_sigkill_during_upload(tmp_path, s3_env, point, nth):
    """Killed after the 2nd object was stored but before the catalog knew (or during its PUT):
    nothing local deleted, no row lost; the next upload redoes it and everything verifies."""
    home = tmp_path / "h"
    rc, out = _run_child(home, s3_env, point, nth, env=_env(**{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}))
    assert rc == -signal.SIGKILL and out == [{"appended": N_BATCHES}], out
    eng = Engine.open(home, s3_env, background=False, writer=True)
    assert sum(e.remote for e in eng.catalog.entries()) == 1  # only the first upload was recorded
    assert all(eng.layout.staged(e.key).exists() for e in eng.catalog.entries())
    r = eng.upload()
    assert r["failed"] == 0 and r["uploaded"] == 2
    for e in eng.catalog.entries():
        assert e.remote and eng.store.head(e.key) == (e.bytes, e.sha256)
    eng.close()
    _check_lake(home, s3_env, _expected_seqs()).close()


@pytest.mark.parametrize("point", ["compact_swap", "compact_after_swap"])
def test_sigkill_during_compaction_swap(tmp_path, s3_env, point):
    """Killed with the compacted object uploaded but before the catalog swap (or right after it):
    readers see the old files or the new one, never both; re-running compaction finishes the job;
    no row lost or duplicated."""
    home = tmp_path / "h"
    env = _env(**{k: os.environ[k] for k in os.environ if k.startswith("AWS_")})
    rc, out = _run_child(home, s3_env, point, 1, env=env)
    assert rc == -signal.SIGKILL and out == [{"appended": N_BATCHES}], out
    eng = _check_lake(home, s3_env, _expected_seqs())
    files = [e for e in eng.catalog.entries() if e.table == "l2"]
    if point == "compact_swap":
        assert len(files) == 3 and not any(e.compacted for e in files)
    else:
        assert len(files) == 1 and files[0].compacted
    eng.compact(grace_s=0)
    eng.compact(grace_s=0)  # idempotent
    files = [e for e in eng.catalog.entries() if e.table == "l2"]
    assert len(files) == 1 and files[0].compacted and files[0].rows == N_BATCHES * BATCH
    eng.close()
    eng = _check_lake(home, s3_env, _expected_seqs())
    # the raw objects are gone from the store once purged (grace 0), the compacted one verifies
    assert eng.store.list_keys("data/l2/") == [files[0].key]
    eng.close()


# ------------------------------------------------------------------------------------------ S3 faults through a proxy

@pytest.fixture
def proxied(tmp_path, moto_server, monkeypatch):
    from engine_tests.faultproxy import FaultProxy

    px = FaultProxy(moto_server.port)
    env = moto_server.env()
    env["AWS_ENDPOINT_URL"] = px.endpoint
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"faults-{os.getpid()}-{random.randrange(10**9)}"
    moto_server.make_bucket(bucket)
    yield px, f"s3://{bucket}/lake"
    px.close()


def _lake_with_files(home: Path, store: str, n_files: int = 4, timeout_s: float = 0.5, attempts: int = 3) -> Engine:
    from engine.lake.store import S3Store

    eng = Engine.open(home, store, background=False, writer=True)
    eng.store = eng.cache.store = S3Store(eng.store.bucket, eng.store.prefix, attempts=attempts,
                                                connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
    for i in range(n_files):
        eng.append("l2", _batch(i))
        eng.flush()
    return eng


def test_s3_answering_500s_retried_then_verified(tmp_path, proxied):
    px, store = proxied
    eng = _lake_with_files(tmp_path / "h", store)
    px.fail_next(2)  # two 500s: botocore's standard retries (3 attempts) absorb them
    r = eng.upload()
    assert r["failed"] == 0 and r["uploaded"] == 4 and px.requests_failed == 2
    px.set_mode("500")  # every request fails: bounded retries, a clear error, nothing deleted
    eng.append("l2", _batch(4))
    eng.flush()
    r = eng.upload()
    assert r["uploaded"] == 0 and r["failed"] == 1
    assert "InternalError (HTTP 500)" in r["errors"][0]
    assert all(eng.layout.staged(e.key).exists() for e in eng.catalog.entries())
    px.set_mode("pass")
    assert eng.upload()["uploaded"] == 1
    for e in eng.catalog.entries():
        assert eng.store.head(e.key) == (e.bytes, e.sha256)
    eng.close()
    _check_lake(tmp_path / "h", store, _expected_seqs(5)).close()


def test_s3_timing_out(tmp_path, proxied):
    px, store = proxied
    eng = _lake_with_files(tmp_path / "h", store, n_files=2, timeout_s=0.2, attempts=1)
    px.set_mode("hang")
    t0 = time.monotonic()
    r = eng.upload()
    took = time.monotonic() - t0
    assert r["uploaded"] == 0 and r["failed"] == 2
    assert "timeout" in r["errors"][0].lower() or "timed out" in r["errors"][0].lower(), r["errors"]
    assert took < 30, f"timeouts not bounded: {took:.1f}s"
    assert all(eng.layout.staged(e.key).exists() for e in eng.catalog.entries())
    px.set_mode("pass")
    assert eng.upload()["uploaded"] == 2
    eng.close()


def _s3_gone(tmp_path, proxied, outage_s: float):
    """The store is gone for `outage_s` while collection and the upload loop go on."""
    px, store = proxied
    home = tmp_path / "h"
    eng = _lake_with_files(home, store, n_files=1, timeout_s=0.3, attempts=2)
    assert eng.upload()["uploaded"] == 1
    px.set_mode("down")
    t_end = time.monotonic() + outage_s
    i, attempts = 1, 0
    while time.monotonic() < t_end:
        eng.append("l2", _batch(i))
        eng.flush()
        i += 1
        r = eng.upload()
        attempts += 1
        assert r["uploaded"] == 0 and r["failed"] >= 1
        assert "Could not connect" in r["errors"][0] or "Connect" in r["errors"][0], r["errors"]
        time.sleep(0.2)  # scenario, not synchronization: collection goes on at a pace for outage_s of real time
    assert attempts >= 2
    assert all(eng.layout.staged(e.key).exists() for e in eng.catalog.entries())
    px.set_mode("pass")
    r = eng.upload()
    assert r["failed"] == 0 and r["uploaded"] == i - 1
    for e in eng.catalog.entries():
        assert e.remote and eng.store.head(e.key) == (e.bytes, e.sha256)
    eng.close()
    _check_lake(home, store, _expected_seqs(i)).close()


def test_s3_gone_for_a_while(tmp_path, proxied):
    _s3_gone(tmp_path, proxied, 10.0)


@pytest.mark.slow
def test_s3_gone_for_a_minute(tmp_path, proxied):
    _s3_gone(tmp_path, proxied, 60.0)


# ------------------------------------------------------------------------------------------ disk full

@pytest.fixture
def small_fs(tmp_path):
    """A 6 MB tmpfs the test mounts (root only); skipped cleanly where mount is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip() or p.returncode}); disk-full test needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


DISK_CHILD = textwrap.dedent(r"""
    import json, os, subprocess, sys, traceback
    sys.path.insert(0, {root!r})
    from engine import Engine
    from engine_tests.test_faults import _batch
    home, mnt, cont = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    eng = Engine.open(home, background=False, flush_rows=10**9, writer=True)
    eng.append("l2", _batch(0))
    eng.flush()
    acked, err, errno_ = [0], None, None
    for i in range(1, 400):
        try:
            eng.append("l2", _batch(i))
            acked.append(i)
            if i % 5 == 0:
                eng.flush()
        except OSError as e:
            err, errno_ = str(e), e.errno
            where = [f.name for f in traceback.extract_tb(e.__traceback__)]
            break
    print(json.dumps({{"acked": acked, "error": err, "errno": errno_, "where": where}}), flush=True)
    if not cont:
        os._exit(9)  # the collector dies on the error: recovery happens at the next start
    subprocess.run(["mount", "-o", "remount,size=256m", mnt], check=True)  # space freed, the writer goes on
    eng.append("l2", _batch(500))
    acked.append(500)
    eng.flush()
    eng.close()
    print(json.dumps({{"acked": acked}}), flush=True)
""")


@pytest.mark.parametrize("writer_survives", [False, True])
def test_disk_full_while_writing(small_fs, writer_survives):
    """The lake home on a 6 MB filesystem; a writer appends and flushes until ENOSPC. The error is
    a clear OSError (errno 28, "No space left on device"); everything stored before is intact
    and verifies; once space is freed every row append() acknowledged is stored exactly once,
    whether the writer died on the error (spool recovery at restart) or carried on."""
    import errno

    home = small_fs / "h"
    p = subprocess.run([sys.executable, "-c", DISK_CHILD.format(root=str(ROOT)), str(home), str(small_fs),
                        "1" if writer_survives else "0"], capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    outs = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert outs, p.stderr[-2000:]
    first = outs[0]
    assert first["error"] is not None, "the filesystem never filled"
    assert first["errno"] == errno.ENOSPC and "No space left on device" in first["error"], first
    if not writer_survives:
        assert p.returncode == 9
        # still full: opening the lake tries to recover the dead writer's spool and fails with
        # the same clear error, changing nothing; every catalogued file is intact
        # (in a child: a failed recovery keeps the spool lock for the life of its process)
        p2 = subprocess.run([sys.executable, "-c", f"from engine import Engine; Engine.open({str(home)!r}, writer=True)"],
                            capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
        assert p2.returncode != 0 and "No space left on device" in p2.stderr, p2.stderr[-2000:]
        from engine.fsio import sha256_file
        from engine.lake.catalog import Catalog

        entries = Catalog(home / "catalog" / "log.jsonl").entries()
        assert entries and all(sha256_file(home / "staging" / e.key) == e.sha256 for e in entries)
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_fs)], check=True)
    else:
        assert p.returncode == 0, p.stderr[-2000:]
    acked = outs[-1]["acked"]
    want = {s for i in acked for s in range(i * BATCH, (i + 1) * BATCH)}
    _check_lake(home, None, want).close()


# ------------------------------------------------------------------------------------------ corruption, clock

def test_corrupted_object_in_store_found_by_verify_and_named_by_queries(tmp_path, s3_env):
    import boto3

    home = tmp_path / "h"
    eng = Engine.open(home, s3_env, background=False, writer=True)
    for i in range(3):
        eng.append("l2", _batch(i))
        eng.flush()
    eng.upload()
    eng.compact(grace_s=0)  # local copies deleted: reads now come from the store
    (e,) = [x for x in eng.catalog.entries() if x.table == "l2"]
    assert not eng.layout.staged(e.key).exists()
    bucket, prefix = s3_env[5:].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    obj = s3.get_object(Bucket=bucket, Key=f"{prefix}/{e.key}")
    data = bytearray(obj["Body"].read())
    data[len(data) // 2: len(data) // 2 + 32] = b"\xee" * 32
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{e.key}", Body=bytes(data), Metadata=obj["Metadata"])
    eng.close()
    import shutil

    shutil.rmtree(home / "cache", ignore_errors=True)
    eng = Engine.open(home, s3_env, background=False)
    problems = eng.verify(table="l2")
    assert [p.key for p in problems] == [e.key] and "sha256" in problems[0].problem
    from engine.lake.store import VerificationError

    with pytest.raises(VerificationError, match=e.key.replace(".", r"\.")):
        eng.l2()
    p = subprocess.run([sys.executable, "-m", "engine.cli", "catalog", "verify", "--home", str(home), "--store", s3_env],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert p.returncode == 1 and f"BAD {e.key}" in p.stdout
    eng.close()


def test_clock_jump_backwards(tmp_path):
    """The collector host's clock jumps back an hour and forward again: every row is kept once,
    no file spans an hour of recv_ts, every file is sorted, queries return rows in order."""
    from engine.lake.writer import is_sorted, read_parquet

    eng = Engine.open(tmp_path / "h", background=False, flush_rows=10**9, writer=True)
    t0 = START + 10 * NS_PER_HOUR + 50 * 60 * 10**9  # 10:50
    segs = [(t0, 0), (t0 - NS_PER_HOUR, 1), (t0 + 5 * 60 * 10**9, 2), (t0 - NS_PER_HOUR + 20 * 60 * 10**9, 3),
            (t0 + 15 * 60 * 10**9, 4)]  # 10:50, back to 09:50, 10:55 (->11:00 crossing), 10:10, 11:05
    n = 0
    for start, k in segs:
        t = synth.l2_rows("coinbase", "BTC-USD", start, 4000, 8 * 60 * 10**9, seed=k, seq_start=k * 4000)
        eng.append("l2", t)
        n += t.num_rows
    eng.flush()
    files = eng.catalog.entries()
    assert sum(e.rows for e in files) == n
    for e in files:
        assert e.min_recv_ts // NS_PER_HOUR == e.max_recv_ts // NS_PER_HOUR, f"{e.key} spans an hour"
        assert is_sorted("l2", read_parquet(eng.layout.staged(e.key), e.key))
    got = eng.l2(allow_unsealed=True)
    assert got.height == n and got["seq"].n_unique() == n
    eng.close()


# ------------------------------------------------------------------------------------------ collector faults

from engine.sim.capture_gen import generate_coinbase, write_capture  # noqa: E402
from engine.sim.replay import ReplayServer  # noqa: E402

PRODUCTS = ["BTC-USD", "ETH-USD", "SOL-USD"]


def _collect_cmd(home: Path, url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "collect", "--home", str(home), "--source", "coinbase",
            "--coinbase-url", url, "--backoff-base", "0.05", "--backoff-max", "0.3", "--status-interval", "0.3",
            "--coinbase-stall", "30", *args]


def _status(home: Path) -> dict:
    try:
        return json.loads((home / "status" / "coinbase.json").read_text())
    except (OSError, ValueError):
        return {}


def _tables(home: Path):
    eng = Engine.open(home)
    try:
        return (eng.l2(allow_unsealed=True, raw_ns=True), eng.trades(allow_unsealed=True, raw_ns=True),
                eng.gaps(allow_unsealed=True, raw_ns=True))  # int ns: the checks below do arithmetic
    finally:
        eng.close()


def _updates(l2: pl.DataFrame) -> pl.DataFrame:
    """Non-snapshot l2 rows as comparable tuples (snapshot and anchor rows are book restatements)."""
    return l2.filter(~pl.col("snapshot")).select(
        "recv_ts", "seq", pl.col("instrument").cast(pl.Utf8), pl.col("side").cast(pl.Utf8), "price", "size", "ts")


def test_collector_sigkill_ten_times_in_a_row(tmp_path):
    """SIGKILL the collector at random moments, 10 times, restarting each time. Every update the
    collector received more than 1 s before its kill is stored (reference: the collector's own
    raw capture, normalized offline); nothing is stored twice; each restart records one `restart`
    gap per product spanning the kill; rows lost are counted and all lie in the last second."""
    from engine.collect.ingest import ingest_files

    cap = tmp_path / "served.jsonl"
    write_capture(generate_coinbase(products=PRODUCTS, seconds=120, rate=400, seed=11, depth=60), cap)
    home, capdir = tmp_path / "live", tmp_path / "cap"
    rng = random.Random(6)
    kills: list[int] = []
    with ReplayServer.run_in_thread(source="coinbase", capture=str(cap), speed=2.0, loop_capture=False) as srv:
        for k in range(10):
            proc = subprocess.Popen(_collect_cmd(home, srv.ws_url, "--capture-dir", str(capdir), "--capture-plain"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
            before = _status(home).get("updated_ns", 0)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # this run is up and has received data
                st = _status(home)
                if st.get("pid") == proc.pid and st.get("rows", 0) > 0 and st.get("updated_ns", 0) > before:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.3, 1.8))  # scenario: the kill lands at a random moment of live collection
            kills.append(time.time_ns())
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        p = subprocess.run(_collect_cmd(home, srv.ws_url, "--capture-dir", str(capdir), "--capture-plain", "--for", "1.5"),
                           capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
        assert p.returncode == 0, p.stderr[-2000:]
    l2, tr, gaps = _tables(home)
    # reference: the collector's own capture of what it received, through the same normalization
    ref_home = tmp_path / "ref"
    eng = Engine.open(ref_home, writer=True, book_anchors=True)
    ingest_files(eng, sorted(capdir.glob("coinbase-*.jsonl*")), "coinbase", progress=False)
    eng.close()
    ref_l2, ref_tr, _ = _tables(ref_home)
    ref, got = _updates(ref_l2), _updates(l2)
    key = list(ref.columns)
    # no duplicates: every stored update appears in the capture at most as often as it was received
    over = got.group_by(key).len().join(ref.group_by(key).len(), on=key, how="left", suffix="_ref").filter(
        pl.col("len_ref").is_null() | (pl.col("len") > pl.col("len_ref")))
    assert over.height == 0, f"stored rows not received or stored twice:\n{over.head()}"
    lost = ref.join(got.unique(key), on=key, how="anti")
    # every lost row was received within 1 s (the spool sync window) before a kill
    def near_kill(ns: int) -> bool:
        return any(0 <= k - ns <= 1_000_000_000 for k in kills)

    far = [r for r in lost["recv_ts"].to_list() if not near_kill(r)]
    assert not far, f"{len(far)} rows received > 1 s before a kill were lost"
    # trades: unique ids, and all received > 1 s before a kill are stored
    assert tr.select("instrument", "trade_id").unique().height == tr.height
    ref_t = ref_tr.select(pl.col("instrument").cast(pl.Utf8), "trade_id", "recv_ts")
    got_t = tr.select(pl.col("instrument").cast(pl.Utf8), "trade_id")
    lost_t = ref_t.join(got_t, on=["instrument", "trade_id"], how="anti")
    assert all(near_kill(r) for r in lost_t["recv_ts"].to_list())
    # gaps: one `restart` gap per product per restart, each covering its kill
    g = gaps.with_columns(pl.col("kind").cast(pl.Utf8), pl.col("market").cast(pl.Utf8))
    restarts = g.filter(pl.col("kind") == "restart").sort("start_ts")
    assert restarts.height == 10 * len(PRODUCTS), restarts
    assert set(restarts["market"]) == set(PRODUCTS)
    assert g.filter(pl.col("kind") != "restart").height == 0, g
    for k in kills:
        cover = restarts.filter((pl.col("start_ts") <= k) & (pl.col("end_ts") >= k))
        assert cover.height == len(PRODUCTS), f"kill at {k} not covered by a restart gap"
    (tmp_path / "fault_collector_sigkill.json").write_text(json.dumps(
        {"kills": len(kills), "rows_received": ref.height, "rows_stored": got.height, "rows_lost": lost.height,
         "trades_lost": lost_t.height, "restart_gaps": restarts.height}))
    print(f"\nSIGKILL x10: received {ref.height} updates, stored {got.height}, lost {lost.height} "
          f"(all within 1 s of a kill), trades lost {lost_t.height}, restart gaps {restarts.height}")


class _DupReplay(ReplayServer):
    """An exchange that sends every 25th data frame twice, with the same sequence number."""

    dup_every = 25
    dups_sent = 0
    _n = 0

    def _cb_next(self, c, text, d):
        s = super()._cb_next(c, text, d)
        self._n += 1
        if self._n % self.dup_every == 0:
            c.put(s)  # the duplicate goes out first; _deliver then sends the original text again
            self.dups_sent += 1
        return s


def test_exchange_sends_duplicate_frames(tmp_path):
    """Duplicate frames from the exchange: repeated sequence numbers are skipped and counted
    (`out_of_order`), repeated trades (capture lines repeated, fresh sequence numbers) are skipped
    by trade_id and counted (`dup_trades`); stored rows equal the clean capture's rows exactly."""
    from engine.collect.ingest import ingest_files
    from engine.sim.capture_gen import read_capture

    clean = tmp_path / "clean.jsonl"
    write_capture(generate_coinbase(products=PRODUCTS, seconds=15, rate=150, seed=3, depth=60), clean)
    recs, dup_trade_frames, dup_trades = [], 0, 0
    started = False
    for r in read_capture(clean):
        recs.append(r)
        f = r.get("frame") or ""
        started = started or '"heartbeats"' in f[:40]
        if started and '"market_trades"' in f[:40] and '"update"' in f:
            recs.append(r)  # the exchange repeats the trade frame
            dup_trade_frames += 1
            dup_trades += f.count('"trade_id"')
    dupcap = tmp_path / "dup.jsonl"
    write_capture(recs, dupcap)
    ref_home = tmp_path / "ref"
    eng = Engine.open(ref_home, writer=True, book_anchors=True)
    ingest_files(eng, [clean], "coinbase", progress=False)
    eng.close()
    ref_l2, ref_tr, _ = _tables(ref_home)
    home = tmp_path / "live"
    # paced (5x), so that no trade frame races the client's market_trades subscription
    with _DupReplay.run_in_thread(source="coinbase", capture=str(dupcap), speed=5.0) as srv:
        proc = subprocess.Popen(_collect_cmd(home, srv.ws_url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=_env(), cwd=ROOT)
        try:
            # handshake: the capture is exhausted and the collector counted every frame sent (two
            # status writes in a row agreeing with an unchanged frames_sent; one connection throughout)
            deadline = time.monotonic() + 40
            matched, st = None, {}
            while time.monotonic() < deadline:
                if srv.done.is_set():
                    sent, st = srv.stats()["frames_sent"], _status(home)
                    if st.get("frames") != sent:
                        matched = None
                    elif matched is not None and matched[1] == sent and st["updated_ns"] > matched[0]:
                        break
                    elif matched is None or matched[1] != sent:
                        matched = (st["updated_ns"], sent)
                time.sleep(0.05)
            else:
                raise AssertionError(f"collector read {st.get('frames')} of {srv.stats()['frames_sent']} frames")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        dups_sent = srv.dups_sent
        shift = srv.stats()["shift_ns"]  # exchange times moved to the present
    assert dup_trade_frames > 10 and dups_sent > 50
    l2, tr, gaps = _tables(home)
    st = _status(home)
    assert st["skip_reasons"].get("out_of_order", 0) + sum(
        v for k, v in st["skip_reasons"].items() if k.startswith("out_of_order")) >= dups_sent, st["skip_reasons"]
    assert st["dup_trades"] >= dup_trades, st
    assert gaps.height == 0, gaps  # a repeated frame is not a gap
    canon = lambda df, sh=0: sorted(_updates(df).drop("recv_ts", "seq").with_columns(pl.col("ts") - sh).rows())  # noqa: E731
    assert canon(l2, shift) == canon(ref_l2)
    assert tr.select("instrument", "trade_id").unique().height == tr.height == ref_tr.height


# ------------------------------------------------------------------------------------------ Dagster daemon down

def test_dagster_daemon_down_for_an_hour_sensor_catches_up(tmp_path):
    """An hour of collection (a file every 5 minutes per market, plus gaps) lands while no
    sensor ticks; the catch-up ticks (the real sensor, then the same evaluation limited to 7 files
    a tick) report every raw file exactly once, request an upload run for every touched
    (date, market) with idempotent run keys, and a further tick finds nothing new."""
    import re

    import dagster as dg
    from engine_defs import sensors
    from engine_defs.resources import EngineResource

    home = tmp_path / "h"
    eng = Engine.open(home, background=False, writer=True)
    markets = ["BTC-USD", "ETH-USD"]
    t0 = START + 5 * NS_PER_HOUR
    for minute in range(0, 60, 5):
        for j, m in enumerate(markets):
            eng.append("l2", synth.l2_rows("coinbase", m, t0 + minute * 60 * 10**9, 500, 5 * 60 * 10**9,
                                           seed=minute * 10 + j, seq_start=minute * 1000 + j * 500))
        eng.flush()
    eng.append("gaps", synth.gap_rows([{"source": "coinbase", "market": "BTC-USD", "instrument": None,
                                        "start_ts": t0, "end_ts": t0 + 10**9, "kind": "disconnect", "detail": "x"}]))
    eng.flush()
    raw_keys = {e.key for e in eng.catalog.entries()}
    eng.close()
    log_path = home / "catalog" / "log.jsonl"
    assert len(raw_keys) == 25

    def drain(tick, instance):
        cursor, runs, reported, ticks = None, [], [], 0
        for _ in range(100):
            with dg.build_sensor_context(cursor=cursor, instance=instance,
                                         resources={"engine": EngineResource(home=str(home))}) as ctx:
                res = tick(ctx)
            ticks += 1
            runs += list(res.run_requests or [])
            for ev in res.asset_events or []:
                reported.append(re.search(r"raw file (\S+) ", ev.description).group(1))
            if res.cursor == cursor and not res.run_requests:
                break
            cursor = res.cursor
        return runs, reported, ticks, cursor

    for tick in (sensors.catalog_sensor, lambda ctx: sensors.evaluate(ctx, log_path, max_files=7)):
        instance = dg.DagsterInstance.ephemeral()
        runs, reported, ticks, cursor = drain(tick, instance)
        assert sorted(reported) == sorted(raw_keys), "a file was missed or reported twice"
        parts = {(r.partition_key.keys_by_dimension["date"], r.partition_key.keys_by_dimension["market"]) for r in runs}
        assert parts == {(DAY, f"coinbase:{m}") for m in markets}
        assert len({r.run_key for r in runs}) == len(runs)
        # nothing new: a further tick requests nothing and keeps the cursor
        with dg.build_sensor_context(cursor=cursor, instance=instance,
                                     resources={"engine": EngineResource(home=str(home))}) as ctx:
            res = tick(ctx)
        assert not res.run_requests and res.cursor == cursor
    assert ticks >= 4  # the limited evaluation really caught up over several ticks
