#!/bin/bash
# loft's training step against PyTorch's on the same network, in one sitting: PreResNet-18
# (CIFAR stem, inner width 2) at each base width, batch 128, THREADS threads each. Rounds
# alternate loft, PyTorch NCHW and PyTorch channels-last so that a noisy machine hits all
# three alike; each figure is the best step of its round, the table shows the median over
# rounds and loft / PyTorch's better layout. Peak memory: loft's peak RSS against PyTorch's peak
# RSS less its RSS after `import torch` (the library itself). Not part of CI; the PyTorch venv
# is made on demand (scripts/torch-venv.sh, about 3 GB).
#
#   scripts/bench-vs-torch.sh [BASES (64,16,8)] [ROUNDS (3)]      THREADS=2 BATCH=128
set -euo pipefail
cd "$(dirname "$0")/.."
BASES=${1:-64,16,8}
ROUNDS=${2:-3}
THREADS=${THREADS:-2}
BATCH=${BATCH:-128}
LOFT=${LOFT:-target/release/loft}
[[ -x $LOFT ]] || { echo "bench-vs-torch: $LOFT not built (make build)" >&2; exit 2; }
PY=$(scripts/torch-venv.sh)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for r in $(seq 1 "$ROUNDS"); do
    for b in ${BASES//,/ }; do
        echo "round $r/$ROUNDS, base $b: loft ..." >&2
        "$LOFT" --threads "$THREADS" bench --step-only "$b" --batch "$BATCH" --quick --device cpu >>"$OUT/loft-$b"
        for layout in nchw cl; do
            echo "round $r/$ROUNDS, base $b: PyTorch $layout ..." >&2
            "$PY" scripts/bench_torch.py "$b" --batch "$BATCH" --threads "$THREADS" --layout $layout >>"$OUT/torch-$b-$layout"
        done
    done
done
"$PY" - "$OUT" "$BASES" "$THREADS" "$BATCH" <<'PY'
import json, statistics, sys
out, bases, threads, batch = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
print(f"PreResNet-18 (inner width 2), batch {batch}, 32x32x3, {threads} threads each, {cpu}; "
      f"medians over rounds of the best step per round.\n")
print("| model | loft step (s) | PyTorch NCHW (s) | PyTorch channels-last (s) | loft / PyTorch (better layout) "
      "| loft peak RSS | PyTorch peak RSS (less the library) |")
print("|---|---:|---:|---:|---:|---:|---:|")
gib = float(1 << 30)
for b in bases:
    rows = [l.split("|") for l in open(f"{out}/loft-{b}") if l.startswith("|")]
    loft = statistics.median(float(r[4]) for r in rows)
    loft_rss = rows[-1][8].strip()
    t = {lay: [json.loads(l) for l in open(f"{out}/torch-{b}-{lay}")] for lay in ("nchw", "cl")}
    med = {lay: statistics.median(d["step_s"] for d in v) for lay, v in t.items()}
    best = min(med.values())
    d = min(t["nchw"] + t["cl"], key=lambda d: d["peak_rss"])
    work = (d["peak_rss"] - d["rss_after_import"]) / gib
    print(f"| base {b} | {loft:.3f} | {med['nchw']:.3f} | {med['cl']:.3f} | {loft / best:.2f}x | {loft_rss} "
          f"| {d['peak_rss'] / gib:.2f} GiB ({work:.2f} GiB) |")
print(f"\nPyTorch {t['nchw'][0]['torch']}.")
PY
