#!/usr/bin/env python3
"""PyTorch's training step on the network `loft bench` times: PreResNet-18 (CIFAR stem, inner
width 2, 10 classes) at a base width, batch n, 32x32x3 input; forward, cross-entropy, backward
and SGD (momentum 0.9, weight decay 5e-4). The module is docs/pytorch.md's, run as written.

    python scripts/bench_torch.py BASE [--batch 128] [--threads 2] [--steps 5] [--layout nchw|cl]
                                       [--device cpu|cuda] [--tf32]

Prints one JSON line: seconds per step (best of the timed steps after two warm-up steps),
peak RSS of the process and its RSS right after `import torch` (the library itself), in bytes;
on a GPU (--device cuda; cuDNN autotuned, TF32 off unless --tf32) also the peak of PyTorch's
GPU allocations. Run one configuration per process so that the peak is its own
(scripts/bench-vs-torch.sh and scripts/gpu-check.sh do).
"""
import argparse
import json
import os
import re
import resource
import time


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=int)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layout", choices=["nchw", "cl"], default="nchw")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tf32", action="store_true", help="on a GPU: let cuDNN and cuBLAS use TF32")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    after_import = rss_bytes()
    doc = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "pytorch.md")).read()
    scope = {}
    exec(re.findall(r"```python\n(.*?)```", doc, re.S)[0], scope)

    # the blocks of loft's preresnet18 at this base width (`loft info --base-width B`)
    blocks, c_in = [], a.base
    for stage, mult in enumerate([1, 2, 4, 8], start=1):
        c = a.base * mult
        for pos in range(2):
            stride = 2 if (pos == 0 and stage > 1) else 1
            blocks.append({"name": f"s{stage}.b{pos}", "c_in": c_in, "inner": 2 * c, "c_out": c,
                           "stride": stride, "proj": stride != 1 or c_in != c})
            c_in = c
    meta = {"family": "preact", "stem": "cifar", "bn_eps": "1e-5", "in_channels": "3", "stem_width": str(a.base),
            "blocks": json.dumps(blocks), "classes": "10", "mean": "[0, 0, 0]", "std": "[1, 1, 1]"}
    torch.manual_seed(1)
    net = scope["LoftNet"](meta).train()
    x = torch.randn(a.batch, 3, 32, 32)
    y = torch.arange(a.batch) % 10
    if a.layout == "cl":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    gpu = a.device == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = a.tf32
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        net, x, y = net.to("cuda"), x.to("cuda"), y.to("cuda")
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    params = sum(p.numel() for p in net.parameters())

    def sync():
        if gpu:
            torch.cuda.synchronize()

    times = []
    for i in range(a.steps + 2):
        sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    doc = {"base": a.base, "layout": a.layout, "batch": a.batch, "threads": a.threads, "device": a.device,
           "params": params, "step_s": min(times), "median_s": sorted(times)[len(times) // 2],
           "peak_rss": peak, "rss_after_import": after_import, "torch": torch.__version__}
    if gpu:
        doc.update(tf32=a.tf32, gpu=torch.cuda.get_device_name(), gpu_peak_bytes=torch.cuda.max_memory_allocated())
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
