"""The main job's demo preparation (engine/run/supervisor.py)."""

from __future__ import annotations

import time

from engine.collect.capture import read_capture
from engine.run.supervisor import prepare_demo


def test_demo_captures_are_never_stamped_in_the_future(tmp_path):
    """Playback starts when prepare_demo returns: a frame stamped later would put exchange times
    ahead of receive times (negative feed lag) for the whole demo."""
    d = prepare_demo(tmp_path, minutes=0.05)
    now = time.time_ns()
    for src, path in d["captures"].items():
        first = next(recv_ns for recv_ns, frame, _meta in read_capture(path) if frame is not None)
        assert first <= now, (src, (first - now) / 1e9)
        assert now - first < 30 * 10**9, (src, (now - first) / 1e9)  # and not stale either
    assert d["private_key"].exists() and d["public_key"].exists()


# ---- the launcher's process tree dies with it (kill -9 included) --------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from engine_tests.conftest import ROOT, free_port  # noqa: E402


def _procs() -> dict[int, tuple[str, int, int]]:
    """pid → (state, ppid, session) of every process, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_bytes()
        except OSError:
            continue
        f = raw[raw.rindex(b")") + 2:].split()
        out[int(d)] = (f[0].decode(), int(f[1]), int(f[3]))
    return out


def _tree(root: int) -> set[int]:
    """The live descendants of `root`, and every live process in their sessions."""
    procs = _procs()
    tree, todo = set(), [root]
    while todo:
        p = todo.pop()
        kids = [c for c, (_, ppid, _) in procs.items() if ppid == p and c not in tree]
        tree.update(kids)
        todo.extend(kids)
    sids = {procs[p][2] for p in tree} - {procs[root][2]} if root in procs else set()
    tree |= {p for p, (_, _, sid) in procs.items() if sid in sids}
    return {p for p in tree if procs[p][0] not in "ZX"}


def _alive(pids: set[int]) -> set[int]:
    procs = _procs()
    return {p for p in pids if p in procs and procs[p][0] not in "ZX"}


def _port_listened(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


class _Launcher:
    """A launcher process (`python -m engine.run.supervisor ...` or a stand-in) whose output is read
    on a thread; on exit everything of its tree ever seen is killed, so a failing test leaves
    nothing behind."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        self.lines: list[str] = []
        self.seen: set[int] = set()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def demo(cls, tmp: Path, *extra: str) -> "_Launcher":
        """`./scripts/run --demo` in a fresh ENGINE_HOME, DAGSTER_HOME and demo dir."""
        env = dict(os.environ, DAGSTER_HOME=str(tmp / "dagster_home"), ENGINE_HOME=str(tmp / "lake"))
        return cls([sys.executable, "-m", "engine.run.supervisor", "--demo", "--demo-minutes", "0.2", "--demo-dir",
                    str(tmp / "demo"), "--home", str(tmp / "lake"), *extra], env)

    def __enter__(self) -> "_Launcher":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.tree()
            self.proc.kill()
            self.proc.wait(10)
        for p in _alive(self.seen):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(text in x for x in self.lines):
                return
            time.sleep(0.2)
        raise AssertionError(f"launcher never printed {text!r}:\n{''.join(self.lines)[-3000:]}")

    def started(self) -> dict[str, int]:
        """name → pid from the launcher's "started NAME pid N" lines."""
        out = {}
        for x in self.lines:
            w = x.split()
            if len(w) >= 4 and w[0] == "started" and w[2] == "pid":
                out[w[1]] = int(w[3])
        return out

    def tree(self) -> set[int]:
        t = _tree(self.proc.pid)
        self.seen |= t
        return t

    def kill_and_check(self, ports: list[int], min_procs: int) -> None:
        """SIGKILL the launcher; within 20 s no process of its tree may remain and no port be listened on."""
        tree = self.tree()
        assert set(self.started().values()) <= tree and len(tree) >= min_procs, (self.started(), tree)
        assert all(_port_listened(p) for p in ports)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 20
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {p: " ".join(_cmdline(p))[:120] for p in _alive(tree)}
        assert not left, f"left running after kill -9 of the launcher: {left}"
        assert not [p for p in ports if _port_listened(p)]


def _wait_collector(home: Path, timeout: float = 60) -> None:
    """The collector is up once it wrote its pid file."""
    deadline = time.monotonic() + timeout
    while not list((home / "status").glob("collector-*.pid")):
        assert time.monotonic() < deadline, "the collector never started"
        time.sleep(0.2)


def _replay_ports(started: dict[str, int]) -> list[int]:
    out = []
    for name, pid in started.items():
        cmd = _cmdline(pid)
        if name.startswith("replay-") and "--port" in cmd:
            out.append(int(cmd[cmd.index("--port") + 1]))
    return out


def test_kill_9_of_the_launcher_takes_collector_and_exchanges_with_it(tmp_path):
    """`kill -9` of `./scripts/run --demo --no-dagster`: the collector and every replay exchange exit
    within 20 s and the exchanges' ports are free (they used to run on as orphans)."""
    with _Launcher.demo(tmp_path, "--no-dagster") as launcher:
        launcher.wait_line("stop: Ctrl-C", 120)
        assert {"collector", "replay-coinbase", "replay-kalshi", "replay-kraken"} <= set(launcher.started())
        ports = _replay_ports(launcher.started())
        assert len(ports) == 3
        _wait_collector(tmp_path / "lake")
        launcher.kill_and_check(ports, min_procs=3)


def test_a_clean_stop_leaves_nothing_and_the_reaper_kills_nothing(tmp_path):
    """`--for`: the launcher stops its children itself, then tells the reaper it is done (the
    reaper must not signal session ids that may since belong to someone else)."""
    with _Launcher.demo(tmp_path, "--no-dagster", "--for", "2") as launcher:
        launcher.wait_line("stop: Ctrl-C", 120)
        tree = launcher.tree()
        assert launcher.proc.wait(60) == 0, "".join(launcher.lines)[-3000:]
        assert "all processes stopped" in "".join(launcher.lines)
        deadline = time.monotonic() + 10
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(tree)
        assert (tmp_path / "demo" / "logs" / "reaper.log").read_text() == ""


STAND_IN = """
import sys, time
from pathlib import Path
from engine.run.supervisor import Supervisor
sup = Supervisor(Path(sys.argv[1]))
sup.start("tree", [sys.executable, "-c", "import subprocess, time; "
          "[subprocess.Popen(['sleep', '60']) for _ in range(2)]; time.sleep(60)"], None)
time.sleep(60)  # scenario: a launcher stand-in that lives (with its tree) until the test kills it
"""


def test_kill_9_of_the_launcher_takes_grandchildren_with_it(tmp_path):
    """The supervisor's children's own children (Dagster's code servers, here two `sleep`s that
    no parent-death signal reaches) go too: the reaper stops the child's whole session."""
    with _Launcher([sys.executable, "-c", STAND_IN, str(tmp_path / "logs")]) as launcher:
        launcher.wait_line("started tree", 30)
        deadline = time.monotonic() + 30
        while sum(_cmdline(p)[:2] == ["sleep", "60"] for p in launcher.tree()) < 2:
            assert time.monotonic() < deadline, launcher.tree()
            time.sleep(0.1)
        launcher.kill_and_check([], min_procs=4)  # reaper, child, two grandchildren


@pytest.mark.slow
def test_kill_9_of_the_launcher_takes_dagster_and_its_code_servers_with_it(tmp_path):
    """The whole demo (collector, replay exchanges, the Dagster code server, dagster-webserver and
    dagster-daemon): after `kill -9` of the launcher nothing is left and no port is listened on."""
    port = free_port()
    with _Launcher.demo(tmp_path, "--port", str(port)) as launcher:
        launcher.wait_line("Dagster UI:", 240)
        started = launcher.started()
        assert {"collector", "replay-coinbase", "replay-kalshi", "dagster-code-server", "dagster-daemon",
                "dagster-webserver"} <= set(started)
        code = _cmdline(started["dagster-code-server"])  # the one code server, shared by webserver and daemon
        code_port = int(code[code.index("--port") + 1])
        assert _port_listened(code_port)
        own = [p for p, (_, ppid, _) in _procs().items()
               if ppid in (started["dagster-daemon"], started["dagster-webserver"]) and "grpc" in _cmdline(p)]
        assert not own, f"the webserver or the daemon started a code server of its own: {own}"
        _wait_collector(tmp_path / "lake")
        launcher.kill_and_check([port, code_port, *_replay_ports(started)], min_procs=7)


MIDDLE = """
import os, subprocess, sys, time
from engine.run.reaper import die_with_parent
pre = die_with_parent()
if sys.argv[1] == "race":  # the parent is gone before the child's preexec runs
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        print(os.getpid(), flush=True)
        deadline = time.monotonic() + 10
        while os.getppid() == parent and time.monotonic() < deadline:  # until the parent has exited
            time.sleep(0.01)
        pre()
        os.execv("/bin/sleep", ["sleep", "60"])
    os._exit(0)
p = subprocess.Popen(["sleep", "60"], preexec_fn=pre)
print(p.pid, flush=True)
time.sleep(60)  # scenario: the middle process lives until the test kills it
"""


@pytest.mark.parametrize("case", ["killed", "race"])
def test_a_child_dies_with_its_parent(case):
    """`die_with_parent`: the child gets SIGTERM when its parent is SIGKILLed, and a child whose
    parent died before prctl ran (no signal will ever come) exits instead of running on."""
    mid = subprocess.Popen([sys.executable, "-c", MIDDLE, case], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(mid.stdout.readline())
    try:
        if case == "killed":
            assert _alive({child})
            mid.kill()
        mid.wait(10)
        deadline = time.monotonic() + 10
        while _alive({child}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive({child})
    finally:
        if _alive({child}):
            os.kill(child, signal.SIGKILL)
        if mid.poll() is None:
            mid.kill()
            mid.wait(10)
