#!/bin/bash
# A PyTorch reference environment outside the repository, made on demand (never needed by CI):
# prints the path of its python. Used by the PyTorch comparisons (docs/pytorch.md's check,
# benchmarks against PyTorch).
#
#   py=$(scripts/torch-venv.sh)        LOFT_TORCH_VENV overrides the folder
set -euo pipefail
VENV=${LOFT_TORCH_VENV:-$HOME/.cache/loft/torch-venv}
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import torch, safetensors, numpy' 2>/dev/null; then
    echo "torch-venv: installing torch, safetensors and numpy into $VENV (about 3 GB) ..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch safetensors numpy >&2
fi
echo "$VENV/bin/python"
