#!/usr/bin/env bash
# Builds, on a CPU machine, what tools/gpu-check.sh runs on a GPU machine without a Rust
# toolchain or network: the CUDA build of nested-reft (one binary; the services are links to
# it) and of the GPU test program, stripped and compressed, the default model and its
# calibration profile. Carried files are limited per transfer (64 MiB each time, the working
# tree included), so the bundle comes in parts, each to be carried by its own call:
#
#   gpu-bundle/a   binaries, profile, the model's first bytes
#   gpu-bundle/b   the rest of the model (and gpu-bundle/c, ... if needed)
#
# Then, on the GPU machine, from the repository root, one call per part, the last one running
# the check (the machine must stay up between them; the parts wait in /tmp/nested-reft-gpu):
#
#   tools/gpu-check.sh stage gpu-bundle/a
#   tools/gpu-check.sh run gpu-bundle/b
#
# Needs the default model in the asset cache (tools/fetch-assets.sh model) and, for the
# calibrated behavior, its profile (nested-reft calibrate).
set -euo pipefail
cd "$(dirname "$0")/.."

# Per part: what one transfer may carry, less the working tree and some slack.
part_budget=$((56 * 1024 * 1024))

eval "$(tools/cuda-toolkit.sh link)"
target=${CARGO_TARGET_DIR:-target}
echo "bundle: building nested-reft with CUDA (release) ..." >&2
cargo build --release --locked -p tools --features cuda --bin nested-reft
echo "bundle: building the GPU tests ..." >&2
tests_bin=$(cargo test --release --locked -p tests --features cuda --test gpu --no-run \
  --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])
')
[ -n "$tests_bin" ] || { echo "error: no GPU test program was built" >&2; exit 1; }

assets=$(python3 - <<'PY'
import os
a = os.environ.get("NESTED_REFT_ASSETS")
x = os.environ.get("XDG_CACHE_HOME", "")
print(a or (os.path.join(x, "nested-reft") if x.startswith("/") else os.path.expanduser("~/.cache/nested-reft")))
PY
)
model=$assets/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || { echo "error: $model is missing (tools/fetch-assets.sh model)" >&2; exit 1; }

out=gpu-bundle
rm -rf "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
strip -o "$stage/nested-reft" "$target/release/nested-reft"
strip -o "$stage/gpu-tests" "$tests_bin"
mkdir -p "$out/a"
tar -C "$stage" -cJf "$out/a/bin.tar.xz" nested-reft gpu-tests
[ -f "$model.profile.json" ] && cp "$model.profile.json" "$out/a/model.profile.json"
sha256sum "$model" | cut -d' ' -f1 > "$out/a/model.sha256"

# The model in pieces: the first fills part a's room, the others a part each.
used=$(du -cb "$out/a" | tail -1 | cut -f1)
first=$((part_budget - used))
[ "$first" -gt 0 ] || { echo "error: the binaries alone fill a transfer ($used bytes)" >&2; exit 1; }
size=$(stat -c %s "$model")
python3 - "$model" "$out" "$first" "$part_budget" "$size" <<'PY'
import os, string, sys
model, out, first, budget, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with open(model, "rb") as f:
    n, part = 0, 0
    while n < size:
        take = min(first if part == 0 else budget, size - n)
        d = os.path.join(out, string.ascii_lowercase[part])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"model.{part:02d}"), "wb") as g:
            g.write(f.read(take))
        n += take
        part += 1
PY
for d in "$out"/*/; do
  echo "bundle: $d $(du -sh "$d" | cut -f1)" >&2
done
echo "bundle: done; see the head of tools/gpu-check.sh for how to run it" >&2
