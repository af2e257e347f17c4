"""Market-data engine: collect, store, compact and query L2 books and trades."""

from engine.schema import SchemaError

__all__ = ["Engine", "ReadOnlyError", "SchemaError"]


def __getattr__(name):  # lazy so that `import engine.schema` stays light
    if name in ("Engine", "ReadOnlyError"):
        from engine import api

        return getattr(api, name)
    raise AttributeError(name)
