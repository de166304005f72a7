#!/usr/bin/env bash
# The GPU checks and figures, in one run on your card (ROCm or CUDA torch): felix-300m training tok/s, MFU
# and peak memory in bf16 with and without torch.compile; scripts/cuda_checks.py (flash attention, bf16,
# torch.compile and the KV cache, each against its reference: the math kernel, the CPU, eager, a full forward; and
# that a training micro-batch makes no host sync, under torch.cuda.set_sync_debug_mode("error")); the demo trained
# on the GPU; and `felix splice` on that model there (make-edits, a 5-edit bench). The log and the first result line
# say which torch build (ROCm: HIP version and gfx architecture; CUDA: CUDA version) and card it ran on.
# Each step has its own time limit and appends one line to $OUT/results.jsonl as it ends, so a run cut short
# still keeps what it measured. The limits add up to about 12 minutes; the steps take far less on an H100-class
# card, and the splice steps come last, so a run cut at 10 minutes loses only them.
#
#   PYTHON=.venv/bin/python bash scripts/gpu_checks.sh        # results in runs/gpu-checks/
#   OUT=DIR CONFIG=felix-50m bash scripts/gpu_checks.sh       # another config or output directory
#   CONFIG=demo DEMO_STEPS=20 bash scripts/gpu_checks.sh      # a quick trial of the script itself, also on a CPU
#
# On a machine whose python has CUDA torch but not this package's dependencies (no network there), build the
# wheels first on one that has them, `bash scripts/gpu_wheels.sh` (into .whl/, ignored by git), and copy
# .whl/ along: the script installs them into /tmp/felix-site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-checks}
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-felix-300m}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/felix-site \
        .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/felix-site"
fi
LOG="$OUT/log.txt"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
# The vendor's own tool, where installed: rocm-smi on ROCm, nvidia-smi on CUDA (either may be absent).
{ date -u
  if command -v rocm-smi >/dev/null 2>&1; then rocm-smi --showproductname --showmeminfo vram --showdriverversion; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi; } >"$LOG" 2>&1

# step NAME SECONDS CMD...: run CMD under a time limit; record its exit status and the JSON object its
# stdout ends with (the `--json` contract) as one line of results.jsonl.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" >>"$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/.stdout" 2>>"$LOG"
    local rc=$?
    cat "$OUT/.stdout" >>"$LOG"
    "$PY" - "$name" "$rc" "$((SECONDS - t0))" "$OUT/.stdout" >>"$RESULTS" <<'EOF'
import json, sys
name, rc, seconds, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = [line for line in open(path, encoding="utf-8", errors="replace").read().splitlines() if line.strip()]
try:
    result = json.loads(lines[-1])
except (IndexError, ValueError):
    result = None
print(json.dumps({"step": name, "rc": rc, "seconds": seconds, "result": result}))
EOF
    rm -f "$OUT/.stdout"
    echo "$name: rc=$rc in $((SECONDS - t0)) s" >&2
}

# What torch runs on, as torch sees it: a ROCm build has torch.version.hip (torch.version.cuda is None) and names
# the card's architecture (gcnArchName: gfx1101 for an RX 7800 XT); a CUDA build has torch.version.cuda.
step env 30 "$PY" -c '
import json, torch
r = {"torch": torch.__version__, "hip": torch.version.hip, "cuda": torch.version.cuda,
     "backend": "rocm" if torch.version.hip else "cuda" if torch.version.cuda else "cpu",
     "gpu_visible": torch.cuda.is_available()}
if r["gpu_visible"]:
    p = torch.cuda.get_device_properties(0)
    r |= {"device": p.name, "arch": getattr(p, "gcnArchName", None) or f"sm_{p.major}{p.minor}",
          "memory_bytes": p.total_memory, "bf16_supported": torch.cuda.is_bf16_supported()}
print(json.dumps(r))'

# Most wanted first; with env's these limits add up to 580 s, inside one device command's 600.
step bench-eager 120 "$PY" -m felix bench train --config "$CONFIG" train.compile=false --json
step bench-compiled 170 "$PY" -m felix bench train --config "$CONFIG" train.compile=true --json
step cuda-checks 120 "$PY" scripts/cuda_checks.py --json
step bench-memory 60 "$PY" -m felix bench memory --config "$CONFIG" train.micro_batch_size=1 --json
# a new directory each run: `felix demo` continues one it finds, and a second run (or one after a CPU trial of the
# script) would report the earlier demo's training instead of training on this card
DEMO_DIR=$(mktemp -d /tmp/felix-demo.XXXXXX)
step demo 80 "$PY" -m felix demo --out "$DEMO_DIR" ${DEMO_STEPS:+--max-steps "$DEMO_STEPS"} --json
cp "$DEMO_DIR/loss.png" "$OUT/demo-loss.png" 2>/dev/null || true
# splicing on the card, on the demo model it trained: an edit set of facts it holds, then a short sequential bench
# (last, so a run cut short loses only these)
SPLICE_DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
step splice-make-edits 40 "$PY" -m felix splice make-edits --checkpoint "$DEMO_DIR/run" --device "$SPLICE_DEVICE" \
    --out "$OUT/splice-edits.jsonl" --n 10 --json
step splice-bench 120 "$PY" -m felix splice bench --checkpoint "$DEMO_DIR/run" --device "$SPLICE_DEVICE" \
    --edits "$OUT/splice-edits.jsonl" --n 5 --json
