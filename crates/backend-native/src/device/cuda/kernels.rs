//! The CUDA C++ sources of `kernels/`, embedded in the binary so that a carried executable needs
//! no source tree, and the compile options shared by the runtime and `cargo xtask check-kernels`.

/// Shared helpers, offered to NVRTC as the header `common.cuh`.
pub const COMMON_HEADER: (&str, &str) = (
    "common.cuh",
    include_str!("../../../../../kernels/common.cuh"),
);

/// Every kernel file: (file name, source).
pub const SOURCES: &[(&str, &str)] = &[
    (
        "attention_decode.cu",
        include_str!("../../../../../kernels/attention_decode.cu"),
    ),
    (
        "attention_q4.cu",
        include_str!("../../../../../kernels/attention_q4.cu"),
    ),
    (
        "attention_prefill.cu",
        include_str!("../../../../../kernels/attention_prefill.cu"),
    ),
    (
        "bias_relu.cu",
        include_str!("../../../../../kernels/bias_relu.cu"),
    ),
    (
        "compress.cu",
        include_str!("../../../../../kernels/compress.cu"),
    ),
    (
        "convert.cu",
        include_str!("../../../../../kernels/convert.cu"),
    ),
    (
        "embedding.cu",
        include_str!("../../../../../kernels/embedding.cu"),
    ),
    (
        "kv_cache.cu",
        include_str!("../../../../../kernels/kv_cache.cu"),
    ),
    (
        "layernorm.cu",
        include_str!("../../../../../kernels/layernorm.cu"),
    ),
    (
        "residual.cu",
        include_str!("../../../../../kernels/residual.cu"),
    ),
    (
        "sampling.cu",
        include_str!("../../../../../kernels/sampling.cu"),
    ),
    (
        "softmax.cu",
        include_str!("../../../../../kernels/softmax.cu"),
    ),
];

/// NVRTC options for `arch` (e.g. `sm_90`). `include` is a directory holding `cuda_fp16.h` when
/// NVRTC's bundled headers are not to be relied on.
pub fn compile_options(arch: &str, include: Option<&std::path::Path>) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // Kernels are written for f32 accumulation with fused multiply-adds; fast-math style
        // flushing would make the CPU comparison noisier without a measurable gain.
        "--fmad=true".to_string(),
    ];
    if let Some(dir) = include {
        o.push(format!("--include-path={}", dir.display()));
    }
    o
}
