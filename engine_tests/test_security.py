"""Security: credentials never leak; sql() cannot write, attach or reach the network; local
servers bind to 127.0.0.1 by default. (Basic COPY / ATTACH / read_csv / INSTALL / http cases are
in test_storage.py; these extend them.)"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import Engine
from engine.sim import synth
from engine.timeutil import to_ns

ROOT = Path(__file__).resolve().parents[1]
START = to_ns("2026-11-03")
AWS_KEY_ID = "AKIALEAKCANARY7Q3ZX9"
AWS_SECRET = "leakCanarySecret/9f3Kq+Zt7Wx2Yb8Vn4Mp1Lr6Hd0Gs5Ej"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KALSHI_", "AWS_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _grep_tree(root: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            if p.suffix == ".zst" or p.name.endswith(".zst"):
                import zstandard

                try:
                    data += zstandard.ZstdDecompressor().decompressobj().decompress(data)
                except zstandard.ZstdError:
                    pass
            for name, n in needles.items():
                if n in data:
                    hits.append(f"{name} in {p}")
    return hits


def test_credentials_never_leak(tmp_path, moto_server):
    """Distinctive fake AWS keys and a Kalshi private key go through uploads (good and failing),
    a collector run with capture, and error paths; none of them appears in any log, capture,
    Parquet file (data or metadata), catalog, status file, manifest or exception message."""
    from engine.collect.kalshi.auth import generate_keypair
    from engine.sim.capture_gen import generate_kalshi, write_capture
    from engine.sim.replay import ReplayServer

    import boto3

    priv, pub = generate_keypair(tmp_path / "keys", bits=2048)
    pem_lines = [ln for ln in priv.read_text().splitlines() if ln and not ln.startswith("-----")]
    needles = {"aws_key_id": AWS_KEY_ID.encode(), "aws_secret": AWS_SECRET.encode(),
               "kalshi_private_key": pem_lines[3].encode(), "kalshi_private_key_end": pem_lines[-2].encode()}
    aws = {"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": moto_server.endpoint}
    boto3.client("s3", endpoint_url=moto_server.endpoint, aws_access_key_id=AWS_KEY_ID,
                 aws_secret_access_key=AWS_SECRET, region_name="us-east-1").create_bucket(Bucket="leak")
    home = tmp_path / "home"
    outputs: list[str] = []
    # 1. a Kalshi collector run with auth and raw capture
    capf = tmp_path / "kalshi.jsonl"
    write_capture(generate_kalshi(series=["KXBTC"], seconds=60, rate=40, seed=5, contract_minutes=2, strikes=2,
                                  use_yes_price=False), capf)
    env = _env(KALSHI_API_KEY_ID="kalshi-key-id-public", KALSHI_PRIVATE_KEY_PATH=str(priv), **aws)
    with ReplayServer.run_in_thread(source="kalshi", capture=str(capf), speed=20.0, kalshi_public_key=str(pub)) as srv:
        p = subprocess.run([sys.executable, "-m", "engine.cli", "collect", "--home", str(home), "--source", "kalshi",
                            "--series", "KXBTC", "--kalshi-url", srv.ws_url, "--kalshi-rest-url", srv.rest_url,
                            "--capture-dir", str(home / "capture"), "--capture-plain", "--for", "3",
                            "--status-interval", "0.5"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert p.returncode == 0, p.stderr[-2000:]
        assert srv.stats()["auth_rejected"] == 0
        outputs += [p.stdout, p.stderr]
    assert list((home / "capture").glob("kalshi-*")), "no capture written"
    # 2. upload, compaction, manifest through the S3 store with the fake keys (CLI: logs on stderr)
    eng = Engine.open(home, background=False, writer=True)
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", START, 1000, 3600 * 10**9))
    eng.flush()
    eng.close()
    for args in (["upload"], ["compact"], ["catalog", "publish"], ["catalog", "verify"]):
        p = subprocess.run([sys.executable, "-m", "engine.cli", *args, "--home", str(home), "--store", "s3://leak/lake"],
                           capture_output=True, text=True, env=_env(**aws), cwd=ROOT, timeout=120)
        outputs += [p.stdout, p.stderr]
        assert p.returncode == 0, (args, p.stderr[-2000:])
    # 3. error paths: wrong bucket, unreachable endpoint, refused credentials -> exception texts
    from engine.lake.store import S3Store, StoreError

    errors = []
    old = dict(os.environ)
    try:
        os.environ.update(aws)
        for bucket, endpoint in (("nope", moto_server.endpoint), ("leak", "http://127.0.0.1:9")):
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            st = S3Store(bucket, "x", attempts=1, connect_timeout_s=0.5, read_timeout_s=0.5)
            for fn in (lambda: st.put_bytes("k", b"x"), lambda: st.get_bytes("k"), lambda: st.list_keys("data/")):
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e) + str(e) + "".join(map(str, e.args)))
        p = subprocess.run([sys.executable, "-m", "engine.cli", "upload", "--home", str(tmp_path / "h2"), "--store",
                            "s3://leak/lake"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env=_env(**dict(aws, AWS_ENDPOINT_URL="http://127.0.0.1:9")))
        outputs += [p.stdout, p.stderr]
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert len(errors) >= 5 and any(isinstance(x, str) and "nope" in x for x in errors)
    # grep everything written and said
    hits = _grep_tree(tmp_path / "home", needles) + _grep_tree(tmp_path / "h2", needles) if (tmp_path / "h2").exists() \
        else _grep_tree(tmp_path / "home", needles)
    for name, n in needles.items():
        for i, text in enumerate(outputs + errors):
            if n.decode() in text:
                hits.append(f"{name} in output/exception #{i}")
    assert hits == [], hits
    # and the Parquet key-value metadata explicitly
    import pyarrow.parquet as pq

    files = list(home.rglob("*.parquet"))
    assert files
    for f in files:
        md = pq.ParquetFile(f).schema_arrow.metadata or {}
        blob = b"".join(k + v for k, v in md.items())
        assert not any(n in blob for n in needles.values()), f


class _Listener:
    """A TCP listener on 127.0.0.1 that records every connection attempt."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                self.connections += 1
                c.close()
            except OSError:
                continue

    def close(self):
        self._stop = True
        self.t.join(2)
        self.sock.close()


def test_sql_cannot_write_attach_or_reach_network(tmp_path):
    from engine.research.query import QueryError

    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", START, 100, 3600 * 10**9))
    eng.flush()
    outside = tmp_path / "outside.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2, 3]}), outside)
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    lst = _Listener()
    url = f"http://127.0.0.1:{lst.port}/x"
    bad = [
        "SELECT 1; COPY trades TO '{d}/x.csv'",                     # a second statement smuggled in
        "COPY (SELECT * FROM trades) TO '{d}/x.parquet' (FORMAT parquet)",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO trades SELECT * FROM trades",
        "ATTACH '{d}/x.duckdb' AS x",
        "ATTACH ':memory:' AS m",
        "SET enable_external_access = true",
        "SET allowed_paths = ['/']",
        "LOAD httpfs",
        "PRAGMA enable_profiling",
        "SELECT * FROM read_parquet('{o}')",                         # a Parquet file outside the lake
        "SELECT * FROM read_text('{s}')",
        "SELECT * FROM read_blob('{s}')",
        "SELECT * FROM glob('{d}/*')",
        "SELECT * FROM read_csv('" + url + "')",
        "SELECT * FROM read_parquet('" + url + ".parquet')",
        "SELECT * FROM read_json('" + url + ".json')",
        "SELECT * FROM trades WHERE price > (SELECT count(*) FROM read_csv_auto('{s}'))",
    ]
    try:
        for q in bad:
            q = q.format(d=tmp_path, o=outside, s=secret)
            with pytest.raises(QueryError):
                eng.sql(q)
        assert lst.connections == 0, "sql() opened a network connection"
    finally:
        lst.close()
    assert not list(tmp_path.glob("x.*")), "sql() wrote a file"
    assert eng.sql("SELECT count(*) AS n FROM trades")["n"][0] == 100  # the lake itself still answers
    eng.close()


def test_local_servers_bind_loopback_by_default(tmp_path):
    from engine.sim.capture_gen import generate_coinbase
    from engine.sim.replay import ReplayServer
    from engine.sim.replay import cli as replay_cli

    assert inspect.signature(ReplayServer.__init__).parameters["host"].default == "127.0.0.1"
    src = inspect.getsource(replay_cli)
    assert '"--host", default="127.0.0.1"' in src
    with ReplayServer.run_in_thread(source="coinbase", capture=list(generate_coinbase(seconds=1, rate=10)),
                                    speed=0) as srv:
        addrs = {s.getsockname()[0] for s in srv._server.sockets}
        assert addrs == {"127.0.0.1"}, addrs
        assert srv.ws_url.startswith("ws://127.0.0.1:")
    # the replay exchange CLI, started with defaults, listens on loopback only
    from engine_tests.conftest import free_port, wait_port

    cap = tmp_path / "c.jsonl"
    from engine.sim.capture_gen import write_capture

    write_capture(generate_coinbase(seconds=1, rate=10), cap)
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "engine.cli", "replay-exchange", "--source", "coinbase", "--capture",
                          str(cap), "--port", str(port)], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
        mine = [ln.split()[1] for ln in listening if ln.split()[3] == "0A" and ln.split()[1].endswith(f":{port:04X}")]
        assert mine == [f"0100007F:{port:04X}"], mine  # 127.0.0.1 only, no 0.0.0.0 / ::
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
