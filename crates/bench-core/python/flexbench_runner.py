"""What every Python runner shares: the child protocol, the measured generation
loop, peak memory, versions and failure exit codes.

The child protocol (bench-core's protocol.rs): the case JSON file is named by FLEXBENCH_CASE; the
runner prints exactly one line `FLEXBENCH_RESULT {json}` with a RawResult on stdout; exit code 3 means
the runner ran out of memory, 4 means the case cannot run here. Everything else printed is the log.
Runners report raw measurements only; bench-core computes every metric.

Test-only fault injection: FLEXBENCH_TEST_FAULT=oom|hang|exit:<code>[@rank] makes the first
measured step raise a PyTorch out-of-memory error, sleep forever, or exit with the code (on every rank,
or only on the given one), so the failure paths can be tested with real processes.
"""

import argparse
import json
import os
import resource
import sys
import time
import traceback

EXIT_OOM = 3
EXIT_UNAVAILABLE = 4
RESULT_PREFIX = "FLEXBENCH_RESULT "


class Unavailable(Exception):
    """The case cannot run on this machine (missing device, package or feature)."""


def log(msg):
    print(f"[flexbench] {msg}", file=sys.stderr, flush=True)


def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--case", default=os.environ.get("FLEXBENCH_CASE"), help="case JSON file")
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--prompts", required=True, help="prompts.json: one list of token ids per sequence")
    p.add_argument("--offload-dir", required=True, help="scratch directory for offloaded weights")
    # the deepspeed launcher appends --local_rank to the script's arguments
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")))
    args = p.parse_args()
    if not args.case:
        raise SystemExit("no case: pass --case FILE or set FLEXBENCH_CASE (runners are started by cargo xtask bench)")
    return args


def load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read {what} {path}: {e}")


def measured_gen_len(case):
    cut = case.get("cut_gen_len")
    return min(cut if cut else case["gen_len"], case["gen_len"])


def import_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"missing Python package ({e}): run cargo xtask python-env")
    return sys.modules["torch"]


def cpu_dtype(torch):
    """dtype for CPU cases: fp32 unless FLEXBENCH_CPU_DTYPE says bf16 (CPU kernels for fp16 are
    slow or missing: DeepSpeed's CPU accelerator refuses it outright)."""
    name = os.environ.get("FLEXBENCH_CPU_DTYPE", "fp32")
    table = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in table:
        raise SystemExit(f"FLEXBENCH_CPU_DTYPE={name}: expected fp32 or bf16")
    return table[name]


def versions(extra=()):
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "safetensors", "numpy") + tuple(extra):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except ImportError:
                continue
        out[name] = getattr(mod, "__version__", "unknown")
    return out


def _io_counters():
    """Bytes this process read from / wrote to storage (page-cache hits are not counted)."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields["read_bytes"]), int(fields["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def _dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class _Fault:
    def __init__(self, rank):
        spec = os.environ.get("FLEXBENCH_TEST_FAULT", "")
        kind, _, only_rank = spec.partition("@")
        self.kind = kind if (not only_rank or int(only_rank) == rank) else ""

    def fire(self, torch):
        if not self.kind:
            return
        log(f"test fault injected: {self.kind}")
        if self.kind == "oom":
            raise torch.OutOfMemoryError("test fault: CUDA out of memory. Tried to allocate 1.00 GiB")
        if self.kind == "hang":
            while True:
                time.sleep(3600)
        if self.kind.startswith("exit:"):
            os._exit(int(self.kind[5:]))
        raise SystemExit(f"FLEXBENCH_TEST_FAULT={self.kind}: unknown fault")


def make_step_timer(torch, on_cuda, fault):
    """A LogitsProcessor that timestamps the end of every generation step (it runs right after the
    step's forward pass), so step i's time is the interval since step i-1 (step 0 since the start
    of generate: the prefill). The interval covers everything generate does for the token, as
    FlexLLMGen's own engine times it; on CUDA it synchronizes first so the GPU work is counted."""
    from transformers import LogitsProcessor

    class StepTimer(LogitsProcessor):
        def __init__(self):
            self.stamps = []
            self.armed = False

        def start(self):
            if on_cuda:
                torch.cuda.synchronize()
            self.stamps = [time.perf_counter()]

        def __call__(self, input_ids, scores):
            if on_cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            if self.armed:
                self.armed = False
                fault.fire(torch)
            return scores

        def step_times(self):
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    return StepTimer()


def generate_measured(model, input_ids, case, on_cuda, rank=0):
    """Warm-up generations of one token, then `repetitions` measured generations of every
    measured step (min_new_tokens = max_new_tokens, so no sequence stops early and every step
    runs). Returns (step_times per repetition, last repetition's generated ids, bytes moved)."""
    import torch
    from transformers import LogitsProcessorList

    fault = _Fault(rank)
    timer = make_step_timer(torch, on_cuda, fault)
    attention_mask = torch.ones_like(input_ids)
    common = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        num_beams=1,
        pad_token_id=1,
        use_cache=True,
        logits_processor=LogitsProcessorList([timer]),
    )
    n = measured_gen_len(case)
    with torch.no_grad():
        for i in range(case.get("warmup", 1)):
            log(f"warm-up {i + 1}/{case.get('warmup', 1)}")
            timer.start()
            model.generate(max_new_tokens=1, min_new_tokens=1, **common)
        steps, out = [], None
        io0 = _io_counters()
        for i in range(case.get("repetitions", 1)):
            log(f"measured generation {i + 1}/{case.get('repetitions', 1)}: {n} tokens")
            timer.armed = i == 0
            timer.start()
            out = model.generate(max_new_tokens=n, min_new_tokens=n, **common)
            times = timer.step_times()
            if len(times) != n:
                raise RuntimeError(f"generation hook saw {len(times)} steps, expected {n}")
            steps.append(times)
        io1 = _io_counters()
    moved = {}
    if io0 and io1:
        reps = max(1, case.get("repetitions", 1))
        moved = {"disk_read": (io1[0] - io0[0]) // reps, "disk_write": (io1[1] - io0[1]) // reps}
    tokens = out[:, input_ids.shape[1]:].tolist()
    return steps, tokens, moved


def peak_memory(torch, on_cuda, offload_dir=None):
    # ru_maxrss is in KiB on Linux: the process's peak resident set, loading included.
    peak = {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if on_cuda and torch.cuda.is_available():
        peak["gpu"] = int(torch.cuda.max_memory_allocated())
    if offload_dir:
        on_disk = _dir_bytes(offload_dir)
        if on_disk:
            peak["disk"] = on_disk
    return peak


def emit(result):
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _is_oom(e):
    import sys as _s

    torch = _s.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    # CPU allocations refused by the OS surface as RuntimeError from PyTorch's allocator.
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def main_guard(body):
    """Runs the runner body, mapping failures to the protocol's exit codes."""
    try:
        body()
    except Unavailable as e:
        log(f"unavailable: {e}")
        print(f"unavailable: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_UNAVAILABLE)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: B902 - every failure needs a classified exit
        if _is_oom(e):
            print(f"out of memory: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            sys.stderr.flush()
            os._exit(EXIT_OOM)
        traceback.print_exc()
        sys.stderr.flush()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Often this rank only saw a peer die (connection reset in a collective). The deepspeed
            # launcher reports the first failed rank it polls (once a second) and kills the rest, so
            # linger: the rank that failed first, with the telling exit code, gets reported.
            time.sleep(3)
        os._exit(1)
