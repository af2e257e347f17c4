"""Pictures of the lake: quotes and trades of a window, order-book depth over time, coverage.

Each function returns a matplotlib `Figure` built without pyplot (a notebook shows it inline, a
server or the CLI never touches a GUI backend) and, given `out`, also writes it: `.png`, or
`.html` — one self-contained file holding the figure as inline SVG with wheel zoom and drag pan,
no network and no extra dependency. matplotlib is the optional extra `engine[plot]`, imported
only here, when a picture is asked for.

- `quotes`: best bid and ask (step lines, the spread shaded) with the trades of the window as
  markers (buys ▲, sells ▼, area by size), and the spread below.
- `depth`: the book sampled on a UTC-aligned time grid (`eng.books`), as a price x time heat map
  of the size resting at each level (bids blue, asks orange, log colour scale), best bid/ask on
  top; samples inside a gap (no book known) are hatched.
- `coverage`: the market x hour map of `engine.research.coverage` (gaps as red bars).

Unset arguments are filled from the catalog (no data read): the source of a market when only one
has it, the most active instrument of the window, and a window ending at the last data.

`data-engine plot quotes|depth|coverage [--market M] [--source S] [--instrument I] [--start]
[--end] [--out FILE.png|FILE.html]`.
"""

from __future__ import annotations

import argparse
import html
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.fsio import atomic_path
from engine.research import parse_duration
from engine.timeutil import NS, iso, to_ns

DEFAULT_SPAN = {"quotes": 10 * 60 * NS, "depth": 10 * 60 * NS}
MAX_SAMPLES = 240  # depth columns: enough for a picture, few enough book replays
MAX_PRICE_BINS = 240
BID, ASK = "#1f5fbf", "#d9480f"
BUY, SELL = "#2b9348", "#9d0208"


class NoDataError(LookupError):
    """Nothing to draw for these arguments (the message names the window and what was asked)."""


def _mpl():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'engine[plot]'") from e

    def figure(w: float, h: float, dpi: int, **kw):
        fig = Figure(figsize=(w, h), dpi=dpi, **kw)
        FigureCanvasAgg(fig)
        return fig

    return figure


def _dt(ns) -> np.ndarray:
    """int ns → datetime64[ns] (zone-less UTC, what matplotlib's date axis takes)."""
    return np.asarray(ns, dtype=np.int64).astype("datetime64[ns]")


def _time_axis(ax) -> None:
    import matplotlib.dates as mdates

    loc = mdates.AutoDateLocator(tz="UTC")
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc, tz="UTC"))


def _plain_prices(ax) -> None:
    """Prices as written (97012.5), never as an offset (+9.7e4) the reader has to add."""
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def _gaps(eng, t: "Target") -> list[tuple[int, int]]:
    """Recorded gaps of the market (whole market or this instrument) overlapping the window."""
    from engine.research.query import UnknownMarketError

    try:
        g = eng.gaps(source=t.source, market=t.market, end=t.end, allow_unsealed=True, raw_ns=True)
    except UnknownMarketError:
        return []
    g = g.filter((pl.col("end_ts") > t.start)
                 & (pl.col("instrument").is_null() | (pl.col("instrument").cast(pl.String) == t.instrument)))
    return list(g.select("start_ts", "end_ts").iter_rows())


def _shade_gaps(ax, gaps, label: str = "gap (recorded)") -> None:
    for i, (a, b) in enumerate(gaps):
        ax.axvspan(_dt(a), _dt(max(b, a + 1)), facecolor="#f2f2f2", edgecolor="#999999", hatch="///", linewidth=0,
                   zorder=0, label=label if i == 0 else None)


# ---- arguments filled from the catalog -------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One instrument of one (source, market) over [start, end) (int ns)."""

    source: str
    market: str
    instrument: str
    start: int
    end: int

    def label(self) -> str:
        inst = "" if self.instrument == self.market else f" {self.instrument}"
        return f"{self.source}/{self.market}{inst}  {iso(self.start)[:19]} – {iso(self.end)[:19]} UTC"


def target(eng, source=None, market=None, instrument=None, start=None, end=None, *, table: str = "l2",
           span_ns: int = 10 * 60 * NS) -> Target:
    """The instrument and window to draw, unset parts filled from the catalog (see module doc)."""
    known = eng.catalog.markets(table)
    if not known:
        raise NoDataError(f"the lake at {eng.home} has no {table} files")
    if market is None:
        raise ValueError(f"name a market; {table} markets: {', '.join(sorted({m for _, m in known}))}")
    sources = sorted({s for s, m in known if m == market and (source is None or s == source)})
    if not sources:
        raise NoDataError(f"no {table} files for market {market!r}" + (f" of source {source!r}" if source else "")
                          + f"; markets: {', '.join(f'{s}/{m}' for s, m in known)}")
    if len(sources) > 1:
        raise ValueError(f"market {market!r} is in several sources ({', '.join(sources)}): name one")
    source = sources[0]
    start, end = to_ns(start, name="start"), to_ns(end, name="end")
    figs = eng.catalog.summary(table=table, source=source, market=market, by="instrument", instrument=instrument,
                               start=start, end=end, raw_ns=True).filter(pl.col("instrument").is_not_null())
    if figs.height == 0:
        what = f"{source}/{market}" + (f" instrument {instrument!r}" if instrument else "")
        when = f"between {iso(start)} and {iso(end)}" if start is not None and end is not None else (
            f"at or after {iso(start)}" if start is not None else f"before {iso(end)}")
        have = eng.catalog.summary(table=table, source=source, market=market, raw_ns=True)
        span = f"; its {table} data: {iso(have['min_ts'].min())} .. {iso(have['max_ts'].max())}" if have.height else ""
        raise NoDataError(f"{what} has no {table} data {when}{span}")
    top = figs.sort("rows", descending=True).row(0, named=True)
    instrument = top["instrument"]  # exact: itself; a glob or nothing: the most active match
    if end is None:
        end = (top["max_ts"] + 1) if start is None else start + span_ns
    if start is None:
        start = end - span_ns
    if end <= start:
        raise ValueError(f"end ({iso(end)}) must be after start ({iso(start)}); end is exclusive")
    return Target(source, market, instrument, start, end)


# ---- quotes and trades -----------------------------------------------------------------------------
def quotes(eng, source=None, market=None, instrument=None, start=None, end=None, *, trades: bool = True, out=None,
           dpi: int = 100, size=(11.0, 5.5), allow_unsealed: bool = False):
    """Best bid/ask and trades of one instrument over a window (default: the last 10 minutes of data)."""
    figure = _mpl()
    t = target(eng, source, market, instrument, start, end, span_ns=DEFAULT_SPAN["quotes"])
    q = eng.quotes(t.source, t.market, t.instrument, t.start, t.end, allow_unsealed=allow_unsealed, raw_ns=True)
    tr = None
    if trades and (t.source, t.market) in eng.catalog.markets("trades"):
        tr = eng.trades(source=t.source, market=t.market, instrument=t.instrument, start=t.start, end=t.end,
                        allow_unsealed=allow_unsealed, raw_ns=True)
    if q.height == 0 and (tr is None or tr.height == 0):
        raise NoDataError(f"no quotes or trades for {t.label()}")
    fig = figure(*size, dpi)
    ax, sp = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    fig.subplots_adjust(left=0.08, right=0.985, top=0.94, bottom=0.08, hspace=0.08)  # fixed: layout solvers cost seconds
    gaps = _gaps(eng, t)
    _shade_gaps(ax, gaps)
    _shade_gaps(sp, gaps, label=None)
    if q.height:
        # each quote holds until the next, the window's end, or a recorded gap (unknown: the line breaks)
        ts = np.append(q["ts"].to_numpy(), [a for a, _ in gaps if t.start <= a < t.end] + [t.end - 1])
        bid = np.append(q["bid_price"].cast(pl.Float64).fill_null(np.nan).to_numpy(), np.full(len(ts) - q.height, np.nan))
        ask = np.append(q["ask_price"].cast(pl.Float64).fill_null(np.nan).to_numpy(), np.full(len(ts) - q.height, np.nan))
        order = np.argsort(ts, kind="stable")
        x, bid, ask = _dt(ts[order]), bid[order], ask[order]
        if order[-1] == len(ts) - 1:  # the window's end repeats the last quote so its step is drawn
            bid[-1], ask[-1] = bid[-2], ask[-2]
        ax.fill_between(x, bid, ask, step="post", color="#bbbbbb", alpha=0.35, linewidth=0, label="spread")
        ax.step(x, bid, where="post", color=BID, linewidth=1.1, label="best bid")
        ax.step(x, ask, where="post", color=ASK, linewidth=1.1, label="best ask")
        sp.step(x, ask - bid, where="post", color="#555555", linewidth=0.9)
    if tr is not None and tr.height:
        smax = max(float(tr["size"].max() or 0.0), 1e-12)
        for side, marker, colour in (("buy", "^", BUY), ("sell", "v", SELL)):
            s = tr.filter(pl.col("side").cast(pl.String) == side)
            if s.height:
                ax.scatter(_dt(s["ts"].to_numpy()), s["price"].to_numpy(), s=12 + 70 * s["size"].to_numpy() / smax,
                           marker=marker, color=colour, edgecolors="black", linewidths=0.3, zorder=3,
                           label=f"{side}s ({s.height})")
    ax.set_title(f"best bid/ask and trades: {t.label()}", fontsize=10)
    ax.set_ylabel("price")
    _plain_prices(ax)
    ax.legend(loc="upper left", fontsize=8, ncols=6)
    ax.grid(alpha=0.25)
    sp.set_ylabel("spread")
    sp.grid(alpha=0.25)
    sp.set_xlim(_dt(t.start), _dt(t.end))
    _time_axis(sp)
    return _finish(fig, out, dpi)


# ---- depth heat map ------------------------------------------------------------------------------
def _step(span: int, every) -> int:
    if every is not None:
        return parse_duration(every, name="every")
    raw = max(span // MAX_SAMPLES, 1)
    for unit in (NS, 10**6):  # whole seconds when the window allows, else whole ms
        if raw >= unit:
            return -(-raw // unit) * unit
    return raw


def _price_bins(prices: np.ndarray) -> np.ndarray:
    """Bin edges over the prices: one bin per tick when that is few enough, wider bins otherwise."""
    u = np.unique(prices)
    lo, hi = float(u[0]), float(u[-1])
    d = np.diff(u)
    tick = float(d[d > 1e-12].min()) if np.any(d > 1e-12) else max(abs(lo) * 1e-4, 1e-6)
    n = int(min(MAX_PRICE_BINS, round((hi - lo) / tick) + 1))
    w = max((hi - lo) / max(n - 1, 1), tick)
    return lo - w / 2 + w * np.arange(n + 1)


def _price_range(have: pl.DataFrame, top: pl.DataFrame, levels: int) -> tuple[float, float]:
    """The prices to show: every best bid and ask, and the inner levels (the 10th from the touch,
    5th/95th percentile over time), not a stray far level: the picture is about the size near the
    market."""
    k = min(levels, 10) - 1
    inner = have.filter(pl.col("level") == k)
    lo_c = [top["bid_price"].min(), inner["bid_price"].quantile(0.05), top["ask_price"].min()]
    hi_c = [top["ask_price"].max(), inner["ask_price"].quantile(0.95), top["bid_price"].max()]
    lo = min(float(v) for v in lo_c if v is not None)
    hi = max(float(v) for v in hi_c if v is not None)
    pad = (hi - lo) * 0.04 or max(abs(hi) * 1e-4, 1e-6)
    return lo - pad, hi + pad


def depth(eng, source=None, market=None, instrument=None, start=None, end=None, *, every=None, levels: int = 20,
          out=None, dpi: int = 100, size=(11.0, 5.5), allow_unsealed: bool = False):
    """Size resting at each price over time (books every `every`, default: about 240 samples)."""
    import matplotlib
    import matplotlib.colors as mcolors

    figure = _mpl()
    t = target(eng, source, market, instrument, start, end, span_ns=DEFAULT_SPAN["depth"])
    step = _step(t.end - t.start, every)
    b = eng.books(t.source, t.market, t.instrument, t.start, t.end, every=step, depth=levels,
                  allow_unsealed=allow_unsealed, raw_ns=True)
    samples = np.unique(b["ts"].to_numpy())
    have = b.filter(pl.col("valid") & (pl.col("bid_price").is_not_null() | pl.col("ask_price").is_not_null()))
    if have.height == 0:
        raise NoDataError(f"no book known at any sample of {t.label()} (every {step / NS:g} s)")
    top = b.filter(pl.col("level") == 0).unique("ts", keep="first").sort("ts")  # invalid samples: null → line breaks
    lo, hi = _price_range(have, top, levels)
    sides = {}
    for side in ("bid", "ask"):
        d = have.select(pl.col("ts"), pl.col(f"{side}_price").alias("p"), pl.col(f"{side}_size").alias("s")).filter(
            pl.col("p").is_between(lo, hi) & (pl.col("s") > 0))
        sides[side] = (d["p"].to_numpy(), d["s"].to_numpy(), np.searchsorted(samples, d["ts"].to_numpy()))
    shown = np.concatenate([sides["bid"][0], sides["ask"][0]])
    if len(shown) == 0:
        raise NoDataError(f"no resting size at any sample of {t.label()} (every {step / NS:g} s)")
    edges = _price_bins(shown)
    x = _dt(np.append(samples, samples[-1] + step))
    fig = figure(*size, dpi)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.08, right=0.83, top=0.94, bottom=0.08)  # fixed: layout solvers cost seconds
    sizes = np.concatenate([sides["bid"][1], sides["ask"][1]])
    norm = mcolors.LogNorm(vmin=max(float(sizes.min()), float(sizes.max()) * 1e-4), vmax=float(sizes.max()))
    for i, (side, cmap) in enumerate((("bid", "Blues"), ("ask", "Oranges"))):
        p, sz, c = sides[side]
        mat = np.zeros((len(edges) - 1, len(samples)))
        np.add.at(mat, (np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2), c), sz)
        cm = matplotlib.colormaps[cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # empty levels: no colour
        mesh = ax.pcolormesh(x, edges, np.ma.masked_less_equal(mat, 0.0), cmap=cm, norm=norm, shading="flat",
                             rasterized=True)  # one image in SVG/HTML, not a path per cell
        fig.colorbar(mesh, cax=fig.add_axes((0.845 + 0.075 * i, 0.08, 0.014, 0.86)), label=f"{side} size")
    tx = _dt(np.append(top["ts"].to_numpy(), top["ts"].to_numpy()[-1] + step))
    for side, colour in (("bid", BID), ("ask", ASK)):
        y = top[f"{side}_price"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        ax.step(tx, np.append(y, y[-1]), where="post", color=colour, linewidth=1.0, label=f"best {side}")
    runs: list[list[int]] = []
    for x0 in b.filter(~pl.col("valid"))["ts"].unique().sort().to_list():  # consecutive samples without a book: one span
        if runs and x0 == runs[-1][1]:
            runs[-1][1] = x0 + step
        else:
            runs.append([x0, x0 + step])
    _shade_gaps(ax, runs, label="no book known (gap)")
    ax.set_ylim(float(edges[0]), float(edges[-1]))
    _plain_prices(ax)
    ax.set_title(f"book depth (top {levels} levels, every {step / NS:g} s): {t.label()}", fontsize=10)
    ax.set_ylabel("price")
    ax.set_xlim(x[0], x[-1])
    ax.legend(loc="upper left", fontsize=8)
    _time_axis(ax)
    return _finish(fig, out, dpi)


# ---- coverage --------------------------------------------------------------------------------------
def coverage(eng, start=None, end=None, *, source=None, market=None, out=None, dpi: int = 100):
    """The market x hour coverage map (engine.research.coverage), gaps as red bars."""
    from engine.research import coverage as cov_mod

    _mpl()
    cov = cov_mod.coverage(eng, start, end, source=source, market=market, raw_ns=True)
    if cov.height == 0:
        raise NoDataError("no l2 or trades files in the catalog for these filters")
    fig, _ = cov_mod.draw(cov, cov_mod.gaps_of(eng, cov), dpi=dpi)
    return _finish(fig, out, dpi)


# ---- output ----------------------------------------------------------------------------------------
def _finish(fig, out, dpi: int):
    if out is not None:
        save(fig, out, dpi=dpi)
    return fig


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ margin: 0; font: 13px sans-serif; color: #333; }}
header {{ padding: 6px 10px; }}
#fig {{ width: 100vw; height: calc(100vh - 34px); overflow: hidden; }}
#fig svg {{ width: 100%; height: 100%; cursor: grab; }}
</style></head>
<body><header>{title} &mdash; wheel: zoom, drag: pan, double-click: reset (data-engine plot)</header>
<div id="fig">{svg}</div>
<script>
(function () {{
  const svg = document.querySelector("#fig svg");
  svg.removeAttribute("width"); svg.removeAttribute("height");
  const home = svg.getAttribute("viewBox").split(/[ ,]+/).map(Number);
  let vb = home.slice(), drag = null;
  const set = () => svg.setAttribute("viewBox", vb.join(" "));
  const at = (e) => {{ const r = svg.getBoundingClientRect(), s = Math.max(vb[2] / r.width, vb[3] / r.height);
    return [vb[0] + (e.clientX - r.left) * s, vb[1] + (e.clientY - r.top) * s, s]; }};
  svg.addEventListener("wheel", (e) => {{ e.preventDefault(); const [x, y] = at(e), k = e.deltaY < 0 ? 0.8 : 1.25;
    vb = [x - (x - vb[0]) * k, y - (y - vb[1]) * k, vb[2] * k, vb[3] * k]; set(); }}, {{ passive: false }});
  svg.addEventListener("mousedown", (e) => {{ drag = [e.clientX, e.clientY, vb.slice()]; }});
  window.addEventListener("mouseup", () => {{ drag = null; }});
  window.addEventListener("mousemove", (e) => {{ if (!drag) return; const s = at(e)[2];
    vb = [drag[2][0] - (e.clientX - drag[0]) * s, drag[2][1] - (e.clientY - drag[1]) * s, vb[2], vb[3]]; set(); }});
  svg.addEventListener("dblclick", () => {{ vb = home.slice(); set(); }});
}})();
</script></body></html>
"""


def save(fig, out, *, dpi: int = 100) -> Path:
    """Write `fig` to `out` atomically: `.png`, or `.html` (self-contained: inline SVG, zoom and pan)."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in (".png", ".html", ".htm"):
        raise ValueError(f"plot output must end in .png or .html, got {out.name!r}")
    with atomic_path(out) as tmp:
        if kind == ".png":
            fig.savefig(tmp, format="png", dpi=dpi)
        else:
            buf = io.StringIO()
            fig.savefig(buf, format="svg")
            svg = buf.getvalue()
            svg = svg[svg.index("<svg"):]
            title = fig.axes[0].get_title() if fig.axes else "data-engine plot"
            tmp.write_text(_HTML.format(title=html.escape(title), svg=svg), encoding="utf-8")
    return out


class Plots:
    """`eng.plot`: the functions above bound to one engine."""

    def __init__(self, eng):
        self.eng = eng

    def quotes(self, *args, **kw):
        return quotes(self.eng, *args, **kw)

    def depth(self, *args, **kw):
        return depth(self.eng, *args, **kw)

    def coverage(self, *args, **kw):
        return coverage(self.eng, *args, **kw)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine plot", description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["quotes", "depth", "coverage"])
    ap.add_argument("--market", help="quotes/depth: the market (coverage: a filter, globs allowed)")
    ap.add_argument("--source", help="default: the one source holding the market")
    ap.add_argument("--instrument", help="default: the most active instrument of the window")
    ap.add_argument("--start", help="date or ISO time, UTC when no zone (default: 10 minutes before --end)")
    ap.add_argument("--end", help="exclusive (default: the last data)")
    ap.add_argument("--every", help="depth: sampling step, e.g. 1s (default: about 240 samples)")
    ap.add_argument("--levels", type=int, default=20, help="depth: levels per side (default 20)")
    ap.add_argument("--no-trades", action="store_true", help="quotes: leave the trades out")
    ap.add_argument("--allow-unsealed", action="store_true", help="read past the sealed watermark")
    ap.add_argument("--out", help="FILE.png or FILE.html (default KIND.png)")
    ap.add_argument("--dpi", type=int, default=100)
    ap.add_argument("--home", default=None, help="lake home (default $ENGINE_HOME or ./lake)")
    ap.add_argument("--store", default=None, help="object store (default $ENGINE_STORE or HOME/store)")
    a = ap.parse_args(argv)
    from engine import Engine
    from engine.errors import EngineError
    from engine.lake.store import StoreError
    from engine.schema import SchemaError

    out = Path(a.out or f"{a.kind}.png")
    try:
        eng = Engine.open(a.home, a.store, background=False)
        try:
            if a.kind == "coverage":
                coverage(eng, a.start, a.end, source=a.source, market=a.market, out=out, dpi=a.dpi)
            elif a.kind == "quotes":
                quotes(eng, a.source, a.market, a.instrument, a.start, a.end, trades=not a.no_trades, out=out,
                       dpi=a.dpi, allow_unsealed=a.allow_unsealed)
            else:
                depth(eng, a.source, a.market, a.instrument, a.start, a.end, every=a.every, levels=a.levels, out=out,
                      dpi=a.dpi, allow_unsealed=a.allow_unsealed)
        finally:
            eng.close()
    except (EngineError, SchemaError, StoreError, LookupError, ValueError, OSError, ImportError) as e:
        print(f"data-engine plot {a.kind}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0
