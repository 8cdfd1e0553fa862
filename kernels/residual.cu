// Residual connections: out = x + residual. (The preceding linear layer's bias is already added
// by the GEMM's epilogue or by bias_act_f16, so no fused bias variant is needed.)
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
