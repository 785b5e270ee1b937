#!/usr/bin/env python3
"""Write a small ImageNet-shaped tree of generated 500x375 JPEGs (the size of a typical
ImageNet photo) for the loader benchmark and quick runs:

    python3 scripts/imagenet_sample.py DIR [IMAGES_PER_CLASS] [CLASSES]

DIR/train/cNNN/*.JPEG and DIR/val/cNNN/*.JPEG (a fifth as many). Needs numpy and Pillow
(make deps puts Pillow in .deps/python: PYTHONPATH=.deps/python).
"""
import os
import sys

import numpy as np
from PIL import Image

root = sys.argv[1]
per_class = int(sys.argv[2]) if len(sys.argv) > 2 else 50
classes = int(sys.argv[3]) if len(sys.argv) > 3 else 10
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:375, 0:500]
for half, n in (("train", per_class), ("val", max(1, per_class // 5))):
    for c in range(classes):
        d = os.path.join(root, half, f"c{c:03d}")
        os.makedirs(d, exist_ok=True)
        for k in range(n):
            # smooth structure plus noise, so the JPEG is not trivially compressible
            f = rng.uniform(0.005, 0.05, size=3)
            base = 128 + 90 * np.sin(xx[..., None] * f + yy[..., None] * f[::-1] + c)
            img = np.clip(base + rng.normal(0, 20, size=(375, 500, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img, "RGB").save(os.path.join(d, f"c{c:03d}_{k:05d}.JPEG"), quality=90)
print(f"wrote {classes} classes x {per_class} training images (500x375) under {root}")
