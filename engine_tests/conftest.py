"""Shared fixtures: a real moto S3 server on 127.0.0.1 (subprocess), lake homes. Exchange messages
(recorded ones from ../shared/fixtures when present, the project's own otherwise): exchange_fixtures.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class MotoServer:
    """moto's standalone S3 server as a child process, stoppable and restartable on the same port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="x", aws_secret_access_key="y",
                     region_name="us-east-1").create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def moto_server():
    srv = MotoServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch, request):
    """Environment pointing the engine at a fresh bucket on the session's moto server."""
    bucket = "lake-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    bucket = "".join(c for c in bucket if c.isalnum() or c == "-")[:60]
    moto_server.make_bucket(bucket)
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    return f"s3://{bucket}/lake"
