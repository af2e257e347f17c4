"""Verified upload of catalogued local files to the object store; local copies stay until compaction
has replaced them and its grace period has passed."""

from __future__ import annotations

import time

from engine.lake.store import StoreError, StoreUnavailableError
from engine.log import get_logger

log = get_logger(component="upload")
MAX_CONSECUTIVE_FAILURES = 3  # then the store is down: stop, keep everything local, retry next run


def upload(eng, table=None, source=None, market=None, date=None, progress=None, grace_s: float | None = None) -> dict:
    """Upload every live file not yet remote; returns counts. Each success is logged to the catalog.
    Then files retired by compaction longer than `grace_s` ago (default: compaction's) are purged."""
    from engine.lake.compaction import GRACE_S, purge_retired

    eng.require_writer("upload")
    done = failed = nbytes = streak = 0
    errors: list[str] = []
    todo = eng.catalog.pending_upload(table, source, market, date)
    t0 = time.perf_counter()
    for e in todo:
        path = eng.layout.staged(e.key)
        if not path.exists():
            errors.append(f"{e.key}: local copy missing and not remote")
            failed += 1
            log.error("upload_missing_local", key=e.key)
            continue
        try:
            eng.store.put_file(e.key, path, e.sha256)
        except StoreError as err:
            failed += 1
            streak += 1
            errors.append(f"{e.key}: {err}")
            log.error("upload_failed", key=e.key, error=str(err))
            # an endpoint that does not answer will not answer the next file either (bounded waiting)
            if isinstance(err, StoreUnavailableError) or streak >= MAX_CONSECUTIVE_FAILURES:
                rest = len(todo) - done - failed
                failed += rest
                errors.append(f"{rest} more file(s) not tried: the store failed {streak} times in a row")
                log.error("upload_aborted", store=eng.store.url, not_tried=rest)
                break
            continue
        streak = 0
        eng.catalog.mark_remote(e.key)
        done += 1
        nbytes += e.bytes
        if progress:
            progress(done, len(todo))
        log.info("uploaded", key=e.key, bytes=e.bytes, store=eng.store.url)
    purged = purge_retired(eng, GRACE_S if grace_s is None else grace_s)
    if done or purged:  # what the bucket holds changed: readers elsewhere see it through the manifest
        from engine.lake.manifest import publish_after_change

        if publish_after_change(eng) is None:
            errors.append("manifest not republished (see log); the next upload or compaction publishes it")
    return {"uploaded": done, "failed": failed, "bytes": nbytes, "seconds": time.perf_counter() - t0, "errors": errors}

