"""One source of truth for where things live, in the lake home and in the object store."""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.timeutil import NS

_PART_RE = re.compile(
    r"^data/(?P<table>[a-z0-9_]+)/source=(?P<source>[^/]+)/market=(?P<market>[^/]+)/date=(?P<date>\d{4}-\d{2}-\d{2})/(?P<name>[^/]+)\.parquet$"
)
_SAFE = re.compile(r"[A-Za-z0-9._\-]+")
# a data file's name: `{seq}` (unsharded), `{seq}-s{shard}` (a collector shard's), each optionally
# `-{n}` (a compacted file written again under a fresh name); seq 0 is a compacted file
_NAME_RE = re.compile(r"^(?P<seq>\d+)(?:-s(?P<shard>\d+))?(?:-(?P<n>\d+))?$")
SHARD_MAX = 9999
KEY_PART_MAX = 64  # a path segment (`market=...`) far below the 255-byte file-name limit


def is_pattern(pattern: str | None) -> bool:
    """Source, market and instrument filters are exact names or globs (`KX*`)."""
    return pattern is not None and ("*" in pattern or "?" in pattern)


def match(value: str, pattern: str | None) -> bool:
    if pattern is None:
        return True
    return fnmatch.fnmatchcase(value, pattern) if is_pattern(pattern) else value == pattern


def pattern_regex(pattern: str) -> str:
    """The glob as an anchored regular expression (for Polars / Arrow string matching)."""
    return "^" + fnmatch.translate(pattern).removeprefix("(?s:").removesuffix(")\\Z") + "$"


def default_home() -> Path:
    return Path(os.environ.get("ENGINE_HOME", "./lake")).resolve()


def key_part_problem(value: str) -> str | None:
    """Why `value` cannot be a source or market (they become path segments and partition keys), or None."""
    if len(value) > KEY_PART_MAX:
        return f"longer than {KEY_PART_MAX} characters ({len(value)})"
    if not _SAFE.fullmatch(value):  # fullmatch: `$` would accept a trailing newline
        return "empty or not only letters, digits, '.', '_' and '-'"
    return None


def check_key_part(kind: str, value: str) -> str:
    problem = key_part_problem(value)
    if problem:
        raise ValueError(f"invalid {kind} {value[:80]!r}: {problem}")
    return value


def date_of_ns(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns // NS, tz=dt.timezone.utc).strftime("%Y-%m-%d")


def partition_prefix(table: str, source: str, market: str, date: str) -> str:
    return f"data/{table}/source={source}/market={market}/date={date}"


def buffer_key(table: str, source: str, market: str) -> str:
    """The writer's buffer (and spool) key of one table, source and market."""
    return f"{table}|{source}|{market}"


def file_name(seq: int, shard: int | None = None, n: int = 0) -> str:
    """A data file's name (without `.parquet`): `0003` unsharded, `0003-s1` written by shard 1; `n`
    > 0 for a compacted file that could not take its usual name (`0000-1`, `0000-s1-2`)."""
    name = f"{seq:04d}" if shard is None else f"{seq:04d}-s{shard}"
    return name if not n else f"{name}-{n}"


def file_key(table: str, source: str, market: str, date: str, seq: int, shard: int | None = None) -> str:
    """The key of raw file `seq` of a partition; a shard's files carry its id so that shards
    writing the same partition never collide."""
    return f"{partition_prefix(table, source, market, date)}/{file_name(seq, shard)}.parquet"


def compacted_key(table: str, source: str, market: str, date: str, shard: int | None = None, n: int = 0) -> str:
    """The key of a compacted (or derived) file: `0000.parquet`, a shard's `0000-s{shard}.parquet`."""
    return f"{partition_prefix(table, source, market, date)}/{file_name(0, shard, n)}.parquet"


def name_parts(name: str) -> tuple[int | None, int | None]:
    """(seq, shard) of a data file's name without `.parquet`; (None, None) for a name this engine
    does not write (accepted everywhere, ordered last)."""
    m = _NAME_RE.match(name)
    if not m:
        return None, None
    return int(m["seq"]), (int(m["shard"]) if m["shard"] is not None else None)


@dataclass(frozen=True)
class KeyParts:
    table: str
    source: str
    market: str
    date: str
    name: str

    @property
    def seq(self) -> int | None:
        """The raw file's sequence number in its partition (0: compacted), None for a foreign name."""
        return name_parts(self.name)[0]

    @property
    def shard(self) -> int | None:
        """The collector shard that wrote the file; None for unsharded (and legacy) names."""
        return name_parts(self.name)[1]

    @property
    def compacted(self) -> bool:
        return self.seq == 0


def parse_key(key: str) -> KeyParts:
    m = _PART_RE.match(key)
    if not m:
        raise ValueError(f"not a lake data key: {key!r}")
    return KeyParts(**m.groupdict())


@dataclass(frozen=True)
class Layout:
    """Directories of a lake home."""

    home: Path

    @property
    def staging(self) -> Path:
        return self.home / "staging"

    @property
    def catalog_dir(self) -> Path:
        return self.home / "catalog"

    @property
    def catalog_log(self) -> Path:
        return self.catalog_dir / "log.jsonl"

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def default_store(self) -> Path:
        return self.home / "store"

    @property
    def tmp(self) -> Path:
        """Scratch space (sql() spills here, never in the working directory)."""
        return self.home / "tmp"

    @property
    def status(self) -> Path:
        return self.home / "status"

    @property
    def quarantine(self) -> Path:
        """Uncatalogued files that could not be adopted: kept for inspection, never deleted."""
        return self.home / "quarantine"

    @property
    def shard_file(self) -> Path:
        """This home's collector-shard identity (engine.lake.shard); absent: an unsharded home."""
        return self.home / "shard.json"

    def staged(self, key: str) -> Path:
        return self.staging / key


MANIFEST_KEY = "catalog/manifest.parquet"  # an unsharded writer's manifest
MANIFEST_PREFIX = "catalog/manifest"  # one LIST under it finds the manifest and every shard's part


def manifest_part_key(shard: int) -> str:
    """The manifest part a collector shard publishes; readers merge the parts (and MANIFEST_KEY)."""
    return f"{MANIFEST_PREFIX}/part-{shard:04d}.parquet"


_PART_KEY_RE = re.compile(r"^catalog/manifest/part-(\d+)\.parquet$")


def manifest_part_shard(key: str) -> int | None:
    """The shard of a manifest part key, None for any other key."""
    m = _PART_KEY_RE.match(key)
    return int(m[1]) if m else None
