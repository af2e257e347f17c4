"""Binary contracts against spot in one call: every contract quote (or trade) of a series with its
strikes and time to expiry, the spot mid as of the same instant, the spot's distance to the strike,
the implied probability, the eventual result and whether both sides' data can be trusted.

    v = eng.contract_view("KXBTC", "coinbase:BTC-USD", start, end, tolerance="5s")

Composed from the toolkit, no join of its own: the contract rows are `eng.quotes` / `eng.trades`;
the version of each contract in force comes from the `instruments` versions through `asof` (by
instrument); the spot through `asof` against the spot's quotes; validity from `mark_valid`.

Definitions (column by column):
- `prob`: a binary contract's prices are YES prices in dollars of a $1 payout, in [0, 1] (Kalshi:
  YES bids are `bid` rows, NO bids at p are `ask` rows at 1 - p), so the implied probability of YES
  is the YES mid (bid_price + ask_price) / 2 for a quote (null unless both sides are quoted) and
  the price for a trade.
- the version in force: the latest `instruments` row of the contract with `valid_from` <= the row's
  `recv_ts` (`valid_from` is a receive time: both are the collector's clock, so this is what was
  known when the row arrived). Rows older than the first recorded version take the first, so
  reference data recorded after the fact still labels them. It gives `strike_type`,
  `floor_strike`, `cap_strike`, `open_ts`, `close_ts`, `expiration_ts`.
- `time_to_expiry` = `close_ts` (else `expiration_ts`) - `ts`: a Duration (int64 ns with
  `raw_ns=True`); negative once closed.
- `spot_bid`/`spot_ask`/`spot_mid`/`spot_ts`: the spot's last quote at or before `ts`, if at most
  `tolerance` older (else null); `spot_mid` = (bid + ask) / 2.
- `strike`: the reference strike: `floor_strike` (greater), `cap_strike` (less), the middle of
  [floor, cap] (between).
- `distance`: signed distance, in spot units, from `spot_mid` to the edge of the YES region:
  positive inside it (how far the spot may move and still settle YES), negative outside (how far
  it must move to settle YES). greater / greater_or_equal: spot - floor; less / less_or_equal:
  cap - spot; between: min(spot - floor, cap - spot). Null for other strike types (custom, ...).
- `result`, `settlement_value`, `settled_ts`: from the contract's latest version, whatever the
  query window (the eventual outcome, a label, not point-in-time): "yes" | "no" | null while
  undetermined.
- `contract_valid` / `spot_valid` / `valid`: `mark_valid` over the trailing `window` ending at `ts`:
  no recorded gap of the contract's market (or that contract) and its book started by a snapshot
  (quotes; trades need no book); the same for the spot's book; `valid` is both.
"""

from __future__ import annotations

import warnings

import polars as pl

from engine import schema
from engine.research.asof import asof
from engine.research.query import UnknownMarketError
from engine.research.windows import mark_valid
from engine.timeutil import result_times, to_ns

OF = ("quotes", "trades")
TIME_COLS = ("ts", "recv_ts", "open_ts", "close_ts", "expiration_ts", "spot_ts", "settled_ts")
_FIRST = -(2**63)  # the first version of a contract also covers rows before it
_REF = ["strike_type", "floor_strike", "cap_strike", "open_ts", "close_ts", "expiration_ts"]
_FINAL = ["result", "settlement_value", "settled_ts"]


class ReferenceDataWarning(UserWarning):
    """The series has no rows in the `instruments` table: strikes, expiry and results are null."""


def _market(eng, name: str, what: str, tables=("l2", "trades", "instruments")) -> tuple[str, str]:
    """`source:market`, or a market name held by exactly one source in the catalog."""
    if ":" in name:
        src, mkt = name.split(":", 1)
        return src, mkt
    srcs = sorted({s for t in tables for s, m in eng.catalog.markets(t) if m == name})
    if len(srcs) == 1:
        return srcs[0], name
    if not srcs:
        known = sorted({f"{s}:{m}" for t in tables for s, m in eng.catalog.markets(t)})
        raise UnknownMarketError(f"contract_view: no {what} {name!r} in the catalog; markets: {', '.join(known) or 'none'}")
    raise ValueError(f"contract_view: {what} {name!r} is held by several sources ({', '.join(srcs)}); "
                     f"name one as 'source:{name}'")


def _spot(eng, spot: str | None, ref: pl.DataFrame, at) -> tuple[str, str, str]:
    """(source, market, instrument) of the spot: as given (`source:market[:instrument]`, or a
    market name), or the one spot market sharing the contracts' underlying (`related`)."""
    if spot is None:
        under = ref["underlying"].drop_nulls().unique().to_list() if "underlying" in ref.columns else []
        if len(under) != 1:
            raise ValueError("contract_view: give spot= ('source:market'); the series' underlying is "
                             f"{'unknown (no instruments rows)' if not under else 'ambiguous: ' + ', '.join(under)}")
        cands = eng.related(under[0], at=at).filter(pl.col("kind") == "spot")["key"].to_list()
        if len(cands) != 1:
            raise ValueError(f"contract_view: give spot= (one of {', '.join(cands) or 'no spot market of ' + under[0]}); "
                             f"the {under[0]} spot is {'ambiguous' if cands else 'unknown'}")
        spot = cands[0]
    parts = spot.split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    src, mkt = _market(eng, spot, "spot market", ("l2",))
    insts = eng.catalog.instruments(table="l2", source=src, market=mkt)["instrument"].unique().to_list()
    if len(insts) > 1:
        raise ValueError(f"contract_view: spot {src}:{mkt} has several instruments ({', '.join(sorted(insts))}); "
                         f"name one as '{src}:{mkt}:<instrument>'")
    return src, mkt, insts[0] if insts else mkt


def _versions(ref: pl.DataFrame) -> pl.DataFrame:
    """Every version as an as-of right side (`__t` = valid_from; the first at the dawn of time)."""
    v = ref.sort(["instrument", "valid_from"], maintain_order=True)
    first = pl.col("valid_from") == pl.col("valid_from").min().over("instrument")
    return v.select(pl.col("instrument"), pl.when(first).then(pl.lit(_FIRST, pl.Int64)).otherwise("valid_from").alias("__t"),
                    *_REF)


def _distance() -> tuple[pl.Expr, pl.Expr]:
    st = pl.col("strike_type")
    up = st.is_in(["greater", "greater_or_equal"])
    down = st.is_in(["less", "less_or_equal"])
    between = st == "between"
    s, lo, hi = pl.col("spot_mid"), pl.col("floor_strike"), pl.col("cap_strike")
    strike = pl.when(up).then(lo).when(down).then(hi).when(between).then((lo + hi) / 2)
    dist = pl.when(up).then(s - lo).when(down).then(hi - s).when(between).then(pl.min_horizontal(s - lo, hi - s))
    return strike.alias("strike"), dist.alias("distance")


def contract_view(eng, series: str, spot: str | None = None, start=None, end=None, *, of: str = "quotes",
                  instrument: str | None = None, tolerance="5s", window="5s", validity: bool = True,
                  allow_unsealed: bool = False, raw_ns: bool = False) -> pl.DataFrame:
    """Each contract quote (`of="quotes"`) or trade (`of="trades"`) of `series` with `ts` in
    [start, end), in the order `eng.quotes`/`eng.trades` return them, plus the columns of the module
    doc. `series` and `spot` are market names or `source:market` (`spot` may add `:instrument`;
    None: the one spot market of the series' underlying). `instrument` narrows the contracts (exact
    or glob). `validity=False` leaves out the three validity columns (and the gap and snapshot
    reads behind them). Times are Datetime("ns", "UTC") (int64 ns with `raw_ns=True`)."""
    if of not in OF:
        raise ValueError(f"contract_view: of must be one of {', '.join(OF)}, got {of!r}")
    src, mkt = _market(eng, series, "series")
    start, end = to_ns(start, name="start"), to_ns(end, name="end")
    read = eng.quotes if of == "quotes" else eng.trades
    rows = read(source=src, market=mkt, instrument=instrument, start=start, end=end, allow_unsealed=allow_unsealed,
                raw_ns=True)
    try:
        ref = eng.instruments(source=src, market=mkt, instrument=instrument, history=True, raw_ns=True)
    except UnknownMarketError:
        ref = pl.DataFrame(schema=result_times(pl.from_arrow(schema.INSTRUMENTS_SCHEMA.empty_table()),
                                               schema.time_cols("instruments"), raw_ns=True).schema)
    if ref.is_empty() and rows.height:
        warnings.warn(f"contract_view: no instruments rows for {src}:{mkt}; strikes, expiry and results are null "
                      "(the collector records them in the instruments table)", ReferenceDataWarning, stacklevel=3)
    ref = ref.with_columns(pl.col(c).cast(pl.String) for c in ("source", "market", "instrument"))
    ss, sm, si = _spot(eng, spot, ref, end)

    # the version in force when each row arrived, by instrument
    out = asof(eng, rows.with_columns(pl.col("recv_ts").alias("__t")), _versions(ref), on="__t", by="instrument",
               keep_right_on=False, raw_ns=True).drop("__t")
    # the eventual outcome: the latest version's
    final = ref.sort("valid_from", maintain_order=True).group_by("instrument", maintain_order=True).last().select(
        "instrument", *_FINAL)
    out = out.join(final, on="instrument", how="left", maintain_order="left")
    # the spot as of the same instant
    out = asof(eng, out, ("quotes", {"source": ss, "market": sm, "instrument": si, "allow_unsealed": allow_unsealed}),
               on="ts", by=None, tolerance=tolerance,
               right_columns={"ts": "spot_ts", "bid_price": "spot_bid", "ask_price": "spot_ask"}, raw_ns=True)
    prob = (pl.col("bid_price") + pl.col("ask_price")) / 2 if of == "quotes" else pl.col("price")
    expiry = pl.coalesce("close_ts", "expiration_ts") - pl.col("ts")
    out = out.with_columns(((pl.col("spot_bid") + pl.col("spot_ask")) / 2).alias("spot_mid"), prob.alias("prob"),
                           expiry.alias("time_to_expiry"))
    out = out.with_columns(*_distance())
    flags = ["contract_valid", "spot_valid", "valid"] if validity else []
    if validity:
        out = _validity(eng, out, (ss, sm, si), of, window, allow_unsealed)
    keep = list(rows.columns) + _REF[:3] + ["strike", "open_ts", "close_ts", "expiration_ts", "time_to_expiry",
                                       "spot_bid", "spot_ask", "spot_mid", "spot_ts", "distance", "prob",
                                       *_FINAL, *flags]
    out = result_times(out.select(keep), TIME_COLS, raw_ns=raw_ns)
    if not raw_ns:
        out = out.with_columns(pl.col("time_to_expiry").cast(pl.Duration("ns")))
    return out


def _validity(eng, out: pl.DataFrame, spot: tuple[str, str, str], of: str, window, allow_unsealed: bool) -> pl.DataFrame:
    """May each row's data be trusted: its contract's market (and book, for quotes) and the spot's
    book, over the trailing `window`."""
    ss, sm, si = spot
    keys = out.select("source", "market", "instrument", "ts")  # only what the flags need goes through the joins
    c = mark_valid(eng, keys, window=window, require_snapshot=of == "quotes", col="v", allow_unsealed=allow_unsealed)
    sp = keys.select(pl.lit(ss).alias("source"), pl.lit(sm).alias("market"), pl.lit(si).alias("instrument"), "ts")
    s = mark_valid(eng, sp, window=window, col="v", allow_unsealed=allow_unsealed)
    out = out.with_columns(contract_valid=c["v"], spot_valid=s["v"])
    return out.with_columns(valid=pl.col("contract_valid") & pl.col("spot_valid"))


__all__ = ["contract_view", "ReferenceDataWarning"]
