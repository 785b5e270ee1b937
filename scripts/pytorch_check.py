#!/usr/bin/env python3
"""Check docs/pytorch.md against loft: build the network of a `loft export` file with the module
the document gives (its code block, run as written), evaluate it on the checkpoint's test set,
and compare with `loft evaluate --json`: the same prediction for every image (equal confusion
matrices) and the same mean loss within 1e-4. Fashion-MNIST (IDX) and CIFAR binary test sets.

    python scripts/pytorch_check.py MODEL.safetensors EVALUATE.json DATA_DIR

`make pytorch-check CKPT=...` runs it in the PyTorch environment of scripts/torch-venv.sh.
"""
import gzip
import json
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def module_code():
    doc = open(os.path.join(HERE, "..", "docs", "pytorch.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    return blocks[0]  # the module; the second block is usage


def test_images(dataset, data_dir, n):
    if dataset == "fashion-mnist":
        def idx(name):
            for p in (name, name + ".gz"):
                path = os.path.join(data_dir, p)
                if os.path.exists(path):
                    raw = (gzip.open if p.endswith(".gz") else open)(path, "rb").read()
                    return raw
            raise SystemExit(f"{name} not found in {data_dir}")
        imgs = np.frombuffer(idx("t10k-images-idx3-ubyte"), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        labels = np.frombuffer(idx("t10k-labels-idx1-ubyte"), np.uint8, offset=8)
    elif dataset in ("cifar10", "cifar100"):
        name, skip = ("test_batch.bin", 1) if dataset == "cifar10" else ("test.bin", 2)
        raw = np.fromfile(os.path.join(data_dir, name), np.uint8).reshape(-1, skip + 3072)
        imgs, labels = raw[:, skip:].reshape(-1, 3, 32, 32), raw[:, skip - 1]
    else:
        raise SystemExit(f"data set {dataset}: only fashion-mnist and cifar test sets are read here")
    return torch.from_numpy(imgs[:n].copy()), torch.from_numpy(labels[:n].astype(np.int64))


def main():
    model_path, eval_path, data_dir = sys.argv[1:4]
    ev = json.load(open(eval_path))
    scope = {}
    exec(module_code(), scope)
    net = scope["load_loft"](model_path)
    images, labels = test_images(ev["dataset"], data_dir, ev["samples"])
    with torch.no_grad():
        logits = torch.cat([net(net.normalise(images[i:i + 256])) for i in range(0, len(images), 256)])
    loss = F.cross_entropy(logits, labels).item()
    pred = logits.argmax(1)
    k = logits.shape[1]
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels.numpy(), pred.numpy()), 1)
    same = np.array_equal(confusion, np.array(ev["confusion"]))
    print(f"PyTorch: loss {loss:.6f} top-1 {100 * (pred == labels).float().mean().item():.2f}%  "
          f"loft: loss {ev['loss']:.6f} top-1 {ev['top1']:.2f}%  same predictions: {same}")
    if not same or abs(loss - ev["loss"]) > 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
