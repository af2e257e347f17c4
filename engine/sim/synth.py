"""Synthetic canonical rows (random-walk books and trades) for tests, benchmarks and the demo."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine import schema

BASE_PRICE = {"BTC-USD": 97_000.0, "ETH-USD": 3_400.0, "SOL-USD": 240.0}


def _dict(values: list[str], idx: np.ndarray) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(idx.astype(np.int32)), pa.array(values))


def l2_rows(source: str, market: str, start_ns: int, n: int, span_ns: int, seed: int = 0,
            instruments: list[str] | None = None, seq_start: int = 0) -> pa.Table:
    """`n` l2 rows spread over [start_ns, start_ns + span_ns), recv 1–5 ms after ts."""
    rng = np.random.default_rng(seed)
    instruments = instruments or [market]
    ts = np.sort(start_ns + rng.integers(0, span_ns, n, dtype=np.int64))
    recv = ts + rng.integers(1_000_000, 5_000_000, n, dtype=np.int64)
    recv = np.minimum(recv, start_ns + span_ns - 1)
    ts = np.minimum(ts, recv)
    base = BASE_PRICE.get(market, 0.5 if market.startswith("KX") else 100.0)
    tick = 0.01
    side = rng.integers(0, 2, n)
    offset = rng.integers(1, min(200, int(base / tick * 0.9)), n) * tick  # prices stay positive (Kalshi: 0-1)
    price = np.round(np.where(side == 0, base - offset, base + offset), 2)
    size = np.where(rng.random(n) < 0.2, 0.0, np.round(rng.random(n) * 3, 8))
    return pa.table(
        {
            "ts": ts,
            "recv_ts": recv,
            "source": _dict([source], np.zeros(n)),
            "market": _dict([market], np.zeros(n)),
            "instrument": _dict(instruments, rng.integers(0, len(instruments), n)),
            "side": _dict(["bid", "ask"], side),
            "price": price,
            "size": size,
            "seq": np.arange(seq_start, seq_start + n, dtype=np.int64),
            "snapshot": np.zeros(n, dtype=bool),
        },
        schema=schema.L2_SCHEMA,
    )


def trade_rows(source: str, market: str, start_ns: int, n: int, span_ns: int, seed: int = 0,
               instruments: list[str] | None = None, id_start: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + 7919)
    instruments = instruments or [market]
    ts = np.sort(start_ns + rng.integers(0, span_ns, n, dtype=np.int64))
    recv = np.minimum(ts + rng.integers(1_000_000, 5_000_000, n, dtype=np.int64), start_ns + span_ns - 1)
    ts = np.minimum(ts, recv)
    base = BASE_PRICE.get(market, 0.5 if market.startswith("KX") else 100.0)
    price = np.round(base + np.cumsum(rng.normal(0, base * 1e-5, n)), 2)
    ids = np.arange(id_start, id_start + n)
    return pa.table(
        {
            "ts": ts,
            "recv_ts": recv,
            "source": _dict([source], np.zeros(n)),
            "market": _dict([market], np.zeros(n)),
            "instrument": _dict(instruments, rng.integers(0, len(instruments), n)),
            "side": _dict(["buy", "sell"], rng.integers(0, 2, n)),
            "price": price,
            "size": np.round(rng.random(n), 6),
            "trade_id": pa.array(ids.astype(str)),
            "seq": ids.astype(np.int64),
        },
        schema=schema.TRADES_SCHEMA,
    )


def gap_rows(rows: list[dict]) -> pa.Table:
    return schema.validate("gaps", pa.Table.from_pylist(rows, schema=pa.schema(
        [pa.field(f.name, pa.string() if pa.types.is_dictionary(f.type) else f.type) for f in schema.GAPS_SCHEMA])))


def realistic_l2(source: str, market: str, start_ns: int, n: int, seed: int = 0, msg_rows: int = 6,
                 rate_per_s: float = 300.0) -> pa.Table:
    """L2 rows shaped like a live Coinbase feed: messages of ~6 level changes sharing one event time
    and sequence number, levels clustered near a random-walk mid, sizes with few significant digits."""
    rng = np.random.default_rng(seed)
    n_msg = -(-n // msg_rows)
    gaps = rng.exponential(1e9 * msg_rows / rate_per_s, n_msg).astype(np.int64) + 1
    msg_ts = start_ns + np.cumsum(gaps)
    ts = np.repeat(msg_ts, msg_rows)[:n]
    recv = ts + np.repeat(rng.integers(200_000, 3_000_000, n_msg), msg_rows)[:n]
    seq = np.repeat(np.arange(n_msg, dtype=np.int64), msg_rows)[:n]
    tick = 0.01
    base = BASE_PRICE.get(market, 100.0)
    mid_ticks = np.round(base / tick) + np.cumsum(rng.integers(-2, 3, n_msg))
    mid = np.repeat(mid_ticks, msg_rows)[:n]
    side = rng.integers(0, 2, n)
    dist = np.minimum(rng.geometric(0.08, n), 5000)
    price = np.round((mid + np.where(side == 0, -dist, dist)) * tick, 2)
    lots = np.array([0.0, 0.00001, 0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0])
    size = np.round(rng.choice(lots, n) * rng.integers(1, 40, n) + np.where(rng.random(n) < 0.3, rng.integers(1, 10**6, n) * 1e-8, 0), 8)
    size = np.where(rng.random(n) < 0.35, 0.0, size)
    return pa.table(
        {
            "ts": ts, "recv_ts": recv,
            "source": _dict([source], np.zeros(n)), "market": _dict([market], np.zeros(n)),
            "instrument": _dict([market], np.zeros(n)), "side": _dict(["bid", "ask"], side),
            "price": price, "size": size, "seq": seq, "snapshot": np.zeros(n, dtype=bool),
        },
        schema=schema.L2_SCHEMA,
    )
