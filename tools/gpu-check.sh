#!/usr/bin/env bash
# Proves the GPU path on one GPU, from a bundle built on a CPU machine by tools/gpu-bundle.sh
# (the GPU machine needs no Rust toolchain and no network, only the NVIDIA driver and the CUDA
# libraries cuBLAS, cuRAND and NVRTC of CUDA 13, e.g. from their Python packages). Under 8
# minutes on an H100/H200:
#
#   1. the GPU tests (tests/tests/gpu.rs): log-probs on CUDA = CPU within 1e-3 on the real
#      weights (full and nested plans), generation drawn on the device, the 8-bit behavior, a
#      device slot round trip bit for bit, one update step = CPU within 1e-4 (seq-is, tis),
#      CUDA IPC between two processes including a writer restart;
#   2. behavior decode tokens/s at batch 1, 8 and 32: full f32 (the baseline), full q8_0 and
#      calibrated 0.1 (`nested-reft bench rollout --device cuda`);
#   3. the host weight store's publish and read times (`nested-reft bench weights`), the
#      baseline of the device slots' publication;
#   4. sync and async training with both processes on the GPU, 4 steps each (`nested-reft
#      bench overlap`): the overlap speedup and its ideal bound, the learner's tokens/s, the
#      device publication time, and per version the checksum of the learner's published
#      weights against the server's of what it copied out of the mapped slot.
#
# Usage (from the repository root; the parts of a bundle are carried one per call):
#   tools/gpu-check.sh stage DIR   copy a part into /tmp/nested-reft-gpu and stop
#   tools/gpu-check.sh run [DIR]   stage DIR too (if given), then check
# Results go to $OUT (or ./gpu-check-out): the benches' reports, logs and summary.txt.
set -uo pipefail

stage=/tmp/nested-reft-gpu
cmd=${1:-run}
case "$cmd" in
  stage | run) ;;
  *) echo "usage: $0 stage DIR | run [DIR]" >&2; exit 2 ;;
esac
mkdir -p "$stage"
if [ -n "${2:-}" ]; then
  cp -f "$2"/* "$stage"/ || { echo "error: cannot copy $2 into $stage" >&2; exit 1; }
  echo "staged $2: $(ls "$stage" | tr '\n' ' ')"
fi
[ "$cmd" = stage ] && exit 0

out=${OUT:-$PWD/gpu-check-out}
mkdir -p "$out"
summary=$out/summary.txt
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
fail=0
step() { # NAME COMMAND...: runs a step with its log in $out, notes a failure and goes on
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name" >&2
  if "$@" > "$out/$name.log" 2>&1; then
    say "ok    $name ($((SECONDS - t0)) s)"
  else
    say "FAIL  $name ($((SECONDS - t0)) s): see $name.log"; tail -20 "$out/$name.log" >&2; fail=1
  fi
}

# The bundle: binaries, then the model from its parts, checked against its hash.
for f in bin.tar.xz model.sha256 model.00; do
  [ -f "$stage/$f" ] || { echo "error: $stage/$f is missing: stage every part first" >&2; exit 1; }
done
bin=$stage/bin
mkdir -p "$bin"
tar -C "$bin" -xJf "$stage/bin.tar.xz" || exit 1
ln -sf nested-reft "$bin/nested-reft-learner"
ln -sf nested-reft "$bin/nested-reft-rollout-server"
export NESTED_REFT_ASSETS=$stage/assets
mkdir -p "$NESTED_REFT_ASSETS"
model=$NESTED_REFT_ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$stage"/model.[0-9][0-9] > "$model.part" && mv "$model.part" "$model"
[ "$(sha256sum "$model" | cut -d' ' -f1)" = "$(cat "$stage/model.sha256")" ] ||
  { echo "error: the joined model does not match its hash (a part is missing?)" >&2; exit 1; }
[ -f "$stage/model.profile.json" ] && cp "$stage/model.profile.json" "$model.profile.json"

# The CUDA libraries candle links (the driver's libcuda is found by the loader).
libs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib"):
        for d in glob.glob(os.path.join(base, pat)):
            dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/cuda/lib64
missing=$(ldd "$bin/nested-reft" | grep "not found" || true)
[ -z "$missing" ] || { echo "error: libraries not found:" >&2; echo "$missing" >&2; exit 1; }
export PATH=$bin:$PATH
say "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"

step gpu-tests "$bin/gpu-tests" --test-threads=1
step rollout nested-reft bench rollout --device cuda --behaviors full@q8_0,calibrated:0.1 \
  --batches 1,8,32 --new-tokens 64 --repeats 3 --no-eval -o "$out/rollout"
step weights-cpu-store nested-reft bench weights
step overlap nested-reft bench overlap --steps 4 --train-arg=--device=cuda -o "$out/overlap"

# The GPU path's figures, from the reports.
python3 - "$out" <<'PY' | tee -a "$summary"
import json, os, sys
out = sys.argv[1]
def lines(p):
    try:
        return [json.loads(l) for l in open(p) if l.strip()]
    except OSError:
        return []
try:
    r = json.load(open(os.path.join(out, "rollout", "rollout.json")))
    print("behavior decode tokens/s (bench rollout, CUDA):")
    print(json.dumps(r.get("behaviors", r), indent=1)[:3000])
except (OSError, ValueError) as e:
    print(f"no rollout report ({e})")
for mode in ("sync", "async"):
    d = os.path.join(out, "overlap", mode)
    learner = lines(os.path.join(d, "metrics.jsonl"))
    server = lines(os.path.join(d, "rollout-server", "metrics.jsonl"))
    tps = [l["update"]["learner_tokens_per_s"] for l in learner if l.get("update")]
    pub = [l["publish_s"] for l in learner if l.get("publish_s")]
    if tps:
        print(f"{mode}: learner tokens/s {sum(tps) / len(tps):.0f} (mean of {len(tps)} steps)")
    if pub:
        print(f"{mode}: device publication {1e3 * sum(pub) / len(pub):.2f} ms per step")
    mine = {l["version"]: l["weights_sum"] for l in learner if "weights_sum" in l}
    theirs = {l["policy_version"]: l["weights_sum"] for l in server if "weights_sum" in l}
    both = sorted(set(mine) & set(theirs))
    same = [v for v in both if mine[v] == theirs[v]]
    print(f"{mode}: weight checksums equal for {len(same)}/{len(both)} versions"
          + ("" if len(same) == len(both) else f" (differ: {[v for v in both if v not in same]})"))
    probes = [p for l in learner for p in l.get("probes", [])]
    if probes:
        print(f"{mode}: probe max |diff| {max(p.get('max_abs_diff', 0) for p in probes):.2e} over {len(probes)} versions")
try:
    o = json.load(open(os.path.join(out, "overlap", "overlap.json")))
    print("overlap:", json.dumps({k: o[k] for k in o if k in ("speedup", "ideal_bound", "fraction_of_bound", "tg_s", "tt_s", "sync", "async")})[:2000])
except (OSError, ValueError) as e:
    print(f"no overlap report ({e})")
PY
if [ "$fail" = 0 ]; then say "gpu-check: all steps passed"; else say "gpu-check: FAILED"; fi
exit "$fail"
