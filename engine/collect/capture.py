"""Raw capture files: JSON Lines (plain or .zst), one object per line, in receive order.

    {"recv_ns": <int>, "frame": "<raw text frame>"}
    {"recv_ns": <int>, "meta": {"type": "connect", "source": <name>, "conn": <int>, ...}}
    {"recv_ns": <int>, "meta": {"type": "disconnect", "conn": <int>, "reason": "<text>"}}
    {"recv_ns": <int>, "meta": {"type": "rest", "name": "<endpoint>", "body": "<answer text>"}}

A `rest` line is a REST answer a source's Link fetched (reference data: Kalshi markets, Coinbase
products; `engine.collect.rest`), recorded where it reached the normalizer among the frames.
A connect line's further fields are the source's `Source.connect_meta` (Kalshi: "use_yes_price": <bool>).

Written live by the collector (rotated at each UTC hour; the file name carries the hour) and read
by `ingest`, which replays the same normalization offline.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Iterator

import msgspec
import zstandard

from engine.timeutil import NS, NS_PER_HOUR


class CaptureLine(msgspec.Struct, kw_only=True):
    recv_ns: int
    frame: str | None = None
    meta: dict | None = None


_line_decoder = msgspec.json.Decoder(CaptureLine)
_enc = msgspec.json.Encoder()


def hour_name(source: str, recv_ns: int, compress: bool) -> str:
    t = time.gmtime(recv_ns // NS)
    return f"{source}-{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}T{t.tm_hour:02d}Z.jsonl" + (".zst" if compress else "")


class CaptureWriter:
    """Appends frames and meta lines; rotates to a new file at each UTC hour of recv_ns.

    Each rotation starts a new file (a restarted collector never appends to an old .zst); if the
    name exists a numeric suffix is added. `flush()` pushes buffered bytes to the OS (zstd: a
    flushed block), so a crash loses at most what arrived since the last flush.
    """

    def __init__(self, directory: str | os.PathLike, source: str, compress: bool = True, level: int = 3):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.compress = compress
        self.level = level
        self.hour: int | None = None
        self._raw = None
        self._out = None
        self.path: Path | None = None
        self.files: list[Path] = []
        self._conn_meta: dict | None = None
        self.lines = 0

    def _open(self, recv_ns: int) -> None:
        self._close_file()
        self.hour = recv_ns // NS_PER_HOUR
        base = hour_name(self.source, recv_ns, self.compress)
        path = self.dir / base
        i = 1
        while path.exists():
            stem, _, ext = base.partition(".jsonl")
            path = self.dir / f"{stem}.{i}.jsonl{ext}"
            i += 1
        self.path = path
        self._raw = open(path, "wb")
        self._out = zstandard.ZstdCompressor(level=self.level).stream_writer(self._raw) if self.compress else self._raw
        self.files.append(path)
        if self._conn_meta is not None:  # each file says how its frames are to be read
            self._write({"recv_ns": recv_ns, "meta": dict(self._conn_meta, continued=True)})

    def _write(self, obj) -> None:
        self._out.write(_enc.encode(obj) + b"\n")
        self.lines += 1

    def _roll(self, recv_ns: int) -> None:
        if self.hour is None or recv_ns // NS_PER_HOUR != self.hour:
            self._open(recv_ns)

    def frame(self, recv_ns: int, frame: str | bytes) -> None:
        if isinstance(frame, (bytes, bytearray, memoryview)):
            frame = bytes(frame).decode("utf-8", "replace")
        self._roll(recv_ns)
        self._write({"recv_ns": recv_ns, "frame": frame})

    def frames(self, recv_ns: int, frames: list) -> None:
        """Frames of one socket read (one receive time) as one write: the lines are the ones
        `frame()` writes, each frame's JSON string encoded once and the line built around it."""
        if not frames:
            return
        self._roll(recv_ns)
        head = b'{"recv_ns":%d,"frame":' % recv_ns
        enc = _enc.encode
        parts = []
        for f in frames:
            if not isinstance(f, str):
                f = bytes(f).decode("utf-8", "replace")
            parts.append(head + enc(f) + b"}\n")
        self._out.write(b"".join(parts))
        self.lines += len(parts)

    def meta(self, recv_ns: int, meta: dict) -> None:
        if meta.get("type") == "connect":
            self._conn_meta = None  # a new file opened for this line must not restate the old connection
        self._roll(recv_ns)
        self._write({"recv_ns": recv_ns, "meta": meta})
        if meta.get("type") == "connect":
            self._conn_meta = dict(meta)
        elif meta.get("type") == "disconnect":
            self._conn_meta = None

    def flush(self) -> None:
        if self._out is None:
            return
        if self.compress:
            self._out.flush(zstandard.FLUSH_BLOCK)
        self._raw.flush()

    def _close_file(self) -> None:
        if self._out is not None:
            if self.compress:
                self._out.flush(zstandard.FLUSH_FRAME)
                self._out.close()  # closes the raw file too
            else:
                self._raw.close()
            self._out = self._raw = None

    def close(self) -> None:
        self._close_file()


def _open_text(path: Path):
    raw = open(path, "rb")
    if path.suffix == ".zst" or path.name.endswith(".zst"):
        return raw, io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw, raw


class CaptureReader:
    """Iterates (recv_ns, frame_or_None, meta_or_None); counts bad lines (torn tail tolerated)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.bad_lines = 0
        self.compressed_pos = 0
        self.size = self.path.stat().st_size

    def __iter__(self) -> Iterator[tuple[int, str | None, dict | None]]:
        raw, f = _open_text(self.path)
        try:
            try:
                for line in f:
                    self.compressed_pos = raw.tell()
                    if not line.strip():
                        continue
                    try:
                        cl = _line_decoder.decode(line)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        self.bad_lines += 1
                        continue
                    yield cl.recv_ns, cl.frame, cl.meta
            except zstandard.ZstdError:
                self.bad_lines += 1  # truncated .zst (crash while writing): keep what was readable
        finally:
            f.close()
            if f is not raw:
                raw.close()


def read_capture(path: str | os.PathLike) -> Iterator[tuple[int, str | None, dict | None]]:
    return iter(CaptureReader(path))
