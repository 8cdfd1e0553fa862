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
