"""Small hardening fixes: pre-epoch times, redaction of secrets, verify --repair."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.timeutil import iso, to_ns


def test_pre_epoch_fractional_times():
    assert to_ns("1969-12-31T23:59:59.5Z") == -500_000_000
    assert to_ns(dt.datetime(1969, 12, 31, 23, 59, 59, 250_000, tzinfo=dt.timezone.utc)) == -750_000_000
    assert to_ns("1969-12-31T23:59:59Z") == -1_000_000_000
    assert to_ns("1970-01-01T00:00:00.000001Z") == 1_000
    assert to_ns("1960-06-15T12:00:00.123456+02:00") == to_ns("1960-06-15T10:00:00.123456Z")
    assert to_ns("2026-11-25T01:02:03.456789Z") == 1795568523_456789_000
    assert iso(to_ns("1969-12-31T23:59:59.5Z")) == "1969-12-31T23:59:59.500000Z"


# ---- secrets and messages ---------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KALSHI_", "AWS_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _events(stderr: str) -> list[dict]:
    return [json.loads(ln) for ln in stderr.splitlines() if ln.startswith("{")]


def test_redact_masks_url_credentials():
    from engine.log import redact

    assert redact('EndpointConnectionError: "http://alice:pw%40x@127.0.0.1:9/b/k"') == \
        'EndpointConnectionError: "http://***@127.0.0.1:9/b/k"'
    assert redact("https://token@host.example/x and s3://bucket/prefix") == "https://***@host.example/x and s3://bucket/prefix"
    assert redact("http://127.0.0.1:9000/b/k?x=1") == "http://127.0.0.1:9000/b/k?x=1"
    assert redact("user@example.com wrote") == "user@example.com wrote"


def test_endpoint_credentials_stay_out_of_logs_and_errors():
    from engine_tests.conftest import free_port

    port = free_port()  # nothing listens: every call fails after botocore's retries (StoreUnavailableError)
    code = (
        "import json\n"
        "from engine.lake.store import S3Store, StoreError\n"
        "st = S3Store('bkt', 'p', attempts=2, connect_timeout_s=0.5, read_timeout_s=0.5)\n"
        "msgs = []\n"
        "for fn in (lambda: st.put_bytes('k', b'x'), lambda: st.head('k'), lambda: st.get_bytes('k')):\n"
        "    try:\n"
        "        fn()\n"
        "    except StoreError as e:\n"
        "        msgs.append(str(e))\n"
        "print(json.dumps(msgs))\n"
    )
    env = _env(AWS_ACCESS_KEY_ID="AKIATESTKEYID", AWS_SECRET_ACCESS_KEY="not-the-url-secret", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://alice:Url5ecretPw@127.0.0.1:{port}")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    msgs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(msgs) == 3
    for text in msgs + [r.stderr]:
        assert "Url5ecretPw" not in text and "alice" not in text, text
    assert all(f"***@127.0.0.1:{port}" in m and "did not answer" in m for m in msgs), msgs  # still says where


def test_engine_resource_repr_hides_plain_secrets():
    import dagster as dg

    from engine_defs.resources import EngineResource

    r = EngineResource(home="/tmp/lake", store="s3://bucket/lake", aws_access_key_id="AKIAPLAINKEYID",
                       aws_secret_access_key="plainSecretValue", aws_endpoint_url="http://alice:EndpointPw@h:9000")
    for text in (repr(r), str(r)):
        for secret in ("AKIAPLAINKEYID", "plainSecretValue", "EndpointPw", "alice"):
            assert secret not in text, text
        assert "s3://bucket/lake" in text and "h:9000" in text  # the rest still shows
    # the resource still hands the real values to the store client
    assert r._credentials()["AWS_SECRET_ACCESS_KEY"] == "plainSecretValue"
    env = EngineResource(home="/tmp/lake", aws_secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY"))
    assert "AWS_SECRET_ACCESS_KEY" in repr(env)  # an EnvVar shows its name, which is not a secret


@pytest.mark.timeout(120)
def test_bad_kalshi_key_logged_once_with_its_cause(tmp_path):
    from engine.sim.capture_gen import generate_kalshi, write_capture
    from engine.sim.replay import ReplayServer

    bad = tmp_path / "kalshi-private.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key at all\n-----END PRIVATE KEY-----\n")
    capf = tmp_path / "kalshi.jsonl"
    write_capture(generate_kalshi(series=["KXBTC"], seconds=30, rate=5, seed=5, contract_minutes=2, strikes=2,
                                  use_yes_price=False), capf)
    env = _env(KALSHI_API_KEY_ID="kalshi-key-id", KALSHI_PRIVATE_KEY_PATH=str(bad))
    with ReplayServer.run_in_thread(source="kalshi", capture=str(capf), speed=1.0) as srv:
        p = subprocess.run([sys.executable, "-m", "engine.cli", "collect", "--home", str(tmp_path / "home"),
                            "--source", "kalshi", "--series", "KXBTC", "--kalshi-url", srv.ws_url,
                            "--kalshi-rest-url", srv.rest_url, "--for", "4", "--backoff-base", "0.05",
                            "--backoff-max", "1.5", "--status-interval", "60"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=90)
    assert p.returncode == 0, p.stderr[-2000:]
    ev = _events(p.stderr)
    key_errors = [e for e in ev if (e.get("level") == "error" and e.get("component") == "collector")
                  or e.get("event") in ("auth_headers_failed", "kalshi_key_unusable")]
    assert len(key_errors) == 1, key_errors  # once, not on every reconnect
    (e,) = key_errors
    assert e["key_path"] == str(bad) and "PEM" in e["problem"], e
    assert '"error": "ValueError"' not in p.stderr
    # backed off: with a 1.5 s cap, four seconds hold only a few quiet attempts (not one every 50 ms)
    retries = [x for x in ev if x.get("event") == "reconnecting"]
    assert len(retries) <= 1, retries


# ---- verify --repair ------------------------------------------------------------------------
def test_verify_repair_reuploads_an_object_deleted_behind_the_engines_back(tmp_path, s3_env, capsys):
    import boto3

    from engine import Engine
    from engine.cli import main
    from engine.sim import synth

    home = tmp_path / "h"
    eng = Engine.open(home, s3_env, background=False, writer=True)
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-03T05:00:00Z"), 500, 3600 * 10**9))
    eng.flush()
    assert eng.upload()["uploaded"] == 1
    (e,) = eng.catalog.entries()
    assert eng.verify() == []
    bucket, _, prefix = s3_env[5:].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{e.key}")  # behind the engine's back; the local copy stays
    assert eng.layout.staged(e.key).exists()
    assert eng.upload()["uploaded"] == 0  # upload() trusts the catalog: the object stays missing

    (p,) = eng.verify()
    assert p.key == e.key and "missing" in p.problem and not p.repaired
    eng.close()
    args = ["catalog", "verify", "--home", str(home), "--store", s3_env]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"BAD {e.key}" in out and "missing" in out

    assert main(args + ["--repair"]) == 0
    out = capsys.readouterr().out
    assert f"REPAIRED {e.key}" in out
    head = s3.head_object(Bucket=bucket, Key=f"{prefix}/{e.key}")
    assert head["ContentLength"] == e.bytes and head["Metadata"]["sha256"] == e.sha256
    assert main(args) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_verify_repair_local_store_object_damaged(tmp_path):
    from engine import Engine
    from engine.sim import synth

    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", to_ns("2026-11-03T05:00:00Z"), 500, 3600 * 10**9))
    eng.flush()
    assert eng.upload()["uploaded"] == 1
    (e,) = eng.catalog.entries()
    obj = eng.store.path(e.key)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))  # the store's copy rots; queries still read the good staging copy
    (p,) = eng.verify()
    assert "checksum differs" in p.problem and not p.repaired
    (p,) = eng.verify(repair=True)
    assert p.repaired
    assert eng.verify() == []
    eng.layout.staged(e.key).unlink()
    assert eng.verify() == []  # the repaired store object is the copy read now
    eng.close()
