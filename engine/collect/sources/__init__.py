"""The shared pieces of the per-exchange normalizers (one module per exchange beside this one), by
their old address: they live in `engine.collect.base` (the normalizer base, counters, actions),
`engine.collect.columns` (column builders) and `engine.collect.timestamps`.
"""

from engine.collect.base import CHUNK_ROWS, Action, BaseNormalizer, Counters, fixed_units, tune_gc  # noqa: F401
from engine.collect.columns import (  # noqa: F401
    DICT_T,
    SIDE_MAP,
    GapCols,
    L2Cols,
    TradeCols,
    absurd_runs,
    const_dict,
    dict_runs,
    float_array,
    int_array,
)
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS, bulk_ts, parse_ts, settle_ts  # noqa: F401


def make_normalizer(source: str, **kw) -> BaseNormalizer:
    if source == "coinbase":
        from engine.collect.sources.coinbase import CoinbaseNormalizer

        return CoinbaseNormalizer(**kw)
    if source == "kalshi":
        from engine.collect.sources.kalshi import KalshiNormalizer

        return KalshiNormalizer(**kw)
    raise ValueError(f"unknown source {source!r}; sources are coinbase, kalshi")
