#!/usr/bin/env python3
"""A small OPT trained on real text, for the native engine's accuracy tests of 4-bit compression.

Run by hand (not in CI), with the project's venv, for a few minutes on the CPU:
    ~/.cache/flexbench/venv/bin/python scripts/train_tiny_opt.py [--minutes 4]

Random weights say nothing about what 4 bits cost; a model that has learnt something does. This
trains an OPTForCausalLM (hidden 128, 3 layers, 2 heads of 64, ffn 512, 256 positions) on the
Python standard library's own sources as byte-level tokens (id = byte + 4; 1 = pad, 2 = bos/eos),
rounds its weights to fp16, and writes crates/backend-native/tests/fixtures/trained_stdlib/:
config.json, model.safetensors (fp16, tied head, under 2 MB) and expected.json holding

- `sequences`: held-out token sequences (files the model never saw) to score;
- `fp16`: transformers' teacher-forced negative log-likelihood (natural log, summed over every
  token i >= 1 of every sequence), token count and perplexity, in float32 over the fp16 weights;
- `q4_weights`: the same with every weight of two or more dimensions replaced by its 4-bit
  group-wise round trip (FlexLLMGen's formula, written below in torch: groups of 64 along
  dimension 0, padded with zeros, min and scale = 15 / (max - min) in f32, codes
  round(clamp((x - min) * scale, 0, 15)) ties to even, scale and min stored as fp16, decoded as
  q / scale + min), transformers computing the perplexity;
- `q4_fnv1a64`: per tensor, the FNV-1a 64 hash of its stored 4-bit bytes (packed codes, element
  2k in the high nibble, then the [scale, min] pairs as fp16, FlexLLMGen's data and scale
  tensors one after the other), so the tests can check that the engine's quantizer writes the
  very bytes this reference decoded.
"""
import argparse
import glob
import json
import math
import os
import shutil
import sysconfig
import time

import torch
from safetensors.torch import save_file
from transformers import OPTConfig, OPTForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "backend-native", "tests",
                    "fixtures", "trained_stdlib")
OFFSET = 4  # token id = byte + OFFSET; 0..3 are OPT's specials (1 pad, 2 bos/eos)
VOCAB = 256 + OFFSET
SEQ = 128
HELD_OUT = ["textwrap.py", "fractions.py", "heapq.py", "bisect.py"]
EVAL_SEQS = 4
GROUP = 64


def corpus():
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "*.py")))
    train, held = [], []
    for f in files:
        data = open(f, "rb").read()
        (held if os.path.basename(f) in HELD_OUT else train).append(data)
    return lib, b"\n".join(train), held


def ids(data):
    return torch.tensor([b + OFFSET for b in data], dtype=torch.long)


def eval_sequences(held):
    """EVAL_SEQS sequences of SEQ tokens, each from a held-out file, starting at a line."""
    out = []
    for i in range(EVAL_SEQS):
        data = held[i % len(held)]
        start = data.index(b"\n", len(data) // 3 + 977 * i) + 1
        out.append([b + OFFSET for b in data[start:start + SEQ]])
    return out


def nll(model, sequences):
    """Teacher-forced: the sum over sequences of -log p(token i | tokens 0..i-1), i >= 1."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in sequences:
            x = torch.tensor([s])
            logits = model(input_ids=x).logits.float()[0]
            lp = torch.log_softmax(logits.double(), dim=-1)
            total += float(-lp[torch.arange(len(s) - 1), x[0, 1:]].sum())
            count += len(s) - 1
    return {"nll": total, "tokens": count, "ppl": math.exp(total / count)}


def q4_roundtrip(w):
    """FlexLLMGen's 4-bit group-wise quantization along dimension 0: (decoded values, stored bytes)."""
    x = w.float()
    rows, rest = x.shape[0], x.shape[1:]
    groups = (rows + GROUP - 1) // GROUP
    pad = groups * GROUP - rows
    if pad:
        x = torch.cat([x, torch.zeros((pad,) + rest)], dim=0)
    g = x.view((groups, GROUP) + rest)
    mn = g.min(dim=1, keepdim=True).values
    mx = g.max(dim=1, keepdim=True).values
    scale = 15.0 / (mx - mn)
    q = ((g - mn) * scale).clamp(0, 15).round()
    q = torch.nan_to_num(q, nan=0.0).to(torch.uint8)
    scale16, mn16 = scale.to(torch.float16), mn.to(torch.float16)
    deq = (q.float() / scale16.float() + mn16.float()).view((groups * GROUP,) + rest)[:rows]
    packed = (q[:, 0::2] << 4) | q[:, 1::2]  # [groups, 32, rest]
    scales = torch.cat([scale16, mn16], dim=1)  # [groups, 2, rest]
    stored = packed.contiguous().numpy().tobytes() + scales.contiguous().view(torch.uint8).numpy().tobytes()
    return deq.to(w.dtype), stored


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    lib, train, held = corpus()
    data = ids(train)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3, num_attention_heads=2, ffn_dim=512,
                    max_position_embeddings=256, word_embed_proj_dim=128, do_layer_norm_before=True,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
                    tie_word_embeddings=True)
    model = OPTForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    budget = a.minutes * 60
    t0, step, batch = time.time(), 0, 32
    print(f"training on {len(data)} bytes of {lib}/*.py for {a.minutes} minutes")
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for group in opt.param_groups:  # warm-up, then cosine decay to a tenth
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = torch.randint(0, len(data) - SEQ - 1, (batch,))
        x = torch.stack([data[s:s + SEQ] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
        step += 1
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).float())
    seqs = eval_sequences(held)
    fp16 = nll(model, seqs)
    print(f"held-out, fp16 weights: ppl {fp16['ppl']:.4f} over {fp16['tokens']} tokens")
    hashes = {}
    q4 = OPTForCausalLM(cfg)
    q4.load_state_dict(model.state_dict())
    q4.eval()
    with torch.no_grad():
        for name, p in q4.named_parameters():
            if p.dim() >= 2:
                deq, stored = q4_roundtrip(p.data)
                p.copy_(deq)
                hashes["model." + name.removeprefix("model.") if not name.startswith("model.") else name] = \
                    fnv1a64(stored)
    q4w = nll(q4, seqs)
    print(f"held-out, 4-bit weights (reference): ppl {q4w['ppl']:.4f}")
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(ROOT, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(ROOT)
    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump({
            "generator": "scripts/train_tiny_opt.py",
            "corpus": f"{lib}/*.py (held out: {', '.join(HELD_OUT)}), byte + {OFFSET}",
            "train_steps": step,
            "train_minutes": a.minutes,
            "seed": a.seed,
            "sequences": seqs,
            "fp16": fp16,
            "q4_weights": q4w,
            "q4_fnv1a64": hashes,
        }, f, indent=1)
    size = sum(os.path.getsize(os.path.join(ROOT, x)) for x in os.listdir(ROOT))
    print(f"wrote {os.path.relpath(ROOT)}: {size} bytes, {step} steps")


if __name__ == "__main__":
    main()
