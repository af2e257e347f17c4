"""Capture file I/O for the simulator: the one place generators and the replay exchange read and
write captures.

The format is the collector's (`engine.collect.capture`): JSON Lines (plain, or zstd when the name
ends in `.zst`), one object per line in receive order, either `{"recv_ns": int, "frame": "<raw text
frame>"}` or `{"recv_ns": int, "meta": {...}}` (connect / disconnect, and in a collector's captures
`rest`: a REST answer it fetched). Here records are plain dicts.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
import zstandard

_enc = msgspec.json.Encoder()


def write_capture(records: Iterable[dict], path: str | Path) -> int:
    """Write capture records as JSON Lines (zstd when the name ends in .zst); returns the line count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "wb") as raw:
        if path.suffix == ".zst":
            cctx = zstandard.ZstdCompressor(level=10)
            out = cctx.stream_writer(raw, closefd=False)
        else:
            out = raw
        buf = io.BytesIO()
        for rec in records:
            buf.write(_enc.encode(rec))
            buf.write(b"\n")
            n += 1
            if buf.tell() > 1 << 20:
                out.write(buf.getvalue())
                buf = io.BytesIO()
        out.write(buf.getvalue())
        if out is not raw:
            out.close()
    return n


def read_capture(path: str | Path) -> Iterator[dict]:
    """Iterate the records of a capture file (plain or .zst); blank lines are skipped."""
    path = Path(path)
    with open(path, "rb") as raw:
        if path.suffix == ".zst":
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        else:
            stream = raw
        for line in stream:
            line = line.strip()
            if line:
                yield msgspec.json.decode(line)
