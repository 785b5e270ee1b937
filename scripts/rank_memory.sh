#!/bin/bash
# Per-rank memory of pre-training: dense (one rank), LoFT-2 and LoFT-4 with the default
# partitioned stages, and LoFT-4 with all four stages partitioned. One round of 2 local steps
# of PreResNet-18 on synthetic data; prints a Markdown table of where each rank's memory goes
# (from summary.json's per_rank_memory) and the largest rank against the dense rank.
#
#   scripts/rank_memory.sh [extra pretrain flags]
# Knobs: LOFT (binary, default target/release/loft), BASE (base width, default 64),
#        BATCH (per worker, default 64), OUT (default runs/rank-memory).
set -euo pipefail
LOFT=${LOFT:-target/release/loft}
BASE=${BASE:-64}
BATCH=${BATCH:-64}
OUT=${OUT:-runs/rank-memory}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

[[ -x "$LOFT" ]] || { echo "rank_memory.sh: $LOFT not found (cargo build --release)" >&2; exit 2; }
command -v mpirun >/dev/null || { echo "rank_memory.sh: mpirun not found (make deps)" >&2; exit 2; }

common=(pretrain --dataset synthetic --base-width "$BASE" --batch-size "$BATCH" --rounds 1 --local-steps 2
        --eval-every 1 --progress none)
run() { # name ranks method stages
    local name=$1 np=$2 method=$3 stages=$4
    mpirun -np "$np" --oversubscribe --bind-to none "$LOFT" --threads 1 "${common[@]}" \
        --method "$method" --partitioned-stages "$stages" --out "$OUT/$name" "${@:5}" >&2
}
run dense 1 dense 2,3,4 "$@"
run loft2 2 loft 2,3,4 "$@"
run loft4 4 loft 2,3,4 "$@"
run loft4-all 4 loft 1,2,3,4 "$@"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
mib = lambda b: b / 2**20
rows = [("dense", "dense, 1 rank"), ("loft2", "LoFT-2, stages 2-4"), ("loft4", "LoFT-4, stages 2-4"),
        ("loft4-all", "LoFT-4, stages 1-4")]
print("| run | rank | activations | activation grads | worker params + stats | worker grads + momentum "
      "| full model | sync buffers | scratch | MPI, runtime, data | peak RSS | / dense |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
dense = None
for name, label in rows:
    s = json.load(open(f"{out}/{name}/summary.json"))
    # a loft without the breakdown (before it existed): peak RSS only
    mem = s.get("per_rank_memory") or [
        {"activations": 0, "activation_grads": 0, "worker_params": 0, "worker_grads_and_momentum": 0,
         "full_model": 0, "sync_buffers": 0, "scratch": 0, "peak_rss": b} for b in s["per_rank_peak_rss_bytes"]]
    if dense is None:
        dense = mem[0]["peak_rss"]
    for r, m in enumerate(mem):
        known = sum(m[k] for k in ["activations", "activation_grads", "worker_params",
                                   "worker_grads_and_momentum", "full_model", "sync_buffers", "scratch"])
        cells = [m["activations"], m["activation_grads"], m["worker_params"], m["worker_grads_and_momentum"],
                 m["full_model"], m["sync_buffers"], m["scratch"], max(m["peak_rss"] - known, 0), m["peak_rss"]]
        print(f"| {label} | {r} | " + " | ".join(f"{mib(c):.0f}" for c in cells)
              + f" | {m['peak_rss'] / dense:.2f} |")
print()
for name, label in rows:
    s = json.load(open(f"{out}/{name}/summary.json"))
    peak = max(s["per_rank_peak_rss_bytes"])
    print(f"- {label}: largest rank {mib(peak):.0f} MiB, {peak / dense:.2f} of the dense rank")
PY
