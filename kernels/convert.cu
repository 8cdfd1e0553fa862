// fp16 <-> f32 conversions (logits to f32 for sampling on the host, f32 test inputs to fp16).
#include "common.cuh"

extern "C" __global__ void f16_to_f32(float* __restrict__ out, const __half* __restrict__ x,
                                      long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = __half2float(x[i]);
}

// Round to nearest even, the same rounding as `half::f16::from_f32` on the CPU side.
extern "C" __global__ void f32_to_f16(__half* __restrict__ out, const float* __restrict__ x,
                                      long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(x[i]);
}
