#!/bin/bash
# Every GPU check in one run, for a lent GPU machine (no Rust there: run scripts/gpu-bundle.sh
# here first and carry bundle/).
#
#   scripts/gpu-check.sh [test|bench|all]     (make test-gpu, make bench-gpu; default all)
#
# Writes its logs and tables under $OUT (default runs/gpu-check):
#   nvidia-smi.txt   the card and driver
#   kernels.md       ptxas's table for the card's architecture
#   tests.log        the kernel tests on the real GPU (LOFT_REQUIRE_GPU=1: no skips)
#   sanitizer.log    the same tests under compute-sanitizer (memcheck)
#   loft.log         LoFT pre-training on --device cuda and on the CPU, losses side by side
#   bench.md         loft bench on the GPU (PreResNet-34x2 convolutions at batch 128, element-wise
#                    kernels against the copy rate, training steps); cudnn.md: the same conv
#                    shapes in PyTorch/cuDNN; step.md: training steps against PyTorch's
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
LOFT=bundle/loft
what=${1:-all}
[[ -x $LOFT ]] || { echo "gpu-check: $LOFT missing: run scripts/gpu-bundle.sh where cargo is" >&2; exit 2; }
status=0
step() { echo "== $*" >&2; }

step card; nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || status=1
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
if [[ $what != bench ]]; then
step kernels; $LOFT kernels --arch "sm_${arch:-90}" > "$OUT/kernels.md" 2>&1 || status=1
step tests; LOFT_REQUIRE_GPU=1 bundle/tests/kernels --test-threads 1 > "$OUT/tests.log" 2>&1 || status=1
if command -v compute-sanitizer >/dev/null; then
    step sanitizer
    LOFT_REQUIRE_GPU=1 compute-sanitizer --tool memcheck --error-exitcode 9 bundle/tests/kernels --test-threads 1 \
        > "$OUT/sanitizer.log" 2>&1 || status=1
fi
step loft
args=(pretrain --dataset synthetic --base-width 16 --rounds 4 --local-steps 4 --batch-size 64 --train-subset 2048
      --test-subset 512 --eval-every 2 --simulate-workers 2 --seed 3 --progress none)
{
    $LOFT --threads 8 "${args[@]}" --device cuda --out "$OUT/loft-cuda" && \
    $LOFT --threads 8 "${args[@]}" --device cpu --out "$OUT/loft-cpu" && \
    python3 - "$OUT/loft-cpu" "$OUT/loft-cuda" <<'PY'
import json, sys
rows = [[json.loads(l) for l in open(f"{d}/metrics.jsonl")] for d in sys.argv[1:]]
print("| round | cpu train loss | cuda train loss | cpu test loss | cuda test loss | cuda round s |")
print("|---:|---:|---:|---:|---:|---:|")
worst = 0.0
for c, g in zip(*rows):
    for k in ("train_loss", "test_loss"):
        if c[k] is not None:
            worst = max(worst, abs(c[k] - g[k]) / abs(c[k]))
    print(f"| {c['round']} | {c['train_loss']:.5f} | {g['train_loss']:.5f} | {c['test_loss']} | {g['test_loss']} | {g['round_time_s']:.3f} |")
print(f"\nlargest relative loss difference: {worst:.2e}")
sys.exit(0 if worst < 0.02 else 1)
PY
} > "$OUT/loft.log" 2>&1 || status=1
fi
if [[ $what != test ]]; then
step bench; $LOFT bench --device cuda --arch preresnet34 --json "$OUT/convs.json" > "$OUT/bench.md" 2> "$OUT/bench.err" || status=1
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step cudnn; python3 scripts/bench_cudnn.py "$OUT/convs.json" > "$OUT/cudnn.md" 2>&1 || status=1
    # the full training step against PyTorch's on the same GPU, batch 128 (TF32 off and on)
    step steps
    for b in 64 16; do
        $LOFT bench --step-only $b --batch 128 --quick --device cuda >> "$OUT/step-loft.txt" || status=1
        for tf in "" --tf32; do
            python3 scripts/bench_torch.py $b --batch 128 --steps 20 --device cuda $tf >> "$OUT/step-torch.jsonl" || status=1
        done
    done
    python3 - "$OUT" > "$OUT/step.md" <<'PY' || status=1
import json, sys
out = sys.argv[1]
loft = {int(l.split("|")[1].split()[-1]): float(l.split("|")[4]) for l in open(f"{out}/step-loft.txt") if l.startswith("|")}
torch = [json.loads(l) for l in open(f"{out}/step-torch.jsonl")]
print(f"PreResNet-18 (inner width 2), batch 128, 32x32x3, {torch[0]['gpu']}, PyTorch {torch[0]['torch']}; images/s.\n")
print("| model | loft | PyTorch FP32 | PyTorch TF32 | loft / PyTorch FP32 (time) |\n|---|---:|---:|---:|---:|")
for b, t in sorted(loft.items(), reverse=True):
    fp32 = next(d["step_s"] for d in torch if d["base"] == b and not d["tf32"])
    tf32 = next(d["step_s"] for d in torch if d["base"] == b and d["tf32"])
    print(f"| base {b} | {128 / t:.0f} | {128 / fp32:.0f} | {128 / tf32:.0f} | {t / fp32:.2f}x |")
PY
fi
fi
echo "gpu-check: exit $status; results in $OUT" >&2
exit $status
