"""Dagster benchmarks (`scripts/bench_dagster`): prints numbers, changes nothing outside its work dir.

1. sensor: catalog log of N files (default 100,000): read time, tick time (first tick of a backlog,
   a batch of MAX_FILES_PER_TICK files), the daemon-side cost of recording that tick's raw
   materializations in SQLite, ticks to drain the backlog, an idle tick, and the Engine/catalog
   open time (every run pays it once).
2. processes: dagster-webserver and dagster-daemon start time (until GraphQL answers / the daemon
   heartbeats) and RSS of each process group. `--code-server shared` (the default, as `./scripts/run`):
   one `dagster api grpc` code server that both use (its group: the run workers too); `managed`: the
   repo's workspace.yaml, each starting its own code servers in its group.
3. backfill: a demo lake of D days × M markets (default 30 × 6), then a compaction backfill of all
   D × M partitions launched through the webserver's GraphQL API as the UI does (an asset backfill of
   the compacted assets and the catalog), executed by the daemon in runs of up to
   ENGINE_DAGSTER_BACKFILL_PARTITIONS partitions; wall time until every partition is materialized
   and no run is left, the CPU seconds of the daemon's side (daemon group + code server group: the
   daemon, the code servers and the run workers, whichever group they are in; less sensitive than
   wall time to what else runs on the machine, whose 1-minute load average is printed), its peak
   RSS with the processes at that peak, and that of every Dagster process (webserver included).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)

from engine.timeutil import NS_PER_HOUR as H  # noqa: E402

BIN = Path(sys.executable).parent
MARKETS6 = [("coinbase", "BTC-USD"), ("coinbase", "ETH-USD"), ("coinbase", "SOL-USD"),
            ("kalshi", "KXBTC"), ("kalshi", "KXETH"), ("kalshi", "KXBTCD")]
MARKETS12 = MARKETS6 + [("coinbase", "ADA-USD"), ("coinbase", "DOGE-USD"), ("coinbase", "XRP-USD"),
                        ("kalshi", "KXINX"), ("kalshi", "KXNASDAQ100"), ("kalshi", "KXFED")]


def _rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _pss_mb(pids) -> float:
    """Proportional set size: shared pages (the libraries every Dagster process maps) counted once over
    the processes sharing them, so sums over processes are not inflated as RSS sums are."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total / 1024


def _cpu_s(pid: int) -> float:
    """CPU seconds of a process and of its children it has waited for (exited run workers included)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def _cmd(pid: int) -> str:
    """A short name for a process: the dagster command it runs (daemon, code server, run worker)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace").rsplit("/", 1)[-1] for a in args[:6] if a]
    return " ".join(w for w in words if not w.startswith("-"))[:60]


def _group_pids(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(f[2]) == pgid and f[0] != "Z":
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _gql(port, query, variables=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["data"]


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- 1. sensor over a big catalog log -----------------------------------------------------------------


def fake_log(path: Path, n_files: int) -> int:
    """A catalog log of `n_files` raw-file lines (12 markets × l2/trades × hourly files from the start date;
    100k files ≈ 174 days), with an upload mark after every file but the newest day's, like a live lake's log."""
    from engine.lake.catalog import FileEntry, Op, encode_ops
    from engine_defs.partitions import START_DATE

    path.parent.mkdir(parents=True, exist_ok=True)
    day0 = dt.date.fromisoformat(START_DATE)
    n = 0
    with open(path, "wb") as f:
        buf = []
        d = 0
        while n < n_files:
            date = (day0 + dt.timedelta(days=d)).isoformat()
            t0 = int(dt.datetime.combine(day0 + dt.timedelta(days=d), dt.time(), dt.timezone.utc).timestamp()) * 10**9
            for hour in range(24):
                for s, m in MARKETS12:
                    for table in ("l2", "trades"):
                        if n >= n_files:
                            break
                        lo = t0 + hour * H
                        e = FileEntry(key=f"data/{table}/source={s}/market={m}/date={date}/{hour + 1:04d}.parquet",
                                      table=table, source=s, market=m, date=date, rows=50_000, bytes=600_000,
                                      sha256="0" * 64, min_ts=lo, max_ts=lo + H - 1, min_recv_ts=lo,
                                      max_recv_ts=lo + H - 1, min_seq=0, max_seq=49_999, created_ns=lo + H)
                        buf.append(encode_ops(Op(op="add", at=lo + H, file=e)))
                        if d < n_files // (24 * 2 * len(MARKETS12)) - 1:  # all but the newest day are uploaded already
                            buf.append(encode_ops(Op(op="remote", at=lo + H + 1, key=e.key)))
                        n += 1
            d += 1
            if len(buf) > 20_000:
                f.write(b"".join(buf))
                buf = []
        f.write(b"".join(buf))
    return n


def _one_by_one_baseline(work: Path, ctx, log: Path) -> dict:
    """The same first tick's events stored the daemon's way (one `report_runless_asset_event` each),
    into a fresh instance of the same storage: the baseline of the batch."""
    import dagster as dg

    from engine_defs.instance import ensure_instance
    from engine_defs.sensors import evaluate

    with dg.instance_for_test() as tinst:  # Dagster's own storage: the sensor hands its events back
        r = evaluate(dg.build_sensor_context(instance=tinst), log)
    events = r.asset_events
    with dg.DagsterInstance.from_config(str(ensure_instance(work / "dagster_home_baseline"))) as inst:
        for req in r.dynamic_partitions_requests or []:
            inst.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        t = time.perf_counter()
        for e in events:
            inst.report_runless_asset_event(e)
        one = time.perf_counter() - t
    return {"events": len(events), "baseline_one_by_one_record_s": round(one, 3)}


def bench_sensor(work: Path, n_files: int) -> dict:
    import dagster as dg

    from engine_defs import lake
    from engine_defs.instance import ensure_instance
    from engine_defs.sensors import MAX_FILES_PER_TICK, evaluate

    home = work / "biglake"
    log = home / "catalog" / "log.jsonl"
    t = time.perf_counter()
    fake_log(log, n_files)
    out = {"files": n_files, "log_mb": round(log.stat().st_size / 2**20, 1), "write_log_s": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    lr = lake.read_log(log, 0, max_bytes=1 << 30)
    out["read_whole_log_s"] = round(time.perf_counter() - t, 3)
    out["log_lines"] = len(lr.ops)
    dh = ensure_instance(work / "dagster_home_sensor")
    os.environ["DAGSTER_HOME"] = str(dh)
    with dg.DagsterInstance.from_config(str(dh)) as inst:
        cursor = None
        ticks, first, total_eval, total_record, max_eval, runs_total, events_total = 0, None, 0.0, 0.0, 0.0, 0, 0
        while True:
            ctx = dg.build_sensor_context(instance=inst, cursor=cursor)
            t = time.perf_counter()
            r = evaluate(ctx, log)  # stores its events in one batch on the project's storage
            ev_s = time.perf_counter() - t
            if r.skip_reason:  # no new raw files: drained
                break
            stored = list(inst.fetch_materializations(dg.AssetKey("raw_l2"), limit=1).records) if ticks == 0 else None
            t = time.perf_counter()
            for req in r.dynamic_partitions_requests or []:
                inst.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            for e in r.asset_events:  # what the daemon would do with events the sensor did not store
                inst.report_runless_asset_event(e)
            rec_s = time.perf_counter() - t
            if first is None:
                first = {"events_stored_by_sensor": bool(stored) and not r.asset_events,
                         "run_requests": len(r.run_requests), "tick_s": round(ev_s + rec_s, 3)}
                first.update(_one_by_one_baseline(work, ctx, log))
            ticks += 1
            total_eval += ev_s
            total_record += rec_s
            runs_total += len(r.run_requests)
            max_eval = max(max_eval, ev_s)
            cursor = r.cursor
        out.update({"max_files_per_tick": MAX_FILES_PER_TICK, "first_tick": first, "ticks_measured": ticks,
                    "mean_tick_s": round((total_eval + total_record) / ticks, 3), "max_tick_eval_s": round(max_eval, 3),
                    "ticks_to_drain": ticks, "upload_runs_requested": runs_total,
                    "drain_total_s": round(total_eval + total_record, 1)})
        # an idle tick: cursor at the end of the log
        end = json.dumps({"offset": log.stat().st_size, "ino": log.stat().st_ino})
        t = time.perf_counter()
        r = evaluate(dg.build_sensor_context(instance=inst, cursor=end), log)
        out["idle_tick_s"] = round(time.perf_counter() - t, 4)
    from engine.api import Engine

    t = time.perf_counter()
    eng = Engine(home, None, background=False)
    out["engine_open_s"] = round(time.perf_counter() - t, 2)
    out["catalog_entries"] = len(eng.catalog.by_key)
    eng.close()
    return out


# ---- 2/3. processes and backfill ---------------------------------------------------------------------


def build_demo_lake(home: Path, days: int, markets, end_date: dt.date, hours_per_day: int = 4,
                    rows_per_hour: int = 2000) -> tuple[list[str], int]:
    """`days` closed days before `end_date` × markets: l2 + trades, `hours_per_day` hourly files each."""
    from engine import Engine
    from engine.sim import synth

    eng = Engine.open(home, background=False, writer=True)
    dates = [(end_date - dt.timedelta(days=days - i)).isoformat() for i in range(days)]
    for i, date in enumerate(dates):
        t0 = int(dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc).timestamp()) * 10**9
        for j, (s, m) in enumerate(markets):
            inst = None if s == "coinbase" else [f"{m}-{date.replace('-', '')[2:]}-B{k}" for k in range(3)]
            for h in range(hours_per_day):
                start = t0 + (6 * h) * H
                eng.append("l2", synth.l2_rows(s, m, start, rows_per_hour, H, seed=i * 100 + j * 10 + h,
                                               instruments=inst, seq_start=h * rows_per_hour))
                eng.append("trades", synth.trade_rows(s, m, start, rows_per_hour // 4, H, seed=i * 100 + j * 10 + h,
                                                      instruments=inst, id_start=(i * 24 + h) * rows_per_hour))
    eng.flush()
    n = len(eng.catalog.entries())
    eng.close()
    return dates, n


class Procs:
    def __init__(self, env, logs: Path):
        self.env, self.logs, self.procs = env, logs, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name, cmd):
        out = open(self.logs / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self.procs[name]

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def bench_processes_and_backfill(work: Path, days: int, n_markets: int, max_runs: int, backfill: bool,
                                 code_server: str = "shared") -> dict:
    import dagster as dg

    from engine_defs.daemon import daemon_cmd
    from engine_defs.instance import code_server_args, ensure_instance, ensure_workspace
    from engine_defs.partitions import market_key

    out = {}
    markets = MARKETS6[:n_markets]
    home = work / "demolake"
    today = dt.datetime.now(dt.timezone.utc).date()
    t = time.perf_counter()
    dates, nfiles = build_demo_lake(home, days, markets, today)
    out["demo_lake"] = {"days": days, "markets": len(markets), "files": nfiles,
                        "build_s": round(time.perf_counter() - t, 1)}
    dh = ensure_instance(work / "dagster_home", max_concurrent_runs=max_runs)
    with dg.DagsterInstance.from_config(str(dh)) as inst:  # markets registered up front; sensor left off
        inst.add_dynamic_partitions("markets", [market_key(s, m) for s, m in markets])
    env = dict(os.environ, ENGINE_HOME=str(home), DAGSTER_HOME=str(dh), ENGINE_DAGSTER_SENSOR="stopped",
               PYTHONUNBUFFERED="1", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env.pop("ENGINE_STORE", None)
    port = _free_port()
    procs = Procs(env, work / "logs")
    out["code_server"] = code_server
    try:
        t0 = time.perf_counter()
        ws, code = "workspace.yaml", None
        if code_server == "shared":  # as ./scripts/run (engine/run/supervisor.py)
            code_port = _free_port()
            ws = str(ensure_workspace(dh, code_port))
            code = procs.start("code_server", [str(BIN / "dagster"), *code_server_args(code_port)])
            deadline = time.monotonic() + 120
            while not _listening(code_port) and time.monotonic() < deadline and code.poll() is None:
                time.sleep(0.1)
            out["code_server_ready_s"] = round(time.perf_counter() - t0, 1)
        web = procs.start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", ws])
        daemon = procs.start("daemon", daemon_cmd(ws))  # as ./scripts/run: backfills picked up within 2 s
        groups = {"daemon": daemon, **({"code_server": code} if code else {}), "webserver": web}
        web_s = daemon_s = None
        deadline = time.monotonic() + 180
        while (web_s is None or daemon_s is None) and time.monotonic() < deadline:
            if web_s is None:
                try:
                    if _gql(port, "{ version }"):
                        web_s = time.perf_counter() - t0
                except OSError:
                    pass
            if daemon_s is None:
                with dg.DagsterInstance.from_config(str(dh)) as inst:
                    hb = inst.get_daemon_heartbeats()
                if hb and "SENSOR" in hb and "QUEUED_RUN_COORDINATOR" in hb:
                    daemon_s = time.perf_counter() - t0
            time.sleep(0.25)
        time.sleep(5)  # let the code servers finish loading
        out["webserver_ready_s"] = round(web_s, 1) if web_s else None
        out["daemon_heartbeat_s"] = round(daemon_s, 1) if daemon_s else None
        out["webserver_rss_mb"] = round(_rss_mb(_group_pids(web.pid)), 0)
        out["daemon_rss_mb"] = round(_rss_mb(_group_pids(daemon.pid)), 0)
        if code:
            out["code_server_rss_mb"] = round(_rss_mb(_group_pids(code.pid)), 0)
        out["processes"] = {f"{g}_group": len(_group_pids(p.pid)) for g, p in groups.items()}
        if not backfill:
            return out
        keys = [f"{d}|{market_key(s, m)}" for d in dates for s, m in markets]
        side_pids = [p.pid for g, p in groups.items() if g != "webserver"]
        cpu0 = sum(_cpu_s(pid) for pid in side_pids)
        load0 = os.getloadavg()[0]
        t1 = time.perf_counter()
        # an asset backfill, as the UI launches one (select the assets, pick the partitions): the daemon
        # groups the partitions into runs by the assets' BackfillPolicy
        m = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
        sel = [{"path": [f"compacted_{t}"]} for t in ("l2", "trades", "gaps")] + [{"path": ["catalog"]}]
        res = _gql(port, m, {"p": {"assetSelection": sel, "partitionNames": keys}})["launchPartitionBackfill"]
        if res["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"backfill not launched: {res}")
        submit_s = time.perf_counter() - t1
        q = ("""query { runsOrError(filter: {tags: [{key: "dagster/backfill", value: "%s"}]}) { ... on Runs {
               results { status } } } }""" % res["backfillId"])
        peak, rs, peak_parts = 0, [], []
        peak_groups = dict.fromkeys(groups, 0.0)
        peak_all = peak_side_pss = peak_all_pss = 0.0
        while True:  # until every partition's compaction is recorded and no run is queued or running
            rs = [r["status"] for r in _gql(port, q)["runsOrError"]["results"]]
            pids = {g: _group_pids(p.pid) for g, p in groups.items()}
            rss = {g: _rss_mb(ps) for g, ps in pids.items()}
            for g, v in rss.items():
                peak_groups[g] = max(peak_groups[g], v)
            peak_all = max(peak_all, sum(rss.values()))
            side = rss["daemon"] + rss.get("code_server", 0.0)  # the daemon's side: runs included
            pss = {g: _pss_mb(ps) for g, ps in pids.items()}
            peak_side_pss = max(peak_side_pss, pss["daemon"] + pss.get("code_server", 0.0))
            peak_all_pss = max(peak_all_pss, sum(pss.values()))
            if side > peak:
                peak, peak_parts = side, sorted((round(_rss_mb([p])), g, _cmd(p)) for g in ("daemon", "code_server")
                                                for p in pids.get(g, ()))
            busy = sum(1 for s in rs if s not in ("SUCCESS", "FAILURE", "CANCELED"))
            with dg.DagsterInstance.from_config(str(dh)) as inst:
                done = len(inst.get_materialized_partitions(dg.AssetKey("compacted_l2")))
            if (done >= len(keys) and not busy) or (rs and not busy and "FAILURE" in rs):
                break
            if time.perf_counter() - t1 > 3600:
                raise TimeoutError("backfill did not finish within an hour")
            time.sleep(1)
        wall = time.perf_counter() - t1
        time.sleep(2)  # the last run worker exits and is reaped: its CPU is its parent's then
        cpu = sum(_cpu_s(pid) for pid in side_pids) - cpu0
        out["backfill"] = {"partitions": len(keys), "partitions_compacted": done, "runs": len(rs),
                           "runs_ok": rs.count("SUCCESS"), "runs_failed": rs.count("FAILURE"),
                           "cli_submit_s": round(submit_s, 1), "wall_s": round(wall, 1),
                           "s_per_partition": round(wall / len(keys), 2), "max_concurrent_runs": max_runs,
                           "daemon_side_cpu_s": round(cpu, 1), "load_avg_1m_before": round(load0, 2),
                           "load_avg_1m_after": round(os.getloadavg()[0], 2),
                           "daemon_side_peak_rss_mb": round(peak),
                           **{f"{g}_group_peak_rss_mb": round(v) for g, v in peak_groups.items()},
                           "all_dagster_peak_rss_mb": round(peak_all), "daemon_side_peak_pss_mb": round(peak_side_pss),
                           "all_dagster_peak_pss_mb": round(peak_all_pss), "at_peak": peak_parts}
        return out
    finally:
        procs.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench_dagster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="files in the sensor benchmark's catalog log")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--markets", type=int, default=6)
    ap.add_argument("--max-runs", type=int, default=2, help="run queue concurrency for the backfill")
    ap.add_argument("--only", choices=["sensor", "processes", "backfill"], default=None)
    ap.add_argument("--code-server", choices=["shared", "managed"], default="shared",
                    help="shared: one `dagster api grpc` for webserver and daemon, as ./scripts/run; managed: each "
                         "starts its own from workspace.yaml (the daemon a new one every 60 s)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_dagster_", dir=os.environ.get("BENCH_DIR") or None))
    print(f"work dir: {work}", flush=True)
    results = {}
    try:
        if a.only in (None, "sensor"):
            results["sensor"] = bench_sensor(work, a.files)
            print(json.dumps({"sensor": results["sensor"]}, indent=1), flush=True)
        if a.only in (None, "processes", "backfill"):
            results["dagster"] = bench_processes_and_backfill(work, a.days, a.markets, a.max_runs,
                                                              backfill=a.only != "processes",
                                                              code_server=a.code_server)
            print(json.dumps({"dagster": results["dagster"]}, indent=1), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
