"""Collector status and control: the status files (`{home}/status/{source}.json`, written by the
running collector), `data-engine status` and `data-engine flush` (SIGUSR1 to every running collector
of the lake, or a control file for one that is starting)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from engine.timeutil import NS


def status_dir(home: str | os.PathLike) -> Path:
    return Path(home) / "status"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _alive_collector(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"collect" in cmd or b"engine" in cmd
    except OSError:
        return True


def request_flush(home: str | os.PathLike) -> int:
    """Ask every running collector of this lake to flush now (SIGUSR1); returns how many were asked."""
    n = 0
    for p in sorted(status_dir(home).glob("collector-*.pid")):
        try:
            pid = int(p.read_text().strip())
        except (OSError, ValueError):
            continue
        if not _alive_collector(pid):
            try:
                p.unlink()
            except OSError:
                pass
            continue
        try:
            os.kill(pid, signal.SIGUSR1)
            n += 1
        except OSError:
            pass
    if n == 0:  # no live pid file: leave a control file for a collector that is starting
        try:
            status_dir(home).mkdir(parents=True, exist_ok=True)
            (status_dir(home) / "flush.request").touch()
        except OSError:
            pass
    return n


def status_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine status", description="Show collector counters.")
    ap.add_argument("--home", default=os.environ.get("ENGINE_HOME", "./lake"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    files = sorted(status_dir(a.home).glob("*.json"))
    if not files:
        print(f"no collector status in {status_dir(a.home)}")
        return 1
    out = []
    for f in files:
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        st["running"] = _alive_collector(int(st.get("pid", 0) or 0)) and (time.time_ns() - st.get("updated_ns", 0)) < 3600 * NS
        out.append(st)
    if a.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    cols = ["source", "running", "frames", "bytes", "rows", "skipped_frames", "gaps", "reconnects", "feed_lag_ms", "age_s"]
    print("  ".join(f"{c:>14}" for c in cols))
    now = time.time_ns()
    for st in out:
        lag = st.get("feed_lag_ns")
        vals = [
            st.get("source"), st.get("running"), st.get("frames"), st.get("bytes"), st.get("rows"), st.get("skipped_frames"),
            st.get("gaps"), st.get("reconnects"), None if lag is None else round(lag / 1e6, 1),
            round((now - st.get("updated_ns", now)) / 1e9, 1),
        ]
        print("  ".join(f"{str(v):>14}" for v in vals))
    return 0
