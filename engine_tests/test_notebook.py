"""docs/research.ipynb runs end to end: executed headlessly with nbclient on a `python3` kernel of this
interpreter (a kernel spec installed into a temporary Jupyter path) against a freshly generated lake;
any cell error fails the test, and the README's two pictures come out of it."""

from __future__ import annotations

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from benchmarks.docs_figures import FIGURES, NOTEBOOK, figures, run_notebook  # noqa: E402
from engine.sim.sample_lake import build  # noqa: E402


def test_research_notebook_executes_end_to_end(tmp_path):
    import io

    import matplotlib.image as mpimg
    import nbformat

    lake = build(tmp_path / "lake", minutes=6, coinbase_rate=40, kalshi_rate=15)
    source = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in source.cells if c.cell_type == "code"]
    # the cells the brief names are all there: open, catalog, quotes, book, asof, bars, valid, depth, coverage
    text = "\n".join(c.source for c in code)
    for call in ("Engine.open(", "catalog.summary(", "eng.quotes(", "eng.book(", "eng.asof(", "eng.bars(",
                 "eng.valid(", "eng.plot.depth(", "eng.coverage(", "eng.plot.coverage("):
        assert call in text, call
    nb, seconds = run_notebook(lake.home, timeout_s=240)  # raises CellExecutionError naming a failing cell
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert len(ran) == len(code) and all(c.execution_count for c in ran)
    assert not [o for c in ran for o in c.outputs if o.output_type == "error"]
    assert not [o for c in ran for o in c.outputs if o.get("name") == "stderr" and "Traceback" in o.get("text", "")]
    pictures = sum(1 for c in ran for o in c.outputs if "image/png" in o.get("data", {}))
    assert pictures >= 8  # quotes, book, asof, bars, windows, two depth maps, coverage
    figs = figures(nb)
    for tag in FIGURES:
        img = mpimg.imread(io.BytesIO(figs[tag]), format="png")
        assert img.shape[0] > 300 and img.shape[1] > 700, tag
    print(f"notebook executed in {seconds:.1f} s ({pictures} pictures)")
