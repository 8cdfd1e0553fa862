#!/usr/bin/env bash
# Compression speed benchmark (not a test): decode with and without FlexLLMGen's 4-bit group-wise
# compression on the native engine's CPU device, opt-1.3b dummy weights, both sides in one run in
# alternating rounds (A, B, A, B, ...; each side's figure is its median round):
#   - weights 100% on disk, batch 1, compressed weights: goal decode >= 2.5x the token/s of
#     uncompressed and disk bytes read per token <= 0.3x;
#   - weights in memory, batch 4, compressed weights: goal decode >= 1.5x;
#   - KV cache on disk (weights in memory), batch CACHE_BATCH, prompt CACHE_PROMPT, compressed
#     cache: goal decode faster than without.
# Prints every round, the ratios against the goals, bytes read per token, the memory peaks per
# tier and the process's peak RSS, and which CPU kernels ran.
#
# usage: scripts/compress_speed.sh [OFFLOAD_DIR] [GEN_LEN] [ROUNDS] [CACHE_BATCH] [CACHE_PROMPT] [ONLY]
#   OFFLOAD_DIR   a directory on the disk to measure (default ./target/compress-speed); it needs
#                 room for opt-1.3b's fp16 and 4-bit weights (2.6 + 0.7 GB) and the cache files
#   GEN_LEN       tokens per round: 1 prefill + GEN_LEN-1 decode steps (default 6)
#   ROUNDS        rounds per comparison (default 3)
#   CACHE_BATCH   batch of the cache comparison (default 4)
#   CACHE_PROMPT  prompt of the cache comparison (default 256)
#   ONLY          comma list of comparisons to run: disk,memory,cache (default all)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/target/compress-speed}"
gen_len="${2:-6}"
rounds="${3:-3}"
cache_batch="${4:-4}"
cache_prompt="${5:-256}"
only="${6:-}"
mkdir -p "$dir"
cargo build --release -q -p backend-native --manifest-path "$root/Cargo.toml"
bin="$root/target/release/flexbench-native"
args=(compress-speed --offload-dir "$dir" --gen-len "$gen_len" --rounds "$rounds"
    --cache-batch "$cache_batch" --cache-prompt-len "$cache_prompt")
[ -n "$only" ] && args+=(--only "$only")
# other processes' dirty pages would be written back during the measurement
sync
json="$("$bin" "${args[@]}")"

python3 - "$json" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
gib = lambda b: b / 2**30
print(f"model {r['model']} on {r['device']}; AMX {'available' if r['amx'] else 'not available'}")
for c in r["comparisons"]:
    u, z = c["uncompressed"], c["compressed"]
    print(f"\n{c['name']}: batch {c['batch']}, prompt {c['prompt_len']}, gen {c['gen_len']} ({u['policy']} against {z['policy']})")
    for side in (u, z):
        rounds = " ".join(f"{t:.3f}" for t in side["decode_tok_s"])
        peaks = ", ".join(f"{k} {gib(v):.2f} GiB" for k, v in sorted(side["peak_memory_bytes"].items()))
        print(f"  {side['policy']:>28}: decode token/s per round {rounds}; median {side['median_decode_tok_s']:.3f}; "
              f"disk read {side['disk_read_per_token'] / 2**20:.1f} MiB/token; io wait {side['io_wait_s']:.2f} s, compute "
              f"{side['compute_s']:.2f} s, disk thread busy {100 * side['disk_busy_fraction']:.0f}%; peaks {peaks}")
    line = f"  decode ratio {c['speedup']:.2f}x"
    if c["disk_read_ratio"] is not None:
        line += f", disk bytes per token {c['disk_read_ratio']:.3f}x"
    print(line + f"; goal: {c['goal']}: {'met' if c['goal_met'] else 'NOT met'}")
print(f"\npeak RSS of the process (both sides of every comparison loaded): {gib(r['host_rss_peak']):.2f} GiB")
PY
