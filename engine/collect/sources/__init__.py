"""Compatibility re-exports of the shared normalizer pieces under their old address.

They live in `engine.collect.base`, `engine.collect.columns` and `engine.collect.timestamps`, the
exchanges in their own packages (`engine.collect.coinbase`, `engine.collect.kalshi`). Kept so code
written against the old layout (the replay exchange in `engine.sim` imports `parse_ts` from here)
keeps importing; new code imports from the modules themselves.
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
from engine.collect.registry import make_normalizer  # noqa: F401
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS, bulk_ts, parse_ts, settle_ts  # noqa: F401
