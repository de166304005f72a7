#!/usr/bin/env bash
# A facts model's locality experiment once it has trained (EXP-46aw, EXP-46ax): the facts held, two edit sets, arm
# P on each (side by side, one thread and one core each) and the table. MODEL names the demo directory
# (runs/demo-facts-MODEL) and the edit sets (runs/facts-MODEL-s{0,1}.jsonl), EXP the benches (runs/EXP-s{0,1}) and
# logs (runs/EXP-logs/). Run it again after a stop: what finished is kept, and a stopped bench continues with
# --resume. Stop it with SIGTERM (kill PID), not SIGINT: started in the background from a script, felix ignores
# SIGINT.
#
#     nohup bash scripts/facts_p_arms.sh 116m exp46aw > /tmp/exp46aw.log 2>&1 &   # EXP-46aw (the defaults)
#     DEVICE=cuda bash scripts/facts_p_arms.sh 116m-lr1e-3 exp46ax                # everything on a GPU
#
# On a GPU machine with no venv, after scripts/gpu_checks.sh has installed the wheels into /tmp/felix-site:
#     PYTHONPATH=$PWD:/tmp/felix-site PYTHON=python3 DEVICE=cuda bash scripts/facts_p_arms.sh MODEL EXP
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-116m}
EXP=${2:-exp46aw}
RUN=runs/demo-facts-$MODEL/run
PY=${PYTHON:-.venv/bin/python}  # a machine without the venv (a lent GPU): PYTHON=python3, felix on PYTHONPATH
FELIX="$PY -m felix"
LOGS=runs/$EXP-logs
DEVICE=${DEVICE:-cpu}  # a bench resumes only on the device it started on

if [ ! -d "$RUN/checkpoints/step-00003000" ]; then
    echo "$EXP: $RUN has no step-00003000 checkpoint: train the model first (the command in the doc)" >&2
    exit 1
fi
mkdir -p "$LOGS"

if [ ! -s "$LOGS/held.json" ]; then
    $PY scripts/held_facts.py "$RUN" --device "$DEVICE" > "$LOGS/held.json.tmp"
    mv "$LOGS/held.json.tmp" "$LOGS/held.json"
fi
held=$($PY -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["held"])' "$LOGS/held.json")
n=$([ "$held" -ge 306 ] && echo 100 || echo 50)  # the pre-registration's cut (EXP-46au)
echo "$EXP: the model holds $held facts: $n edits per set"

for s in 0 1; do
    edits=runs/facts-$MODEL-s$s.jsonl
    if [ ! -s "$edits" ]; then
        $FELIX splice make-edits --checkpoint "$RUN" --source facts --out "$edits" --n "$n" --seed "$s" \
            --device "$DEVICE" --json > "$LOGS/make-edits-s$s.json"
    fi
done

pids=()
for s in 0 1; do
    out=runs/$EXP-s$s
    [ -s "$out/bench.json" ] && continue
    resume=()
    [ -f "$out/bench-progress.safetensors" ] && resume=(--resume)
    # on the CPU, one thread and one core each; on a GPU the host's threads are left to the CPU-side solves
    pin=()
    [ "$DEVICE" = cpu ] && pin=(env OMP_NUM_THREADS=1 taskset -c "$s")
    "${pin[@]}" $FELIX splice bench --checkpoint "$RUN" --edits "runs/facts-$MODEL-s$s.jsonl" \
        --n "$n" --heldout-neutral --device "$DEVICE" --json --out "$out" \
        --preserve-prompts "runs/facts-$MODEL-s$s.preserve.jsonl" \
        --prompt-weight 3 "${resume[@]}" >> "$LOGS/bench-s$s.log" 2>&1 &
    pids+=($!)
done
# a SIGTERM to this script stops the benches too (each after its step, with its progress saved)
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143' TERM
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
[ "$status" -eq 0 ] || { echo "$EXP: a bench stopped before its end: see $LOGS/bench-s*.log" >&2; exit 1; }

$PY scripts/bench_table.py --title "$MODEL, $n fact edits" "P, seed 0=runs/$EXP-s0/bench.json" \
    "P, seed 1=runs/$EXP-s1/bench.json"
