#!/usr/bin/env bash
# A method sweep: every method x domain pair x seed with `uda train`, then one results table.
#
#   examples/sweep.sh
#   METHODS="source-only dann" PAIRS="mnist2000,usps1800 usps1800,mnist2000" SEEDS="0 1 2" examples/sweep.sh
#   UDA="torchrun --standalone --nproc-per-node 4 -m uda_cli" examples/sweep.sh     # each run on 4 GPUs
#
# Settings (environment variables):
#   METHODS  method names                                   [source-only dann]
#   PAIRS    SRC,TGT pairs (a domain may carry :split)      [mnist2000,usps1800 usps1800,mnist2000]
#   SEEDS    seeds                                          [0 1 2]
#   STEPS    --steps for every run                          [the method's default]
#   OUT      folder of the run folders and results          [runs/sweep]
#   UDA      the command that runs uda                      [uda]
#   EXTRA    more options for every run, e.g. "--device cuda --batch-size 64"
#
# Each run gets its own folder, $OUT/<method>_<src>_<tgt>_s<seed>, and starts with
# --resume auto: running the script again after an interruption continues unfinished runs
# and re-reports finished ones (they are not trained again). Each run's result (one JSON
# object on stdout, --log-format json) is appended to $OUT/results.jsonl, its log goes to
# $OUT/logs/; at the end $OUT/results.md holds the target accuracy per method and pair
# (mean and standard deviation over seeds). A run stopped by a signal (exit 130, 138, 143)
# stops the sweep with the same status, so a scheduler can requeue the whole script; a run
# that fails otherwise is reported and the sweep goes on (exit 1 at the end).
set -uo pipefail

METHODS=${METHODS:-"source-only dann"}
PAIRS=${PAIRS:-"mnist2000,usps1800 usps1800,mnist2000"}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-}
OUT=${OUT:-runs/sweep}
UDA=${UDA:-uda}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}

mkdir -p "$OUT/logs"
failed=0
# A signal to this script alone (not to the run in progress) stops the sweep after that run.
stopping=0
trap 'stopping=143' TERM
trap 'stopping=138' USR1
for method in $METHODS; do
  for pair in $PAIRS; do
    src=${pair%%,*}
    tgt=${pair#*,}
    for seed in $SEEDS; do
      name="${method}_${src//[:\/]/-}_${tgt//[:\/]/-}_s${seed}"
      echo "== $name"
      # shellcheck disable=SC2086  # UDA and EXTRA are word lists on purpose
      result=$($UDA train --method "$method" --src "$src" --tgt "$tgt" --seed "$seed" ${STEPS:+--steps "$STEPS"} \
                 --out "$OUT/$name" --resume auto --log-format json $EXTRA 2>>"$OUT/logs/$name.log")
      status=$?
      case $status in
        0) printf '%s\n' "$result" | tail -n 1 >> "$OUT/results.jsonl" ;;
        130|138|143) echo "stopped by a signal (exit $status); run the script again to continue"; exit "$status" ;;
        *) echo "failed (exit $status), see $OUT/logs/$name.log"; failed=1 ;;
      esac
      if [ "$stopping" != 0 ]; then echo "stopped by a signal; run the script again to continue"; exit "$stopping"; fi
    done
  done
done

"$PYTHON" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
latest = {}
path = out / "results.jsonl"
for line in path.read_text().splitlines() if path.exists() else []:
    r = json.loads(line)
    latest[r["run_dir"]] = r  # a re-run reports a run again: keep its last line
groups = {}
for r in latest.values():
    groups.setdefault((r["method"], r["src"], r["tgt"]), []).append(100 * r["accuracy"])
lines = ["| method | source | target | target accuracy % | seeds |", "|---|---|---|---|---|"]
for (m, s, t), acc in sorted(groups.items()):
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    lines.append(f"| {m} | {s} | {t} | {statistics.mean(acc):.2f} ± {sd:.2f} | {len(acc)} |")
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit "$failed"
