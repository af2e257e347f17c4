"""`EngineResource`: hands assets, sensors, schedules and notebooks an `Engine` for one lake.

Credentials come from `EnvVar`s (Dagster shows the variable name, never the value) and are only
placed in the process environment while the store client is built; they are never logged.
"""


import atexit
import contextlib
import gc
import os
import threading
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

_AWS_FIELDS = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_endpoint_url": "AWS_ENDPOINT_URL",
    "aws_region": "AWS_DEFAULT_REGION",
}
_SECRET_FIELDS = ("aws_access_key_id", "aws_secret_access_key")
_env_lock = threading.Lock()


@contextlib.contextmanager
def _env_overlay(values: dict[str, str]):
    """Set env vars only while the boto3 client is built (the core reads credentials from the env)."""
    if not values:
        yield
        return
    with _env_lock:
        old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_exit_hook = False


def _exit_without_final_gc() -> None:
    """When this process exits (a run worker, after its run), skip the garbage collector's passes
    over every object of Dagster, the definitions and the data libraries: `gc.freeze()` as the first
    exit step. Those passes took ~0.4–0.6 s of CPU at each run worker's exit, while the next run of a
    backfill was already starting beside it (two workers' memory at once). The run's writes are
    durable before its end (fsync'd, SQLite committed); at exit, objects outside reference cycles
    are still freed by reference counting and the standard streams flushed; cycles are left to the
    OS, which takes the whole process a moment later."""
    global _exit_hook
    if not _exit_hook:
        atexit.register(gc.freeze)
        _exit_hook = True


def _env_or_none(name: str):
    return dg.EnvVar(name) if os.environ.get(name) else None


class EngineResource(dg.ConfigurableResource):
    """One lake: `home` (catalog, staging) and `store` (directory or s3://bucket/prefix)."""

    home: str
    store: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_endpoint_url: str | None = None
    aws_region: str | None = None

    _engines: dict = PrivateAttr(default_factory=dict)

    def __repr_args__(self):
        """repr() and str() never show a credential given as a plain string (an EnvVar shows its name)."""
        from engine.log import redact

        for name, value in super().__repr_args__():
            if name in _SECRET_FIELDS and isinstance(value, str) and not isinstance(value, dg.EnvVar):
                value = "***"
            elif isinstance(value, str):
                value = redact(value)
            yield name, value

    @classmethod
    def from_env(cls) -> "EngineResource":
        """ENGINE_HOME (default ./lake), ENGINE_STORE and AWS_* from the environment.

        In Definitions the credentials stay `EnvVar`s; in a notebook, `EngineResource.from_env().engine()`.
        """
        from engine.paths import default_home

        return cls(
            home=str(default_home()),
            store=os.environ.get("ENGINE_STORE") or None,
            **{f: _env_or_none(v) for f, v in _AWS_FIELDS.items()},
        )

    def _credentials(self) -> dict[str, str]:
        out = {}
        for f, env in _AWS_FIELDS.items():
            v = getattr(self, f)
            if isinstance(v, dg.EnvVar):  # outside a Dagster run (notebook): resolve now
                v = v.get_value()
            if v:
                out[env] = v
        return out

    def open(self, writer: bool = False):
        """A new `Engine` (background=False): a reader, or with `writer=True` one that may upload,
        compact and publish (the assets that write). Neither takes the collector's spool lock."""
        from engine.api import Engine

        with _env_overlay(self._credentials()):
            # Engine(...) rather than Engine.open(writer=True): that recovers a crashed spool, which
            # would take the collector's lock and make its restart fail; the collector recovers it.
            # Dagster runs beside the collector: it reads the writer's catalog log, never the manifest
            return Engine(Path(self.home), self.store, background=False, writer=writer, from_store=False)

    def engine(self, writer: bool = False):
        """The engine of this resource for one role, opened once and reused (per run, or per notebook)."""
        eng = self._engines.get(writer)
        if eng is None:
            eng = self._engines[writer] = self.open(writer)
        else:
            eng.catalog.refresh()
        return eng

    def teardown_after_execution(self, context) -> None:
        for eng in self._engines.values():
            eng.close()
        self._engines.clear()
        _exit_without_final_gc()

    @property
    def catalog_log(self) -> Path:
        from engine.paths import Layout

        return Layout(Path(self.home).resolve()).catalog_log
