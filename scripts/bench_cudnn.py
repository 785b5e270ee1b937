#!/usr/bin/env python3
"""Time the convolution shapes `loft bench --json FILE` measured, in PyTorch (cuDNN), and print
one Markdown table: GFLOP/s of loft's kernels beside cuDNN's with TF32 off and on, and the ratio
of loft's time to cuDNN FP32's (the target is at most 1.5). Run on the GPU machine, same sitting:

    loft bench --device cuda --json convs.json > bench.md
    python3 scripts/bench_cudnn.py convs.json > cudnn.md
"""
import json
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, min_reps=5, min_s=0.5):
    fn()
    torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_s:
        fn()
        reps += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def passes(c, tf32):
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dev = "cuda"
    x = torch.randn(c["n"], c["c_in"], c["h"], c["w"], device=dev)
    w = torch.randn(c["c_out"], c["c_in"], c["kh"], c["kw"], device=dev)
    y = F.conv2d(x, w, stride=c["stride"], padding=c["pad"])
    dy = torch.randn_like(y)
    conv = dict(stride=c["stride"], padding=c["pad"])
    return (
        timed(lambda: F.conv2d(x, w, **conv)),
        timed(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, **conv)),
        timed(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, **conv)),
    )


def main():
    doc = json.load(open(sys.argv[1]))
    torch.backends.cudnn.benchmark = True
    print(f"### Convolutions of {doc['arch']} (batch {doc['batch']}): loft ({doc['backend']}) against cuDNN\n")
    print(f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}. "
          "GFLOP/s per pass (forward / backward data / backward filter); ratio = loft time / cuDNN FP32 time.\n")
    print("| layer | c_in -> c_out | k / s | HxW | loft | cuDNN FP32 | cuDNN TF32 | ratio (worst pass) |")
    print("|---|---|---|---|---|---|---|---:|")
    worst_all = 0.0
    for row in doc["convs"]:
        c = row["conv"]
        ho = (c["h"] + 2 * c["pad"] - c["kh"]) // c["stride"] + 1
        wo = (c["w"] + 2 * c["pad"] - c["kw"]) // c["stride"] + 1
        gflop = 2.0 * c["n"] * c["c_out"] * ho * wo * c["c_in"] * c["kh"] * c["kw"] / 1e9
        s = row["seconds"]
        loft = (s["forward"], s["backward_data"], s["backward_filter"])
        fp32, tf32 = passes(c, False), passes(c, True)
        fmt = lambda t: " / ".join(f"{gflop / v:.0f}" for v in t)
        ratio = max(a / b for a, b in zip(loft, fp32))
        worst_all = max(worst_all, ratio)
        print(f"| {row['layer']} | {c['c_in']} -> {c['c_out']} | {c['kh']}x{c['kw']} / {c['stride']} | "
              f"{c['h']}x{c['w']} | {fmt(loft)} | {fmt(fp32)} | {fmt(tf32)} | {ratio:.2f} |")
    print(f"\nworst ratio over all layers: {worst_all:.2f} (target at most 1.5)")


if __name__ == "__main__":
    main()
