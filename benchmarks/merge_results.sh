#!/usr/bin/env bash
# Rebuild benchmarks/RESULTS.md from the per-area sections in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")"
{
  echo "# Benchmark results"
  echo
  echo "Each section below is written by its benchmark script (\`python benchmarks/<script>.py --quick\`)"
  echo "and states its command, date and machine. All numbers come from the project's 2-core"
  echo "AMD EPYC CPU machine (no GPU was lent to these tasks). Encoder, face pipeline, verification"
  echo "memory and adapter training were measured on the idle machine; the other sections (and everything added in session 3) while other"
  echo "jobs loaded it (load average 10-19 on 2 cores): there the ratios, measured side by side in one"
  echo "run, are the meaningful numbers, and absolute throughputs are pessimistic."
  echo
  for area in encoder faces datasets_and_eval losses checkpoints training vlm_bridge adapter_training gallery_and_demo demo indexing search clip_index; do
    f="results/$area.md"
    [ -f "$f" ] || continue
    echo
    sed 's/^# /## /; s/^## \(.*\)/### \1/' "$f" | sed '1s/^### /## /'
  done
} > RESULTS.md
