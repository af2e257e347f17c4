"""`data-engine ingest FILE... --source NAME`: the live normalization, run offline.

Same capture -> same rows: the normalizer is the one the collector uses, receive times come from
the capture, and no wall clock is consulted while normalizing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable

from engine.collect import registry
from engine.collect.append import append_tables
from engine.collect.base import CHUNK_ROWS, BaseNormalizer, tune_gc
from engine.collect.capture import CaptureReader
from engine.collect.rest import REST_META
from engine.log import get_logger
from engine.timeutil import NS

log = get_logger(component="ingest")


def apply_line(norm: BaseNormalizer, recv_ns: int, frame: str | None, meta: dict | None) -> None:
    """Feed one capture line (frame or meta) to a normalizer."""
    if frame is not None:
        norm.feed(recv_ns, frame)
        return
    if not meta:
        return
    typ = meta.get("type")
    if typ == "connect":
        if meta.get("continued") and norm.conn is not None and norm.conn == meta.get("conn"):
            return  # the same connection continues in a rotated file
        kw = registry.get(norm.source).connect_kwargs(meta)  # what the source's meta line means
        conn = meta.get("conn")
        norm.on_connect(recv_ns, conn=int(conn) if conn is not None else None, **kw)
    elif typ == "disconnect":
        if norm.conn is not None:
            norm.on_disconnect(recv_ns, str(meta.get("reason", "")))
    elif typ == REST_META:  # a REST answer the live Link fetched, at the place it reached the normalizer
        body = meta.get("body")
        if isinstance(body, str):
            norm.rest(recv_ns, str(meta.get("name", "")), body)
        else:
            norm.skip(str(meta)[:200], "bad_rest_line: no body text")


def ingest_files(eng, files: Iterable[str | os.PathLike], source: str, *, progress: bool = True,
                 max_skew_s: float | None = None, seed: bool = True) -> dict:
    kw = {}
    if max_skew_s is not None:
        kw["max_skew_ns"] = int(max_skew_s * NS)
    src = registry.get(source)
    norm = src.normalizer(**kw)
    if seed:
        src.seed(eng, norm)
    files = [Path(f) for f in files]
    total = sum(f.stat().st_size for f in files)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"ingest {source}", file=sys.stderr)
    rows = bad_lines = 0
    for f in files:
        rd = CaptureReader(f)
        done = 0
        for i, (recv_ns, frame, meta) in enumerate(rd):
            try:
                apply_line(norm, recv_ns, frame, meta)
            except Exception as e:  # noqa: BLE001 - a normalizer bug costs one line, not the ingest
                norm.skip(frame if frame is not None else str(meta), f"internal_error: {type(e).__name__}", e)
            if i & 255 == 0:
                if norm.rows_pending() >= CHUNK_ROWS:
                    rows += append_tables(eng, norm.take())
                if bar is not None and rd.compressed_pos > done:
                    bar.update(rd.compressed_pos - done)
                    done = rd.compressed_pos
        bad_lines += rd.bad_lines
        if bar is not None:
            bar.update(rd.size - done)
    rows += append_tables(eng, norm.take())
    if bar is not None:
        bar.close()
    norm.c.last_recv_ns = norm.last_frame_recv
    eng.flush()
    stats = norm.c.as_dict()
    stats["rows_appended"] = rows
    stats["bad_lines"] = bad_lines
    log.info("ingest_done", source=source, files=len(files), **{k: v for k, v in stats.items() if k != "skip_reasons"},
             skip_reasons=stats["skip_reasons"])
    return stats


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine ingest", description="Normalize raw capture files into the lake.")
    ap.add_argument("files", nargs="+", help="capture files (.jsonl or .jsonl.zst), read in the order given")
    ap.add_argument("--source", required=True, choices=registry.names())
    ap.add_argument("--home", default=os.environ.get("ENGINE_HOME", "./lake"))
    ap.add_argument("--max-skew", type=float, default=None, help="seconds an exchange timestamp may differ from recv")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    from engine.api import Engine

    missing = [f for f in a.files if not Path(f).is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    eng = Engine.open(home=a.home, writer=True, book_anchors=True)
    tune_gc()
    try:
        st = ingest_files(eng, a.files, a.source, progress=not a.no_progress, max_skew_s=a.max_skew)
    finally:
        eng.close()
    print(
        f"ingested {len(a.files)} file(s): {st['frames']} frames, {st['rows_l2']} l2 rows, {st['rows_trades']} trades, "
        f"{st['gaps']} gaps, {st['skipped_frames']} skipped frames, {st['bad_lines']} bad lines, "
        f"{st['instrument_versions']} instrument versions"
    )
    return 0
