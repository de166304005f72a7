#!/usr/bin/env bash
# EXP-46aw once its model has trained (docs/experiments/EXP-46aw-116m-facts-model.md): the facts held, the two
# edit sets, arm P on each (side by side, one thread and one core each) and the table. Run it again after a stop:
# what finished is kept, and a stopped bench continues with --resume. Stop it with SIGTERM (kill PID), not SIGINT:
# started in the background from a script, felix ignores SIGINT. Logs: runs/exp46aw-logs/.
#
#     nohup bash scripts/exp46aw.sh > /tmp/exp46aw.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/demo-facts-116m/run
FELIX=.venv/bin/felix
PY=.venv/bin/python
LOGS=runs/exp46aw-logs
mkdir -p "$LOGS"

if [ ! -d "$RUN/checkpoints/step-00003000" ]; then
    echo "exp46aw: $RUN has no step-00003000 checkpoint: train the model first (the command in the doc)" >&2
    exit 1
fi

if [ ! -s "$LOGS/held.json" ]; then
    $PY scripts/held_facts.py "$RUN" > "$LOGS/held.json.tmp"
    mv "$LOGS/held.json.tmp" "$LOGS/held.json"
fi
held=$($PY -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["held"])' "$LOGS/held.json")
n=$([ "$held" -ge 306 ] && echo 100 || echo 50)  # the pre-registration's cut (EXP-46au)
echo "exp46aw: the model holds $held facts: $n edits per set"

for s in 0 1; do
    edits=runs/facts-116m-s$s.jsonl
    if [ ! -s "$edits" ]; then
        $FELIX splice make-edits --checkpoint "$RUN" --source facts --out "$edits" --n "$n" --seed "$s" --json \
            > "$LOGS/make-edits-s$s.json"
    fi
done

pids=()
for s in 0 1; do
    out=runs/exp46aw-s$s
    [ -s "$out/bench.json" ] && continue
    resume=()
    [ -f "$out/bench-progress.safetensors" ] && resume=(--resume)
    OMP_NUM_THREADS=1 taskset -c "$s" $FELIX splice bench --checkpoint "$RUN" --edits runs/facts-116m-s$s.jsonl \
        --n "$n" --heldout-neutral --json --out "$out" --preserve-prompts runs/facts-116m-s$s.preserve.jsonl \
        --prompt-weight 3 "${resume[@]}" >> "$LOGS/bench-s$s.log" 2>&1 &
    pids+=($!)
done
# a SIGTERM to this script stops the benches too (each after its step, with its progress saved)
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143' TERM
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
[ "$status" -eq 0 ] || { echo "exp46aw: a bench stopped before its end: see $LOGS/bench-s*.log" >&2; exit 1; }

$PY scripts/bench_table.py --title "117.89M, $n fact edits" "P, seed 0=runs/exp46aw-s0/bench.json" \
    "P, seed 1=runs/exp46aw-s1/bench.json"
