#!/usr/bin/env bash
# One prepared GPU check of flexbench's CUDA device (issue 5), for a GPU machine with CUDA 13,
# PyTorch and transformers but no Rust and no network.
#
# Exact steps:
#   1. On the development machine (Rust; no GPU needed):
#          cargo xtask gpu-check --prepare
#      builds the release binaries into target/gpu-check/bin (git-ignored, checked under 48 MiB),
#      writes the benchmark cases to target/gpu-check/cases, and prints the call below.
#   2. Device tool (the working tree travels; the prepared folder is carried):
#          run(command="bash scripts/gpu-check.sh", carry=["target/gpu-check"], timeout_s=540)
#   3. Results come back under $OUT: report.md (the tables), gpu-check.log (all output), and one
#      log per step (kernels, tests, golden, offload, speed, bench, sanitize).
#
# Steps here: nvidia-smi; every CUDA kernel against the CPU device on fresh random inputs
# (relative error per kernel; with issue 11 the 4-bit kernels too: compressed products, gathers,
# the compressed KV cache's append and attention, sparse attention over fp16 and compressed
# caches); the other CUDA tests (presence probe, NVRTC compile with this machine's NVRTC); the
# golden checkpoints on CUDA (tokens identical to transformers'), resident and through the
# offloader (weights on CPU, cache on CPU with CPU attention, weights on disk, splits), and the
# accuracy of compression on the trained fixture (perplexity with 4-bit weights against the
# Python reference, 4-bit cache and sparse attention against fp16; resident, weights on host and
# disk, cache on host with CPU attention and on disk); the speed goals (cuBLAS GEMM rate, copy bandwidth, pinned host-to-device bandwidth,
# prefill/decode GEMMs, decode attention); a short benchmark (opt-1.3b and opt-6.7b dummy
# weights: all on GPU, weights on CPU, cache on CPU with CPU attention) through
# `flexbench-native run-case` (plus opt-1.3b with 4-bit weights and cache), with the weights-on-CPU goal ratio (decode step time over host
# weight bytes / pinned host-to-device bandwidth); then compute-sanitizer (memcheck, racecheck) on the
# kernel tests. Each step has a time limit, and steps are skipped
# once the whole budget (GPU_CHECK_BUDGET_S, default 450 s) is spent, so it ends within 8 minutes.
# A step that fails is recorded and the next one runs; the exit code is 1 if any step failed.

set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PREP=${GPU_CHECK_DIR:-target/gpu-check}
BIN=$PREP/bin
OUT=${OUT:-$PREP/out}
mkdir -p "$OUT"
REPORT=$OUT/report.md
exec > >(tee "$OUT/gpu-check.log") 2>&1

START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-450}
FAILED=()

remaining() { echo $((BUDGET - (SECONDS - START))); }
note() { echo "$*" | tee -a "$REPORT"; }

if [ ! -d "$BIN" ]; then
    echo "no prepared binaries in $BIN: run 'cargo xtask gpu-check --prepare' on the development machine and carry $PREP" >&2
    exit 2
fi

# CUDA 13 libraries: the toolkit first, then the CUDA wheels of the Python environment (PyTorch's
# nvidia/cu13), so libcublas.so.13 / libcublasLt.so.13 / libnvrtc.so.13 are found by name.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
PYNV=$(python3 -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)
if [ -n "$PYNV" ] && [ -d "$PYNV/lib" ]; then
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$PYNV/lib"
fi
# NVRTC does not bundle cuda_fp16.h: the toolkit's headers, else the wheels'.
if [ ! -f /usr/local/cuda/include/cuda_fp16.h ] && [ -n "$PYNV" ] && [ -f "$PYNV/include/cuda_fp16.h" ]; then
    export FLEXBENCH_CUDA_INCLUDE=$PYNV/include
fi
export FLEXBENCH_CACHE=${FLEXBENCH_CACHE:-/tmp/flexbench-cache}
export RUST_BACKTRACE=1

# step NAME LIMIT_S COMMAND...: runs with a time limit into $OUT/NAME.log; records failures.
step() {
    local name=$1 limit=$2
    shift 2
    local left
    left=$(remaining)
    if [ "$left" -lt 20 ]; then
        echo "=== $name: SKIPPED (time budget spent)"
        FAILED+=("$name(skipped)")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s, $(remaining)s of budget left)"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name(exit $rc)")
        return 1
    fi
    return 0
}

: >"$REPORT"
note "# flexbench gpu-check report"
note ""
note "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
note ""
note "## GPU"
note ""
note '```'
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$REPORT"
note '```'
nvidia-smi || true

# ---- 1. every kernel against the CPU device ----
step kernels 150 "$BIN/test-cuda_kernels" --ignored --nocapture --test-threads=1
note ""
note "## Kernels against the CPU device (relative error, fresh random inputs)"
note ""
note "| kernel | rel. error | tolerance |"
note "|---|---|---|"
grep -h '^KERNEL ' "$OUT/kernels.log" 2>/dev/null | sed -E 's/^KERNEL ([^ ]+) rel_err=([^ ]+) tol=([^ ]+).*/| \1 | \2 | \3 |/' >>"$REPORT"
note ""
note "kernel tests: $(grep -h '^test result' "$OUT/kernels.log" 2>/dev/null | tail -1)"
failures() { # the first lines of each panic in a step's log, for the report
    if grep -q 'panicked at' "$OUT/$1.log" 2>/dev/null; then
        note ""
        note '```'
        grep -h -A2 'panicked at' "$OUT/$1.log" | head -30 >>"$REPORT"
        note '```'
    fi
}
failures kernels

# ---- 2. other CUDA tests: lib unit tests named *cuda* (probe, NVRTC with this machine's NVRTC),
#         and any ignored *cuda* test of the other test executables ----
for exe in "$BIN"/test-*; do
    case "$exe" in
    */test-cuda_kernels | */test-cuda_golden | */test-cuda_offload) continue ;;
    esac
    step tests 30 "$exe" --include-ignored cuda --nocapture --test-threads=1 || true
done
note ""
note "other CUDA tests: $(grep -h '^test result' "$OUT/tests.log" 2>/dev/null | awk '{p+=$4; f+=$6} END {printf "%d passed, %d failed", p, f}')"

# ---- 3. golden checkpoints on CUDA ----
step golden 120 "$BIN/test-cuda_golden" --ignored --nocapture --test-threads=1
note ""
note "## Golden checkpoints and compression accuracy on CUDA"
note ""
note '```'
grep -h '^GOLDEN ' "$OUT/golden.log" >>"$REPORT" 2>/dev/null || note "(no result: see golden.log)"
note '```'
failures golden

# ---- 3b. the offloader on CUDA: golden tokens for offloaded placements ----
mkdir -p /tmp/flexbench-offload
step offload 90 env TMPDIR=/tmp/flexbench-offload "$BIN/test-cuda_offload" --ignored --nocapture --test-threads=1
note ""
note "## Offloaded placements on CUDA (golden tokens)"
note ""
note '```'
grep -h '^CUDA_OFFLOAD ' "$OUT/offload.log" >>"$REPORT" 2>/dev/null || note "(no result: see offload.log)"
note "$(grep -h '^test result' "$OUT/offload.log" 2>/dev/null | tail -1)"
note '```'
failures offload

# ---- 4. speed goals ----
step speed 150 "$BIN/gpu_speed"
note ""
note "## Speed goals"
note ""
sed -n '/^| measurement/,$p' "$OUT/speed.log" >>"$REPORT" 2>/dev/null
grep -h '^Error' -A3 "$OUT/speed.log" >>"$REPORT" 2>/dev/null

# ---- 5. short benchmark through the runner ----
# Goal (issue 5): with weights in host memory, decode step time within 1.15x of
# host-resident weight bytes / measured pinned host-to-device bandwidth (gpu_speed's
# PINNED_H2D_BYTES_PER_S: write-combined pinned memory, as the offloader's host tier uses).
H2D_BW=$(grep -h '^PINNED_H2D_BYTES_PER_S=' "$OUT/speed.log" 2>/dev/null | tail -1 | cut -d= -f2)
note ""
note "## Short benchmark through flexbench-native run-case (prompt 512, 8 measured decode steps, batch 4, dummy weights)"
note ""
note "pinned host-to-device bandwidth (speed step): ${H2D_BW:-not measured} B/s"
note ""
note "| case | outcome | prefill s | decode s/step | decode tok/s | host weights GiB | step / (host weights / H2D bw), goal <= 1.15 | io wait s / compute s |"
note "|---|---|---|---|---|---|---|---|"
if [ ! -x "$BIN/flexbench-native" ]; then
    note "| all | not built (no flexbench-native binary was prepared) | | | | | | |"
    FAILED+=("bench(no runner)")
else
    mkdir -p /tmp/flexbench-offload
    for case in "$PREP"/cases/*.json; do
        name=$(basename "$case" .json)
        left=$(remaining)
        if [ "$left" -lt 30 ]; then
            note "| $name | skipped (time budget spent) | | | | | | |"
            FAILED+=("bench-$name(skipped)")
            continue
        fi
        limit=100
        [ "$limit" -gt "$left" ] && limit=$left
        echo "=== bench $name (limit ${limit}s)" | tee -a "$OUT/bench.log"
        FLEXBENCH_CASE=$case timeout --kill-after=5 "$limit" "$BIN/flexbench-native" run-case --case "$case" \
            --offload-dir /tmp/flexbench-offload >/tmp/bench.out 2>/tmp/bench.err
        rc=$?
        cat /tmp/bench.out /tmp/bench.err >>"$OUT/bench.log"
        [ "$rc" -ne 0 ] && FAILED+=("bench-$name(exit $rc)")
        python3 - "$name" "$rc" /tmp/bench.out /tmp/bench.err "$case" "${H2D_BW:-}" >>"$REPORT" <<'EOF'
import json, sys
name, rc, out, err, case_file, bw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
line = next((l for l in open(out) if l.startswith("FLEXBENCH_RESULT ")), None)
tail = " ".join(open(err).read().strip().splitlines()[-2:])[:160].replace("|", "/")
kind = {0: "ok", 3: "out of memory", 4: "unavailable", 124: "timeout", 137: "timeout"}.get(rc, f"error (exit {rc})")
if line is None or rc != 0:
    print(f"| {name} | {kind}: {tail} | | | | | | |")
else:
    r = json.loads(line.split(" ", 1)[1])
    steps = r["step_times_s"][-1]
    c = json.load(open(case_file))
    batch = c["gpu_batch_size"] * c["num_gpu_batches"]
    dec = steps[1:]
    per = sum(dec) / len(dec) if dec else float("nan")
    host_w = r["peak_memory_bytes"].get("weights_host", 0)
    ratio = ""
    if host_w > 0:
        if bw:
            floor = host_w / float(bw)
            verdict = "met" if per / floor <= 1.15 else "NOT met"
            ratio = f"{per / floor:.2f} ({verdict}; floor {floor:.4f} s)"
        else:
            ratio = "no bandwidth measured"
    io, comp = r.get("io_wait_s"), r.get("compute_s")
    iocomp = f"{io:.3f} / {comp:.3f}" if io is not None and comp is not None else ""
    print(f"| {name} | ok | {steps[0]:.3f} | {per:.4f} | {batch / per:.1f} | {host_w / 2**30:.2f} | {ratio} | {iocomp} |")
EOF
    done
fi

# ---- 6. compute-sanitizer on the kernel tests (memcheck: out-of-bounds and misaligned accesses;
#         racecheck: shared-memory races), last because it is the slowest and optional ----
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
note ""
note "## compute-sanitizer"
note ""
if [ -x "$SANITIZER" ]; then
    for tool in memcheck racecheck; do
        if step sanitize 90 "$SANITIZER" --tool "$tool" --error-exitcode 9 "$BIN/test-cuda_kernels" --ignored --test-threads=1; then
            note "- $tool: clean ($(grep -h 'ERROR SUMMARY' "$OUT/sanitize.log" | tail -1))"
        else
            note "- $tool: FAILED or timed out ($(grep -h 'ERROR SUMMARY' "$OUT/sanitize.log" | tail -1)); see sanitize.log"
        fi
    done
else
    note "- not run: compute-sanitizer not found"
fi

note ""
if [ ${#FAILED[@]} -eq 0 ]; then
    note "all steps passed in $((SECONDS - START))s"
    exit 0
fi
note "FAILED steps: ${FAILED[*]} (total $((SECONDS - START))s)"
exit 1
