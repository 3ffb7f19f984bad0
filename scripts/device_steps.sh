#!/bin/bash
# Run a list of GPU steps in one call of the device machine, inside a time budget, and bring every step's output
# back as one archive (the device tool returns at most 8 files, 2 folders down).
#
#   bash scripts/device_steps.sh STEPS_FILE [BUDGET_S]
#
# STEPS_FILE: one step per line, "timeout_s|name|command" ('#' starts a comment); the command runs in the repository
# root with PYTHONPATH=. and $D set to the step's own output folder (pass it as --out). A step is cut at its timeout
# or at what is left of BUDGET_S (default 560), whichever comes first; steps with under 30 s left are skipped.
# Writes $OUT/results.tgz (every step's folder and log, the GPU and package versions) and $OUT/summary.txt, and
# prints the summary and the tail of each log. Example steps (the next run's, session 10's note):
#   120|gputests|python -m pytest -q -n 6 -m gpu tests
#   300|census|python scripts/bench_forward.py --parts kernels_b,kernels_long --out $D
STEPS=$1; BUDGET=${2:-560}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/device_steps_out}; mkdir -p "$OUT"
T0=$(date +%s); R=/tmp/devres; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > $R/gpu.txt 2>&1
python -c "import torch, timm, transformers, triton; print(torch.__version__, timm.__version__, transformers.__version__,
triton.__version__)" >> $R/gpu.txt 2>&1
: > $R/summary.txt
while IFS='|' read -r TO NAME CMD; do
  [ -z "$TO" ] && continue; case "$TO" in \#*) continue;; esac
  LEFT=$((BUDGET - ($(date +%s) - T0) - 15))
  if [ $LEFT -lt 30 ]; then echo "$NAME: SKIPPED (no time, $LEFT s left)" >> $R/summary.txt; continue; fi
  [ "$TO" -gt $LEFT ] && TO=$LEFT
  export D=$R/$NAME; mkdir -p "$D"
  S=$(date +%s)
  timeout -k 5 "$TO" bash -c "$CMD" > "$D/log.txt" 2>&1; RC=$?
  echo "$NAME: rc=$RC $(( $(date +%s) - S ))s (limit $TO)" >> $R/summary.txt
  (cd /tmp && tar czf "$OUT/results.tgz" devres) && cp $R/summary.txt "$OUT/summary.txt"  # kept if a later step is cut
done < "$STEPS"
(cd /tmp && tar czf "$OUT/results.tgz" devres) && cp $R/summary.txt "$OUT/summary.txt"
cat $R/gpu.txt $R/summary.txt
for d in $R/*/; do echo "=== $(basename "$d")"; tail -c 1500 "$d/log.txt"; done
