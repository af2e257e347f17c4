"""Execute `docs/research.ipynb` headlessly against a lake and keep its pictures.

`run_notebook` is what the test suite uses (`engine_tests/test_notebook.py`): a `python3` kernel
spec pointing at this interpreter is installed into a temporary Jupyter path, so the kernel runs
the same Python, with this checkout first on its path and the lake in `ENGINE_HOME`; any cell
error fails the run (nbclient raises `CellExecutionError` naming the cell).

`scripts/docs_figures [--home LAKE] [--write-notebook]` builds a sample lake (engine.sim.sample_lake)
unless given one, executes the notebook, writes the figures of the cells tagged `fig-quotes` and
`fig-depth` to `docs/research-quotes.png` and `docs/research-depth.png` (the README shows them)
and, with `--write-notebook`, stores the executed notebook with its outputs.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "research.ipynb"
FIGURES = {"fig-quotes": "research-quotes.png", "fig-depth": "research-depth.png"}


def run_notebook(home, path: Path = NOTEBOOK, *, timeout_s: int = 180):
    """Execute the notebook on `home`; returns (executed notebook, seconds). Raises on any cell error."""
    import nbformat
    from ipykernel.kernelspec import install
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="nbrun-") as tmp:
        prefix = Path(tmp) / "jupyter"
        # kernel.json runs sys.executable: the kernel is this interpreter, whatever else is installed
        install(kernel_name="python3", prefix=str(prefix))
        saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "ENGINE_HOME",
                                               "PYTHONPATH", "MPLBACKEND", "MPLCONFIGDIR")}
        os.environ.update({
            "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
            "JUPYTER_RUNTIME_DIR": str(Path(tmp) / "runtime"),  # connection files: not in the user's home
            "IPYTHONDIR": str(Path(tmp) / "ipython"),
            "MPLCONFIGDIR": str(Path(tmp) / "mpl"),
            "ENGINE_HOME": str(Path(home).resolve()),
            "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [saved["PYTHONPATH"]] if p]),
        })
        os.environ.pop("MPLBACKEND", None)  # the notebook's own %matplotlib inline decides
        try:
            client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3", allow_errors=False,
                                    resources={"metadata": {"path": str(path.parent)}})
            t0 = time.perf_counter()
            client.execute()
            return nb, time.perf_counter() - t0
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def figures(nb) -> dict[str, bytes]:
    """PNG bytes of the first image output of each tagged cell (tag → bytes)."""
    out = {}
    for cell in nb.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            for o in cell.get("outputs", []):
                png = o.get("data", {}).get("image/png")
                if png:
                    out[tag] = base64.b64decode(png)
                    break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", help="lake to run on (default: a fresh sample lake)")
    ap.add_argument("--minutes", type=float, default=20.0, help="length of the sample lake")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs")
    ap.add_argument("--write-notebook", action="store_true", help="store the executed notebook with its outputs")
    a = ap.parse_args(argv)
    from engine.fsio import atomic_write_bytes

    with tempfile.TemporaryDirectory(prefix="docs-lake-") as tmp:
        home = a.home
        if home is None:
            from engine.sim.sample_lake import build

            t0 = time.perf_counter()
            s = build(Path(tmp) / "lake", minutes=a.minutes)
            home = s.home
            print(f"sample lake: {s.rows:,} rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        nb, secs = run_notebook(home)
    print(f"notebook executed in {secs:.1f} s", file=sys.stderr)
    figs = figures(nb)
    for tag, name in FIGURES.items():
        if tag not in figs:
            print(f"error: the cell tagged {tag} drew no picture", file=sys.stderr)
            return 1
        atomic_write_bytes(Path(a.out) / name, figs[tag])
        print(f"wrote {Path(a.out) / name} ({len(figs[tag]):,} bytes)")
    if a.write_notebook:
        import nbformat

        atomic_write_bytes(NOTEBOOK, (nbformat.writes(nb) + "\n").encode())
        print(f"wrote {NOTEBOOK} with its outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
