#!/usr/bin/env bash
# Run benchmarks/quality.py as one single-threaded job per (category, detector) on a many-core
# machine, then merge. The budget stays in CPU seconds of one thread, as on the 2-core machine.
#   benchmarks/quality_parallel.sh OUT_JSON BUDGET_S JOBS [VGG_WEIGHTS]
set -uo pipefail
out=${1:-results/quality.json}; budget=${2:-60}; jobs=${3:-16}; vgg=${4:-}
py=${PYTHON:-python3}
data=${QUALITY_DATA:-/tmp/edgead-quality-data}
work=$(mktemp -d)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS=ignore
$py -c "from edgead.data import synth; synth.generate('$data', None, synth.SynthSpec(image_size=128))"
models=$($py -c "from edgead.models import registry; print(' '.join(registry.available()))")
cats=$($py -c "from edgead.data import synth; print(' '.join(synth.CATEGORIES))")
vggarg=${vgg:+--vgg-weights $vgg}
{
  for c in $cats; do echo "$c baselines"; done
  for m in utad ganomaly ssim_ae skip_ganomaly alad egbad fanogan anogan vae; do
    case " $models " in *" $m "*) for c in $cats; do echo "$c $m"; done;; esac
  done
} | timeout "${TOTAL_TIMEOUT:-1000000}" xargs -P "$jobs" -L 1 bash -c '
  cat=$0; what=$1
  if [ "$what" = baselines ]; then sel="--models"; else sel="--no-baselines --models $what"; fi
  '"$py"' -m benchmarks.quality --data '"$data"' --categories $cat $sel --budget-s '"$budget"' \
      --threads 1 --no-latency '"$vggarg"' --out '"$work"'/$cat-$what.json > '"$work"'/$cat-$what.log 2>&1 \
      || echo "job $cat $what failed" >&2
'
$py -m benchmarks.quality --merge "$work"/*.json --out "$out"
tail -n 3 "$work"/*.log | grep -i "error\|traceback" || true
