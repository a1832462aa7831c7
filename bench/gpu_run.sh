#!/usr/bin/env bash
# The one command for the lent GPU machine (run from the repo root, with .whl/ carried; made here by
# bench/gpu_wheels.sh). Installs the carried wheels, prints nvidia-smi, runs the GPU check into
# $OUT/gpu (gpu_report.json, gpu_report.md, cases.log, log.txt: 4 files, what comes back from $OUT).
#
#   bash bench/gpu_run.sh            # OUT defaults to ./gpu-out when the device tool does not set it
#   BUDGET_S=270 bash bench/gpu_run.sh -- --cases gpu_tests,digits    # extra arguments go to gpu_check.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/gpu"
{
    echo "== $(date -u +%FT%TZ) $(hostname) python3=$(command -v python3)"
    # shellcheck source=bench/gpu_install.sh
    source bench/gpu_install.sh || echo "gpu_run.sh: WARNING: bench/gpu_install.sh failed (exit $?)"
    echo "PYTHONPATH=${PYTHONPATH:-}"
    nvidia-smi || echo "gpu_run.sh: nvidia-smi not available"
    [ "${1:-}" = "--" ] && shift
    python3 bench/gpu_check.py --out "$OUT/gpu" --budget-s "${BUDGET_S:-270}" "$@"
    echo "gpu_check.py exit $?"
} 2>&1 | tee "$OUT/gpu/log.txt"
