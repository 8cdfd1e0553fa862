// Helpers shared by every kernel file. NVRTC gets this file as a named header (the runtime embeds it
// next to each .cu source), so kernels need no include path of their own beyond cuda_fp16.h.
#pragma once
#include <cuda_fp16.h>

// NVRTC has no math.h, hence no INFINITY macro.
#define NEG_INF __int_as_float(0xff800000)
#define INFINITY_F __int_as_float(0x7f800000)

// Reductions are done in f32 whatever the storage type: fp16 sums over thousands of elements lose
// too many bits (the CPU reference accumulates in f32 too).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reductions for blocks of at most 1024 threads (32 warps). `scratch` holds 32 floats;
// the trailing barrier lets the caller reuse `scratch` right away.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : NEG_INF;
    v = warp_max(v);
    __syncthreads();
    return v;
}

// ---- 4-bit group-wise compression (crates/backend-native/src/compress, FlexLLMGen's format) ----
// Groups of 64 values along one dimension, the last padded with zeros; per group min and
// scale = 15 / (max - min) stored as fp16; codes q = round(clamp((x - min) * scale, 0, 15)), two per
// byte, element 2k of a group in the high nibble of byte k; decoded as q / scale + min, computed as
// q * (1 / scale) + min. The formula and its f32 operation order are the CPU quantizer's (whose
// output check-kernels --emulate compares byte for byte).
#define Q4_GROUP 64
#define Q4_GROUP_BYTES 32

__device__ __forceinline__ unsigned q4_code(float x, float lo, float s) {
    // a constant group has s = inf and (x - lo) * s = NaN: fmaxf returns 0 for it, as the CPU's
    // saturating cast does
    const float v = fminf(fmaxf((x - lo) * s, 0.0f), 15.0f);
    return (unsigned)rintf(v);
}

// Quantizes one group: n (<= 64) values x[i * stride], the rest of the 64 the zero padding, into
// 32 code bytes data[k * dstride] and its scale and min.
__device__ __forceinline__ void q4_quantize(const __half* x, long long stride, int n,
                                            unsigned char* data, long long dstride,
                                            __half* scale, __half* min_out) {
    float lo = INFINITY_F, hi = NEG_INF;
    for (int i = 0; i < n; ++i) {
        const float v = __half2float(x[i * stride]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    if (n < Q4_GROUP) {
        lo = fminf(lo, 0.0f);
        hi = fmaxf(hi, 0.0f);
    }
    // torch evaluates FlexLLMGen's 15 / (max - min) as 15 * reciprocal(max - min)
    const float s = 15.0f * (1.0f / (hi - lo));
    for (int k = 0; k < Q4_GROUP_BYTES; ++k) {
        const float a = 2 * k < n ? __half2float(x[(2 * k) * stride]) : 0.0f;
        const float b = 2 * k + 1 < n ? __half2float(x[(2 * k + 1) * stride]) : 0.0f;
        data[k * dstride] = (unsigned char)((q4_code(a, lo, s) << 4) | q4_code(b, lo, s));
    }
    *scale = __float2half_rn(s);
    *min_out = __float2half_rn(lo);
}
