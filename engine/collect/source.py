"""`Source`: the one interface an exchange implements to be collected (live and offline).

An exchange is one package under `engine/collect/` (`wire.py` protocol definitions and Structs,
`normalize.py` its normalizer, `source.py` its `Source`), registered in `engine.collect.registry`.
The collector (`runner`), `ingest` and the launcher (`engine.run.supervisor`) only ask the Source;
none of them knows an exchange by name. `docs/adding-a-source.md` is the recipe.

What a Source answers:
- its `name` (the lake's `source` column, capture file names, `--source` choices, status file);
- configuration: its `collect` options (`add_arguments`: URL, markets, stall limit, anything else),
  the configured markets, the URL, the stall limit, and why it cannot run (`unusable`);
- connect/subscribe/auth: `auth_headers`, `ping_interval`, and a `Link` per connection runner that
  sends the subscriptions, carries out the resync policy (the normalizer's `Action`s: reconnect,
  get_snapshot, exchange errors), runs market discovery and adds its own status counters;
- normalization: the normalizer factory, what a connection's capture meta line holds
  (`connect_meta`) and means to the normalizer (`connect_kwargs`), state seeded from the lake
  before the first frame (`seed`, e.g. trade ids);
- the demo: collector options for a local replay exchange and throw-away credentials.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine.collect.base import Action, BaseNormalizer
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS


class Reconnect(Exception):
    """Drop the connection and connect again; the message is the reason (it names the gap kind first:
    `disconnect: ...`, `sequence: ...`)."""


class AuthError(Exception):
    """The credentials cannot sign a connection. `problem` is safe to log (never key material)."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


@dataclass
class Demo:
    """What a source needs for the offline demo besides its generated capture."""

    env: dict[str, str] = field(default_factory=dict)  # for the collector (e.g. throw-away credentials)
    replay_args: list[str] = field(default_factory=list)  # extra options of its replay exchange
    files: dict[str, Path] = field(default_factory=dict)  # files made (returned by prepare_demo)


class Link:
    """The live protocol of one source on one connection runner: what is sent after connecting, how
    the normalizer's actions are carried out, background tasks (discovery), watchdog checks and
    status counters. One per runner, kept across reconnects; the runner owns the socket.

    `runner` gives `cfg`, `log`, `lock` (held around every normalizer call), `norm`, `ws` (the
    open socket or None) and `rest(name, body, key=None)`: a fetched REST answer (reference data)
    recorded in the capture and handed to the normalizer's `on_rest`, the way `ingest` replays it
    (with a `key`, only when it differs from the last answer of that key)."""

    def __init__(self, source: "Source", runner: Any):
        self.source = source
        self.runner = runner

    async def on_open(self, ws) -> None:
        """Called on every new connection, after the normalizer heard of it: subscribe."""
        for m in self.source.subscribe_messages(self.runner.cfg):
            await ws.send(m)

    async def act(self, ws, action: Action) -> None:
        """The resync policy for one normalizer action other than `reconnect` (which the runner
        handles). Default: an exchange error (`Action("error", message=..., reason=...)`) or a
        snapshot request reconnects, which resubscribes and so brings fresh snapshots."""
        if action.kind == "get_snapshot":
            raise Reconnect("sequence: no snapshot request on this feed, resubscribing")
        if action.kind == "error":
            a = action.args
            raise Reconnect(f"disconnect: exchange error: {a.get('message')} {a.get('reason') or ''}")

    def overdue(self) -> str | None:
        """Checked by the watchdog about every 0.25 s: a reason here closes the connection."""
        return None

    def tasks(self, stop) -> list:
        """Coroutines run beside the connection loop until `stop` (e.g. market discovery)."""
        return []

    def status(self) -> dict[str, Any]:
        """Extra fields of the status file."""
        return {}


class Source:
    """An exchange as the collector sees it. Subclass, set the class attributes, override what differs."""

    name: str = "?"  # lowercase identifier: the `source` column, `--source` choice, option prefix
    title: str = ""  # for help texts (default: name)
    markets_option: str = ""  # collect option naming the markets (default --{name}-markets)
    markets_help: str = "markets"
    default_markets: tuple[str, ...] = ()
    default_url: str = ""
    url_env: str = ""  # environment variable overriding default_url (default {NAME}_WS_URL)
    stall_s: float = 30.0  # default seconds without a frame before a `stale` reconnect
    ping_interval: float = 20.0  # WebSocket ping interval (s)
    credentials_env: tuple[str, ...] = ()  # environment variables it needs to run at all
    link_class: type[Link] = Link

    # ---- configuration (`data-engine collect` options) -------------------------------------------
    def _markets_dest(self) -> str:
        return (self.markets_option or f"--{self.name}-markets").lstrip("-").replace("-", "_")

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        """Its options of `data-engine collect`: markets, URL and stall limit; extend for more."""
        title = self.title or self.name
        g = ap.add_argument_group(title)
        g.add_argument(self.markets_option or f"--{self.name}-markets", nargs="+", default=list(self.default_markets),
                       help=f"{title} {self.markets_help}")
        g.add_argument(f"--{self.name}-url", default=os.environ.get(self.url_env or f"{self.name.upper()}_WS_URL", self.default_url))
        g.add_argument(f"--{self.name}-stall", type=float, default=self.stall_s,
                       help=f"seconds without a frame before a {title} `stale` reconnect")

    def markets(self, cfg: argparse.Namespace) -> list[str]:
        """The configured markets (the normalizer's known markets; restart gaps are written for them)."""
        return list(getattr(cfg, self._markets_dest()))

    def set_markets(self, cfg: argparse.Namespace, markets: list[str]) -> None:
        """Narrow the configured markets (a collector shard keeps the markets assigned to it)."""
        setattr(cfg, self._markets_dest(), list(markets))

    def url(self, cfg: argparse.Namespace) -> str:
        return getattr(cfg, f"{self.name}_url")

    def stall_limit(self, cfg: argparse.Namespace) -> float:
        return getattr(cfg, f"{self.name}_stall")

    def unusable(self, cfg: argparse.Namespace) -> str | None:
        """Why this source cannot run with this configuration (logged as `{name}_skipped`), or None."""
        return None

    # ---- connect / subscribe / auth --------------------------------------------------------------
    def subscribe_messages(self, cfg: argparse.Namespace) -> list[str]:
        """Text frames the default `Link` sends on every connection."""
        return []

    def auth_headers(self, cfg: argparse.Namespace) -> dict[str, str] | None:
        """Headers of the WebSocket upgrade, built per connection attempt; raise AuthError if the
        credentials cannot be used (the runner logs it once and retries at the slowest backoff)."""
        return None

    def auth_fields(self, cfg: argparse.Namespace) -> dict[str, Any]:
        """Fields naming the credentials in the log (a key path, never key material)."""
        return {}

    def link(self, runner: Any) -> Link:
        return self.link_class(self, runner)

    # ---- normalization ---------------------------------------------------------------------------
    def normalizer(self, markets: Iterable[str] = (), max_skew_ns: int = DEFAULT_MAX_SKEW_NS, log=None) -> BaseNormalizer:
        raise NotImplementedError

    def connect_meta(self, cfg: argparse.Namespace) -> dict[str, Any]:
        """Fields of a connection's `connect` meta line in the capture besides type, source and conn."""
        return {}

    def connect_kwargs(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """What a `connect` meta line means to the normalizer: keyword arguments of `on_connect`
        (live, the meta line just written; offline, the one read from the capture)."""
        return {}

    def seed(self, eng, norm: BaseNormalizer) -> None:
        """State from the lake before the first frame (e.g. the last stored trade ids). The default
        seeds the latest stored instrument versions (a restart stores no unchanged version again);
        call `super().seed(eng, norm)` when overriding."""
        from engine.collect.append import seed_instrument_versions

        seed_instrument_versions(eng, norm, self.name)

    # ---- the demo (engine.run.supervisor --demo) -------------------------------------------------
    def local_args(self, port: int) -> list[str]:
        """`collect` options pointing this source at a replay exchange on 127.0.0.1:port."""
        return [f"--{self.name}-url", f"ws://127.0.0.1:{port}"]

    def demo(self, directory: Path) -> Demo:
        """Throw-away credentials and the like for the demo (never a shipped secret)."""
        return Demo()

    def __repr__(self) -> str:
        return f"<Source {self.name}>"
