"""`python -m engine.sim.replay ...`: the replay exchange CLI."""

import sys

from engine.sim.replay.cli import cli

if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli(sys.argv[1:]))
