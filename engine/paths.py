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


def file_key(table: str, source: str, market: str, date: str, seq: int) -> str:
    return f"{partition_prefix(table, source, market, date)}/{seq:04d}.parquet"


@dataclass(frozen=True)
class KeyParts:
    table: str
    source: str
    market: str
    date: str
    name: str


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

    def staged(self, key: str) -> Path:
        return self.staging / key


MANIFEST_KEY = "catalog/manifest.parquet"
