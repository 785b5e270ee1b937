#!/bin/bash
# Strong scaling of LoFT on this machine: S = 1, 2, 4 ranks on the same total work (the
# global batch per step, S x per-rank batch, is held fixed), printing a Markdown table of
# time per round (compute and sync), per-rank peak memory and bytes moved.
#
#   scripts/strong_scaling.sh [extra pretrain flags]
# Knobs: LOFT (binary), GLOBAL_BATCH (default 128), ROUNDS (default 8), WORKERS ("1 2 4"),
#        THREADS_TOTAL (cores to share among ranks; default: nproc), OUT (default runs/scaling).
set -euo pipefail
LOFT=${LOFT:-target/release/loft}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
ROUNDS=${ROUNDS:-8}
WORKERS=${WORKERS:-1 2 4}
THREADS_TOTAL=${THREADS_TOTAL:-$(nproc)}
OUT=${OUT:-runs/scaling}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

[[ -x "$LOFT" ]] || { echo "strong_scaling.sh: $LOFT not found (cargo build --release)" >&2; exit 2; }
command -v mpirun >/dev/null || { echo "strong_scaling.sh: mpirun not found (make deps)" >&2; exit 2; }

echo "| S | batch/rank | threads/rank | round (s) | compute (s) | sync (s) | sync % | peak RSS/rank (MiB) | sync bytes/rank/round | test acc |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for S in $WORKERS; do
    B=$(( GLOBAL_BATCH / S ))
    T=$(( THREADS_TOTAL / S )); (( T >= 1 )) || T=1
    DIR="$OUT/S$S"
    mpirun -np "$S" --oversubscribe --bind-to none "$LOFT" --threads "$T" pretrain \
        --rounds "$ROUNDS" --batch-size "$B" --eval-every "$ROUNDS" --progress none --out "$DIR" "$@" >&2
    python3 - "$DIR" "$S" "$B" "$T" "$ROUNDS" <<'PY'
import json, sys
d, S, B, T, R = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = json.load(open(f"{d}/summary.json"))
l = json.load(open(f"{d}/ledger.json"))
comp = max(s["per_rank_compute_ms"]) / 1e3 / R
sync = max(s["per_rank_sync_ms"]) / 1e3 / R
rnd = s["wall_s"] / R
rss = max(s["per_rank_peak_rss_bytes"]) / 2**20
sent = max(l["per_rank_sync_bytes_sent"]) // R
print(f"| {S} | {B} | {T} | {rnd:.3f} | {comp:.3f} | {sync:.4f} | {100*sync/max(comp+sync,1e-9):.1f}% | {rss:.0f} | {sent} | {s['final_test_acc']:.2f}% |")
PY
done
