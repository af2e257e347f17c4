# Shared by scripts/run and scripts/test: create .venv and install exactly requirements.lock + the project.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: Python >= 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.engine-installed"
WANT="$(cat "$ROOT/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing pinned dependencies into $VENV (one-time)" >&2
  LOG="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check -r "$ROOT/requirements.lock" \
         && "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps -e "$ROOT"; } > "$LOG" 2>&1; then
    tail -30 "$LOG" >&2
    echo "error: installing the pinned dependencies failed; full log: $LOG" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
