"""Market-data engine: collect, store, compact and query L2 books and trades."""

__all__ = ["Engine", "ReadOnlyError", "SchemaError"]


def __getattr__(name):  # lazy: `import engine.paths` (or timeutil) must not pull in pyarrow and numpy
    if name in ("Engine", "ReadOnlyError"):
        from engine import api

        return getattr(api, name)
    if name == "SchemaError":
        from engine.schema import SchemaError

        return SchemaError
    raise AttributeError(name)
