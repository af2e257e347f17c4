"""The bucket is the database: a second home (an empty directory, the same bucket on moto's S3
server on 127.0.0.1) reads complete, fresh and bounded results with no LIST of the data (one LIST
of the manifest objects)."""

from __future__ import annotations

import http.server
import threading
import time
import warnings
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from engine import Engine
from engine.api import SyncBoundaryWarning
from engine.lake.manifest import ManifestError
from engine.lake.store import MULTIPART_THRESHOLD, CacheTooSmallError, S3Store, StoreError
from engine.paths import MANIFEST_KEY
from engine.sim import synth
from engine.timeutil import to_ns
from engine_tests.faultproxy import FaultProxy

H = 3600 * 10**9
T0 = to_ns("2026-10-05T00:00:00Z")


def _writer(tmp_path: Path, store: str, name: str = "vps") -> Engine:
    return Engine.open(tmp_path / name, store, background=False, writer=True)


def _hour(eng: Engine, h: int, rows: int = 100, market: str = "BTC-USD", seed: int = 0) -> None:
    eng.append("trades", synth.trade_rows("coinbase", market, T0 + h * H, rows, H - 10**9, seed=seed + h,
                                          id_start=(seed + h) * 10**6))
    eng.flush()


def _requests(store: S3Store) -> list[tuple[str, str]]:
    """Every HTTP request the store's boto3 client sends from now on: (method, url)."""
    seen: list[tuple[str, str]] = []
    store.client.meta.events.register("before-send.s3.*", lambda request, **_: seen.append((request.method, request.url)))
    return seen


def test_upload_publishes_and_a_fresh_home_sees_exactly_the_uploaded_rows(tmp_path, s3_env):
    w = _writer(tmp_path, s3_env)
    for h in range(3):
        _hour(w, h)
    w.upload()  # no explicit publish
    r = Engine.open(tmp_path / "laptop", s3_env)
    assert r.remote_reader
    got = r.trades(allow_unsealed=True)
    assert got.height == 300
    assert got.sort("trade_id").equals(w.trades(allow_unsealed=True).sort("trade_id"))


def test_partial_upload_clamps_to_the_remote_watermark_and_warns(tmp_path, s3_env):
    w = _writer(tmp_path, s3_env)
    for h in range(2):
        _hour(w, h)
    w.upload()
    _hour(w, 2)  # written on the VPS, not uploaded yet
    w.publish_manifest()
    r = Engine.open(tmp_path / "laptop", s3_env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = r.trades(start=T0, end=T0 + 4 * H)
        again = r.trades(start=T0, end=T0 + 4 * H)
    assert got.height == again.height == 200 and got["recv_ts"].dt.epoch("ns").max() < T0 + 2 * H
    msgs = [str(c.message) for c in caught if issubclass(c.category, SyncBoundaryWarning)]
    assert len(msgs) == 1 and "coinbase" in msgs[0] and "complete up to" in msgs[0], msgs
    # the writer's own home is not clamped by what it has not uploaded
    assert w.trades(start=T0, end=T0 + 4 * H).height == 300
    # allow_unsealed reads what the bucket has (the third hour is not there)
    assert r.trades(allow_unsealed=True).height == 200


def test_reader_sees_new_uploads_after_refresh_and_refresh_s(tmp_path, s3_env):
    w = _writer(tmp_path, s3_env)
    _hour(w, 0)
    w.upload()
    r = Engine.open(tmp_path / "laptop", s3_env, refresh_s=3600)
    assert r.trades(allow_unsealed=True).height == 100
    _hour(w, 1)
    w.upload()
    assert r.trades(allow_unsealed=True).height == 100  # within refresh_s: the cached view
    assert r.refresh() is True
    assert r.trades(allow_unsealed=True).height == 200
    # an unchanged manifest: one request, a LIST of catalog/manifest* (which carries the ETags), no download
    seen = _requests(r.store)
    assert r.refresh() is False
    assert len(seen) == 1 and seen[0][0] == "GET" and "list-type=2" in seen[0][1] and "manifest" in seen[0][1], seen
    # refresh_s: a reader refreshes by itself when its last check is older (0: before every query)
    r2 = Engine.open(tmp_path / "notebook", s3_env, refresh_s=0)
    _hour(w, 2)
    w.upload()
    assert r2.trades(allow_unsealed=True).height == 300
    _hour(w, 3)
    w.upload()
    assert r2.trades(allow_unsealed=True).height == 400
    # reopening a home whose cached manifest is current costs one request
    n0 = Engine.open(tmp_path / "laptop", s3_env)
    assert n0.trades(allow_unsealed=True).height == 400


def test_no_manifest_garbage_manifest_and_bare_404_are_errors(tmp_path, s3_env, moto_server, monkeypatch):
    with pytest.raises(ManifestError, match="no catalog manifest at s3://.*data-engine upload"):
        Engine.open(tmp_path / "a", s3_env)
    w = _writer(tmp_path, s3_env)
    w.store.put_bytes(MANIFEST_KEY, b"<html><body>Service Unavailable</body></html>")
    with pytest.raises(ManifestError, match="unreadable.*<html"):
        Engine.open(tmp_path / "b", s3_env)

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b"<html>404 Not Found</html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.server_address[1]}")
        with pytest.raises(StoreError, match="HTTP 404 without an S3 error code"):
            Engine.open(tmp_path / "c", "s3://anything/lake")
    finally:
        srv.shutdown()


def test_query_larger_than_the_cache_is_lazy_or_refused_clearly(tmp_path, s3_env):
    w = _writer(tmp_path, s3_env)
    for h in range(6):
        _hour(w, h, rows=3000)
    w.upload()
    total = sum(e.bytes for e in w.catalog.entries())
    want = w.trades(allow_unsealed=True)
    r = Engine.open(tmp_path / "laptop", s3_env, cache_bytes=total // 3)
    with pytest.raises(CacheTooSmallError, match="cache_bytes=.*scan"):
        r.trades(allow_unsealed=True)
    with pytest.raises(CacheTooSmallError):
        r.sql("SELECT count(*) FROM trades", allow_unsealed=True)
    lazy = r.scan_trades(allow_unsealed=True)
    agg = lazy.group_by("side").agg(pl.len(), pl.col("size").sum()).sort("side").collect()
    assert_frame_equal(agg, want.group_by("side").agg(pl.len(), pl.col("size").sum()).sort("side"), rel_tol=1e-9)
    cached = sum(p.stat().st_size for p in (tmp_path / "laptop" / "cache").rglob("*.parquet"))
    assert cached <= total // 3
    assert r.scan_trades(allow_unsealed=True).collect().sort("trade_id").equals(want.sort("trade_id"))


def test_sql_reads_only_the_tables_it_names(tmp_path, s3_env):
    w = _writer(tmp_path, s3_env)
    _hour(w, 0)
    w.append("l2", synth.l2_rows("coinbase", "BTC-USD", T0, 500, H - 10**9, seed=1))
    w.flush()
    w.upload()
    l2_key = next(e.key for e in w.catalog.entries() if e.table == "l2")
    w.store.delete(l2_key)  # gone from the bucket: only l2 queries may notice
    r = Engine.open(tmp_path / "laptop", s3_env)
    seen = _requests(r.store)
    got = r.sql("SELECT count(*) AS n FROM trades", allow_unsealed=True)
    assert got["n"][0] == 100
    assert not [u for _, u in seen if "/l2/" in u], seen
    assert r.sql("SELECT 1 AS one")["one"][0] == 1


def test_unresponsive_endpoint_fails_within_a_minute(tmp_path, moto_server, monkeypatch):
    moto_server.make_bucket("hang")
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    w = Engine.open(tmp_path / "vps", "s3://hang/lake", background=False, writer=True)
    _hour(w, 0)
    with FaultProxy(moto_server.port) as px:
        monkeypatch.setenv("AWS_ENDPOINT_URL", px.endpoint)
        monkeypatch.setenv("ENGINE_STORE_READ_TIMEOUT_S", "4")
        px.set_mode("hang")
        w2 = Engine.open(tmp_path / "vps", "s3://hang/lake", background=False, writer=True)
        t0 = time.monotonic()
        res = w2.upload()
        took = time.monotonic() - t0
    assert res["uploaded"] == 0 and res["failed"] == 1 and "did not answer" in res["errors"][0], res
    assert all(w2.layout.staged(e.key).exists() for e in w2.catalog.entries())  # nothing local lost
    assert took < 60, took  # bounded: botocore's attempts x the read timeout, no second retry layer


def test_large_object_goes_up_in_parts_and_verifies(tmp_path, s3_env):
    import os

    w = _writer(tmp_path, s3_env)
    p = tmp_path / "big.bin"
    p.write_bytes(os.urandom(MULTIPART_THRESHOLD + (3 << 20)))
    from engine.fsio import sha256_file

    sha = sha256_file(p)
    seen = _requests(w.store)
    w.store.put_file("data/big.bin", p, sha)
    assert sum(1 for m, u in seen if m == "PUT" and "partNumber=" in u) == 5
    out = tmp_path / "back.bin"
    w.store.get_file("data/big.bin", out)
    assert sha256_file(out) == sha


@pytest.mark.slow
def test_unresponsive_endpoint_with_default_timeouts_fails_within_a_minute(tmp_path, moto_server, monkeypatch):
    """The shipped defaults (5 s connect, 15 s read, 3 botocore attempts), not a test's short ones."""
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ENGINE_STORE_READ_TIMEOUT_S", raising=False)
    with FaultProxy(moto_server.port) as px:
        monkeypatch.setenv("AWS_ENDPOINT_URL", px.endpoint)
        px.set_mode("hang")
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="did not answer"):
            Engine.open(tmp_path / "laptop", "s3://hang/lake")
        took = time.monotonic() - t0
    assert took < 60, took
