"""sql() is bounded: a time limit (the connection is interrupted), a memory limit, temp files in the lake home,
and every DuckDB error surfaces as one of the engine's own errors."""

from __future__ import annotations

import os
import re

import pytest

from engine import Engine
from engine.errors import EngineError, QueryError, QueryMemoryError, QueryTimeoutError
from engine.sim import synth
from engine.timeutil import to_ns

START = to_ns("2026-11-01")
RUNAWAY = "SELECT sum(hash(range)) FROM range(1000000000000)"  # 1e12 rows: hours of CPU unbounded


def _lake(tmp_path) -> Engine:
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", START, 100, 3600 * 10**9))
    eng.flush()
    return eng


def _bytes(setting: str) -> float:
    """DuckDB shows memory sizes as e.g. '256.0 MiB' or '5.8 GiB'."""
    m = re.fullmatch(r"([\d.]+) (KiB|MiB|GiB|TiB)", setting)
    assert m, setting
    return float(m.group(1)) * 1024 ** (1 + ["KiB", "MiB", "GiB", "TiB"].index(m.group(2)))


@pytest.mark.timeout(60)  # the outer bound: an unbounded sql() would run for hours
def test_runaway_query_hits_the_time_limit(tmp_path):
    eng = _lake(tmp_path)
    with pytest.raises(QueryTimeoutError) as ei:
        eng.sql(RUNAWAY, timeout_s=0.5)
    assert isinstance(ei.value, EngineError) and isinstance(ei.value, QueryError)
    assert "0.5" in str(ei.value) and "timeout_s" in str(ei.value)
    assert eng.sql("SELECT count(*) AS n FROM trades")["n"][0] == 100  # the next query runs normally
    eng.close()


def test_memory_limit_and_temp_directory_are_applied(tmp_path):
    eng = _lake(tmp_path)
    q = ("SELECT current_setting('memory_limit') AS m, current_setting('temp_directory') AS t, "
         "(SELECT count(*) FROM trades) AS n")
    got = eng.sql(q, memory_limit=256 << 20).row(0, named=True)
    assert _bytes(got["m"]) == 256 << 20
    assert got["n"] == 100
    tmp = os.path.realpath(got["t"])
    assert tmp.startswith(str(eng.home) + os.sep), tmp  # spills stay inside the lake home, never the cwd
    assert not os.path.exists(tmp), "the query's temp directory is removed afterwards"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    default = _bytes(eng.sql(q)["m"][0])
    assert abs(default - ram / 4) <= 0.01 * ram, (default, ram)  # 25% of RAM, not DuckDB's 80%
    eng.close()


def test_duckdb_errors_become_engine_errors(tmp_path):
    eng = _lake(tmp_path)
    with pytest.raises(QueryMemoryError) as ei:  # list() cannot spill: over the limit it fails
        eng.sql("SELECT list(range) AS l FROM range(50000000)", memory_limit="64MB")
    assert "memory_limit" in str(ei.value)
    for bad in ("SELECT CAST('x' AS INTEGER)", "SELECT no_such_column FROM trades", "SELECT * FROM no_such_table",
                "SELECT error('boom')"):
        with pytest.raises(QueryError):
            eng.sql(bad)
    with pytest.raises(ValueError):
        eng.sql("SELECT 1", timeout_s=0)
    eng.close()
