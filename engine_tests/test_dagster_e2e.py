"""End to end: the code server, dagster-webserver and dagster-daemon as real processes started as
`./scripts/run` starts them (own process groups, a temp DAGSTER_HOME, free ports on 127.0.0.1; the
webserver and the daemon share the one code server) over a lake that a writer appends to. The
catalog sensor sees the files and its upload runs succeed, as reported by the webserver's GraphQL
API; a compaction backfill launched with the `dagster` CLI (from the repo's workspace.yaml) succeeds
too. Every process is gone afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine import Engine
from engine.sim import synth
from engine.timeutil import to_ns
from engine_tests.conftest import free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
H = 3600 * 10**9
D1 = "2026-03-02"
T1 = to_ns(D1)


def gql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())
    assert "errors" not in out, out
    return out["data"]


RUNS = """query Runs($job: String!) { runsOrError(filter: {pipelineName: $job}) {
  ... on Runs { results { runId status tags { key value } } } } }"""
MATS = """query M($key: AssetKeyInput!) { assetOrError(assetKey: $key) {
  ... on Asset { assetMaterializations(limit: 100) { partition metadataEntries { label
    ... on IntMetadataEntry { intValue } } } } } }"""
CHECK_RUNS = """query C($key: AssetKeyInput!, $name: String!) { assetCheckExecutions(assetKey: $key,
  checkName: $name, limit: 20) { status partition evaluation { severity } } }"""


def runs(port, job):
    res = gql(port, RUNS, {"job": job})["runsOrError"]["results"]
    return [{"id": r["runId"], "status": r["status"], "tags": {t["key"]: t["value"] for t in r["tags"]}} for r in res]


def wait_for(pred, timeout, what, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs:
            assert p.poll() is None, f"{name} exited with {p.returncode}"
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def group_members(pgids: set[int], marker: str) -> list[int]:
    """Live processes in our process groups or carrying our DAGSTER_HOME in their environment."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            if int(fields[2]) in pgids or marker.encode() in (d / "environ").read_bytes():
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def stop_group(p: subprocess.Popen, timeout: float = 15) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # grandchildren (code server, run workers) too
    except ProcessLookupError:
        pass
    p.wait(timeout=10)


def grpc_preflight() -> None:
    """Dagster's daemon and webserver serve the code location over gRPC: fail clearly if the venv
    cannot import it (e.g. a package that pulled protobuf below what grpcio-health-checking needs)."""
    r = subprocess.run([sys.executable, "-c", "import dagster._grpc.server"], capture_output=True, text=True)
    if r.returncode != 0:
        import google.protobuf

        pytest.fail(f"this venv cannot start Dagster's gRPC code server (protobuf {google.protobuf.__version__}): "
                    f"{r.stderr.strip().splitlines()[-1]}; reinstall the pinned set: "
                    "pip install -r requirements.lock", pytrace=False)


def grpc_servers_in(pgid: int) -> list[str]:
    """Code servers (`dagster api grpc`) in a process group."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                if b"grpc" in cmd:
                    out.append(b" ".join(cmd).decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_webserver_daemon_sensor_uploads_and_backfill(tmp_path):
    from engine_defs.daemon import daemon_cmd
    from engine_defs.instance import code_server_args, ensure_instance, ensure_workspace

    grpc_preflight()
    t0 = time.monotonic()
    home = tmp_path / "lake"
    dh = ensure_instance(tmp_path / "dagster_home", max_concurrent_runs=2)
    env = dict(os.environ, ENGINE_HOME=str(home), DAGSTER_HOME=str(dh), ENGINE_DAGSTER_SENSOR_INTERVAL="2",
               PYTHONUNBUFFERED="1", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env.pop("ENGINE_STORE", None)
    eng = Engine.open(home, background=False, writer=True)  # the writer (a collector in production)
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", T1 + 9 * H, 2000, 2 * H, seed=1))
    eng.append("trades", synth.trade_rows("kalshi", "KXBTC", T1 + 12 * H, 300, H, seed=2))
    eng.flush()

    port, code_port = free_port(), free_port()
    ws = str(ensure_workspace(dh, code_port))
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    try:
        for name, cmd in (
            ("code_server", [str(BIN / "dagster"), *code_server_args(code_port)]),
            ("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", ws]),
            ("daemon", daemon_cmd(ws)),  # as ./scripts/run starts it
        ):
            out = open(logs / f"{name}.log", "wb")
            procs.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)))
            if name == "code_server":
                wait_port(code_port, timeout=60)
        wait_port(port, timeout=60)
        wait_for(lambda: gql(port, "{ version }"), 60, "the webserver's GraphQL API", procs)
        t_up = time.monotonic() - t0

        def upload_runs_done():
            rs = runs(port, "upload_job")
            failed = [r for r in rs if r["status"] in ("FAILURE", "CANCELED")]
            assert not failed, (failed, (logs / "daemon.log").read_text()[-3000:])
            ok = {r["tags"].get("dagster/partition") for r in rs if r["status"] == "SUCCESS"}
            return ok if ok >= {f"{D1}|coinbase:BTC-USD", f"{D1}|kalshi:KXBTC"} else None

        wait_for(upload_runs_done, 180, "the sensor's upload runs to succeed", procs)
        t_sensor = time.monotonic() - t0
        eng.catalog.refresh()
        assert all(e.remote for e in eng.catalog.entries())

        # a file written while everything runs: one more upload run, for exactly that partition
        eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", T1 + 10 * H, 100, H // 2, seed=3))
        eng.flush()
        wait_for(lambda: len([r for r in runs(port, "upload_job") if r["status"] == "SUCCESS"]) == 3, 60,
                 "the upload run for the new file", procs)
        parts = sorted(r["tags"]["dagster/partition"] for r in runs(port, "upload_job"))
        assert parts == [f"{D1}|coinbase:BTC-USD", f"{D1}|coinbase:BTC-USD", f"{D1}|kalshi:KXBTC"]

        raw = gql(port, MATS, {"key": {"path": ["raw_l2"]}})["assetOrError"]["assetMaterializations"]
        assert len(raw) == 2 and {m["partition"] for m in raw} == {f"{D1}|coinbase:BTC-USD"}
        rows = [e["intValue"] for m in raw for e in m["metadataEntries"] if e["label"] == "dagster/row_count"]
        assert sum(rows) == 2000
        # the gap and coverage checks ran in the sensor's runs, per partition (the demo data covers 2 hours)
        cov = gql(port, CHECK_RUNS, {"key": {"path": ["uploaded_l2"]}, "name": "coverage"})["assetCheckExecutions"]
        assert cov and {c["partition"] for c in cov} == {f"{D1}|coinbase:BTC-USD"}
        assert cov[0]["status"] == "FAILED" and cov[0]["evaluation"]["severity"] == "WARN"
        gaps = gql(port, CHECK_RUNS, {"key": {"path": ["uploaded_trades"]}, "name": "recorded_gaps"})
        assert {c["status"] for c in gaps["assetCheckExecutions"]} == {"SUCCEEDED"}  # no gaps recorded

        # a compaction backfill over date × market from the CLI, executed by the daemon
        keys = f"{D1}|coinbase:BTC-USD,{D1}|kalshi:KXBTC"
        cli = subprocess.run([str(BIN / "dagster"), "job", "backfill", "-w", "workspace.yaml", "-j", "compact_job",
                              "--partitions", keys, "--noprompt"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        assert cli.returncode == 0, cli.stdout + cli.stderr

        def compacted():
            rs = runs(port, "compact_job")
            assert not [r for r in rs if r["status"] in ("FAILURE", "CANCELED")], rs
            return len([r for r in rs if r["status"] == "SUCCESS"]) == 2

        wait_for(compacted, 180, "the compaction backfill", procs)
        for name, p in procs[1:]:  # the webserver and the daemon used the shared code server, none of their own
            assert grpc_servers_in(p.pid) == [], (name, grpc_servers_in(p.pid))
        eng.catalog.refresh()
        raw_tables = ("l2", "trades", "gaps")  # compaction may also derive `quotes` from l2
        assert {(e.table, e.market) for e in eng.catalog.entries() if e.compacted and e.table in raw_tables} == {
            ("l2", "BTC-USD"), ("trades", "BTC-USD"), ("trades", "KXBTC")}
        assert all(e.compacted for e in eng.catalog.entries() if e.table in raw_tables)
        print(f"\nwebserver up {t_up:.1f}s; sensor upload runs done {t_sensor:.1f}s; all done "
              f"{time.monotonic() - t0:.1f}s")
    finally:
        for _, p in reversed(procs):
            stop_group(p)
        eng.close()
    pgids = {p.pid for _, p in procs}
    deadline = time.monotonic() + 10
    while group_members(pgids, str(dh)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(pgids, str(dh)) == [], "processes left behind"
