#!/usr/bin/env bash
# Every CPU benchmark, then the tables in BENCHMARKS.md. One command, ~6-8 minutes on 2 cores:
#   bash bench/run_all.sh
# Results: bench/results/*.json. The GPU benchmark is separate: python bench/bench_gpu.py (CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 SDNQ_USE_TORCH_COMPILE=0
mkdir -p bench/results
start=$(date +%s)
for bench in bench_streaming bench_overhead bench_latency bench_fix_sse bench_scale; do
  echo "== $bench" >&2
  t0=$(date +%s)
  "$PY" "bench/$bench.py" > "bench/results/$bench.log" 2>&1 || { echo "$bench failed; see bench/results/$bench.log" >&2; tail -20 "bench/results/$bench.log" >&2; exit 1; }
  echo "   $(( $(date +%s) - t0 )) s" >&2
done
"$PY" bench/report.py
echo "all benchmarks: $(( $(date +%s) - start )) s" >&2
