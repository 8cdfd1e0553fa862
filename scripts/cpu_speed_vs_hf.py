#!/usr/bin/env python3
"""Native engine vs HuggingFace transformers on the CPU, side by side in one run.

Run with the project's venv after `cargo build --release -p backend-native`:
  ~/.cache/flexbench/venv/bin/python scripts/cpu_speed_vs_hf.py [--reps 2] [--rounds 3] [--cases b4p128,b16p256]

For each case (opt-125m shapes, random weights, gen 32) it runs
  - transformers fp32 and bf16 the FlexLLMGen way: one `generate` per repetition after a
    one-token warm-up, per-step times from a logits processor (called once per step, right after
    that step's forward), greedy, no stop token;
  - flexbench-native run-case (f32 math, and the bf16 matmul mode) on the same shapes;
then prints prefill / decode / total throughput with FlexLLMGen's definitions, the ratios the
issue asks for, and each figure's floor for this machine: FLOPs / measured matrix-product rate +
bytes / measured memory bandwidth (rates from `flexbench-native floor` and torch matmuls).
Each figure is the median over repetitions. Other processes on the machine make these noisy:
the script prints the machine's load average at start and end, and with --rounds R it measures
both sides R times in alternation (transformers, native, transformers, native, ...) and gives
each goal's ratio per round and the median round, so a slow minute hits one round, not one side.

transformers runs in child processes, once per OpenMP wait policy (ACTIVE, PASSIVE) and dtype,
and each of its figures is the better of the two: with other processes on the cores, libgomp's
default spin-waiting can make a decode step ten times slower (measured here: 1.44 s ACTIVE vs
0.16 s PASSIVE per opt-125m step at batch 4 under load), and on a quiet machine ACTIVE wins.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, OPTConfig, OPTForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BIN = os.path.join(ROOT, "target", "release", "flexbench-native")
GEN = 32
H, L, V, FFN = 768, 12, 50272, 3072  # opt-125m
POS = 2048


class StepTimer(LogitsProcessor):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_run(dtype, batch, prompt, reps):
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=12, ffn_dim=FFN, vocab_size=V,
                    max_position_embeddings=POS, word_embed_proj_dim=H)
    model = OPTForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(3, V, (batch, prompt))
    mask = torch.ones_like(ids)
    out = []
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)  # warm-up
        for _ in range(reps):
            timer = StepTimer()
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN, min_new_tokens=GEN,
                           do_sample=False, logits_processor=LogitsProcessorList([timer]))
            stamps = [t0] + timer.times
            out.append([b - a for a, b in zip(stamps, stamps[1:])])
    del model
    return out


def hf_child(dtype_name, batch, prompt, reps, policy):
    """Runs hf_run in a child process with OMP_WAIT_POLICY set (it is read once, at start)."""
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    code = (f"import json,sys,torch; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import cpu_speed_vs_hf as m; torch.set_num_threads({torch.get_num_threads()}); "
            f"print('STEPS', json.dumps(m.hf_run(torch.{dtype_name}, {batch}, {prompt}, {reps})))")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("STEPS ")), None)
    if p.returncode != 0 or line is None:
        sys.exit(f"transformers child failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(line[6:])


def native_run(batch, prompt, reps, matmul):
    case = {"model": "opt-125m", "framework": "native", "prompt_len": prompt, "gen_len": GEN,
            "gpu_batch_size": batch, "placement": "gpu", "device": "cpu", "weights": "dummy",
            "warmup": 1, "repetitions": reps}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(case, f)
    try:
        p = subprocess.run([BIN, "run-case", "--case", f.name, "--matmul", matmul], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        sys.exit(f"flexbench-native failed ({p.returncode}): {p.stderr}")
    line = next(l for l in p.stdout.splitlines() if l.startswith("FLEXBENCH_RESULT "))
    r = json.loads(line.split(" ", 1)[1])
    return r["step_times_s"], r["peak_memory_bytes"].get("host_rss", 0)


def metrics(steps, batch, prompt):
    """FlexLLMGen's definitions; median over repetitions."""
    def med(v):
        v = sorted(v)
        return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
    pre = med([s[0] for s in steps])
    dec = med([sum(s[1:]) for s in steps])
    tot = med([sum(s) for s in steps])
    return {"prefill": batch * prompt / pre, "decode": batch * (GEN - 1) / dec, "total": batch * GEN / tot,
            "prefill_s": pre, "decode_s": dec, "total_s": tot}


def floors(batch, prompt, gflops, gbs, weight_bytes_per_param, kv_bytes):
    """Lower bounds on prefill / decode / total seconds: FLOPs / rate + bytes / bandwidth."""
    params = L * 12 * H * H  # matrices of the layers
    head = V * H
    # prefill: every prompt token through the layers, causal attention, lm_head for the last one
    pf = 2 * batch * prompt * params + 2 * L * batch * prompt * prompt * H + 2 * batch * head
    pb = weight_bytes_per_param * (params + head) + 2 * L * batch * prompt * H * kv_bytes
    pre = pf / (gflops * 1e9) + pb / (gbs * 1e9)
    dec = 0.0
    for t in range(prompt + 1, prompt + GEN):
        f = 2 * batch * (params + head) + 4 * L * batch * t * H
        b = weight_bytes_per_param * (params + head) + 2 * L * batch * t * H * kv_bytes
        dec += f / (gflops * 1e9) + b / (gbs * 1e9)
    return {"prefill_s": pre, "decode_s": dec, "total_s": pre + dec}


def torch_gflops(dtype, n=2048):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(3))
    return 2 * n ** 3 / best / 1e9


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure both sides this many times in alternation; goals use the median round")
    ap.add_argument("--cases", default="b4p128,b16p256")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--omp-policies", default="ACTIVE,PASSIVE",
                    help="OpenMP wait policies to run transformers under; each figure takes the best")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: run `cargo build --release -p backend-native` first")
    print(f"load average at start: {os.getloadavg()}; torch {torch.__version__}, {args.threads} threads")
    fl = json.loads(subprocess.run([BIN, "floor"], capture_output=True, text=True, check=True).stdout)
    rates = {"native f32": fl["gemm_f32_gflops"], "native bf16": fl.get("gemm_bf16_gflops") or fl["gemm_f32_gflops"],
             "hf fp32": torch_gflops(torch.float32), "hf bf16": torch_gflops(torch.bfloat16)}
    bw = fl["mem_read_gbs"]
    print(f"machine: memory read {bw:.1f} GB/s; 2048^3 matrix product GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    # bytes per weight and per KV value each engine moves
    widths = {"native f32": (2, 2), "native bf16": (2, 2), "hf fp32": (4, 4), "hf bf16": (2, 2)}
    def measure(c):
        batch, prompt = (int(x) for x in c[1:].split("p"))
        res = {}
        for name, dtype in [("hf fp32", "float32"), ("hf bf16", "bfloat16")]:
            runs = {pol: metrics(hf_child(dtype, batch, prompt, args.reps, pol), batch, prompt)
                    for pol in args.omp_policies.split(",")}
            for pol, m in runs.items():
                print(f"  {name} b{batch}p{prompt} OMP_WAIT_POLICY={pol}: prefill {m['prefill']:.1f} "
                      f"decode {m['decode']:.1f} total {m['total']:.1f} token/s", flush=True)
            # each figure the better of the policies
            best = {k: max(m[k] for m in runs.values()) for k in ("prefill", "decode", "total")}
            res[name] = (best, None)
        for name, mm in [("native f32", "f32"), ("native bf16", "bf16")]:
            steps, rss = native_run(batch, prompt, args.reps, mm)
            res[name] = (metrics(steps, batch, prompt), rss)
        print(f"\n== opt-125m shapes, batch {batch}, prompt {prompt}, gen {GEN} (token/s; floor = best possible here)")
        print(f"{'':12} {'prefill':>9} {'floor':>9} {'decode':>9} {'floor':>9} {'total':>9} {'floor':>9}  peak RSS")
        for name, (m, rss) in res.items():
            w, kv = widths[name]
            f = floors(batch, prompt, rates[name], bw, w, kv)
            fpre, fdec, ftot = batch * prompt / f["prefill_s"], batch * (GEN - 1) / f["decode_s"], batch * GEN / f["total_s"]
            rss_s = f"{rss / 2**20:.0f} MiB" if rss else ""
            print(f"{name:12} {m['prefill']:9.1f} {fpre:9.1f} {m['decode']:9.1f} {fdec:9.1f} {m['total']:9.1f} {ftot:9.1f}  {rss_s}")
        return res

    rounds = []
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"\n######## round {r + 1} of {args.rounds}", flush=True)
        summary = {c: measure(c) for c in args.cases.split(",")}
        print("\n== ratios (native / transformers)")
        for c, res in summary.items():
            for nat in ["native f32", "native bf16"]:
                n = res[nat][0]
                for hf in ["hf fp32", "hf bf16"]:
                    h = res[hf][0]
                    print(f"{c:8} {nat:11} vs {hf:7}: prefill {n['prefill'] / h['prefill']:.2f}x  "
                          f"decode {n['decode'] / h['decode']:.2f}x  total {n['total'] / h['total']:.2f}x")
        rounds.append(summary)

    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])

    print(f"\n== goals (issue 3 item 6){'; median of the rounds, each round in brackets' if len(rounds) > 1 else ''}")
    def goal(label, c, nat, hf, key, target):
        if c not in rounds[0]:
            return
        rs = []
        for summary in rounds:
            n = nat or max(("native f32", "native bf16"), key=lambda k: summary[c][k][0]["total"])
            rs.append(summary[c][n][0][key] / summary[c][hf][0][key])
        r = median(rs)
        each = f" [{', '.join(f'{x:.2f}' for x in rs)}]" if len(rs) > 1 else ""
        print(f"{label:58} {r:5.2f}x  (goal {target}x) {'met' if r >= target else 'NOT met'}{each}")
    goal("b4p128 total, native f32 vs transformers fp32", "b4p128", "native f32", "hf fp32", "total", 2.5)
    goal("b4p128 decode, best native vs transformers bf16", "b4p128", None, "hf bf16", "decode", 2.0)
    goal("b4p128 total, best native vs transformers bf16", "b4p128", None, "hf bf16", "total", 1.3)
    goal("b16p256 total, best native vs transformers bf16", "b16p256", None, "hf bf16", "total", 1.0)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
