"""flexbench runner for HuggingFace Accelerate (transformers + accelerate device maps), following
FlexLLMGen's baseline (benchmark/hf_ds/hf_opt.py):

  placement gpu : the whole model on the GPU
  placement cpu : embeddings and lm_head on the GPU, decoder layers and final layer norm on the CPU
  placement disk: the same with the layers on disk (accelerate's offload_folder)

On a case with device cpu the GPU's part goes to the CPU instead: then `cpu` offloads nothing (the
whole model is simply in host memory) and `disk` keeps the layers in accelerate's disk offload.
Weights are fp16 on CUDA (as the original) and fp32 on CPU (FLEXBENCH_CPU_DTYPE=bf16 changes that).
"""

import os
import sys

# The shared runner module is bench-core's (crates/bench-core/python), beside this crate.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench-core", "python"))
import flexbench_runner as fr  # noqa: E402


def device_map(placement, device, num_gpus):
    near = 0 if device == "cuda" else "cpu"
    if placement == "gpu":
        if device == "cpu":
            return None
        return {"": 0} if num_gpus == 1 else "balanced"
    far = {"cpu": "cpu", "disk": "disk"}.get(placement)
    if far is None:
        raise fr.Unavailable(f"hf takes placement gpu, cpu or disk, not {placement!r}")
    return {
        "model.decoder.embed_tokens": near,
        "model.decoder.embed_positions": near,
        "model.decoder.final_layer_norm": far,
        "model.decoder.layers": far,
        "lm_head": near,
    }


def _offloaded_bytes(model, checkpoint):
    """Bytes (in the checkpoint's dtype) of the parameters accelerate keeps off the compute device:
    they sit on the meta device and its hooks load them for every forward."""
    meta = sum(p.numel() for p in model.parameters() if p.device.type == "meta")
    config = fr.load_json(os.path.join(checkpoint, "config.json"), "checkpoint config")
    stored = config.get("dtype") or config.get("torch_dtype") or "float16"
    return meta * (4 if stored == "float32" else 2)


def _with_disk(peak, placement, offloaded):
    if placement == "disk" and offloaded:
        peak["disk"] = peak.get("disk", 0) + offloaded
    return peak


def run():
    args = fr.parse_args("flexbench HF Accelerate runner")
    case = fr.load_json(args.case, "case file")
    prompts = fr.load_json(args.prompts, "prompts file")
    torch = fr.import_torch()
    from transformers import OPTForCausalLM

    device = case.get("device", "cuda")
    placement = case["placement"] if isinstance(case["placement"], str) else "policy"
    on_cuda = device == "cuda"
    notes = []
    if on_cuda:
        if not torch.cuda.is_available():
            raise fr.Unavailable("device cuda, but torch sees no CUDA GPU here")
        dtype = torch.float16
    else:
        dtype = fr.cpu_dtype(torch)
        if placement == "cpu":
            notes.append(
                "device cpu: accelerate's cpu device map offloads nothing without a GPU "
                "(the whole model is in host memory, as placement gpu)"
            )
    num_gpus = case.get("num_gpus_per_node", 1) * case.get("num_nodes", 1)
    if on_cuda and num_gpus > torch.cuda.device_count():
        raise fr.Unavailable(f"case wants {num_gpus} GPUs, torch sees {torch.cuda.device_count()}")
    dmap = device_map(placement, device, num_gpus)
    notes.append(f"dtype {str(dtype).replace('torch.', '')}")
    notes.append(f"torch threads {torch.get_num_threads()}")
    notes.append(f"device_map {dmap if dmap is not None else 'none (plain ' + device + ')'}")

    offload = os.path.join(args.offload_dir, "hf_offload")
    os.makedirs(offload, exist_ok=True)
    fr.log(f"loading {args.checkpoint} ({placement}, {device}, {dtype})")
    kwargs = dict(dtype=dtype)
    if dmap is not None:
        kwargs.update(device_map=dmap, offload_folder=offload)
    model = OPTForCausalLM.from_pretrained(args.checkpoint, **kwargs)
    model.eval()

    offloaded = _offloaded_bytes(model, args.checkpoint)
    if placement == "disk":
        notes.append(
            "disk offload: transformers 5 reads disk-offloaded weights straight from the checkpoint's "
            f"safetensors ({offloaded / 2**20:.1f} MiB there), not from a copy in offload_folder"
            if offloaded
            else "disk offload requested but no parameter was offloaded"
        )

    input_device = "cuda:0" if on_cuda else "cpu"
    input_ids = torch.tensor(prompts, dtype=torch.long, device=input_device)
    steps, tokens, moved = fr.generate_measured(model, input_ids, case, on_cuda)
    fr.emit(
        {
            "step_times_s": steps,
            "generated_tokens": len(tokens) * len(tokens[0]),
            "tokens": tokens,
            "peak_memory_bytes": _with_disk(fr.peak_memory(torch, on_cuda, offload), placement, offloaded),
            "bytes_moved": moved,
            "versions": fr.versions(),
            "notes": notes,
        }
    )


if __name__ == "__main__":
    fr.main_guard(run)
