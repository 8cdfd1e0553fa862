"""flexbench runner for DeepSpeed ZeRO-Inference, started by the `deepspeed` launcher (one process
per rank), following FlexLLMGen's baseline (benchmark/hf_ds/hf_opt.py):

  ZeRO stage 3, stage3_prefetch_bucket_size = hidden^2, stage3_param_persistence_threshold = 0;
  placement cpu : offload_param to cpu (pinned on CUDA)
  placement disk: offload_param to nvme (buffer_count 5, buffer_size 2 Gi elements, aio block 1 MiB,
                  queue depth 8) in the case's work directory
  placement gpu : no parameter offload

Each rank generates its share of the batch (batch / world size), as the original. Rank 0 prints the
result line. On CUDA the weights are fp16 with the NCCL backend (the original); on CPU DeepSpeed's
CPU accelerator (gloo) refuses fp16, so fp32 (FLEXBENCH_CPU_DTYPE=bf16 for bf16).

The shared protocol code is flexbench_runner.py in bench-core's python/ directory, found through
PYTHONPATH (set by the Rust backend; the launcher passes the environment to every rank).
"""

import os
import sys

try:
    import flexbench_runner as fr
except ImportError:
    sys.exit("flexbench_runner is not importable: PYTHONPATH must name crates/bench-core/python")

GIB = 1 << 30


def unlink_shm_buffer(dist, rank):
    """DeepSpeed's CPU all-reduce maps one POSIX shared-memory file per rank,
    /dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank} (69 MB), and never
    removes it: with a fresh port per case every run would leave one behind in RAM. Once every rank
    has mapped every buffer (the barrier: DeepSpeed maps them all while initializing) the names can
    go; the mappings live on until the ranks exit, even when a timeout kills them."""
    path = "/dev/shm/deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def check_swap_space(config, dtype, offload):
    """NVMe offload swaps every parameter to files in `offload`: refuse up front, saying how
    much it needs and how much is free, instead of failing part way with a full disk."""
    import shutil
    h, f, v, L = config.hidden_size, config.ffn_dim, config.vocab_size, config.num_hidden_layers
    e = getattr(config, "word_embed_proj_dim", h) or h
    params = L * (4 * h * h + 2 * h * f + 9 * h + f) + v * e + (config.max_position_embeddings + 2) * h
    need = params * dtype.itemsize
    free = shutil.disk_usage(offload).free
    if need > free:
        raise fr.Unavailable(
            f"NVMe offload needs {need / 1e9:.1f} GB of swap files in {offload} "
            f"({params} parameters x {dtype.itemsize} bytes), which has {free / 1e9:.1f} GB free")


def ds_config(placement, dtype_name, hidden, batch, offload_dir, on_cuda, largest_param):
    zero = {
        "stage": 3,
        "stage3_prefetch_bucket_size": hidden * hidden,
        "stage3_param_persistence_threshold": 0,
    }
    notes = []
    config = {
        "fp16": {"enabled": dtype_name == "float16"},
        "bf16": {"enabled": dtype_name == "bfloat16"},
        "zero_optimization": zero,
        "steps_per_print": 2000,
        "train_batch_size": batch,
        "wall_clock_breakdown": False,
    }
    if placement == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    elif placement == "disk":
        buffer_size = 2 * GIB
        if not on_cuda:
            # 5 buffers of 2 Gi elements would take 20+ GiB of host memory; on a CPU-only machine
            # keep FlexLLMGen's count but size them to the largest parameter (DeepSpeed's minimum).
            buffer_size = max(largest_param, 1 << 20)
            notes.append(f"nvme buffer_size {buffer_size} elements (FlexLLMGen: 2 Gi) to fit host memory")
        zero["offload_param"] = {
            "device": "nvme",
            "pin_memory": True,
            "nvme_path": offload_dir,
            "buffer_count": 5,
            "buffer_size": buffer_size,
        }
        config["aio"] = {
            "block_size": 1 << 20,
            "queue_depth": 8,
            "thread_count": 1,
            "single_submit": False,
            "overlap_events": True,
        }
    elif placement != "gpu":
        raise fr.Unavailable(f"deepspeed takes placement gpu, cpu or disk, not {placement!r}")
    return config, notes


def run():
    args = fr.parse_args("flexbench DeepSpeed ZeRO-Inference runner")
    case = fr.load_json(args.case, "case file")
    prompts = fr.load_json(args.prompts, "prompts file")
    torch = fr.import_torch()
    try:
        import deepspeed
        import torch.distributed as dist
    except ImportError as e:
        raise fr.Unavailable(f"missing Python package ({e}): run cargo xtask python-env")
    try:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig  # transformers >= 5
    except ImportError:
        from transformers.deepspeed import HfDeepSpeedConfig  # transformers 4
    from transformers import AutoConfig, OPTForCausalLM

    device = case.get("device", "cuda")
    placement = case["placement"] if isinstance(case["placement"], str) else "policy"
    on_cuda = device == "cuda"
    if on_cuda:
        if not torch.cuda.is_available():
            raise fr.Unavailable("device cuda, but torch sees no CUDA GPU here")
        dtype = torch.float16
        torch.cuda.set_device(args.local_rank)
    else:
        dtype = fr.cpu_dtype(torch)
    dtype_name = str(dtype).replace("torch.", "")

    deepspeed.init_distributed("nccl" if on_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    unlink_shm_buffer(dist, rank)
    batch = len(prompts)
    if batch % world:
        raise fr.Unavailable(f"batch {batch} does not split over {world} ranks")
    per_rank = batch // world
    mine = prompts[rank * per_rank:(rank + 1) * per_rank]

    config = AutoConfig.from_pretrained(args.checkpoint)
    largest = max(config.vocab_size * config.word_embed_proj_dim, config.ffn_dim * config.hidden_size)
    offload = os.path.join(args.offload_dir, "ds_offload")
    os.makedirs(offload, exist_ok=True)
    if placement == "disk":
        check_swap_space(config, dtype, offload)
    ds_cfg, notes = ds_config(placement, dtype_name, config.hidden_size, batch, offload, on_cuda, largest)
    notes.insert(0, f"dtype {dtype_name}, ZeRO-3 offload_param "
                    f"{ds_cfg['zero_optimization'].get('offload_param', {}).get('device', 'none')}, "
                    f"{world} rank(s), {'nccl' if on_cuda else 'gloo'}")

    notes.append(f"torch threads {torch.get_num_threads()}")

    # Must exist before from_pretrained: it makes transformers build the model under zero.Init, so
    # parameters are partitioned (and offloaded) as they load instead of materializing whole.
    dschf = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 - kept alive on purpose
    fr.log(f"rank {rank}/{world}: loading {args.checkpoint} ({placement}, {device}, {dtype_name})")
    model = OPTForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
    model = model.eval()
    engine = deepspeed.initialize(model=model, config_params=ds_cfg)[0]
    engine.module.eval()
    model = engine.module

    input_device = f"cuda:{args.local_rank}" if on_cuda else "cpu"
    input_ids = torch.tensor(mine, dtype=torch.long, device=input_device)
    steps, tokens, moved = fr.generate_measured(model, input_ids, case, on_cuda, rank=rank)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, tokens)
        tokens = [row for part in gathered for row in part]
    if rank == 0:
        fr.emit(
            {
                "step_times_s": steps,
                "generated_tokens": len(tokens) * len(tokens[0]),
                "tokens": tokens,
                "peak_memory_bytes": fr.peak_memory(torch, on_cuda, offload),
                "bytes_moved": moved,
                "versions": fr.versions(("deepspeed",)),
                "notes": notes,
            }
        )
    dist.barrier()


if __name__ == "__main__":
    fr.main_guard(run)
