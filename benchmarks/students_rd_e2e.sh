#!/bin/bash
# End-to-end check of one category through the CLI: edgead synth -> train -> export (FP32, FP16,
# INT8) -> bench parity, for each of the given models (default: students rd rdpp). Short trainings
# (the parity of an engine does not depend on how long the weights trained).
#   benchmarks/students_rd_e2e.sh OUTDIR [MODEL...]
set -euo pipefail
out=${1:?OUTDIR}; shift
models=${*:-students rd rdpp}
py=${PYTHON:-python}
mkdir -p "$out"
$py -m edgead.cli synth --out "$out/data" --categories washer --image-size 128 --n-train 60 --n-test-good 8 --n-test-per-defect 2
for m in $models; do
  case $m in
    students) set_args="width=16 teacher_lr=0.001 student_lr=0.001" ;;
    rdpp) set_args="proj_div=4 ot_points=128" ;;
    *) set_args="" ;;
  esac
  $py -m edgead.cli train --data "$out/data" --category washer --model "$m" --image-size 128 --epochs 2 \
      --batch-size 16 ${set_args:+--set $set_args} --out "$out/run-$m"
  $py -m edgead.cli export "$out/run-$m" --precision fp32 fp16 int8 --out "$out/bundle-$m"
  $py -m edgead.cli bench parity "$out/bundle-$m" --precision fp32 fp16 int8 --out "$out/parity-$m.json" || echo "PARITY-FAILED $m"
done
