"""What a killed writer left in staging, settled by the next writer before the spool is replayed.

A data file is written under a temporary name and renamed, so a `.parquet` name is a complete
file. When its catalog line never landed (killed between rename and append) or was torn, its rows
may already have left the spool: deleting it would lose them. So it is verified (footer, every
row, schema, partition) and adopted. Its footer names the spool batches it holds
(`engine.spool_key`, `engine.spool_from`, `engine.spool_upto`); the adopting catalog line marks
them durable, so the replay that follows does not write them twice. A file whose batches another
catalogued file already holds (its catalog append failed, a later flush wrote them again), or that
fails verification, is moved to quarantine. Only temporary files of dead processes are deleted:
they were never complete, and their rows are still in the spool.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine import schema
from engine.fsio import fsync_dir, sha256_file, tmp_owner_alive
from engine.lake.catalog import FileEntry
from engine.lake.writer import table_stats
from engine.log import get_logger
from engine.paths import Layout, buffer_key, date_of_ns, parse_key

log = get_logger(component="staging")

SPOOL_KEY = "engine.spool_key"  # footer: the buffer whose spooled batches the file holds
SPOOL_FROM = "engine.spool_from"  # footer: the first of those batches
SPOOL_UPTO = "engine.spool_upto"  # footer: the last of those batches


@dataclass
class Found:
    entry: FileEntry
    spool_key: str | None
    spool_from: int | None
    spool_upto: int | None
    derived_from: list[str] | None  # compaction output or derived table: its rows are in these files


def settle(eng, spool) -> None:
    """Adopt, quarantine or (temporary files only) delete what is in staging but not catalogued."""
    cat, staging = eng.catalog, eng.layout.staging
    if not staging.exists():
        return
    cat.refresh()
    pending: set[str] | None = None  # buffers with spooled rows in no catalogued file (read lazily)
    swept = 0
    for p in sorted(staging.rglob("*")):
        if not p.is_file():
            continue
        if p.name.startswith(".") and ".tmp-" in p.name:
            if not tmp_owner_alive(p.name):
                p.unlink(missing_ok=True)
                swept += 1
            continue
        key = p.relative_to(staging).as_posix()
        if p.suffix != ".parquet" or key in cat.by_key or key in cat.retired:
            continue
        try:
            found = inspect(p, key)
        except (OSError, ValueError, pa.ArrowException) as e:
            quarantine(eng.layout, p, key, str(e))
            continue
        e = found.entry
        if found.derived_from is not None:
            if any(k in cat.by_key for k in found.derived_from):
                log.warning("staging_derived_file_left", key=key, hint="never swapped in; its rows are in catalogued "
                            "files and the job that wrote it (compaction, derivation) writes it again")
            else:
                quarantine(eng.layout, p, key, "derived from files the catalog no longer lists")
            continue
        if found.spool_key is not None and cat.spool_hw.get(found.spool_key, -1) >= found.spool_from:
            quarantine(eng.layout, p, key, f"spool batches {found.spool_from}-{found.spool_upto} of {found.spool_key} are "
                       "already in catalogued files (its catalog line failed and a later flush wrote them again)")
            continue
        if found.spool_key is None:  # written before files named their spool batches
            if pending is None:
                pending = spool.pending_keys(cat.spool_hw)
            if buffer_key(e.table, e.source, e.market) in pending:
                quarantine(eng.layout, p, key, "no spool batch range in its footer and the spool still holds "
                           "rows of the same buffer: adopting could store them twice")
                continue
        cat.add_file(e, spool_key=found.spool_key, spool_upto=found.spool_upto)
        log.warning("staging_file_adopted", key=key, rows=e.rows, spool_key=found.spool_key,
                    spool_upto=found.spool_upto, hint="a complete file whose catalog line was lost or torn")
    if swept:
        log.warning("staging_temp_files_swept", files=swept, hint="left by a writer killed mid-write")


def inspect(path: Path, key: str) -> Found:
    """Read a whole file and check it belongs where it lies; raises ValueError/Arrow errors if not."""
    kp = parse_key(key)
    pf = pq.ParquetFile(path)
    meta = {k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items()}
    t = schema.validate(kp.table, pf.read())
    for col, want in (("source", kp.source), ("market", kp.market)):
        got = set(t.column(col).cast(pa.string()).unique().to_pylist())
        if got - {want}:
            raise ValueError(f"{col} {sorted(got)} in the {col}={want} partition")
    stats = table_stats(kp.table, t)
    if t.num_rows and date_of_ns(stats["min_recv_ts"]) != kp.date:
        raise ValueError(f"rows of {date_of_ns(stats['min_recv_ts'])} in the date={kp.date} partition")
    st = path.stat()
    entry = FileEntry(key=key, table=kp.table, source=kp.source, market=kp.market, date=kp.date, rows=t.num_rows,
                      bytes=st.st_size, sha256=sha256_file(path), created_ns=st.st_mtime_ns,
                      schema_version=int(meta.get("engine.schema_version", schema.SCHEMA_VERSION)), **stats)
    derived = None
    if "engine.replaces" in meta:
        derived = list(json.loads(meta["engine.replaces"]))
    elif "engine.derived_from" in meta:
        derived = meta["engine.derived_from"].split(",")
    upto = int(meta[SPOOL_UPTO]) if SPOOL_UPTO in meta else None
    first = int(meta[SPOOL_FROM]) if SPOOL_FROM in meta else upto
    return Found(entry, meta.get(SPOOL_KEY), first, upto, derived)


def quarantine(layout: Layout, path: Path, key: str, why: str) -> Path:
    """Move an unadoptable file out of staging under a name no other file has; never delete it."""
    dest = layout.quarantine / key
    n = 0
    while dest.exists():
        n += 1
        dest = (layout.quarantine / key).with_name(f"{Path(key).name}.{n}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)  # same filesystem: both live in the lake home
    fsync_dir(dest.parent)
    fsync_dir(path.parent)
    log.warning("staging_file_quarantined", key=key, path=str(dest), reason=why)
    return dest

