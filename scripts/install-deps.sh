#!/usr/bin/env bash
# Install the Debian packages loft needs to build, test and run.
# Idempotent: when everything is already present it only runs dpkg-query
# (no apt-get update, no network).
set -euo pipefail

PACKAGES=(libopenmpi-dev openmpi-bin libclang-dev libhdf5-dev pkg-config dataset-fashion-mnist python3-h5py fonts-dejavu-core
          slurmctld slurmd slurm-client munge)

is_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]]
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps: dpkg-query not found; this script supports Debian/Ubuntu only." >&2
    echo "install-deps: please install the equivalents of: ${PACKAGES[*]}" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if is_installed "$pkg"; then
        printf '  %-24s installed\n' "$pkg"
    else
        printf '  %-24s missing\n' "$pkg"
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} > 0)); then
    apt_install=(apt-get install -y --no-install-recommends "${missing[@]}")
    if [[ $(id -u) -eq 0 ]]; then
        sudo_cmd=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo_cmd=(sudo)
    else
        echo "install-deps: missing packages: ${missing[*]}" >&2
        echo "install-deps: not root and sudo is not available; run as root:" >&2
        echo "    apt-get update && DEBIAN_FRONTEND=noninteractive ${apt_install[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]} ..."
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive "${apt_install[@]}"
    still_missing=()
    for pkg in "${missing[@]}"; do
        is_installed "$pkg" || still_missing+=("$pkg")
    done
    if ((${#still_missing[@]} > 0)); then
        echo "install-deps: failed to install: ${still_missing[*]}" >&2
        exit 1
    fi
    echo "install-deps: installed ${#missing[@]} package(s); all ${#PACKAGES[@]} system packages present."
else
    echo "install-deps: all ${#PACKAGES[@]} system packages present."
fi

if command -v cargo >/dev/null 2>&1; then
    echo "install-deps: $(cargo --version)"
else
    echo "install-deps: cargo not found on PATH." >&2
    if [[ -f "$HOME/.cargo/env" ]]; then
        echo "install-deps: rustup seems installed; run: source \"\$HOME/.cargo/env\"" >&2
    else
        echo "install-deps: install the Rust toolchain with rustup:" >&2
        echo "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y" >&2
        echo "    source \"\$HOME/.cargo/env\"" >&2
    fi
    exit 1
fi

# NVRTC (CUDA 13.0, no GPU needed) for compiling the CUDA kernels: the pip wheel, into a
# folder of the repository (no system CUDA). loft finds it there (or through LOFT_NVRTC_DIR).
NVRTC_VERSION=13.0.88
NVRTC_DIR=".deps/nvrtc"
if [[ -f "$NVRTC_DIR/nvidia/cu13/lib/libnvrtc.so.13" && -f "$NVRTC_DIR/.version-$NVRTC_VERSION" ]]; then
    echo "install-deps: NVRTC $NVRTC_VERSION present in $NVRTC_DIR"
else
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        echo "install-deps: python3 with pip is needed to install NVRTC (pip install nvidia-cuda-nvrtc)" >&2
        exit 1
    fi
    echo "install-deps: installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $NVRTC_DIR ..."
    rm -rf "$NVRTC_DIR"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$NVRTC_DIR" \
        "nvidia-cuda-nvrtc==$NVRTC_VERSION"
    touch "$NVRTC_DIR/.version-$NVRTC_VERSION"
    echo "install-deps: NVRTC $NVRTC_VERSION installed in $NVRTC_DIR"
fi

# Python packages the tests use with Debian's python3 (numpy and h5py come from Debian):
# safetensors (the export test reads loft's files with it) and Pillow (the ImageNet test
# writes its JPEGs with it), into a folder of the repository (PYTHONPATH).
PY_PACKAGES=(safetensors==0.8.0 pillow==12.0.0)
PY_DIR=".deps/python"
PY_STAMP="$PY_DIR/.installed-$(echo "${PY_PACKAGES[*]}" | tr ' =' '_-')"
if [[ -f "$PY_STAMP" ]]; then
    echo "install-deps: ${PY_PACKAGES[*]} present in $PY_DIR"
else
    echo "install-deps: installing ${PY_PACKAGES[*]} into $PY_DIR ..."
    rm -rf "$PY_DIR"
    PIP_ROOT_USER_ACTION=ignore /usr/bin/python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$PY_DIR" "${PY_PACKAGES[@]}" ||
        PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
            --python-version 3.11 --only-binary=:all: --target "$PY_DIR" "${PY_PACKAGES[@]}"
    touch "$PY_STAMP"
    echo "install-deps: ${PY_PACKAGES[*]} installed in $PY_DIR"
fi
