#!/usr/bin/env bash
# Throughput of `mxlm quantize` against copying the same files, on a generated random BF16 expert checkpoint
# (bench/bench_quantize.py, M3 expert shapes). Both run from a warm page cache (the input was just written),
# so this measures the quantizer's CPU cost against the cost of moving the bytes. cp is timed alone and followed
# by `sync` (mxlm quantize fsyncs every shard before renaming it), best of RUNS each.
# usage: bench/bench_quantize.sh [MXLM_BIN] [GB=3] [THREADS=2] [RUNS=2]
# env: WORK (default /tmp/mxlm-bench-quantize)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mxlm=${1:-$here/../build/mxlm}
gb=${2:-3}
threads=${3:-2}
runs=${4:-2}
work=${WORK:-/tmp/mxlm-bench-quantize}
py=${PYTHON:-python3}
rm -rf "$work"
mkdir -p "$work"
"$py" "$here/bench_quantize.py" "$work/in" --gb "$gb"
in_bytes=$(du -sb "$work/in" | cut -f1)
sync

timed() {  # prints "seconds peak_rss_kb cpu_seconds"
  /usr/bin/time -f "%e %M %U %S" -o "$work/time" "$@" > "$work/cmd.log" 2>&1 || { cat "$work/cmd.log"; exit 1; }
  awk '{printf "%s %s %.2f\n", $1, $2, $3 + $4}' "$work/time"
}
best_cp=1e9 best_cps=1e9 best_q=1e9 q_rss=0 q_cpu=1e9
for r in $(seq "$runs"); do
  rm -rf "$work/cp"
  read -r t _ < <(timed cp -r "$work/in" "$work/cp")
  best_cp=$(echo "$t $best_cp" | awk '{print ($1 < $2) ? $1 : $2}')
  rm -rf "$work/cp"
  s0=$(date +%s.%N)
  cp -r "$work/in" "$work/cp" && sync
  t=$(echo "$(date +%s.%N) $s0" | awk '{printf "%.2f", $1 - $2}')
  best_cps=$(echo "$t $best_cps" | awk '{print ($1 < $2) ? $1 : $2}')
  rm -rf "$work/cp" "$work/out"
  read -r t rss cpu < <(timed "$mxlm" quantize --model "$work/in" --output "$work/out" --threads "$threads" --no-progress)
  best_q=$(echo "$t $best_q" | awk '{print ($1 < $2) ? $1 : $2}')
  q_cpu=$(echo "$cpu $q_cpu" | awk '{print ($1 < $2) ? $1 : $2}')
  q_rss=$(( rss > q_rss ? rss : q_rss ))
done
out_bytes=$(du -sb "$work/out" | cut -f1)
largest=$((3072 * 6144 * 2))
awk -v inb="$in_bytes" -v outb="$out_bytes" -v cp="$best_cp" -v cps="$best_cps" -v q="$best_q" -v rss="$q_rss" \
    -v threads="$threads" -v largest="$largest" -v cpu="$q_cpu" 'BEGIN {
  printf "input %.2f GB -> output %.2f GB, %d threads\n", inb / 1e9, outb / 1e9, threads
  printf "cp -r:           %6.2f s  (%.2f GB/s)\n", cp, inb / cp / 1e9
  printf "cp -r + sync:    %6.2f s  (%.2f GB/s)\n", cps, inb / cps / 1e9
  printf "mxlm quantize:   %6.2f s  (%.2f GB/s of input), peak RSS %.0f MB (largest tensor %.1f MB)\n", q, inb / q / 1e9, rss / 1024, largest / 1e6
  printf "mxlm CPU time (user+sys): %.2f s = %.2f core-s per GB of input\n", cpu, cpu / (inb / 1e9)
  printf "ratio vs cp: %.2fx, vs cp+sync: %.2fx\n", q / cp, q / cps
  printf "estimate for the 855 GB M3 checkpoint at this rate: %.0f min\n", 855e9 / (inb / q) / 60
}'
rm -rf "$work"
