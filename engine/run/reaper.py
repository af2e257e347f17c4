"""The launcher's children die with it, grandchildren included, even after `kill -9` of `./scripts/run`.

Two mechanisms, because either alone leaves orphans:

- `die_with_parent()`: each child asks the kernel for SIGTERM when its parent dies
  (prctl PR_SET_PDEATHSIG, set in the forked child before exec). It reaches only the direct child,
  not the code servers and run workers dagster-webserver and dagster-daemon spawn.
- `Reaper`: a small process in its own session reads a pipe only the launcher writes to. EOF means
  the launcher is gone, cleanly or not: it stops every process in the children's sessions (each
  child starts its own session and its descendants stay in it), SIGTERM first so collectors
  flush, SIGKILL for what outlives the grace period. A clean shutdown says `done` first.

Standard library only: the reaper starts in milliseconds and never imports Dagster. The launcher
is a process supervisor, not a Dagster definition; this module belongs with it wherever it moves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

PR_SET_PDEATHSIG = 1
GRACE_S = 10.0  # a collector flushes its buffers on SIGTERM before it exits


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child receive `sig` when the launcher dies (Linux; None elsewhere).

    PDEATHSIG fires when the *thread* that forked the child exits, so children must be started
    from the launcher's main thread, which lives as long as the process: enforced here."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start supervised children from the main thread: PDEATHSIG follows the forking thread")
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: no dlopen in the child
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the launcher died before prctl ran: no signal will come
            os._exit(1)

    return preexec


def session_members(sids: Iterable[int]) -> list[int]:
    """Live (not zombie) processes whose session is one of `sids`, from /proc."""
    want = set(sids)
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2:].split()  # after "(comm)": state ppid pgrp session ...
        if int(fields[3]) in want and fields[0] not in (b"Z", b"X"):
            out.append(int(d))
    return out


def _signal_all(sids: set[int], sig: int) -> int:
    pids = session_members(sids)
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    for sid in sids:  # also the process groups (where /proc is not available)
        try:
            os.killpg(sid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return len(pids)


def kill_sessions(sids: Iterable[int], grace_s: float = GRACE_S) -> int:
    """SIGTERM every process of the sessions, then SIGKILL what is still there after `grace_s`.
    Returns how many processes were found at first."""
    sids = set(sids)
    n = _signal_all(sids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while session_members(sids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(10):  # anything spawned meanwhile, too
        if not session_members(sids):
            break
        _signal_all(sids, signal.SIGKILL)
        time.sleep(0.1)
    return n


class Reaper:
    """Launcher side: the reaper process and the write end of its pipe."""

    def __init__(self, log: Path):
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "engine.run.reaper"], stdin=subprocess.PIPE,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def watch(self, sid: int) -> None:
        """Kill session `sid` (a child started with start_new_session) if the launcher dies."""
        self.proc.stdin.write(f"{sid}\n".encode())
        self.proc.stdin.flush()

    def release(self, timeout: float = 5.0) -> None:
        """Clean shutdown: the children are stopped, the reaper exits without touching anything."""
        try:
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> int:
    """Session ids on stdin, one a line; EOF without `done` (the launcher died): kill them."""
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):  # a closing terminal is the launcher's business
        signal.signal(s, signal.SIG_IGN)
    launcher = os.getppid()
    sids: set[int] = set()
    for line in sys.stdin.buffer:
        w = line.split()
        if w == [b"done"]:
            return 0
        if w:
            sids.add(int(w[0]))
    n = kill_sessions(sids)
    print(f"launcher {launcher} gone: stopped {n} process(es) in sessions {sorted(sids)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
