"""`data-engine gen-capture`: a deterministic, protocol-exact capture from any registered exchange's
generator (same arguments → byte-identical file), written with `engine.sim.capture.write_capture`.

Common options (`--minutes`/`--seconds`, `--rate`, `--seed`, `--start`, `--out`) go to every
generator; each exchange adds its own (`GenCli` in `engine.sim.registry`), shown per exchange in
`--help`.
"""

from __future__ import annotations

import argparse
import sys

from engine.sim import registry
from engine.sim.capture import write_capture
from engine.sim.fmt import parse_start


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine gen-capture",
                                 description="Deterministic generator of protocol-exact exchange captures "
                                             "(the project's own code, no fixtures).")
    ap.add_argument("--source", choices=registry.names(), required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    ap.add_argument("--rate", type=float, default=None,
                    help="data messages per second (default: each exchange's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", default=None, help="ISO time or Unix s/ns (default 2026-11-26T17:00:00Z)")
    ap.add_argument("--out", required=True, help="output file (.jsonl or .jsonl.zst)")
    for name in registry.names():
        own = registry.get(name).gen_cli
        if own is not None:
            own.add_arguments(ap.add_argument_group(f"{name} options"))
    a = ap.parse_args(argv)
    common = dict(seconds=a.seconds if a.seconds is not None else a.minutes * 60, seed=a.seed,
                  start_ns=parse_start(a.start), rate=a.rate)
    ex = registry.get(a.source)
    if ex.gen_cli is not None:
        recs = ex.gen_cli.records(a, common)
    else:
        rate = common.pop("rate")
        recs = ex.generator(**common, **({"rate": rate} if rate else {}))
    n = write_capture(recs, a.out)
    print(f"wrote {n} lines to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli(sys.argv[1:]))
