"""The main job (`./scripts/run`): collectors + Dagster webserver + daemon as supervised processes.

Each child runs in its own session (and process group) so that shutdown (Ctrl-C, SIGTERM, `--for`)
reaches every grandchild, and nothing is left behind; if the launcher itself dies (`kill -9`), its
children get SIGTERM from the kernel and a reaper process stops their sessions (engine/run/reaper.py). `dagster dev` is not used: backgrounded it ignores signals.
`--demo` needs no internet: local replay exchanges play generated captures (stamped "now", so the
data is live-looking), sources that sign their connections (Kalshi) get throw-away keys, and files
flush every 15 s. Every registered source is run; what differs per exchange is asked of its `Source`.
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


_DAGSTER_INSTANCE = ("import sys; from engine_defs.instance import ensure_instance, ensure_workspace; "
                     "ensure_workspace(ensure_instance(sys.argv[1]), int(sys.argv[2])); "
                     "from dagster import DagsterInstance; DagsterInstance.get()")


def code_server_cmd(port: int) -> list[str]:
    """The one Dagster code server, shared by the webserver and the daemon (engine_defs/instance.py
    says why; `code_server_args` there is the same command). Run workers are its children."""
    return [_bin("dagster"), "api", "grpc", "--module-name", "engine_defs.definitions", "--host", "127.0.0.1",
            "--port", str(port), "--location-name", "engine"]


def daemon_cmd(workspace: str) -> list[str]:
    """dagster-daemon through `engine_defs.daemon` (the backfill daemon looks for new backfills every
    2 s, not 30; that module says why); same arguments as `dagster-daemon`."""
    return [sys.executable, "-m", "engine_defs.daemon", "run", "-w", workspace]


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def prepare_demo(demo_dir: Path, minutes: float) -> dict:
    """Fresh captures stamped now, and what each source needs besides (`Source.demo`: throw-away
    credentials, never a shipped private key). Returns {"captures": {name: path}, "demo": {name:
    Demo}} and the files the sources made (e.g. "private_key", "public_key")."""
    from engine.collect import registry
    from engine.collect.capture import read_capture
    from engine.sim import capture_gen

    demo_dir.mkdir(parents=True, exist_ok=True)
    start = time.time_ns() + 6 * 10**9  # generation takes about 4 s: stamp when playback starts
    caps = {}
    for src in registry.names():
        out = demo_dir / f"{src}-now.jsonl.zst"
        capture_gen.cli(["--source", src, "--minutes", str(minutes), "--start", str(start), "--out", str(out),
                         *_sim_demo_args(src)])
        caps[src] = out
    demos = {src: registry.get(src).demo(demo_dir) for src in caps}
    # play no frame stamped in the future: the exchange times would run ahead of the receive times
    # (a negative feed lag in `data-engine status`) for the whole demo
    first = max(next(r for r, frame, _ in read_capture(p) if frame is not None) for p in caps.values())
    time.sleep(max(0.0, (first - time.time_ns()) / 1e9))
    out = {"captures": caps, "demo": demos}
    for d in demos.values():
        out.update(d.files)
    return out


def _sim_demo_args(src: str) -> tuple[str, ...]:
    """The simulated exchange's own options for the demo capture (none when it is not simulated)."""
    from engine.sim import registry as sim_registry

    try:
        return sim_registry.get(src).demo_args
    except ValueError:
        return ()


def _start_demo(sup: Supervisor, de: str, env: dict, demo_dir: Path, minutes: float) -> list[str] | None:
    """Replay exchanges for every source, playing fresh captures; the collector options pointing the
    sources at them (None if one does not listen). `env` gets the sources' demo credentials."""
    print("generating demo captures ...", flush=True)
    d = prepare_demo(demo_dir, minutes)
    from engine.collect import registry

    ports = {}
    for src, cap in d["captures"].items():
        port = _free_port()
        while port in ports.values():  # a port just released can be handed out again
            port = _free_port()
        ports[src] = port
        sup.start(f"replay-{src}", [de, "replay-exchange", "--source", src, "--capture", str(cap),
                                    "--port", str(port), "--speed", "1", "--loop", *d["demo"][src].replay_args], env)
    for demo in d["demo"].values():  # the collector's credentials, not the exchanges'
        env.update(demo.env)
    for p in ports.values():
        if not _wait_port(p, 30):
            print(f"error: replay exchange did not listen on 127.0.0.1:{p}", file=sys.stderr)
            return None
    args = ["--source", *ports]
    for src, port in ports.items():
        args += registry.get(src).local_args(port)
    return args


def _live_sources() -> list[str]:
    """Every registered source whose credentials are in the environment."""
    from engine.collect import registry

    out = []
    for src in registry.names():
        missing = [v for v in registry.get(src).credentials_env if not os.environ.get(v)]
        if missing:
            print(f"{src}: {' / '.join(missing)} not set, not collected", flush=True)
        else:
            out.append(src)
    return out


def _start_shards(sup: Supervisor, de: str, env: dict, home: Path, collect: list[str], args) -> bool:
    """Collectors of the shards run here (each `--shard-id i --shards N`, its own home, one store for
    all) and, where Dagster does not do the batch work, a keeper per shard. Returns whether Dagster
    should start: for one shard on this host (`--shard-id`), it works on that home like an unsharded
    lake; several shards here have several homes, which Dagster's one-home definitions do not cover."""
    from engine.collect import shards
    from engine.lake import shard as shard_id
    from engine.paths import Layout

    if not os.environ.get("ENGINE_STORE"):  # every shard must upload to the same place
        env["ENGINE_STORE"] = str(home / "store")
    ids = [args.shard_id] if args.shard_id is not None else list(range(args.shards))
    plan = shards.plan(collect, args.shards)
    dagster = args.shard_id is not None and not args.no_dagster
    every = args.keep_every if args.keep_every is not None else (10.0 if args.demo else 60.0)
    for i in ids:
        h = home if args.shard_id is not None else shards.shard_home(home, i)
        if not plan[i]:
            print(f"shard {i}: no market assigned to it of {args.shards} shards, not started", flush=True)
            continue
        try:  # before any process opens the home: keeper and collector both name files by the id
            shard_id.claim(Layout(h), i, shards=args.shards, markets=plan[i], store=env["ENGINE_STORE"])
        except shard_id.ShardError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        print(f"shard {i} of {args.shards}: home {h}, markets " + "; ".join(
            f"{src} {' '.join(ms)}" for src, ms in plan[i].items()), flush=True)
        sup.start(f"collector-{i}", [de, "collect", "--home", str(h), *collect, "--shard-id", str(i),
                                     "--shards", str(args.shards)], env)
        if not dagster:
            sup.start(f"keeper-{i}", [de, "keep", "--home", str(h), "--every", str(every), "--shard-id", str(i)], env)
    if args.shard_id is None and not args.no_dagster:
        print("note: with several shards on one host each shard's keeper uploads and compacts; Dagster is not "
              "started (run one shard per host with --shard-id for Dagster on each)", flush=True)
    print(f"store (every shard's bucket): {env['ENGINE_STORE']}; read all shards from any home: "
          f"Engine.open('<empty dir>', store='{env['ENGINE_STORE']}')", flush=True)
    return dagster


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/run", description="Collectors + Dagster, supervised.")
    ap.add_argument("--demo", action="store_true", help="offline: replay exchanges play generated captures")
    ap.add_argument("--for", dest="duration", type=float, default=None, help="stop everything after SECONDS")
    ap.add_argument("--home", default=None, help="lake home (default $ENGINE_HOME, ./lake, or ./.demo/lake with --demo)")
    ap.add_argument("--port", type=int, default=3000, help="Dagster UI port on 127.0.0.1")
    ap.add_argument("--no-dagster", action="store_true", help="collectors only")
    ap.add_argument("--demo-minutes", type=float, default=5.0, help="length of the generated demo captures (looped)")
    ap.add_argument("--demo-dir", default=None, help="demo captures, keys and logs (default ./.demo)")
    ap.add_argument("--shards", type=int, default=1,
                    help="spread the markets over N collector processes (engine.collect.shards), each with its own home "
                         "(shard 0: the lake home; shard i: HOME/shards/i) and a keeper uploading to one store")
    ap.add_argument("--shard-id", type=int, default=None,
                    help="with --shards: run only this shard here, in the lake home (one host per shard)")
    ap.add_argument("--keep-every", type=float, default=None,
                    help="seconds between a shard keeper's upload/compaction passes (default 60; 10 with --demo)")
    args = ap.parse_args(argv)
    if args.shards < 1 or (args.shard_id is not None and not 0 <= args.shard_id < args.shards):
        ap.error(f"--shards must be >= 1 and --shard-id in 0..{args.shards - 1}")

    demo_dir = Path(args.demo_dir).resolve() if args.demo_dir else ROOT / ".demo"
    home = Path(args.home or os.environ.get("ENGINE_HOME") or (demo_dir / "lake" if args.demo else ROOT / "lake")).resolve()
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or (demo_dir / "dagster_home" if args.demo else ROOT / ".dagster_home")).resolve()
    env = dict(os.environ, ENGINE_HOME=str(home), DAGSTER_HOME=str(dagster_home), PYTHONUNBUFFERED="1")
    sup = Supervisor((demo_dir if args.demo else home) / "logs")
    de = _bin("data-engine")
    print(f"lake home: {home}" + ("" if args.no_dagster else f"\nDagster home: {dagster_home}"), flush=True)

    collect: list[str] = []
    if args.demo:
        env["ENGINE_FLUSH_AGE_S"] = env.get("ENGINE_FLUSH_AGE_S", "30")
        env.setdefault("ENGINE_DAGSTER_SENSOR_INTERVAL", "5")
        week_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 7 * 86400))
        env.setdefault("ENGINE_DAGSTER_START_DATE", week_ago)  # a readable partitions page
        local = _start_demo(sup, de, env, demo_dir, args.demo_minutes)
        if local is None:
            sup.stop()
            return 1
        collect += local
    else:
        collect += ["--source", *_live_sources()]
    sharded = args.shards > 1 or args.shard_id is not None
    if sharded:
        dagster = _start_shards(sup, de, env, home, collect, args)
    else:
        sup.start("collector", [de, "collect", "--home", str(home), *collect], env)
        dagster = not args.no_dagster
    if not any(n.startswith("collector") for n in sup.procs):
        print("error: no collector to start", file=sys.stderr)
        sup.stop()
        return 1
    if dagster:
        code_port = _free_port()
        # DAGSTER_HOME/dagster.yaml and the workspace naming the code server (engine_defs/instance.py),
        # then the SQLite storages, created once before several processes race to create them; in a
        # child: this supervisor never imports Dagster
        subprocess.run([sys.executable, "-c", _DAGSTER_INSTANCE, str(dagster_home), str(code_port)],
                       env=env, cwd=ROOT, check=True, preexec_fn=die_with_parent())
        ws = str(dagster_home / "code_server_workspace.yaml")
        code = sup.start("dagster-code-server", code_server_cmd(code_port), env)
        if not _wait_port(code_port, 120, code):  # the webserver and daemon load the definitions from it
            print("warning: the Dagster code server did not listen within 120 s; see its log", flush=True)
        sup.start("dagster-daemon", daemon_cmd(ws), env)
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
