// Layer normalisation over the last dimension, fp16 in and out, f32 statistics.
#include "common.cuh"

// One block per row. The row is read twice (mean, then variance around the mean) rather than
// with the one-pass E[x^2]-E[x]^2 formula, which cancels badly in f32 for rows with a large mean;
// the second read hits L1/L2 for OPT's row sizes (at most 12288 halves = 24 KiB).
// out and x may alias (in-place): each element is read before its own write by the same thread.
extern "C" __global__ void layernorm_f16(__half* out, const __half* x,
                                         const __half* __restrict__ weight,
                                         const __half* __restrict__ bias, int rows, int cols,
                                         float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const __half* xr = x + (size_t)r * cols;
    __half* orow = out + (size_t)r * cols;

    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += __half2float(xr[i]);
    const float mean = block_sum(s, scratch) / cols;

    float v = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float d = __half2float(xr[i]) - mean;
        v += d * d;
    }
    const float rstd = rsqrtf(block_sum(v, scratch) / cols + eps);

    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float y = (__half2float(xr[i]) - mean) * rstd;
        orow[i] = __float2half_rn(y * __half2float(weight[i]) + __half2float(bias[i]));
    }
}
