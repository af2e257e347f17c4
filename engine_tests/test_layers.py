"""The package layout is the architecture: data flows collect → lake → research, `sim` may use
`collect`, and `engine` is a plain library that never imports Dagster (an extra: engine[dagster]).

Every module under engine/ is read with `ast` (imports inside functions included), so a lazy
import that runs against the flow fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from engine_tests.conftest import ROOT

ENGINE = ROOT / "engine"
DAGSTER = ("dagster", "dagster_webserver", "dagster_graphql", "dagster_pipes", "dagster_shared", "engine_defs")
# layer -> the layers it must never import
AGAINST_THE_FLOW = {
    "lake": ("collect", "research", "sim"),
    "collect": ("research", "sim"),
    "research": ("collect", "sim"),
}
BASE = ("schema", "timeutil", "paths", "log", "errors", "fsio")  # the top every layer may use: imports no layer
LAYERS = ("collect", "lake", "research", "sim", "run")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved;
    `from pkg import name` also yields `pkg.name` (it may be a module)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "engine" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else ("base" if parts[1] in BASE else "top")


def _violations() -> list[str]:
    bad = []
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) > 40, "engine/ not found where expected"
    for f in files:
        me = _module_name(f)
        mine = _layer(me)
        for line, mod in _imports(f):
            where = f"{f.relative_to(ROOT)}:{line} imports {mod}"
            if mod.split(".")[0] in DAGSTER:
                bad.append(f"{where}: engine never imports Dagster or engine_defs")
                continue
            theirs = _layer(mod)
            if theirs in AGAINST_THE_FLOW.get(mine, ()):
                bad.append(f"{where}: {mine} must not import {theirs} (collect → lake → research; sim uses collect)")
            elif mine == "base" and theirs in LAYERS:
                bad.append(f"{where}: {me} is below every layer")
    return bad


def test_imports_follow_the_flow_and_never_reach_dagster():
    assert _violations() == []


def test_the_checker_sees_lazy_relative_and_from_imports(tmp_path, monkeypatch):
    """The walk above must not pass by looking nowhere: the same checks on a planted tree."""
    import engine_tests.test_layers as me

    root = tmp_path / "repo"
    for rel, text in {
        "engine/__init__.py": "",
        "engine/lake/__init__.py": "",
        "engine/lake/a.py": "def f():\n    from engine.research import quotes\n",
        "engine/lake/b.py": "from ..sim import replay\n",
        "engine/collect/__init__.py": "",
        "engine/collect/c.py": "import dagster as dg\n",
        "engine/research/__init__.py": "",
        "engine/research/d.py": "from engine import collect\n",
        "engine/schema.py": "from engine.lake import a\n",
        "engine/sim/__init__.py": "from engine.collect import c\nfrom engine.lake import a\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for i in range(41):
        (root / "engine" / f"pad{i}.py").write_text("")
    monkeypatch.setattr(me, "ROOT", root)
    monkeypatch.setattr(me, "ENGINE", root / "engine")
    got = "\n".join(me._violations())
    for want in ("engine/lake/a.py:2 imports engine.research", "engine/lake/b.py:1 imports engine.sim",
                 "engine/collect/c.py:1 imports dagster", "engine/research/d.py:1 imports engine.collect",
                 "engine/schema.py:1 imports engine.lake"):
        assert want in got, got
    assert "engine/sim/__init__.py" not in got, got


BLOCK = textwrap.dedent("""
    import sys

    BLOCKED = ("dagster", "dagster_webserver", "dagster_graphql", "dagster_pipes", "dagster_shared",
               "engine_defs", "matplotlib")

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not installed (blocked by the test)")
            return None

    sys.meta_path.insert(0, Blocked())
""")


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)


def test_engine_imports_and_reads_without_dagster_or_matplotlib(tmp_path):
    """`import engine, engine.api, engine.research.query` and a write + every read path with the
    dagster and plot extras missing: lazy imports only where they are used."""
    p = _run_blocked("""
        import engine, engine.api, engine.research.query
        import pkgutil, importlib
        for m in pkgutil.walk_packages(engine.__path__, "engine."):
            importlib.import_module(m.name)  # every module of the library, not only the read path

        from engine import Engine
        from engine.sim import synth
        from engine.timeutil import NS_PER_HOUR, to_ns
        t0 = to_ns("2026-11-02")
        eng = Engine.open("lake", background=False, writer=True, book_anchors=True)
        eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", t0, 2_000, NS_PER_HOUR))
        eng.append("trades", synth.trade_rows("coinbase", "BTC-USD", t0, 500, NS_PER_HOUR))
        eng.flush()
        kw = dict(allow_unsealed=True)
        assert eng.l2(source="coinbase", market="BTC-USD", **kw).height == 2_000
        assert eng.trades(source="coinbase", **kw).height == 500
        assert eng.sql("SELECT count(*) AS n FROM trades", allow_unsealed=True)["n"][0] == 500
        assert eng.quotes("coinbase", "BTC-USD", **kw).height > 0
        assert eng.bars(every="1m", source="coinbase", market="BTC-USD", **kw).height > 0
        eng.book("coinbase", "BTC-USD", "BTC-USD", at=t0 + NS_PER_HOUR // 2, **kw)
        eng.coverage(source="coinbase")
        eng.close()
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok")
    """, tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_the_block_really_blocks(tmp_path):
    p = _run_blocked("import dagster", tmp_path)
    assert p.returncode != 0 and "blocked by the test" in p.stderr
