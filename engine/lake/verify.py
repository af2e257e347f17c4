"""`catalog verify` and `catalog rebuild --from-store`: the catalog checked against, or rebuilt from, the files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.parquet as pq

from engine import schema
from engine.fsio import atomic_write_bytes, sha256_file
from engine.lake.catalog import SNAPSHOT_NAME, FileEntry, Op, encode_ops
from engine.lake.shard import owns
from engine.lake.writer import read_parquet, table_stats
from engine.log import get_logger
from engine.paths import match, parse_key

log = get_logger(component="verify")


@dataclass
class Problem:
    key: str
    problem: str
    repaired: bool = False


def verify(eng, table=None, source=None, market=None, progress=None, repair: bool = False) -> list[Problem]:
    """Re-read every live file and check each uploaded object in the store; report any whose checksum,
    row count, schema or stored copy disagrees with the catalog.

    `repair`: a store object that is missing or differs is uploaded again (verified) from a good
    local copy; the problem is still reported, marked repaired.
    """
    if repair:
        eng.require_writer("verify(repair=True)")
    problems: list[Problem] = []
    entries = [e for e in eng.catalog.entries() if table is None or e.table == table]
    entries = sorted((e for e in entries if match(e.source, source) and match(e.market, market)), key=lambda e: e.key)
    for i, e in enumerate(entries):
        problems += _check_file(eng, e)
        if e.remote:
            problems += _check_remote(eng, e, repair)
        if progress:
            progress(i + 1, len(entries))
    for p in problems:
        if p.repaired:
            log.warning("verify_repaired", key=p.key, problem=p.problem)
        else:
            log.error("verify_problem", key=p.key, problem=p.problem)
    return problems


def _check_file(eng, e) -> list[Problem]:
    """The copy queries read (staging, local store or cache) against the catalog."""
    try:
        path = eng.local_path(e)
    except Exception as err:  # noqa: BLE001 - reported, not raised: verify lists every problem
        return [Problem(e.key, f"unreadable: {err}")]
    sha = sha256_file(path)
    if sha != e.sha256:
        return [Problem(e.key, f"checksum {sha[:12]}… differs from catalog {e.sha256[:12]}…")]
    try:
        md = pq.ParquetFile(path).metadata
    except Exception as err:  # noqa: BLE001
        return [Problem(e.key, f"not a readable Parquet file: {err}")]
    out = []
    if md.num_rows != e.rows:
        out.append(Problem(e.key, f"{md.num_rows} rows, catalog says {e.rows}"))
    got = md.schema.to_arrow_schema().remove_metadata()
    want = schema.spec(e.table).schema
    if [(f.name, str(f.type)) for f in got] != [(f.name, str(f.type)) for f in want]:
        out.append(Problem(e.key, f"schema differs from {e.table}: {got}"))
    return out


def _check_remote(eng, e, repair: bool) -> list[Problem]:
    """The store's object of an uploaded file: present, same size, same SHA-256 (recorded at upload,
    or hashed for a local-directory store). upload() trusts the catalog, so only this notices an
    object deleted or damaged behind the engine's back."""
    head = eng.store.head(e.key)
    if head is None:
        why = f"missing from {eng.store.url} (catalogued as uploaded)"
    elif head[0] != e.bytes:
        why = f"store object has {head[0]} bytes, catalog says {e.bytes}"
    elif _store_sha256(eng, e, head[1]) != e.sha256:
        why = "store object's checksum differs from the catalog"
    else:
        return []
    if not repair:
        return [Problem(e.key, why)]
    staged = eng.layout.staged(e.key)
    if not staged.exists() or sha256_file(staged) != e.sha256:
        return [Problem(e.key, f"{why}; not repaired: no good local copy to upload")]
    eng.store.put_file(e.key, staged, e.sha256)  # verified (size and checksum) before it returns
    return [Problem(e.key, f"{why}; uploaded again from {staged}", repaired=True)]


def _store_sha256(eng, e, recorded: str | None) -> str:
    """The store object's SHA-256: as recorded at upload (S3 metadata), or hashed in a local-directory
    store when a staging copy is what _check_file read (else the store file was that copy)."""
    if recorded is not None:
        return recorded
    if eng.store.is_local and eng.layout.staged(e.key).exists():
        return sha256_file(eng.store.path(e.key))
    return e.sha256


def _owned(eng, key: str) -> bool:
    try:
        return owns(eng.shard, key)
    except ValueError:  # not a data key: skipped as before (parse_key below would refuse it)
        return True


def rebuild_from_store(eng) -> int:
    """Reconstruct the catalog log from the objects in the store (one LIST, each file read once)."""
    eng.require_writer("rebuild_from_store")
    import time

    # a shard takes only its own files (and shard 0 the unsharded names): never another shard's
    keys = [k for k in eng.store.list_keys("data/") if _owned(eng, k)]
    ops = []
    replaced: set[str] = set()
    for key in keys:
        kp = parse_key(key)
        if kp.table not in schema.TABLES:
            continue
        path = eng.cache.root / "rebuild" / key
        if eng.store.is_local:
            src = eng.store.path(key)
        else:
            eng.store.get_file(key, path)
            src = path
        t = read_parquet(src, key)
        replaced.update(json.loads((t.schema.metadata or {}).get(b"engine.replaces", b"[]")))
        e = FileEntry(
            key=key, table=kp.table, source=kp.source, market=kp.market, date=kp.date, rows=t.num_rows,
            bytes=src.stat().st_size, sha256=sha256_file(src), local=False, remote=True,
            compacted=kp.compacted, created_ns=time.time_ns(), **table_stats(kp.table, t),
        )
        ops.append(Op(op="add", file=e))
        if not eng.store.is_local:
            path.unlink(missing_ok=True)
    # Raw files a compaction replaced may still await their purge: their rows are in the compacted file.
    ops = [o for o in ops if o.file.key not in replaced]
    # Everything in the store is sealed: the watermark is the newest receive time seen.
    wm: dict[str, int] = {}
    for o in ops:
        if o.file.max_recv_ts is not None:
            wm[o.file.source] = max(wm.get(o.file.source, 0), o.file.max_recv_ts + 1)
    ops += [Op(op="watermark", source=s, ts=w) for s, w in wm.items()]
    log_path = eng.layout.catalog_log
    if log_path.exists():
        log_path.rename(log_path.with_suffix(f".jsonl.bak-{time.time_ns()}"))
    (eng.layout.catalog_dir / SNAPSHOT_NAME).unlink(missing_ok=True)  # it indexes the old log
    atomic_write_bytes(log_path, encode_ops(*ops))
    log.info("catalog_rebuilt", files=len(keys), store=eng.store.url)
    return len(ops)
