#!/usr/bin/env bash
# What a `--features cuda` build needs on a machine without a CUDA toolkit, installed by package
# name with pip (CUDA 13.0, the generation of the driver on the GPU hosts we target), and the
# environment that points the build at it. Prints the `export` lines: eval them.
#
#   eval "$(tools/cuda-toolkit.sh check)"   # nvcc and headers: enough for `cargo check`
#   eval "$(tools/cuda-toolkit.sh link)"    # + the libraries candle links and a libcuda stub:
#                                           #   enough for `cargo build` (tools/gpu-bundle.sh)
#
# The stub `libcuda.so` (soname libcuda.so.1) exports the driver functions cudarc declares and
# only satisfies the linker: at run time the GPU machine's own driver library is loaded. A
# machine with a real toolkit needs none of this (set CUDA_ROOT, CUDA_COMPUTE_CAP and PATH).
# Directory: $NESTED_REFT_CUDA_DIR, else $XDG_CACHE_HOME/nested-reft-cuda (absolute
# XDG_CACHE_HOME), else ~/.cache/nested-reft-cuda. Idempotent.
set -euo pipefail

what=${1:-check}
case "$what" in
  check | link) ;;
  *) echo "usage: $0 [check|link]" >&2; exit 2 ;;
esac
dir=${NESTED_REFT_CUDA_DIR:-}
if [ -z "$dir" ]; then
  case "${XDG_CACHE_HOME:-}" in
    /*) dir=$XDG_CACHE_HOME/nested-reft-cuda ;;
    *) dir=${HOME:-.}/.cache/nested-reft-cuda ;;
  esac
fi
py=$(command -v python3 || command -v python || true)
[ -n "$py" ] || { echo "error: python3 with pip is needed to install the CUDA packages" >&2; exit 2; }

# One pip call per set, into its own directory: `pip install --target` replaces a directory
# it installs into again, so the sets never share one. nvidia-nvvm is pinned with nvcc (a newer
# nvvm's output is refused by the 13.0 ptxas).
install() { # NAME PACKAGES...
  local name=$1; shift
  local dest=$dir/$name
  [ -f "$dest/.complete" ] && return 0
  rm -rf "$dest"
  echo "cuda: installing $* with pip into $dest ..." >&2
  "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dest" "$@" >&2 ||
    { echo "error: could not install $* with pip (is a package index reachable?)" >&2; exit 3; }
  touch "$dest/.complete"
}
install compiler "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
  "nvidia-cuda-runtime==13.0.*" "nvidia-nvvm==13.0.*"
root=$dir/compiler/nvidia/cu13
[ -x "$root/bin/nvcc" ] || { echo "error: no nvcc in $root/bin after installing" >&2; exit 3; }

if [ "$what" = link ]; then
  install libraries "nvidia-cublas==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand==10.4.0.*"
  libs=$root/lib/stubs
  mkdir -p "$libs"
  # The linker wants the unversioned names; the wheels ship libX.so.N.
  for f in "$dir"/libraries/nvidia/cu13/lib/lib*.so.* "$root"/lib/libcudart.so.*; do
    base=$(basename "$f")
    ln -sf "$f" "$libs/${base%%.so.*}.so"
  done
  if [ ! -f "$libs/libcuda.so" ]; then
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/ 2>/dev/null | tail -1)
    [ -n "$cudarc" ] || { echo "error: cudarc's sources are not in the cargo registry (run cargo fetch)" >&2; exit 3; }
    stub=$(mktemp -d)
    grep -oE '^ +fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" | sed -E 's/^ +fn ([A-Za-z0-9_]+)\(/\1/' |
      sort -u | sed 's/.*/int &(void) { return 999; }/' > "$stub/cuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$libs/libcuda.so" "$stub/cuda.c"
    rm -rf "$stub"
  fi
fi

echo "export CUDA_ROOT='$root'"
echo "export PATH='$root/bin':\"\$PATH\""
# No GPU to ask at build time: the H100/H200 generation.
echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
