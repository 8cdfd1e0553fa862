//! backend-hf: runs HuggingFace Accelerate (transformers + accelerate device maps) in a Python
//! child process, `python/run_hf.py`, with FlexLLMGen's baseline placements.
//!
//! The runner imports bench-core's shared Python runner module (`flexbench_runner.py`: protocol,
//! measured generation loop, memory, exit codes) through `PYTHONPATH`; the checkpoint and prompts
//! it reads are bench-core's shared inputs.

pub mod backend;

pub use backend::HfBackend;
