"""Kalshi contracts of the simulator: the market schedule the generator follows, the REST `/markets`
object of a contract at a replay time (with what its lifecycle events said by then: determination,
settlement, a moved close), and what a ticker says (strike, close time)."""

from __future__ import annotations

import datetime as dt
import random
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from engine.sim.fmt import DEFAULT_START_NS, fmt_iso_seconds
from engine.timeutil import US_EASTERN, us_eastern

DEFAULT_SERIES = ("KXBTC", "KXETH", "KXSOL")
_SERIES_PARAMS = {"KXBTC": (97_000, 500, 0), "KXETH": (3_400, 20, 0), "KXSOL": (240, 2, 0)}
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_TICKER_RE = re.compile(r"^[A-Z0-9]+-(\d{2})([A-Z]{3})(\d{2})(\d{2})(\d{2})?-")


@dataclass
class Lifecycle:
    """What a contract's `market_lifecycle_v2` events said up to a replay time (times in ns)."""

    close_ns: int | None = None  # close_date_updated
    deactivated: bool = False
    result: str | None = None  # determined
    settlement_value: str | None = None  # dollars, as the event wrote it
    expiration_value: str | None = None
    determined_ns: int | None = None
    settled_ns: int | None = None  # settled


@dataclass
class KalshiMarketSpec:
    ticker: str
    event_ticker: str
    series_ticker: str
    open_ns: int
    close_ns: int
    floor_strike: float
    cap_strike: float
    market_id: str


def kalshi_event_code(close_ns: int, with_minutes: bool) -> str:
    """`25NOV2617` (YY MON DD HH in US Eastern time of the close), plus MM for sub-hour contracts."""
    t = us_eastern(close_ns)
    s = f"{t.year % 100:02d}{_MONTHS[t.month - 1]}{t.day:02d}{t.hour:02d}"
    return s + f"{t.minute:02d}" if with_minutes else s


def kalshi_schedule(
    series: Iterable[str] = DEFAULT_SERIES,
    seconds: float = 600.0,
    seed: int = 0,
    start_ns: int = DEFAULT_START_NS,
    contract_minutes: int = 60,
    strikes: int = 6,
) -> list[KalshiMarketSpec]:
    """Every contract whose trading window [open, close) overlaps [start, start + seconds). An event's
    contracts close at a period boundary (multiple of `contract_minutes`) and open half a period before
    the previous event's contracts close, so two events per series overlap half the time."""
    period = contract_minutes * 60 * 10**9
    end = start_ns + int(seconds * 1e9)
    out = []
    for si, s in enumerate(series):
        base, width, _ = _SERIES_PARAMS.get(s, (100 * (si + 1), 5, 0))
        lead = period // 2  # the next event's contracts open half a period before the current ones close
        t = start_ns // period * period
        while t - lead < end:
            close = t + period
            rng = random.Random(f"{seed}:{s}:{t}")
            center = (base + rng.randint(-3, 3) * width) // width * width
            code = kalshi_event_code(close, contract_minutes % 60 != 0)
            ev = f"{s}-{code}"
            for k in range(strikes):
                c = center + (k - strikes // 2) * width
                tick = f"{s}-{code}-B{c}"
                mid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                out.append(
                    KalshiMarketSpec(tick, ev, s, t - lead, close, c - width / 2, c + width / 2 - 0.01, mid)
                )
            t = close
    return out


def market_title(m: KalshiMarketSpec) -> str:
    """The contract's title (REST `title`, lifecycle `created` metadata `title`)."""
    if m.floor_strike is None or m.cap_strike is None:
        return m.ticker
    return f"{m.series_ticker} price range {m.floor_strike:g} to {m.cap_strike:g}"


def market_status(m: KalshiMarketSpec, at_ns: int, life: Lifecycle | None = None) -> str:
    """The status word the live API returns at `at_ns`: `initialized` before open, `active` while open
    (`inactive` when deactivated), `closed` after close, then `determined` and `finalized` as the
    lifecycle events said."""
    if life is not None and life.settled_ns is not None:
        return "finalized"
    if life is not None and life.result:
        return "determined"
    if at_ns < m.open_ns:
        return "initialized"
    if at_ns < m.close_ns:
        return "inactive" if life is not None and life.deactivated else "active"
    return "closed"


def market_object(m: KalshiMarketSpec, at_ns: int, life: Lifecycle | None = None) -> dict:
    """Kalshi REST `/markets` object for a contract at replay time `at_ns` (`life`: its lifecycle
    events so far; `m` already carries a close moved by them). Settled contracts carry `result`,
    `settlement_value_dollars`, `settlement_ts` and `expiration_value` as the live API does."""
    status = market_status(m, at_ns, life)
    o = {
        "ticker": m.ticker,
        "event_ticker": m.event_ticker,
        "series_ticker": m.series_ticker,
        "market_type": "binary",
        "title": market_title(m),
        "status": status,
        "open_time": fmt_iso_seconds(m.open_ns),
        "close_time": fmt_iso_seconds(m.close_ns),
        "expected_expiration_time": fmt_iso_seconds(m.close_ns),
        "expiration_time": fmt_iso_seconds(m.close_ns),
        "latest_expiration_time": fmt_iso_seconds(m.close_ns + 7 * 86400 * 10**9),
        "strike_type": "between",
        "floor_strike": m.floor_strike,
        "cap_strike": m.cap_strike,
        "price_level_structure": "linear_cent",
        "price_ranges": [{"start": "0.0000", "end": "1.0000", "step": "0.0100"}],
        "can_close_early": False,
        "result": (life.result or "") if life is not None else "",
    }
    if life is not None and life.result:
        o["expiration_value"] = life.expiration_value or ""
    if life is not None and life.settled_ns is not None:
        o["settlement_value_dollars"] = life.settlement_value
        o["settlement_ts"] = fmt_iso_seconds(life.settled_ns)
    return o


def kalshi_markets(at_ns: int | None = None, **schedule_kwargs) -> list[dict]:
    """REST `/markets` objects consistent with `generate_kalshi(**same kwargs)`, status as of `at_ns`
    (default: the capture start)."""
    sched = kalshi_schedule(**schedule_kwargs)
    at = schedule_kwargs.get("start_ns", DEFAULT_START_NS) if at_ns is None else at_ns
    return [market_object(m, at) for m in sched]


# ---------------------------------------------------------------------------------------------- tickers


def ticker_strike(ticker: str) -> float | None:
    """The strike in a contract ticker's last part (`...-B95500` / `...-T96000`), if any."""
    last = ticker.rsplit("-", 1)[-1]
    if last[:1] in ("B", "T"):
        try:
            return float(last[1:])
        except ValueError:
            return None
    return None


def ticker_close_ns(ticker: str) -> int | None:
    """Close time encoded in the event part (YYMONDDHH[MM], US Eastern)."""
    m = _TICKER_RE.match(ticker)
    if not m or m.group(2) not in _MONTHS:
        return None
    yy, mon, dd, hh, mm = m.groups()
    try:
        local = dt.datetime(2000 + int(yy), _MONTHS.index(mon) + 1, int(dd), int(hh), int(mm or 0),
                            tzinfo=US_EASTERN, fold=1)  # an hour that repeats (November): its second pass, EST
    except ValueError:
        return None
    return int(local.timestamp()) * 10**9
