#!/usr/bin/env python3
"""Golden fixtures for the native engine: small random OPT checkpoints, made and run by transformers.

Run with the project's venv: ~/.cache/flexbench/venv/bin/python scripts/make_golden.py

For each fixture it builds a random OPTForCausalLM, rounds its weights to the storage dtype
(so that the engine, which stores fp16, holds exactly the values transformers computes with),
saves config.json + safetensors, runs transformers' greedy generate in float32 on a left-padded
batch of prompts of different lengths, and writes expected.json (prompts, new tokens, the raw
logits of every step) under crates/backend-native/tests/fixtures/<name>/.

Fixtures:
  prenorm_f32   pre-LN, float32 tensors (values fp16-representable), sharded with an index
  odd_f16       float16 tensors, 5 heads (odd), names without the `model.` prefix
  postln_bf16   opt-350m style: post-LN, project_in/project_out, bfloat16 tensors

Seeds are searched until the top-1/top-2 logit margin of every step and sequence is at least
MIN_MARGIN (relative to the logit range), so the exact-token tests cannot flake; the minimum
margin found is printed.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import OPTConfig, OPTForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "backend-native", "tests", "fixtures")
MIN_MARGIN = 0.02  # of max|logit|
MAX_NEW = 8
PAD, EOS = 1, 2

FIXTURES = {
    "prenorm_f32": dict(
        config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                    max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True),
        dtype="float32", shard=True, strip_prefix=False, prompt_lens=[7, 3, 5]),
    "odd_f16": dict(
        config=dict(vocab_size=120, hidden_size=40, num_hidden_layers=3, num_attention_heads=5, ffn_dim=72,
                    max_position_embeddings=48, word_embed_proj_dim=40, do_layer_norm_before=True),
        dtype="float16", shard=False, strip_prefix=True, prompt_lens=[4, 9, 1, 6]),
    "postln_bf16": dict(
        config=dict(vocab_size=112, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                    max_position_embeddings=64, word_embed_proj_dim=24, do_layer_norm_before=False),
        dtype="bfloat16", shard=False, strip_prefix=False, prompt_lens=[6, 2, 8]),
}


def round_params(model, dtype):
    """Rounds every parameter to values the engine's fp16 storage holds exactly."""
    with torch.no_grad():
        for p in model.parameters():
            v = p.data
            if dtype == "bfloat16":
                v = v.to(torch.bfloat16).to(torch.float32)
                # bf16 values below fp16's normal range would lose bits in fp16: drop them
                v[v.abs() < 6.2e-5] = 0.0
            v = v.to(torch.float16).to(torch.float32)
            p.data.copy_(v)


def build(name, spec, seed):
    torch.manual_seed(seed)
    cfg = OPTConfig(pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, init_std=0.25,
                    dropout=0.0, attention_dropout=0.0, **spec["config"])
    model = OPTForCausalLM(cfg).eval()
    # random layer-norm affines and biases too (the default init leaves them at 1 and 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n and n.endswith("weight"):
                p.data = 1.0 + 0.2 * torch.randn_like(p)
            elif n.endswith("bias"):
                p.data = 0.1 * torch.randn_like(p)
    round_params(model, spec["dtype"])
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in spec["prompt_lens"]]
    seq = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (seq - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (seq - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=PAD,
                             eos_token_id=EOS)
    new = out.sequences[:, seq:].tolist()
    logits = [l.float() for l in out.logits]
    # margin between the best and second-best logit of every sequence still running at each step
    margin = float("inf")
    for step, l in enumerate(logits):
        top = torch.topk(l, 2, dim=-1).values
        rel = (top[:, 0] - top[:, 1]) / l.abs().max()
        for b in range(len(prompts)):
            if EOS not in new[b][:step]:
                margin = min(margin, float(rel[b]))
    return model, cfg, prompts, new, logits, margin


def save(name, spec, model, prompts, new, logits, seed, margin):
    d = os.path.join(ROOT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec["dtype"]]
    model.to(torch_dtype).save_pretrained(d, safe_serialization=True,
                                          max_shard_size="40KB" if spec["shard"] else "100MB")
    if spec["strip_prefix"]:
        # the original facebook checkpoints name tensors `decoder.*`; and drop the tied lm_head
        path = os.path.join(d, "model.safetensors")
        t = load_file(path)
        t = {k.removeprefix("model."): v for k, v in t.items() if k != "lm_head.weight"}
        save_file(t, path, metadata={"format": "pt"})
    for f in os.listdir(d):
        if f not in ("config.json",) and not f.endswith(".safetensors") and not f.endswith(".index.json"):
            os.remove(os.path.join(d, f))  # generation_config.json: not needed
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump({
            "generator": "scripts/make_golden.py",
            "seed": seed,
            "storage_dtype": spec["dtype"],
            "min_top2_margin": margin,
            "max_new_tokens": MAX_NEW,
            "eos_token_id": EOS,
            "prompts": prompts,
            "new_tokens": new,
            "logits": [l.flatten().tolist() for l in logits],
        }, f)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    return d, size


def main():
    names = sys.argv[1:] or list(FIXTURES)
    for name in names:
        spec = FIXTURES[name]
        best = None
        for seed in range(100):
            model, cfg, prompts, new, logits, margin = build(name, spec, 1000 * (list(FIXTURES).index(name) + 1) + seed)
            if best is None or margin > best[-1]:
                best = (1000 * (list(FIXTURES).index(name) + 1) + seed, model, prompts, new, logits, margin)
            if margin >= MIN_MARGIN:
                break
        seed, model, prompts, new, logits, margin = best
        if margin < MIN_MARGIN:
            sys.exit(f"{name}: no seed reached a top-2 margin of {MIN_MARGIN} (best {margin:.4f})")
        d, size = save(name, spec, model, prompts, new, logits, seed, margin)
        print(f"{name}: seed {seed}, min top-1/top-2 margin {margin:.4f} of max|logit|, "
              f"{len(logits)} steps, {size} bytes in {os.path.relpath(d)}; tokens {new}")


if __name__ == "__main__":
    main()
