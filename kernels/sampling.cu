// Token choice from fp16 logits: greedy argmax and temperature sampling. Both return int32 ids so
// the next step's embedding kernel reads them without a host round trip.
#include "common.cuh"

// Ties go to the lowest index, as torch.argmax and the CPU reference do; NaN is never chosen
// over a number (comparisons with NaN are false).
__device__ __forceinline__ void argmax_merge(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// One block per row (blockDim a multiple of 32, at most 1024).
extern "C" __global__ void argmax_f16(int* __restrict__ out, const __half* __restrict__ logits,
                                      int rows, int cols) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const __half* x = logits + (size_t)r * cols;
    float best = NEG_INF;
    int best_i = cols;  // beyond every real index, so any real element wins a tie against it
    for (int c = threadIdx.x; c < cols; c += blockDim.x) argmax_merge(best, best_i, __half2float(x[c]), c);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        argmax_merge(best, best_i, ov, oi);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = best_i;
    }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x >> 5;
        best = lane < nwarps ? sv[lane] : NEG_INF;
        best_i = lane < nwarps ? si[lane] : cols;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
            argmax_merge(best, best_i, ov, oi);
        }
        // A row of NaNs leaves best_i == cols; clamp to a valid id rather than index out of range.
        if (lane == 0) out[r] = min(best_i, cols - 1);
    }
}

// Temperature sampling by inverse CDF: with w_c = exp((x_c - max) / T), choose the first c whose
// inclusive prefix sum exceeds u_r * sum(w). The uniform draws u (one per row, in [0, 1)) come
// from the host so that a run is reproducible from its seed and the CPU reference can be given
// the same draws.
// One block per row; each thread owns a contiguous slice of the row, so a block-wide exclusive
// scan of per-thread sums tells each thread whether the target falls in its slice; that thread
// then walks its slice in order. blockDim must be a multiple of 32 and at most 1024.
extern "C" __global__ void sample_temperature_f16(int* __restrict__ out,
                                                  const __half* __restrict__ logits,
                                                  const float* __restrict__ uniforms, int rows,
                                                  int cols, float temperature) {
    __shared__ float scratch[32];
    __shared__ float warp_prefix[32];
    __shared__ float total_sum;
    __shared__ int chosen;
    const int r = blockIdx.x;
    if (r >= rows) return;
    const __half* x = logits + (size_t)r * cols;
    const float inv_t = 1.0f / temperature;

    float m = NEG_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, __half2float(x[c]));
    m = block_max(m, scratch);

    const int per = (cols + blockDim.x - 1) / blockDim.x;
    const int c0 = min(cols, (int)threadIdx.x * per), c1 = min(cols, c0 + per);
    float local = 0.0f;
    for (int c = c0; c < c1; ++c) local += __expf((__half2float(x[c]) - m) * inv_t);

    // Scan of `local` across the block: inside each warp with shuffles, then across warps. Each
    // thread's slice covers [start, end) of the running sum, where its `end` is computed from the
    // same operands as the next thread's `start`, so the intervals tile [0, inf) exactly despite
    // rounding and exactly one thread claims the target.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nthreads = blockDim.x;
    float incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    float excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.0f;
    if (lane == 31) scratch[warp] = incl;
    if (threadIdx.x == 0) chosen = -1;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = nthreads >> 5;
        float wi = lane < nwarps ? scratch[lane] : 0.0f;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float v = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) wi += v;
        }
        float we = __shfl_up_sync(0xffffffffu, wi, 1);
        if (lane == 0) we = 0.0f;
        warp_prefix[lane] = we;  // running sum before warp `lane`
        if (lane == nwarps - 1) total_sum = wi;
    }
    __syncthreads();
    const float target = uniforms[r] * total_sum;
    const float start = warp_prefix[warp] + excl;
    float end;
    if ((int)threadIdx.x == nthreads - 1) end = INFINITY_F;
    else if (lane == 31) end = warp_prefix[warp + 1];
    else end = warp_prefix[warp] + incl;
    if (target >= start && target < end) {
        // Rounding can leave the walk just short of the target: the slice's last column then.
        int pick = c1 > c0 ? c1 - 1 : cols - 1;
        float run = start;
        for (int c = c0; c < c1; ++c) {
            run += __expf((__half2float(x[c]) - m) * inv_t);
            if (run > target) {
                pick = c;
                break;
            }
        }
        chosen = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        // Only a NaN target (NaN logits) leaves `chosen` unset; still emit a valid id.
        out[r] = chosen >= 0 ? chosen : cols - 1;
    }
}
