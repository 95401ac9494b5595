#!/usr/bin/env bash
# Run many benchmarks/digits.py jobs, N at a time, on one machine. A GPU takes several digit
# runs at once far better than one after another: session 19 ran 8 + 3 at a time on one H100
# (DANN 10,000 steps in ~80-300 s each, I2I ~15 minutes each, all sharing the card).
#
#   tools/queue.sh JOBS N OUT [digits.py options for every job...]
#   tools/queue.sh tools/paper_jobs.txt 8 runs/paper --budget paper --device cuda
#
# JOBS holds one job a line, "NAME digits.py-options..." (blank and '#' lines skipped), run in
# file order as workers free up. Each job writes OUT/NAME.json (its rows, rewritten after
# every run), OUT/NAME.log and its run folders under OUT/NAME.d; OUT/queue.log says when each
# started and ended and with what exit code. The table of everything finished:
#   python benchmarks/digits.py --from-json OUT/*.json
# A job whose OUT/NAME.json holds rows already is skipped, so the same command resumes a cut
# off queue; an unfinished job starts again from step 0, its earlier run folder kept aside
# as OUT/NAME.d.cut-SECONDS (its last checkpoint can still be read with `uda evaluate`).
# Options are split at spaces: pass none that holds one.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: tools/queue.sh JOBS N OUT [digits.py options...]" >&2; exit 2
fi
jobs=$1; n=$2; out=$3; shift 3
[ -f "$jobs" ] || { echo "queue.sh: no jobs file $jobs; pass a file of 'NAME options' lines" >&2; exit 2; }
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "queue.sh: N=$n: give how many jobs run at once, a whole number >= 1" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"; out=$(cd "$out" && pwd)
export QUEUE_OUT=$out QUEUE_DIGITS=$here/../benchmarks/digits.py QUEUE_PY=${PYTHON:-python3} PYTHONUNBUFFERED=1
export QUEUE_COMMON="$*"
# The data once, before any job: two jobs unpacking MNIST-M into one root at once would clash.
pairs=$(grep -v '^[[:space:]]*#' "$jobs" | grep -o -- '--pairs [^ ]*' | cut -d' ' -f2 | tr ',' '\n' | sort -u | paste -sd, -)
if [ -n "$pairs" ]; then
  $QUEUE_PY "$QUEUE_DIGITS" $QUEUE_COMMON --pairs "$pairs" --prepare-only 2>&1 | tee -a "$out/queue.log"
fi
grep -v '^[[:space:]]*#' "$jobs" | grep -v '^[[:space:]]*$' | xargs -P "$n" -L 1 bash -c '
  name=$0; o=$QUEUE_OUT
  if [ -s "$o/$name.json" ] && [ "$(cat "$o/$name.json")" != "[]" ]; then echo "$(date +%T) skip $name (done)"; exit 0; fi
  if [ -e "$o/$name.d" ]; then mv "$o/$name.d" "$o/$name.d.cut-$(date +%s)"; echo "$(date +%T) $name: earlier unfinished run kept as $name.d.cut-*"; fi
  echo "$(date +%T) start $name $*"
  rc=0; $QUEUE_PY "$QUEUE_DIGITS" $QUEUE_COMMON --out "$o/$name.d" --json "$o/$name.json" "$@" >"$o/$name.log" 2>&1 || rc=$?
  echo "$(date +%T) end $name rc $rc"
  exit 0' 2>&1 | tee -a "$out/queue.log"
