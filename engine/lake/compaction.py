"""Daily compaction: a closed date partition's files merged into one sorted `0000.parquet` (a
collector shard's: `0000-s{shard}.parquet`, made of its own files only).

Safe while collectors write: only partitions whose whole day is below the source's sealed
watermark are touched, and only the files the catalog lists at the start. The new file is
verified (rows, checksum), uploaded and verified, then swapped in with one catalog line. The
replaced files (staged copies and store objects) are retired, not deleted: a query that resolved
its file list before the swap may still be reading them. Later passes (compaction, upload) purge
retired files once the grace period has passed and the file that replaced them verifies in the store.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from engine import schema
from engine.fsio import tmp_path_for
from engine.lake.catalog import FileEntry
from engine.lake.manifest import publish_after_change
from engine.lake.store import StoreError
from engine.lake.writer import read_parquet, write_parquet
from engine.log import get_logger
from engine.paths import compacted_key, parse_key
from engine.timeutil import now_ns, to_ns

log = get_logger(component="compaction")
GRACE_S = 3600.0  # how long retired files stay readable: far longer than any query runs


@dataclass
class CompactionResult:
    table: str
    source: str
    market: str
    date: str
    files_in: int
    rows: int
    key: str
    bytes: int
    seconds: float


class CompactionError(RuntimeError):
    pass


def closed_partitions(eng, date=None, table=None, source=None, market=None):
    """Partitions that can be compacted: a whole day below the source's watermark, not yet one compacted file."""
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return [part for part in eng.catalog.partitions(table=table, source=source, market=market)
            if (date is None or part[3] == date) and is_closed(eng, part, today)]


def is_closed(eng, part, today: str | None = None) -> bool:
    """Whether one (table, source, market, date) partition can be compacted (see `closed_partitions`),
    without listing the catalog's partitions: a ranged run asks this once per partition."""
    t, s, m, d = part
    if d >= (today or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")):
        return False
    if schema.spec(t).part_col == "recv_ts" and eng.sealed_until(s) < to_ns(d) + schema.NS_PER_DAY:
        return False
    files = eng.catalog.files_in(part)
    return bool(files) and not (len(files) == 1 and files[0].compacted)


def compact(eng, date=None, table=None, market=None, source=None, grace_s: float = GRACE_S, progress=None):
    """Compact every closed partition matching the filters; idempotent. Returns CompactionResults."""
    eng.require_writer("compact")
    purged = purge_retired(eng, grace_s)
    results = []
    parts = closed_partitions(eng, date, table, source, market)
    for i, part in enumerate(parts):
        r = compact_partition(eng, part, publish=False)
        if r is not None:
            results.append(r)
        if progress:
            progress(i + 1, len(parts))
    if results or purged:
        publish_after_change(eng)  # once for the whole pass
    return results


def compact_partition(eng, part, validate=None, publish: bool = True) -> CompactionResult | None:
    """`validate(path, key)` (optional) inspects the merged file before anything is uploaded or
    swapped; if it raises, the merged file is deleted and the catalog stays as it was. `publish`:
    republish the store's manifest after the swap (a pass over many partitions does it once)."""
    eng.require_writer("compact_partition")
    table, source, market, date = part
    files = eng.catalog.files_in(part)
    if not files or (len(files) == 1 and files[0].compacted):
        return None
    t0 = time.perf_counter()
    files = _arrival_order(files)
    tables = [read_parquet(eng.local_path(e), e.key) for e in files]
    expected = sum(e.rows for e in files)
    for e, t in zip(files, tables):
        if t.num_rows != e.rows:
            raise CompactionError(f"{e.key} has {t.num_rows} rows, catalog says {e.rows}; not compacting {part}")
    merged = pa.concat_tables([t.select(schema.spec(table).columns) for t in tables]).unify_dictionaries()
    if merged.num_rows != expected:
        raise CompactionError(f"merged {merged.num_rows} rows, expected {expected}")
    keys = {e.key for e in files}
    # a shard's compacted file carries its id: shards holding files of one partition (a market moved
    # between shards that day) each compact only their own, into keys that never collide
    key, n = compacted_key(table, source, market, date, eng.shard), 0
    while key in keys or key in eng.catalog.retired:  # never overwrite an object a reader may still use
        n += 1
        key = compacted_key(table, source, market, date, eng.shard, n)
    # A temporary name: a reader never resolves the new key to a staged copy that is about to go.
    path = tmp_path_for(eng.layout.staged(key))
    wf = write_parquet(table, merged, path, extra_meta={"engine.replaces": json.dumps(sorted(keys))})
    md = pq.ParquetFile(path).metadata
    if md.num_rows != expected:
        path.unlink(missing_ok=True)
        raise CompactionError(f"compacted file {key} holds {md.num_rows} rows, expected {expected}")
    entry = FileEntry(
        key=key, table=table, source=source, market=market, date=date, rows=wf.rows, bytes=wf.bytes,
        sha256=wf.sha256, local=False, compacted=True, created_ns=now_ns(), schema_version=schema.SCHEMA_VERSION,
        **wf.stats,
    )
    if validate is not None:
        try:
            validate(path, key)
        except BaseException:
            path.unlink(missing_ok=True)  # never catalogued: nothing refers to it
            raise
    try:
        eng.store.put_file(key, path, wf.sha256)  # verified; raises before anything is swapped
    finally:
        path.unlink(missing_ok=True)
    entry.remote = True
    eng.catalog.swap(entry, sorted(keys))  # the old files are retired: `purge_retired` deletes them later
    if table == "l2":
        _derive_quotes(eng, source, market, date)
    if publish:
        publish_after_change(eng)
    res = CompactionResult(table, source, market, date, len(files), expected, key, wf.bytes, time.perf_counter() - t0)
    log.info("compacted", table=table, source=source, market=market, date=date, files_in=len(files), rows=expected,
             key=key, seconds=round(res.seconds, 3))
    return res


def _arrival_order(files: list[FileEntry]) -> list[FileEntry]:
    """Files in the order their rows arrived: a compacted file first (it holds the older rows), then
    raw files by sequence number taken as a number (10000 after 9999), so the stable sort of the
    merge keeps rows with equal sort keys in arrival order."""

    def order(e: FileEntry) -> tuple:
        seq = parse_key(e.key).seq
        return (not e.compacted, seq if seq is not None else -1, e.key)

    return sorted(files, key=order)


def _derive_quotes(eng, source, market, date) -> None:
    """Keep the derived `quotes` table in step with the freshly compacted l2 partition."""
    from engine.lake.derived import derive_partition

    derive_partition(eng, source, market, date)


def purge_retired(eng, grace_s: float = GRACE_S, now: int | None = None) -> int:
    """Delete store objects and staged copies of files retired more than `grace_s` ago (`now`: ns,
    default the clock), each only once the file that replaced it verifies in the store (size and,
    where the store keeps it, SHA-256): nothing goes whose rows are not safe elsewhere."""
    eng.require_writer("purge_retired")
    eng.catalog.refresh()
    cutoff = (now_ns() if now is None else now) - int(grace_s * 1e9)
    verified: dict[str, bool] = {}
    done, kept = [], []
    for key, (at, e) in list(eng.catalog.retired.items()):
        if at > cutoff:
            continue
        rep = eng.catalog.replacement(key)
        if rep is not None and rep.key not in verified:
            verified[rep.key] = _in_store(eng, rep)
        if rep is None or not verified[rep.key]:
            kept.append(key)
            continue
        if e.remote:
            try:
                eng.store.delete(key)
            except StoreError as err:  # the store is failing: the rest waits for the next pass
                log.warning("purge_delete_failed", key=key, error=str(err))
                break
        eng.layout.staged(key).unlink(missing_ok=True)
        done.append(key)
    eng.catalog.mark_purged(done)
    if done:
        log.info("purged_retired", files=len(done), grace_s=grace_s)
    if kept:
        log.error("purge_refused", files=len(kept), example=kept[0],
                  why="the compacted file that replaced them is missing or does not verify in the store")
    return len(done)


def _in_store(eng, e: FileEntry) -> bool:
    """Whether the store holds `e` as catalogued (a failed check keeps what it protects)."""
    if not e.remote:
        return False
    try:
        head = eng.store.head(e.key)
    except StoreError as err:
        log.warning("purge_check_failed", key=e.key, error=str(err))
        return False
    return head is not None and head[0] == e.bytes and head[1] in (None, e.sha256)
