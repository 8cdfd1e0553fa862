// Residual connections: out = x + residual, optionally with the preceding linear layer's bias
// fused in (OPT's out_proj and fc2 are followed directly by the residual add, so fusing saves one
// full read and write of the activation).
#include "common.cuh"

// out[i] = x[i] + residual[i]. out may alias x or residual (each element is read before it is
// written, by the same thread).
extern "C" __global__ void residual_add_f16(__half* out, const __half* x, const __half* residual,
                                            long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = __float2half_rn(__half2float(x[i]) + __half2float(residual[i]));
    }
}

// out[r, c] = (x[r, c] + bias[c]) + residual[r, c]. The bias is added to x first and rounded to
// fp16, exactly as an unfused "linear then residual" does, so results match the CPU reference
// (and transformers) bit for bit in the common case rather than only within rounding.
extern "C" __global__ void bias_residual_add_f16(__half* out, const __half* x,
                                                 const __half* __restrict__ bias,
                                                 const __half* residual, long long rows,
                                                 int cols) {
    const long long n = rows * (long long)cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const __half y = __float2half_rn(__half2float(x[i]) + __half2float(bias[i % cols]));
        out[i] = __float2half_rn(__half2float(y) + __half2float(residual[i]));
    }
}
