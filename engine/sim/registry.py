"""Simulated exchanges by name: each one a replay protocol and a capture generator.

    register(name, protocol_cls, generator, gen_cli=None, demo_args=())

`ReplayServer(source=name)`, `data-engine replay-exchange --source NAME` and `data-engine
gen-capture --source NAME` look exchanges up here and name the known ones when a name is not
known. The built-in exchanges are registered in one place, `_register_builtins()` below, on the
first look-up (so importing the registry imports no exchange). A test or a plugin registers its own
exchange the same way (`unregister` removes it).

Adding a simulated exchange: a package `engine/sim/<name>/` with `gen.py` (a deterministic
generator of capture records, keyword arguments `seconds`, `seed`, `start_ns` and `rate`, plus a
`GenCli` for its own gen-capture options if it has any) and `replay.py` (a `ReplayProtocol`
subclass: see `engine.sim.replay.protocol` for the hooks), and one `register(...)` line in
`_register_builtins()`. `engine_tests/test_sim_registry.py` shows the smallest exchange that plays. `demo_args` are the
exchange's own `gen-capture` options for the demo's short capture (Kalshi: contracts of a few
minutes, so some settle while the demo runs).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Generator = Callable[..., Iterator[dict]]  # keyword arguments seconds, seed, start_ns (and rate) at least


@dataclass(frozen=True)
class GenCli:
    """An exchange's own `gen-capture` options: `add_arguments(group)` adds them; `records(args,
    common)` returns the capture's records (`common`: seconds, seed, start_ns, rate or None) and may
    write companion files (Kalshi's `--markets-out`)."""

    add_arguments: Callable[[argparse._ArgumentGroup], None]
    records: Callable[[argparse.Namespace, dict[str, Any]], Iterator[dict]]


@dataclass(frozen=True)
class SimExchange:
    name: str
    protocol: type  # a ReplayProtocol subclass
    generator: Generator
    gen_cli: GenCli | None = None
    demo_args: tuple[str, ...] = ()  # its own gen-capture options for the demo capture


_EXCHANGES: dict[str, SimExchange] = {}
_lock = threading.RLock()
_builtins_loaded = False


def register(name: str, protocol_cls: type, generator: Generator, gen_cli: GenCli | None = None, *,
             replace: bool = False, demo_args: tuple[str, ...] = ()) -> SimExchange:
    """Make an exchange known by `name`: its `ReplayProtocol` subclass and its capture generator."""
    from engine.sim.replay.protocol import ReplayProtocol

    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"exchange name must be a non-empty word (letters, digits, - and _): {name!r}")
    if not (isinstance(protocol_cls, type) and issubclass(protocol_cls, ReplayProtocol)):
        raise TypeError(f"{name}: protocol must be a ReplayProtocol subclass, got {protocol_cls!r}")
    if not callable(generator):
        raise TypeError(f"{name}: generator must be callable, got {generator!r}")
    with _lock:
        _ensure_builtins()
        if name in _EXCHANGES and not replace:
            raise ValueError(f"exchange {name!r} is already registered")
        ex = _EXCHANGES[name] = SimExchange(name, protocol_cls, generator, gen_cli, tuple(demo_args))
    return ex


def unregister(name: str) -> None:
    with _lock:
        _EXCHANGES.pop(name, None)


def get(name: str) -> SimExchange:
    """The exchange registered as `name`; ValueError naming the known ones otherwise."""
    with _lock:
        _ensure_builtins()
        ex = _EXCHANGES.get(name)
    if ex is None:
        raise ValueError(f"unknown exchange {name!r}; known: {', '.join(names()) or '(none)'}")
    return ex


def names() -> tuple[str, ...]:
    with _lock:
        _ensure_builtins()
        return tuple(sorted(_EXCHANGES))


def _ensure_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # set first: _register_builtins() calls register()
        try:
            _register_builtins()
        except BaseException:
            _builtins_loaded = False
            raise


def _register_builtins() -> None:
    """The exchanges that ship with the engine: the one place they are named."""
    from engine.sim.coinbase import gen as coinbase_gen
    from engine.sim.coinbase.replay import CoinbaseProtocol
    from engine.sim.kalshi import gen as kalshi_gen
    from engine.sim.kalshi.replay import KalshiProtocol
    from engine.sim.kraken import gen as kraken_gen
    from engine.sim.kraken.replay import KrakenProtocol

    register("coinbase", CoinbaseProtocol, coinbase_gen.generate_coinbase,
             GenCli(coinbase_gen.add_gen_arguments, coinbase_gen.gen_records))
    register("kalshi", KalshiProtocol, kalshi_gen.generate_kalshi,
             GenCli(kalshi_gen.add_gen_arguments, kalshi_gen.gen_records), demo_args=kalshi_gen.DEMO_ARGS)
    register("kraken", KrakenProtocol, kraken_gen.generate_kraken,
             GenCli(kraken_gen.add_gen_arguments, kraken_gen.gen_records))
