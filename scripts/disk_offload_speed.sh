#!/usr/bin/env bash
# Disk-offload speed benchmark (not a test): weights 100% on disk, CPU device, greedy decode.
# Prints the decode phase's weight read rate against the disk's sequential O_DIRECT read
# bandwidth measured in the same run, their ratio (goal: >= 0.85), and the memory peaks.
#
# usage: scripts/disk_offload_speed.sh [OFFLOAD_DIR] [MODEL] [GEN_LEN] [BATCH] [ROUNDS] [SEP_LAYER]
#   OFFLOAD_DIR  a directory on the disk to measure (default: ./target/offload-speed); it needs
#                room for the model's fp16 weights (opt-1.3b: 2.6 GB)
#   MODEL        registry model with dummy weights (default: opt-1.3b)
#   GEN_LEN      tokens per sequence: 1 prefill + GEN_LEN-1 decode steps (default: 8)
#   BATCH        sequences (default: 1)
#   ROUNDS       generations, each between two reference reads (default: 5)
#   SEP_LAYER    true: attention and MLP halves read as separate units (FlexLLMGen's default);
#                false: whole layers (default: true)
#
# Two reference figures: `flexbench-native disk-speed` reads the model's own weight files
# sequentially with O_DIRECT in 16 MiB blocks into one buffer on transparent huge pages (the
# engine's allocator: on this project's virtual disk the fastest way to read it, 2.6-2.8 GB/s)
# before, between and after ROUNDS generations (each round's ratio uses the reads on both sides
# of it; the result is the median round: this virtual disk drifts from minute to minute), and
# `dd iflag=direct` reads a scratch file of 2 GiB on the same filesystem right after with bs=16M
# and bs=256M, as a cross-check (dd's buffer is ordinary 4 KiB pages, which this disk fills at
# 1.3-1.7 GB/s). The engine reads 8 MiB requests, one at a time, into three hot staging buffers.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/target/offload-speed}"
model="${2:-opt-1.3b}"
gen_len="${3:-8}"
batch="${4:-1}"
rounds="${5:-5}"
sep_layer="${6:-true}"
mkdir -p "$dir"
cargo build --release -q -p backend-native --manifest-path "$root/Cargo.toml"
bin="$root/target/release/flexbench-native"

json="$("$bin" disk-speed --offload-dir "$dir" --model "$model" --gen-len "$gen_len" --batch "$batch" --rounds "$rounds" --sep-layer "$sep_layer")"

scratch="$dir/dd-scratch-$$.bin"
trap 'rm -f "$scratch"' EXIT
dd if=/dev/zero of="$scratch" bs=16M count=128 oflag=direct status=none
dd_rate() { # bytes / seconds of one `dd iflag=direct` read of the scratch file with block size $1
    local line
    line="$(dd if="$scratch" of=/dev/null bs="$1" iflag=direct 2>&1 | tail -1)"
    echo "$line" | sed -E 's/^([0-9]+) bytes.* copied, ([0-9.]+) s.*/\1 \2/'
}
dd16="$(dd_rate 16M)"
dd256="$(dd_rate 256M)"

python3 - "$json" $dd16 $dd256 <<'PY'
import json, sys
r = json.loads(sys.argv[1])
dd = int(sys.argv[2]) / float(sys.argv[3]) / 1e9
dd256 = int(sys.argv[4]) / float(sys.argv[5]) / 1e9
gib = lambda b: b / 2**30
print(f"model {r['model']}, batch {r['batch']}, prompt {r['prompt_len']}, gen {r['gen_len']}, sep_layer {r['sep_layer']}: "
      f"{gib(r['weight_file_bytes']):.2f} GiB of weights on disk")
for i, x in enumerate(r['rounds']):
    print(f"round {i + 1}: O_DIRECT read {x['direct_read_gb_s_before']:.3f} GB/s, decode read {gib(x['decode_read_bytes']):.2f} GiB "
          f"in {x['decode_s']:.2f} s = {x['decode_read_gb_s']:.3f} GB/s (disk thread busy {100 * x['disk_busy_fraction']:.0f}%), "
          f"O_DIRECT read {x['direct_read_gb_s_after']:.3f} GB/s: ratio {x['ratio']:.3f}")
print(f"over all rounds: io wait {r['io_wait_s']:.2f} s, compute {r['compute_s']:.2f} s, disk thread busy reading "
      f"{100 * r['disk_busy_fraction']:.0f}% of the time, copies to the compute device {100 * r['transfer_busy_fraction']:.0f}%")
print(f"medians: decode {r['decode_read_gb_s']:.3f} GB/s, sequential O_DIRECT read of the weight files (16 MiB blocks) "
      f"{r['direct_read_gb_s']:.3f} GB/s")
print(f"dd iflag=direct, 2 GiB scratch file, right after: {dd:.3f} GB/s with bs=16M, {dd256:.3f} GB/s with bs=256M "
      f"(dd's buffer is ordinary 4 KiB pages; decode / dd bs=16M: {r['decode_read_gb_s'] / dd:.2f})")
print(f"ratio decode / sequential O_DIRECT, median round: {r['ratio']:.3f} (goal >= 0.85)")
print(f"sequential O_DIRECT read beside a thread streaming memory (as decode's matrix products do): "
      f"{r['direct_read_beside_memory_load_gb_s']:.3f} GB/s; decode / that: {r['ratio_beside_memory_load']:.3f}")
peaks = ", ".join(f"{k} {gib(v):.2f} GiB" for k, v in sorted(r['peak_memory_bytes'].items()))
print(f"memory peaks: {peaks}")
print("step times of the last round (s): " + " ".join(f"{t:.3f}" for t in r['rounds'][-1]['step_times_s']))
PY
