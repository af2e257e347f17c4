"""Pictures: `data-engine plot quotes|depth|coverage` and `eng.plot.*` on a capture-shaped lake (collector
normalizers via ingest). Each PNG is decoded and must show data (the series' colours, many of them),
not an empty axis; the drawn lines carry the query's numbers; HTML output is one self-contained file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

pytest.importorskip("matplotlib")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.image as mpimg  # noqa: E402

from engine import Engine  # noqa: E402
from engine.research import plot  # noqa: E402
from engine.sim.sample_lake import build  # noqa: E402
from engine.timeutil import iso  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
S = 10**9


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    s = build(tmp_path_factory.mktemp("plot") / "lake", minutes=6, coinbase_rate=40, kalshi_rate=15)
    eng = Engine.open(s.home)
    yield s, eng
    eng.close()


def _pixels(png: Path) -> np.ndarray:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    return (img[..., :3] * 255).round().astype(np.int16)


def _near(px: np.ndarray, colour: str, tol: int = 40) -> int:
    """Pixels within `tol` (per channel) of a colour."""
    want = np.array([round(c * 255) for c in mcolors.to_rgb(colour)])
    return int((np.abs(px - want).max(axis=-1) <= tol).sum())


def _colourful(px: np.ndarray) -> tuple[int, int]:
    """(pixels with a hue, distinct colours among them): text, axes and grid are grey, data is not."""
    sat = px.max(axis=-1) - px.min(axis=-1)
    c = px[sat > 40]
    return len(c), len({tuple(v) for v in c[:: max(1, len(c) // 20000)]})


def _empty_axis(tmp_path) -> tuple[int, int]:
    """The same measure on an empty axis of the same size (title, labels, grid): the baseline."""
    fig = plot._mpl()(11.0, 5.5, 100, layout="constrained")
    ax = fig.subplots()
    ax.set_title("best bid/ask and trades: coinbase/BTC-USD 2026-01-01T00:00:00 – 2026-01-01T00:10:00 UTC")
    ax.grid(alpha=0.25)
    ax.legend(handles=[], loc="upper left")
    fig.savefig(tmp_path / "empty.png", dpi=100)
    return _colourful(_pixels(tmp_path / "empty.png"))


def test_cli_quotes_depth_coverage_draw_data(lake, tmp_path, capsys):
    s, eng = lake
    base_n, base_colours = _empty_axis(tmp_path)
    assert base_n < 500
    home = ["--home", str(s.home)]
    # quotes and trades: the bid, ask, buy and sell colours are all there
    q = tmp_path / "q.png"
    assert plot.cli(["quotes", "--market", "BTC-USD", "--out", str(q), *home]) == 0
    assert f"wrote {q}" in capsys.readouterr().out
    px = _pixels(q)
    assert px.shape[:2] == (550, 1100) and q.stat().st_size > 20_000
    for colour in (plot.BID, plot.ASK, plot.BUY, plot.SELL):
        assert _near(px, colour) > 200, colour
    n, colours = _colourful(px)
    assert n > 20 * max(base_n, 1) and colours > 50
    # depth: a heat map, two colour scales with many shades
    d = tmp_path / "d.png"
    assert plot.cli(["depth", "--market", "KXBTC", "--out", str(d), *home]) == 0
    n, colours = _colourful(_pixels(d))
    assert n > 30_000 and colours > 100, (n, colours)
    # coverage: the map of every market
    c = tmp_path / "c.png"
    assert plot.cli(["coverage", "--out", str(c), *home]) == 0
    px = _pixels(c)
    n, _ = _colourful(px)
    assert n > 5_000 and _near(px, "#b00000", tol=30) > 20  # the cells, and the disconnect's red bars
    # through the top-level command, as HTML: one file, no outside references
    from engine.cli import main

    h = tmp_path / "d.html"
    assert main(["plot", "depth", "--market", "BTC-USD", "--every", "5s", "--levels", "10", "--out", str(h), *home]) == 0
    text = h.read_text()
    assert text.startswith("<!doctype html>") and "<svg" in text and "<script>" in text
    assert "data:image/png;base64," in text  # the heat map is one embedded raster, not thousands of paths
    assert not [u for u in ("<script src", "<link", "@import") if u in text]
    assert 20_000 < h.stat().st_size < 2_000_000


def test_drawn_lines_carry_the_query(lake):
    s, eng = lake
    t0, t1 = s.end_ns - 240 * S, s.end_ns - 60 * S
    fig = eng.plot.quotes(source="coinbase", market="BTC-USD", start=t0, end=t1)
    ax = fig.axes[0]
    bid = next(line for line in ax.lines if line.get_label() == "best bid")
    q = eng.quotes("coinbase", "BTC-USD", start=t0, end=t1, raw_ns=True)
    y = np.asarray(bid.get_ydata(), dtype=float)
    assert q.height > 100 and q["bid_price"].null_count() == 0
    assert np.array_equal(y[~np.isnan(y)][: q.height], q["bid_price"].to_numpy())  # then the window's end
    trades = eng.trades(source="coinbase", market="BTC-USD", start=t0, end=t1)
    assert sum(len(c.get_offsets()) for c in ax.collections if "buys" in str(c.get_label()) or
               "sells" in str(c.get_label())) == trades.height
    # depth: the sizes in the heat map are the books' sizes inside the price range shown
    fig = eng.plot.depth(source="coinbase", market="BTC-USD", start=t0, end=t1, every="2s", levels=5)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    b = eng.books("coinbase", "BTC-USD", "BTC-USD", t0, t1, every="2s", depth=5).filter(pl.col("valid"))
    for side, mesh in zip(("bid", "ask"), [c for c in ax.collections if hasattr(c, "get_array")][:2]):
        shown = b.filter(pl.col(f"{side}_price").is_between(lo, hi))[f"{side}_size"].sum()
        assert np.isclose(float(np.ma.sum(mesh.get_array())), shown), side
    # the recorded disconnect is hatched on both pictures when the window holds it
    g0, g1 = s.gap
    fig = eng.plot.quotes(source="coinbase", market="BTC-USD", start=g0 - 60 * S, end=g1 + 60 * S)
    assert any(p.get_label() == "gap (recorded)" for p in fig.axes[0].patches)
    fig = eng.plot.depth(source="coinbase", market="BTC-USD", start=g0 - 60 * S, end=g1 + 60 * S, every="1s")
    assert any(p.get_label() == "no book known (gap)" for p in fig.axes[0].patches)


def test_defaults_and_errors(lake, tmp_path, capsys):
    s, eng = lake
    t = plot.target(eng, market="KXBTC")  # the source, the busiest contract and the last ten minutes
    inst = eng.catalog.summary(table="l2", market="KXBTC", by="instrument").sort("rows", descending=True)
    assert (t.source, t.instrument) == ("kalshi", inst["instrument"][0]) and t.end - t.start == 600 * S
    with pytest.raises(ValueError, match="name a market; l2 markets: BTC-USD, ETH-USD, KXBTC, KXETH, KXSOL, SOL-USD"):
        plot.target(eng)
    with pytest.raises(plot.NoDataError, match="no l2 files for market 'NOPE'"):
        plot.target(eng, market="NOPE")
    far = iso(s.start_ns - 3600 * S)
    with pytest.raises(plot.NoDataError):
        eng.plot.quotes(market="BTC-USD", start=far, end=iso(s.start_ns - 1800 * S))
    with pytest.raises(ValueError, match="must end in .png or .html"):
        eng.plot.coverage(out=tmp_path / "x.jpg")
    assert plot.cli(["quotes", "--market", "BTC-USD", "--start", far, "--end", iso(s.start_ns - 1800 * S),
                     "--home", str(s.home), "--out", str(tmp_path / "none.png")]) == 2
    assert f"coinbase/BTC-USD has no l2 data between {far} and " in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists() and not list(tmp_path.glob(".none*"))


def test_matplotlib_only_when_a_picture_is_drawn():
    code = ("import sys, engine, engine.api, engine.research.plot, engine.research.export, engine.research.coverage; "
            "assert 'matplotlib' not in sys.modules, 'imported eagerly'")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
