"""`data-engine keep`: a home's batch work in a loop — upload, compact closed days, publish.

Dagster does this for the one home of an unsharded lake. A collector shard on its own host (or
several shards on one) needs the same work done where its files are, so each shard runs a keeper
beside its collector: every pass uploads the shard's finished files (which republishes its manifest
part), compacts its closed partitions (its own files only, into `0000-s{shard}.parquet`) and
purges retired files. The first pass publishes the part even with nothing to upload, so readers
learn at once which sources the shard holds back. A failing pass is logged and retried next
period; SIGTERM ends the loop after one last upload (the collector, stopped first, has flushed).

It opens the home like Dagster does (writer role, no spool recovery), so it never takes the
collector's spool lock.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from engine.log import get_logger

log = get_logger(component="keeper")


def open_home(home: str | os.PathLike, store: str | None = None):
    from engine.api import Engine

    # Engine(...) rather than Engine.open(writer=True): the latter recovers a crashed spool and would
    # take the lock the collector needs at its (re)start
    return Engine(Path(home), store, background=False, writer=True, from_store=False)


def one_pass(eng, compact: bool = True, publish: bool = False) -> dict:
    """Upload, then compact what is closed; `publish`: republish the manifest even if nothing changed."""
    from engine.lake.store import StoreError

    out: dict = {"uploaded": 0, "compacted": 0, "published": False, "errors": []}
    eng.catalog.refresh()
    try:
        if publish:
            eng.publish_manifest()
            out["published"] = True
        up = eng.upload()
        out["uploaded"], out["errors"] = up["uploaded"], list(up["errors"])
        if compact and not up["failed"]:
            out["compacted"] = len(eng.compact())
    except (StoreError, OSError, RuntimeError) as e:  # the store is down, a partition refused: next pass
        out["errors"].append(f"{type(e).__name__}: {e}")
    if out["errors"]:
        log.error("keep_pass_failed", home=str(eng.home), errors=out["errors"][:5])
    elif out["uploaded"] or out["compacted"]:
        log.info("keep_pass", home=str(eng.home), shard=eng.shard, uploaded=out["uploaded"],
                 compacted=out["compacted"])
    return out


def keep(home, store: str | None = None, every_s: float = 60.0, compact: bool = True,
         stop: threading.Event | None = None, duration: float | None = None, shard: int | None = None) -> int:
    """Run passes every `every_s` until `stop` is set (or `duration` s passed); one last upload then.
    `shard`: the home is (or becomes) this shard, whichever of keeper and collector starts first."""
    from engine.lake import shard as shard_id
    from engine.paths import Layout

    stop = stop or threading.Event()
    if shard is not None:
        shard_id.claim(Layout(Path(home).resolve()), shard, store=store or os.environ.get("ENGINE_STORE") or None)
    eng = open_home(home, store)
    end = time.monotonic() + duration if duration else None
    log.info("keeper_started", home=str(eng.home), store=eng.store.url, shard=eng.shard, every_s=every_s)
    published = False
    try:
        while not stop.is_set() and (end is None or time.monotonic() < end):
            if _identity_changed(eng):  # the home became a shard after this keeper opened it
                eng.close()
                eng, published = open_home(home, store), False
                log.info("keeper_reopened", home=str(eng.home), shard=eng.shard)
            published = one_pass(eng, compact=compact, publish=not published)["published"] or published
            stop.wait(every_s if end is None else max(0.0, min(every_s, end - time.monotonic())))
        one_pass(eng, compact=False)
    finally:
        eng.close()
        log.info("keeper_stopped", home=str(eng.home))
    return 0


def _identity_changed(eng) -> bool:
    from engine.lake import shard as shard_id

    ident = shard_id.read(eng.layout)
    return (ident.shard if ident is not None else None) != eng.shard


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine keep",
                                 description="Upload, compact and publish one lake home in a loop (a collector shard's batch side).")
    ap.add_argument("--home", default=os.environ.get("ENGINE_HOME", "./lake"))
    ap.add_argument("--store", default=None, help="default: $ENGINE_STORE, the store the shard recorded, or HOME/store")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between passes")
    ap.add_argument("--no-compact", action="store_true", help="upload and publish only (compaction runs elsewhere)")
    ap.add_argument("--shard-id", type=int, default=None,
                    help="the home's shard id (claimed if the collector has not started yet; refused if it differs)")
    ap.add_argument("--for", dest="duration", type=float, default=None, help="stop after this many seconds")
    a = ap.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return keep(a.home, a.store, a.every, compact=not a.no_compact, stop=stop, duration=a.duration, shard=a.shard_id)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli(sys.argv[1:]))
