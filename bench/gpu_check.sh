#!/usr/bin/env bash
# One prepared check for a GPU machine, done in under 8 minutes (each step has a time limit inside one budget):
#   1. the test suite's GPU-marked tests (pytest -m gpu: Evaluator with bf16 AMP on CUDA against fp32 on the CPU)
#   2. with 2+ GPUs: a barrier curve on 2 ranks (torchrun, NCCL) with --parallel data and points against 1 process
#   3. evaluation throughput of timm resnet50, dataset resident on the GPU vs a plain DataLoader loop (images/s)
#   4. the evaluation overhead ratios of bench/eval_overhead.py (barrier curve, greedy soup), resnet50, CUDA + AMP
#   5. image data (bench/gpu_data.py): decode images/s with PIL workers and with nvjpeg on the GPU; resnet50 images/s
#      on a JPEG folder held as uint8 on the GPU vs a timm validate.py-style DataLoader loop
#   6. weight-space ops on the GPU: bench/soup_io.py (e), TIES over a base + 4 fine-tunes of ~0.9 GB bf16 with
#      --device cuda against the CPU (wall times and max |GPU − CPU|)
# No internet is needed. It runs the repo's .venv/bin/python if that works here (has torch with CUDA), else python3
# (torch, timm, scikit-learn, pytest preinstalled), always with this checkout first on PYTHONPATH.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --cpu-smoke  # anywhere: the same steps at toy sizes on the CPU (checks the script)
set -uo pipefail

SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
BUDGET=450          # seconds for all steps together (the whole check must stay under 8 minutes)
START=$SECONDS
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$WORK/log.txt
FAIL=0

# This checkout first on the path, whatever interpreter runs it; cli/ is shipped as the package weightspace_cli,
# so a link named weightspace_cli makes `python -m weightspace_cli` work without installing anything.
ln -s "$ROOT/cli" "$WORK/weightspace_cli"
export PYTHONPATH="$ROOT:$WORK${PYTHONPATH:+:$PYTHONPATH}"
export WEIGHTSPACE_HASH_CACHE=off  # no hash-cache file in the home folder of a borrowed machine

if [ "$SMOKE" = 1 ]; then need='import torch, timm, sklearn, pytest'
else need='import torch, timm, sklearn, pytest; assert torch.cuda.is_available(), "no CUDA"'; fi
PY=""
for cand in "$ROOT/.venv/bin/python" python3; do
  if ! command -v "$cand" >/dev/null 2>&1; then
    echo "note: $cand not found"
    continue
  fi
  if why=$("$cand" -c "$need" 2>&1); then PY=$cand; break; fi
  echo "note: $cand cannot run the check: $(echo "$why" | tail -n 1)"
done
if [ -z "$PY" ]; then
  echo "gpu_check: no Python here has torch$([ "$SMOKE" = 1 ] || echo ' with CUDA'), timm, scikit-learn and pytest" >&2
  exit 2
fi
[ "$PY" = python3 ] && echo "note: no usable .venv: running $(command -v python3) with the repo on PYTHONPATH"
echo "python: $PY"
"$PY" -c 'import torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
          + (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"))'
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

step() {  # step NAME MAX_SECONDS COMMAND...: run with a time limit inside what is left of the budget
  local name=$1 max=$2 left rc t
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  [ "$max" -gt "$left" ] && max=$left
  if [ "$max" -lt 15 ]; then
    echo "== $name: not run, out of time" | tee -a "$LOG"
    FAIL=1
    return
  fi
  echo "== $name (limit ${max}s)"
  t=$SECONDS
  timeout --kill-after=5 "$max" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== $name: $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAIL=1
}

# 2 ranks vs 1 process on the same barrier curve (two small CNNs trained here on digits, ~10 s).
multi_rank() {
  local dev=$1 mode
  "$PY" - "$WORK" <<'EOF' || return 1
import sys, torch
import weightspace as ws
from weightspace.eval.data import load_data
from weightspace.eval.models import build_model
from weightspace.eval.train import train
data, spec = load_data("digits:train"), "weightspace.eval.zoo:small_cnn"
torch.manual_seed(0)
init = build_model(spec, num_classes=10).state_dict()
for seed in (1, 2):
    m = build_model(spec, num_classes=10)
    m.load_state_dict(init)
    train(m, data, epochs=2, lr=0.05, batch_size=32, seed=seed)
    ws.save(m.state_dict(), f"{sys.argv[1]}/cnn{seed}.safetensors", force=True)
EOF
  local args=(interpolate "$WORK/cnn1.safetensors" "$WORK/cnn2.safetensors" --model weightspace.eval.zoo:small_cnn
              --data digits:val --data digits:test --steps 5 --batch-size 64 --device "$dev" --json --quiet)
  "$PY" -m weightspace_cli "${args[@]}" > "$WORK/single.json" || return 1
  for mode in data points; do
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m weightspace_cli "${args[@]}" \
      --parallel "$mode" > "$WORK/$mode.json" || return 1
  done
  "$PY" - "$WORK" <<'EOF'
import json, sys
load = lambda name: json.load(open(f"{sys.argv[1]}/{name}.json"))["curves"][0]["points"]
one = load("single")
for mode in ("data", "points"):
    two = load(mode)
    worst = {m: max(abs(p["metrics"][d][m] - q["metrics"][d][m]) for p, q in zip(one, two) for d in p["metrics"])
             for m in ("accuracy", "loss")}
    print(f"2 ranks, --parallel {mode}: max |Δ accuracy| {worst['accuracy']:.2e}, max |Δ loss| {worst['loss']:.2e} "
          f"against 1 process ({'identical' if two == one else 'NOT identical'})")
EOF
}
export -f multi_rank
export PY WORK

if [ "$SMOKE" = 1 ]; then
  step "GPU-marked tests (on the CPU)" 150 env WEIGHTSPACE_TEST_DEVICE=cpu "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
  step "2 ranks vs 1 process (gloo, CPU)" 150 bash -c 'multi_rank cpu'
  step "resnet50 throughput (CPU smoke)" 120 "$PY" bench/gpu_throughput.py --cpu-smoke
  OVERHEAD=(--model timm:resnet18 --data 'digits:all?size=16&channels=3&limit=64' --device cpu --steps 3
            --ingredients 2 --repeats 1)
else
  step "GPU-marked tests" 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
  if [ "$NGPU" -ge 2 ]; then
    step "2 ranks vs 1 process (NCCL)" 90 bash -c 'multi_rank auto'
  else
    echo "== 2 ranks vs 1 process (NCCL): not run, needs 2 GPUs ($NGPU here)" | tee -a "$LOG"
  fi
  step "resnet50 throughput" 100 "$PY" bench/gpu_throughput.py
  OVERHEAD=(--model timm:resnet50 --data 'digits:all?size=224&channels=3' --device cuda --ingredients 4 --repeats 2)
fi
if [ -f bench/eval_overhead.py ]; then
  step "evaluation overhead (bench/eval_overhead.py)" 140 "$PY" bench/eval_overhead.py "${OVERHEAD[@]}"
else
  echo "== evaluation overhead: bench/eval_overhead.py is not in this checkout" | tee -a "$LOG"
fi
if [ "$SMOKE" = 1 ]; then
  step "image data: decode and resnet50 (CPU smoke)" 90 "$PY" bench/gpu_data.py --cpu-smoke
else
  step "image data: decode and resnet50 images/s" 100 "$PY" bench/gpu_data.py --images 2000
fi

if [ "$SMOKE" = 1 ]; then
  step "ops on the device (bench/soup_io.py e, CPU smoke)" 120 "$PY" bench/soup_io.py --only e --dtypes bf16 --reps 1 --device cpu
else
  step "ops on the GPU (bench/soup_io.py e)" 120 "$PY" bench/soup_io.py --only e --dtypes bf16 --reps 2 --scale 4.5 --device cuda
fi

echo
echo "== summary ($((SECONDS - START)) s)"
grep -E "images/s|speed-up|barrier curve|greedy soup|bare pass|passed|failed|error|2 ranks|\(e\)|== .*: (FAILED|not run)" "$LOG"
exit $FAIL
