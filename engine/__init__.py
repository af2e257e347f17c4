"""Market-data engine: collect, store, compact and query L2 books and trades."""

from engine.schema import SchemaError

__all__ = ["Engine", "SchemaError"]


def __getattr__(name):  # lazy so that `import engine.schema` stays light
    if name == "Engine":
        from engine.api import Engine

        return Engine
    raise AttributeError(name)
