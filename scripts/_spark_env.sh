# Shared by scripts/bench_spark (and the slow Spark test's setup): a separate .venv-spark with
# PySpark pinned, created on first use. PySpark (~430 MB, a JVM) stays out of the project's .venv;
# the venv is made without --system-site-packages so nothing leaks in from either side.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SPARK_VENV="$ROOT/.venv-spark"
# Spark 4.0 runs on Java 17 or 21 (Spark 3.5 was the last on Java 8/11); pyarrow and polars match .venv
SPARK_PINS=(pyspark==4.0.1 py4j==0.10.9.9 pyarrow==26.0.1 polars==2.1.0)
PY="${PYTHON:-python3}"
if ! command -v java > /dev/null; then
  echo "error: PySpark needs a Java runtime (17 or 21) on PATH: apt-get install openjdk-17-jre-headless" >&2
  exit 2
fi
if ! java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])'; then
  echo "error: Spark 4 needs Java 17 or newer; found: $(java -version 2>&1 | head -1)" >&2
  exit 2
fi
SPARK_STAMP="$SPARK_VENV/.engine-spark-installed"
SPARK_WANT="${SPARK_PINS[*]}"
if [ ! -f "$SPARK_STAMP" ] || [ "$(cat "$SPARK_STAMP")" != "$SPARK_WANT" ]; then
  echo "creating $SPARK_VENV with ${SPARK_WANT} (one-time, ~450 MB)" >&2
  [ -x "$SPARK_VENV/bin/python" ] || "$PY" -m venv "$SPARK_VENV"
  LOG="$SPARK_VENV/install.log"
  if ! "$SPARK_VENV/bin/python" -m pip install --disable-pip-version-check "${SPARK_PINS[@]}" > "$LOG" 2>&1; then
    tail -30 "$LOG" >&2
    echo "error: installing PySpark into $SPARK_VENV failed; full log: $LOG" >&2
    exit 1
  fi
  echo "$SPARK_WANT" > "$SPARK_STAMP"
fi
