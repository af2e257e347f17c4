"""The main job (`./scripts/run`): collectors + Dagster webserver + daemon as supervised processes.

Each child runs in its own session (and process group) so that shutdown (Ctrl-C, SIGTERM, `--for`)
reaches every grandchild, and nothing is left behind; if the launcher itself dies (`kill -9`), its
children get SIGTERM from the kernel and a reaper process stops their sessions (engine/run/reaper.py). `dagster dev` is not used: backgrounded it ignores signals.
`--demo` needs no internet: local replay exchanges play generated captures (stamped "now", so the
data is live-looking), Kalshi auth uses a throw-away key pair, and files flush every 15 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.run.reaper import Reaper, die_with_parent, session_members

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


class Supervisor:
    def __init__(self, logs: Path):
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.reaper = Reaper(self.logs / "reaper.log")  # started first: children never inherit its pipe

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as out:
            p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent())
        self.reaper.watch(p.pid)  # its session id
        self.procs[name] = p
        print(f"  started {name:<16} pid {p.pid}  (log: {self.logs / (name + '.log')})", flush=True)
        return p

    def dead(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, timeout: float = 30.0) -> None:
        # collectors first (they flush), then the rest
        order = sorted(self.procs, key=lambda n: 0 if n.startswith("collector") else 1)
        for n in order:
            p = self.procs[n]
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            if n.startswith("collector"):
                _wait(p, timeout)
        deadline = time.monotonic() + timeout
        for n, p in self.procs.items():
            _wait(p, max(0.1, deadline - time.monotonic()))
        for n, p in self.procs.items():
            try:
                os.killpg(p.pid, signal.SIGKILL)  # leftovers in the group, if any
            except ProcessLookupError:
                pass
            if p.poll() is None:
                p.wait(timeout=5)
        for pid in session_members(p.pid for p in self.procs.values()):  # and any that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reaper.release()


def _wait(p: subprocess.Popen, timeout: float) -> None:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


_DAGSTER_INSTANCE = ("import sys; from engine_defs.instance import ensure_instance; ensure_instance(sys.argv[1]); "
                     "from dagster import DagsterInstance; DagsterInstance.get()")


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def prepare_demo(demo_dir: Path, minutes: float) -> dict:
    """Fresh captures stamped now, and a throw-away Kalshi key pair (never a shipped private key)."""
    from engine.collect import kalshi_auth
    from engine.collect.capture import read_capture
    from engine.sim import capture_gen

    demo_dir.mkdir(parents=True, exist_ok=True)
    start = time.time_ns() + 6 * 10**9  # generation takes about 4 s: stamp when playback starts
    caps = {}
    for src in ("coinbase", "kalshi"):
        out = demo_dir / f"{src}-now.jsonl.zst"
        capture_gen.cli(["--source", src, "--minutes", str(minutes), "--start", str(start), "--out", str(out)])
        caps[src] = out
    # play no frame stamped in the future: the exchange times would run ahead of the receive times
    # (a negative feed lag in `data-engine status`) for the whole demo
    first = max(next(r for r, frame, _ in read_capture(p) if frame is not None) for p in caps.values())
    time.sleep(max(0.0, (first - time.time_ns()) / 1e9))
    keys = demo_dir / "keys"
    priv, pub = kalshi_auth.generate_keypair(keys, name="demo")
    return {"captures": caps, "private_key": Path(priv), "public_key": Path(pub)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/run", description="Collectors + Dagster, supervised.")
    ap.add_argument("--demo", action="store_true", help="offline: replay exchanges play generated captures")
    ap.add_argument("--for", dest="duration", type=float, default=None, help="stop everything after SECONDS")
    ap.add_argument("--home", default=None, help="lake home (default $ENGINE_HOME, ./lake, or ./.demo/lake with --demo)")
    ap.add_argument("--port", type=int, default=3000, help="Dagster UI port on 127.0.0.1")
    ap.add_argument("--no-dagster", action="store_true", help="collectors only")
    ap.add_argument("--demo-minutes", type=float, default=5.0, help="length of the generated demo captures (looped)")
    ap.add_argument("--demo-dir", default=None, help="demo captures, keys and logs (default ./.demo)")
    args = ap.parse_args(argv)

    demo_dir = Path(args.demo_dir).resolve() if args.demo_dir else ROOT / ".demo"
    home = Path(args.home or os.environ.get("ENGINE_HOME") or (demo_dir / "lake" if args.demo else ROOT / "lake")).resolve()
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or (demo_dir / "dagster_home" if args.demo else ROOT / ".dagster_home")).resolve()
    env = dict(os.environ, ENGINE_HOME=str(home), DAGSTER_HOME=str(dagster_home), PYTHONUNBUFFERED="1")
    sup = Supervisor((demo_dir if args.demo else home) / "logs")
    de = _bin("data-engine")
    print(f"lake home: {home}" + ("" if args.no_dagster else f"\nDagster home: {dagster_home}"), flush=True)

    collect = [de, "collect", "--home", str(home)]
    if args.demo:
        env["ENGINE_FLUSH_AGE_S"] = env.get("ENGINE_FLUSH_AGE_S", "30")
        env.setdefault("ENGINE_DAGSTER_SENSOR_INTERVAL", "5")
        week_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 7 * 86400))
        env.setdefault("ENGINE_DAGSTER_START_DATE", week_ago)  # a readable partitions page
        print("generating demo captures ...", flush=True)
        d = prepare_demo(demo_dir, args.demo_minutes)
        cb_port, k_port = _free_port(), _free_port()
        sup.start("replay-coinbase", [de, "replay-exchange", "--source", "coinbase", "--capture", str(d["captures"]["coinbase"]),
                                      "--port", str(cb_port), "--speed", "1", "--loop"], env)
        sup.start("replay-kalshi", [de, "replay-exchange", "--source", "kalshi", "--capture", str(d["captures"]["kalshi"]),
                                    "--port", str(k_port), "--speed", "1", "--loop",
                                    "--kalshi-public-key", str(d["public_key"])], env)
        for p in (cb_port, k_port):
            if not _wait_port(p, 30):
                print(f"error: replay exchange did not listen on 127.0.0.1:{p}", file=sys.stderr)
                sup.stop()
                return 1
        env["KALSHI_API_KEY_ID"] = "demo-key-id"
        env["KALSHI_PRIVATE_KEY_PATH"] = str(d["private_key"])
        collect += ["--source", "coinbase", "kalshi", "--coinbase-url", f"ws://127.0.0.1:{cb_port}",
                    "--kalshi-url", f"ws://127.0.0.1:{k_port}/trade-api/ws/v2",
                    "--kalshi-rest-url", f"http://127.0.0.1:{k_port}/trade-api/v2"]
    else:
        srcs = ["coinbase"]
        if os.environ.get("KALSHI_API_KEY_ID") and os.environ.get("KALSHI_PRIVATE_KEY_PATH"):
            srcs.append("kalshi")
        else:
            print("Kalshi: KALSHI_API_KEY_ID / KALSHI_PRIVATE_KEY_PATH not set, collecting Coinbase only", flush=True)
        collect += ["--source", *srcs]
    sup.start("collector", collect, env)
    if not args.no_dagster:
        ws = str(ROOT / "workspace.yaml")
        # DAGSTER_HOME/dagster.yaml (engine_defs/instance.py), then the SQLite storages, created once
        # before two processes race to create them; in a child: this supervisor never imports Dagster
        subprocess.run([sys.executable, "-c", _DAGSTER_INSTANCE, str(dagster_home)],
                       env=env, cwd=ROOT, check=True, preexec_fn=die_with_parent())
        sup.start("dagster-daemon", [_bin("dagster-daemon"), "run", "-w", ws], env)
        web = sup.start("dagster-webserver", [_bin("dagster-webserver"), "-h", "127.0.0.1", "-p", str(args.port), "-w", ws], env)
        if _wait_port(args.port, 120, web):
            print(f"\nDagster UI: http://127.0.0.1:{args.port}  (assets, partitions date × market, checks, gaps)", flush=True)
        else:
            print("warning: the Dagster webserver did not come up within 120 s; see its log", flush=True)
    print(f"status: data-engine status --home {home}   query: ENGINE_HOME={home} python -c 'from engine import Engine; print(Engine.open().catalog.summary())'")
    print("stop: Ctrl-C" + (f" (or automatically after {args.duration:.0f} s)" if args.duration else ""), flush=True)

    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    t_end = time.monotonic() + args.duration if args.duration else None
    rc = 0
    try:
        while not stop["flag"] and (t_end is None or time.monotonic() < t_end):
            dead = sup.dead()
            if dead:
                for n, code in dead:
                    print(f"error: {n} exited with code {code}; see {sup.logs / (n + '.log')}", file=sys.stderr)
                rc = 1
                break
            time.sleep(0.5)
    finally:
        print("stopping ...", flush=True)
        sup.stop()
        print("all processes stopped", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
