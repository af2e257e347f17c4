"""The engine's own error types: callers catch `EngineError` (or a subclass), never a library's errors."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class QueryError(EngineError, ValueError):
    """A query the engine cannot run as asked (bad SQL, bad arguments, a failure inside DuckDB)."""


class QueryTimeoutError(QueryError, TimeoutError):
    """sql() ran past its time limit and was interrupted."""


class QueryMemoryError(QueryError, MemoryError):
    """sql() needed more memory than its memory limit (and could not spill to disk)."""


class CorruptFileError(EngineError, IOError):
    """A lake file whose bytes are damaged (page checksum, SHA-256 or structure), named by its key."""

    def __init__(self, key: str, why: str):
        super().__init__(f"corrupt or unreadable lake file {key}: {why} (run `data-engine catalog verify`)")
        self.key = key
