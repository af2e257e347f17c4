"""A reader process (Dagster, a notebook) and the writer (collector) share one lake home."""

from __future__ import annotations

import subprocess
import sys

from engine import Engine
from engine.lake.spool import SpoolLockedError
from engine.schema import NS_PER_HOUR
from engine.sim import synth
from engine.timeutil import to_ns

import pytest


def test_reader_opens_while_writer_holds_spool(tmp_path):
    writer = Engine.open(tmp_path / "h", background=False, writer=True)
    writer.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-01"), 100, NS_PER_HOUR))
    writer.flush()
    writer.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-01T01:00"), 50, NS_PER_HOUR,
                                             id_start=1000))  # buffered: its spool segment is live
    code = (
        "import sys; from engine import Engine; e = Engine.open(sys.argv[1], background=False); "
        "print(e.trades().height)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "h")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "100"
    second = Engine.open(tmp_path / "h", background=False, writer=True)  # opens: the live writer keeps its spool
    with pytest.raises(SpoolLockedError, match="one writer per lake home"):
        second.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-02"), 5, 10**9))
    writer.close()
    assert Engine.open(tmp_path / "h", background=False).trades().height == 150


def test_day_left_by_a_stopped_writer_is_sealed(tmp_path):
    """A collector that stopped mid-day (clean or killed, then recovered) does not block compaction forever."""
    from engine.lake.compaction import closed_partitions

    w = Engine.open(tmp_path / "h", background=False, writer=True)
    w.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-01T10:00"), 100, NS_PER_HOUR))
    w.flush()
    w.catalog.watermarks["coinbase"] = to_ns("2026-11-01T11:00")  # as if sealed only up to mid-day
    reader = Engine.open(tmp_path / "h", background=False)
    reader.catalog.watermarks["coinbase"] = to_ns("2026-11-01T11:00")
    assert closed_partitions(reader) == []  # the writer still holds the spool: trust its watermark
    w.close()
    assert reader.sealed_until("coinbase") > to_ns("2026-11-02")
    assert closed_partitions(reader) == [("trades", "coinbase", "BTC-USD", "2026-11-01")]


CRASHED_WRITER = (
    "import os, signal, sys; from engine import Engine; from engine.sim import synth; from engine.schema import NS_PER_HOUR; "
    "from engine.timeutil import to_ns; e = Engine.open(sys.argv[1], background=False, writer=True); "
    "e.append('trades', synth.trade_rows('coinbase', 'BTC-USD', to_ns('2026-11-01'), 100, NS_PER_HOUR)); e.flush(); "
    "e.append('trades', synth.trade_rows('coinbase', 'BTC-USD', to_ns('2026-11-01T01:00'), 50, NS_PER_HOUR, id_start=1000)); "
    "e._spool.sync(); os.kill(os.getpid(), signal.SIGKILL)"
)


def test_reader_leaves_a_crashed_writers_spool_to_the_writer(tmp_path):
    """After a collector crash, a notebook's `Engine.open()` stays a reader: it neither takes the
    spool lock nor replays the spool, so the restarted collector (a writer) opens and recovers it."""
    from engine.api import ReadOnlyError

    home = tmp_path / "h"
    p = subprocess.run([sys.executable, "-c", CRASHED_WRITER, str(home)], capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    spool = sorted((home / "spool").glob("*.arrow"))
    assert spool
    reader = Engine.open(home, background=False)
    assert reader.trades(allow_unsealed=True).height == 100  # the catalogued rows, read from staging
    assert sorted((home / "spool").glob("*.arrow")) == spool  # not replayed
    with pytest.raises(ReadOnlyError, match=r"append\(\).*writer=True"):
        reader.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-02"), 5, 10**9))
    for name, call in [("flush", reader.flush), ("upload", reader.upload), ("compact", reader.compact),
                       ("publish_manifest", reader.publish_manifest)]:
        with pytest.raises(ReadOnlyError, match=rf"{name}\(\).*writer=True"):
            call()
    writer = Engine.open(home, background=False, writer=True)  # the lock is free: the reader never took it
    assert writer.trades(allow_unsealed=True).height == 150  # recovered from the spool
    assert not list((home / "spool").glob("*.arrow"))
    writer.close()
    reader.catalog.refresh()
    assert reader.trades(allow_unsealed=True).height == 150
    reader.close()


def test_a_readers_lock_probe_does_not_fail_a_starting_writer(tmp_path):
    """`sealed_until` on a reader probes the spool lock (take and release at once); a writer starting
    at that instant waits the probe out instead of failing with SpoolLockedError. A lock that
    stays held still fails it, within a bounded time."""
    import fcntl
    import os
    import threading
    import time

    home = tmp_path / "h"
    (home / "spool").mkdir(parents=True)
    fd = os.open(home / "spool" / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a probe, caught in the act
    threading.Timer(0.1, os.close, [fd]).start()
    w = Engine.open(home, background=False, writer=True)
    w.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-01"), 10, NS_PER_HOUR))
    t0 = time.monotonic()
    with pytest.raises(SpoolLockedError):
        Engine.open(home, background=False, writer=True).append(
            "trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-01"), 10, NS_PER_HOUR))
    assert time.monotonic() - t0 < 5
    w.close()
