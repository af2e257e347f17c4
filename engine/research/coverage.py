"""Coverage: the fraction of each UTC hour for which a (source, market) was collected, gaps subtracted.

Collected time is read from the catalog alone (no data read): the receive-time extent of every l2
and trades file, joined when files are less than `join_s` apart (hourly files abut). Every gap of
the market (any kind, any instrument: conservative) is subtracted. Times are receive times.

`data-engine coverage [--start --end --home --source --market] [--png FILE]` prints the table and
draws a market x hour heat map (1 = fully covered) with the gaps marked as red bars.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import polars as pl

from engine import schema
from engine.paths import match
from engine.timeutil import iso, result_times, to_ns

H = schema.NS_PER_HOUR
SCHEMA = {"source": pl.String, "market": pl.String, "hour": pl.Int64, "covered": pl.Float64,
          "collected_s": pl.Float64, "gap_s": pl.Float64, "gaps": pl.Int64}


def _merge(iv: list[tuple[int, int]], join: int = 0) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(iv):
        if b <= a:
            continue
        if out and a <= out[-1][1] + join:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _subtract(iv, holes):
    out = []
    holes = _merge(holes)
    for a, b in iv:
        cur = a
        for ha, hb in holes:
            if hb <= cur or ha >= b:
                continue
            if ha > cur:
                out.append((cur, ha))
            cur = max(cur, hb)
        if cur < b:
            out.append((cur, b))
    return out


def _per_hour(iv, hours: np.ndarray) -> np.ndarray:
    """Nanoseconds of each hour [h, h + 1h) covered by the disjoint intervals `iv`."""
    if not iv or len(hours) == 0:
        return np.zeros(len(hours), dtype=np.float64)
    a = np.array([x[0] for x in iv], dtype=np.int64)[None, :]
    b = np.array([x[1] for x in iv], dtype=np.int64)[None, :]
    h0 = hours[:, None]
    return np.clip(np.minimum(b, h0 + H) - np.maximum(a, h0), 0, None).sum(axis=1).astype(np.float64)


def coverage(eng, start=None, end=None, *, source=None, market=None, join_s: float = 60.0,
             raw_ns: bool = False) -> pl.DataFrame:
    """One row per (source, market, hour) in [start, end): covered fraction, collected and gap seconds,
    number of gaps touching the hour. `hour` is the hour's start, Datetime("ns", "UTC") (int ns with `raw_ns=True`)."""
    return result_times(_coverage(eng, start, end, source, market, join_s), schema.time_cols("coverage"), raw_ns=raw_ns)


def _coverage(eng, start, end, source, market, join_s: float) -> pl.DataFrame:
    start, end = to_ns(start, name="start"), to_ns(end, name="end")
    extents: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for e in eng.catalog.entries():
        if e.table not in ("l2", "trades") or e.min_recv_ts is None:
            continue
        if not (match(e.source, source) and match(e.market, market)):
            continue
        extents.setdefault((e.source, e.market), []).append((e.min_recv_ts, e.max_recv_ts + 1))
    if not extents:
        return pl.DataFrame(schema=SCHEMA)
    lo = start if start is not None else min(a for v in extents.values() for a, _ in v)
    hi = end if end is not None else max(b for v in extents.values() for _, b in v)
    hours = np.arange(lo - lo % H, hi, H, dtype=np.int64)
    frames = []
    join = int(join_s * 1e9)
    for (s, m), iv in sorted(extents.items()):
        from engine.research.query import UnknownMarketError

        try:
            g = eng.gaps(source=s, market=m, allow_unsealed=True, raw_ns=True).select("start_ts", "end_ts")
        except UnknownMarketError:
            g = pl.DataFrame(schema={"start_ts": pl.Int64, "end_ts": pl.Int64})
        gaps = [(a, b) for a, b in g.iter_rows()]
        active = _merge(iv, join)
        covered = _per_hour(_subtract(active, gaps), hours)
        collected = _per_hour(active, hours)
        gap_ns = _per_hour(_merge(gaps), hours)
        n_g = np.array([sum(1 for a, b in gaps if a < h + H and b > h) for h in hours.tolist()], dtype=np.int64)
        frames.append(pl.DataFrame({"source": s, "market": m, "hour": hours, "covered": covered / H,
                                    "collected_s": collected / 1e9, "gap_s": gap_ns / 1e9, "gaps": n_g}, schema=SCHEMA))
    return pl.concat(frames)


def draw(cov: pl.DataFrame, gaps: pl.DataFrame | None = None, *, dpi: int = 100):
    """The market x hour heat map of `cov` as a matplotlib Figure (no pyplot: safe in notebooks and
    servers), and what was drawn: `matrix` (rows = markets, cols = hours), `rows`, `hours`, and
    `centers` (pixel x, y of each cell centre at `dpi`, y from the top) so callers can check the
    picture against the numbers. Times may be Datetime or int ns."""
    cov = result_times(cov, schema.time_cols("coverage"), raw_ns=True)
    if gaps is not None:
        gaps = result_times(gaps, schema.time_cols("gaps"), raw_ns=True)
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("coverage plots need matplotlib: pip install 'engine[plot]'") from e
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [f"{s}:{m}" for s, m in cov.select("source", "market").unique(maintain_order=True).iter_rows()]
    hours = sorted(set(cov["hour"].to_list()))
    col = {h: i for i, h in enumerate(hours)}
    row = {r: i for i, r in enumerate(rows)}
    mat = np.full((len(rows), len(hours)), np.nan)
    for s, m, h, c in cov.select("source", "market", "hour", "covered").iter_rows():
        mat[row[f"{s}:{m}"], col[h]] = c
    w = min(max(6.0, 0.35 * len(hours) + 3), 40.0)
    hgt = min(max(2.5, 0.45 * len(rows) + 1.8), 30.0)
    fig = Figure(figsize=(w, hgt), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdYlGn"]
    im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="fraction of hour covered")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    step = max(1, len(hours) // 24)
    ax.set_xticks(range(0, len(hours), step), [iso(hours[i])[5:13].replace("T", " ") + "h" for i in range(0, len(hours), step)],
                  rotation=90, fontsize=7)
    ax.set_title("coverage per market and UTC hour (red bars: gaps)")
    if gaps is not None and gaps.height and hours:
        t0 = hours[0]
        for s, m, a, b in gaps.select(pl.col("source").cast(pl.String), pl.col("market").cast(pl.String), "start_ts",
                                      "end_ts").iter_rows():
            r = row.get(f"{s}:{m}")
            if r is None:
                continue
            x0 = (a - t0) / H - 0.5
            x1 = max((b - t0) / H - 0.5, x0 + 0.04)  # short gaps stay visible
            ax.plot([x0, x1], [r + 0.38, r + 0.38], color="#b00000", linewidth=3, solid_capstyle="butt")
    ax.set_xlim(-0.5, len(hours) - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    fig.tight_layout()
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    centers = np.zeros((len(rows), len(hours), 2))
    for i in range(len(rows)):
        for j in range(len(hours)):
            x, y = ax.transData.transform((j, i))
            centers[i, j] = (x, height - y)
    return fig, {"matrix": mat, "rows": rows, "hours": hours, "centers": centers, "cmap": "RdYlGn"}


def plot(cov: pl.DataFrame, path, gaps: pl.DataFrame | None = None, *, dpi: int = 100) -> dict:
    """Draw `cov` as a market x hour heat map into PNG `path`; returns what `draw` drew."""
    fig, drawn = draw(cov, gaps, dpi=dpi)
    fig.savefig(path, dpi=dpi)
    return drawn


def gaps_of(eng, cov: pl.DataFrame) -> pl.DataFrame | None:
    """Every gap of the (source, market) pairs in `cov` (for the red bars), or None when there are none."""
    from engine.research.query import UnknownMarketError

    g = []
    for s, m in cov.select("source", "market").unique(maintain_order=True).iter_rows():
        try:
            g.append(eng.gaps(source=s, market=m, allow_unsealed=True, raw_ns=True).select("source", "market", "start_ts", "end_ts"))
        except UnknownMarketError:  # a market without a gaps table just has no bars
            pass
    return pl.concat([x.with_columns(pl.col("source", "market").cast(pl.String)) for x in g]) if g else None


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine coverage", description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=os.environ.get("ENGINE_HOME", "./lake"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--start", default=None, help="date or ISO time (default: first data)")
    ap.add_argument("--end", default=None, help="exclusive (default: last data)")
    ap.add_argument("--source", default=None)
    ap.add_argument("--market", default=None)
    ap.add_argument("--png", default=None, help="write the heat map here")
    a = ap.parse_args(argv)
    from engine import Engine

    eng = Engine.open(a.home, a.store, background=False)
    try:
        cov = coverage(eng, a.start, a.end, source=a.source, market=a.market, raw_ns=True)
        if cov.height == 0:
            print("no l2 or trades files in the catalog for these filters", file=sys.stderr)
            return 1
        summ = cov.group_by("source", "market", maintain_order=True).agg(
            pl.col("covered").mean().round(4).alias("mean_covered"), (pl.col("covered") < 0.999).sum().alias("hours_below_1"),
            pl.col("gap_s").sum().round(1).alias("gap_s"), pl.len().alias("hours"))
        with pl.Config(tbl_rows=500, tbl_width_chars=160):
            print(summ)
        if a.png:
            plot(cov, a.png, gaps_of(eng, cov))
            print(f"wrote {a.png}")
        return 0
    finally:
        eng.close()
