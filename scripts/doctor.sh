#!/usr/bin/env bash
# Report what this machine has for building and running loft.
# Informational only: always exits 0.
set -uo pipefail

ok()   { printf '  \xe2\x9c\x93 %-22s %s\n' "$1" "$2"; }
bad()  { printf '  \xe2\x9c\x97 %-22s %s\n' "$1" "$2"; }
have() { command -v "$1" >/dev/null 2>&1; }
first_line() { head -n 1 | tr -s '[:space:]' ' ' | sed 's/ $//'; }
# First existing path among the arguments (unmatched globs stay literal and are skipped).
first_file() {
    local f
    for f in "$@"; do
        if [[ -e "$f" ]]; then printf '%s\n' "$f"; return 0; fi
    done
    return 1
}
dpkg_version() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [[ "$status" == "install ok installed" ]] || return 1
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null
}

# Make a rustup install visible even if the shell didn't source it.
if ! have cargo && [[ -d "$HOME/.cargo/bin" ]]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi

echo "loft doctor"
echo "== toolchain"
if have cargo; then ok cargo "$(cargo --version 2>/dev/null)"; else
    bad cargo "not found; install rustup: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"; fi
if have rustc; then ok rustc "$(rustc --version 2>/dev/null)"; else
    bad rustc "not found; install rustup (see cargo)"; fi

echo "== system libraries"
if have mpirun; then
    ok mpirun "$(mpirun --version 2>&1 | first_line)"
else
    bad mpirun "not found; apt-get install openmpi-bin (or: make deps)"
fi

if have pkg-config && pkg-config --exists ompi 2>/dev/null; then
    ok "MPI headers" "ompi $(pkg-config --modversion ompi) (cflags: $(pkg-config --cflags-only-I ompi | tr -s ' ' | sed 's/ $//'))"
elif have mpicc; then
    ok "MPI headers" "mpicc: $(mpicc --showme:incdirs 2>/dev/null || command -v mpicc)"
else
    bad "MPI headers" "not found; apt-get install libopenmpi-dev (or: make deps)"
fi

if have pkg-config && pkg-config --exists hdf5 2>/dev/null; then
    ok HDF5 "hdf5 $(pkg-config --modversion hdf5) (pkg-config)"
elif have h5cc && h5cc -showconfig >/dev/null 2>&1; then
    ok HDF5 "$(h5cc -showconfig 2>/dev/null | grep -m1 'HDF5 Version' | sed 's/^[[:space:]]*//')"
elif v=$(dpkg_version libhdf5-dev); then
    ok HDF5 "libhdf5-dev $v (dpkg)"
else
    bad HDF5 "not found; apt-get install libhdf5-dev (or: make deps)"
fi

clang_lib=""
if have llvm-config; then
    d=$(llvm-config --libdir 2>/dev/null || true)
    [[ -n "$d" ]] && clang_lib=$(first_file "$d"/libclang*.so*)
fi
if [[ -z "$clang_lib" && -n "${LIBCLANG_PATH:-}" ]]; then
    clang_lib=$(first_file "$LIBCLANG_PATH"/libclang*.so*)
fi
if [[ -z "$clang_lib" ]] && have ldconfig; then
    clang_lib=$(ldconfig -p 2>/dev/null | grep -E 'libclang(-[0-9.]+)?\.so' | head -n 1 | sed 's/.*=> //')
fi
if [[ -z "$clang_lib" ]]; then
    clang_lib=$(first_file /usr/lib/llvm-*/lib/libclang*.so*)
fi
if [[ -n "$clang_lib" ]]; then
    v=$(dpkg_version libclang-dev 2>/dev/null || true)
    ok libclang "$clang_lib${v:+ (libclang-dev $v)}"
else
    bad libclang "not found; apt-get install libclang-dev (or: make deps)"
fi
if have sbatch && have slurmctld && have slurmd && have munged; then
    ok Slurm "slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null), with slurmctld, slurmd and munge (scripts/slurm_local.sh)"
else
    bad Slurm "optional (for the Slurm test); apt-get install slurmctld slurmd slurm-client munge (or: make deps)"
fi

echo "== data"
fm_files=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
check_fmnist_dir() {
    local dir=$1 f n=0
    for f in "${fm_files[@]}"; do
        if [[ -f "$dir/$f" || -f "$dir/$f.gz" ]]; then n=$((n + 1)); fi
    done
    echo "$n"
}
fm_found=""
for dir in ${LOFT_DATA_DIR:+"$LOFT_DATA_DIR" "$LOFT_DATA_DIR/fashion-mnist"} /usr/share/datasets/fashion-mnist data/fashion-mnist; do
    if [[ -d "$dir" && $(check_fmnist_dir "$dir") -eq 4 ]]; then fm_found=$dir; break; fi
done
if [[ -n "$fm_found" ]]; then
    ok Fashion-MNIST "$fm_found (4/4 files)"
elif [[ -d /usr/share/datasets/fashion-mnist ]]; then
    bad Fashion-MNIST "/usr/share/datasets/fashion-mnist has $(check_fmnist_dir /usr/share/datasets/fashion-mnist)/4 files; reinstall dataset-fashion-mnist or set LOFT_DATA_DIR"
else
    bad Fashion-MNIST "not found; apt-get install dataset-fashion-mnist (or: make deps), or set LOFT_DATA_DIR"
fi

cifar_dir=data/cifar-10-batches-bin
if [[ -d "$cifar_dir" ]]; then
    n=0
    for f in "$cifar_dir"/data_batch_{1..5}.bin "$cifar_dir"/test_batch.bin; do
        [[ -f "$f" ]] && n=$((n + 1))
    done
    if [[ $n -eq 6 ]]; then ok CIFAR-10 "$cifar_dir (6/6 batches)"; else
        bad CIFAR-10 "$cifar_dir has $n/6 batches (optional)"; fi
else
    bad CIFAR-10 "optional; extract cifar-10-binary.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into data/"
fi

echo "== accelerator (optional)"
nvrtc=""
if have ldconfig; then
    nvrtc=$(ldconfig -p 2>/dev/null | grep -m1 'libnvrtc\.so' | sed 's/.*=> //')
fi
if [[ -z "$nvrtc" ]] && have python3; then
    while IFS= read -r sp; do
        [[ -d "$sp/nvidia" ]] || continue
        nvrtc=$(first_file "$sp"/nvidia/cu13/lib/libnvrtc.so* "$sp"/nvidia/cuda_nvrtc/lib/libnvrtc.so*)
        [[ -n "$nvrtc" ]] && break
    done < <(python3 -c 'import site,sys
p=[]
try: p+=site.getsitepackages()
except Exception: pass
try: p.append(site.getusersitepackages())
except Exception: pass
p+=[x for x in sys.path if x.endswith("-packages")]
print("\n".join(dict.fromkeys(p)))' 2>/dev/null)
fi
if [[ -n "$nvrtc" ]]; then ok libnvrtc "$nvrtc"; else
    bad libnvrtc "not found (optional, GPU only); pip install nvidia-cuda-nvrtc, or install the CUDA toolkit"; fi

if have nvidia-smi && gpus=$(nvidia-smi -L 2>/dev/null) && [[ -n "$gpus" ]]; then
    ok "NVIDIA driver" "$(echo "$gpus" | wc -l) GPU(s): $(echo "$gpus" | first_line)"
else
    cuda=""
    have ldconfig && cuda=$(ldconfig -p 2>/dev/null | grep -m1 'libcuda\.so' | sed 's/.*=> //')
    if [[ -n "$cuda" ]]; then bad "NVIDIA driver" "libcuda at $cuda but nvidia-smi lists no GPU (optional)"; else
        bad "NVIDIA driver" "no libcuda / nvidia-smi (optional; CPU backend is used)"; fi
fi

echo "== machine"
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')
[[ -z "$cpu" ]] && have lscpu && cpu=$(lscpu | grep -m1 'Model name' | sed 's/.*: *//')
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?')
ok CPU "${cpu:-unknown} (${cores} cores available)"
if [[ -r /proc/meminfo ]]; then
    mem=$(awk '/^MemTotal:/ {t=$2} /^MemAvailable:/ {a=$2} END {printf "%.1f GiB total, %.1f GiB available", t/1048576, a/1048576}' /proc/meminfo)
    ok memory "$mem"
else
    bad memory "unknown (/proc/meminfo not readable)"
fi
exit 0
