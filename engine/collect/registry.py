"""The exchanges that can be collected, by name: the one place a `Source` is registered.

    from engine.collect import registry
    registry.get("coinbase").normalizer()
    registry.names()            # ["coinbase", "kalshi", "kraken", ...]
    registry.register(MySource())  # e.g. from a test or a plugin module

The built-in sources are imported on first use, so importing the registry stays cheap.
"""

from __future__ import annotations

import importlib

from engine.collect.base import BaseNormalizer
from engine.collect.source import Source

BUILTIN = ("engine.collect.coinbase.source", "engine.collect.kalshi.source", "engine.collect.kraken.source")  # each defines SOURCE

_sources: dict[str, Source] = {}
_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN:
            register(importlib.import_module(mod).SOURCE)


def register(source: Source, replace: bool = False) -> Source:
    """Make `source` collectable under `source.name`; a second source of the same name is refused."""
    _load()
    name = source.name
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"source name {name!r} must be a lowercase identifier")
    if name in _sources and _sources[name] is not source and not replace:
        raise ValueError(f"a source named {name!r} is already registered")
    _sources[name] = source
    return source


def unregister(name: str) -> None:
    _sources.pop(name, None)


def get(name: str) -> Source:
    _load()
    try:
        return _sources[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; sources are {', '.join(names())}") from None


def names() -> list[str]:
    _load()
    return list(_sources)


def make_normalizer(source: str, **kw) -> BaseNormalizer:
    """The normalizer of a registered source (keywords: markets, max_skew_ns, log)."""
    return get(source).normalizer(**kw)
