// Decode attention: one new query per sequence against its whole KV cache, flash-decoding style.
// A decode step reads the entire cache once and does two FMAs per byte pair, so it is bound by
// memory bandwidth; the work is split over the sequence length so that even batch x heads smaller
// than the SM count keeps every SM streaming, and a second small kernel merges the splits.
#include "common.cuh"

#define DEC_THREADS 128
#define DEC_WARPS (DEC_THREADS / 32)
#define DEC_MAX_CHUNK 1024  // keys per block; the host picks the split so chunks fit
#define DEC_MAX_HD 128

// Round up to a power of two (n <= 16): lanes per key in the scoring phase.
__device__ __forceinline__ int pow2_at_least(int n) {
    int g = 1;
    while (g < n) g <<= 1;
    return g;
}

// q: element d of head h for sequence b at q + b * q_stride + h * head_dim + d.
// k_cache / v_cache: key position j of (b, h) at base + b * cs_b + h * cs_h + j * cs_s (elements);
// the same strides serve both, so any [B, H, S, D] or [S, B, H, D] cache layout works.
// mask: [batch, mask_stride] ints, 1 for a real key, 0 for left padding (the current token's key
// must already be in the cache, at position len - 1).
// Split z covers keys [z * chunk, min(len, (z + 1) * chunk)). With one split the block writes the
// normalised result to `out` directly; with several it writes its unnormalised partial output and
// its (max, sum) pair, and attention_decode_reduce_f16 merges them.
// Requirements checked by the host: head_dim % 8 == 0, head_dim <= 128, chunk <= 1024, strides
// multiples of 8 and 16-byte aligned bases.
// grid = (heads, batch, splits), block = 128 threads.
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    attention_decode_f16(__half* __restrict__ out, float* __restrict__ part_o,
                         float* __restrict__ part_ml, const __half* __restrict__ q,
                         long long q_stride, const __half* __restrict__ k_cache,
                         const __half* __restrict__ v_cache, long long cs_b, long long cs_h,
                         long long cs_s, const unsigned* __restrict__ mask, long long mask_stride,
                         int heads, int head_dim, int len, int chunk, long long out_stride,
                         float scale) {
    __shared__ float sc[DEC_MAX_CHUNK];
    __shared__ float red[DEC_THREADS * 8];
    __shared__ float scratch[32];
    const int h = blockIdx.x, b = blockIdx.y, z = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int j0 = z * chunk, j1 = min(len, j0 + chunk);
    const int n = max(0, j1 - j0);
    const int nvec = head_dim / 8;
    const size_t base = (size_t)b * cs_b + (size_t)h * cs_h;
    const unsigned* mrow = mask + (size_t)b * mask_stride;

    // Phase 1: scores. G lanes share a key, each with one 16-byte vector of it, so a warp reads
    // 32 / G whole key rows per load instruction and needs log2(G) shuffles per key.
    const int G = pow2_at_least(nvec);
    const int sub = lane / G, gl = lane % G;
    const int keys_per_step = DEC_WARPS * (32 / G);
    float qf[8];
    {
        uint4 qv = make_uint4(0, 0, 0, 0);
        if (gl < nvec) qv = *reinterpret_cast<const uint4*>(q + (size_t)b * q_stride + (size_t)h * head_dim + gl * 8);
        const __half2* q2 = reinterpret_cast<const __half2*>(&qv);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(q2[e]);
            qf[2 * e] = f.x * scale;
            qf[2 * e + 1] = f.y * scale;
        }
    }
    // The loop bound is uniform across the warp (shuffles need every lane).
    for (int jb = 0; jb < n; jb += keys_per_step) {
        const int jl = jb + warp * (32 / G) + sub;
        float acc = 0.0f;
        if (jl < n && gl < nvec) {
            const uint4 kv = *reinterpret_cast<const uint4*>(k_cache + base + (size_t)(j0 + jl) * cs_s + gl * 8);
            const __half2* k2 = reinterpret_cast<const __half2*>(&kv);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = __half22float2(k2[e]);
                acc = fmaf(qf[2 * e], f.x, acc);
                acc = fmaf(qf[2 * e + 1], f.y, acc);
            }
        }
        for (int o = G / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (jl < n && gl == 0) sc[jl] = mrow[j0 + jl] != 0 ? acc : NEG_INF;
    }
    __syncthreads();

    // Phase 2: softmax statistics of this chunk; sc becomes exp(s - m).
    float mx = NEG_INF;
    for (int j = tid; j < n; j += DEC_THREADS) mx = fmaxf(mx, sc[j]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = tid; j < n; j += DEC_THREADS) {
        const float p = mx == NEG_INF ? 0.0f : __expf(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    sum = block_sum(sum, scratch);  // its barriers also publish sc

    // Phase 3: o = sum_j p_j v_j. Thread t owns vector t % nvec of keys t / nvec, t / nvec + kl,
    // ...: consecutive threads read consecutive 16-byte pieces of a row (coalesced), and the kl
    // partial sums are merged through shared memory.
    const int kl = DEC_THREADS / nvec;
    const int vi = tid % nvec, kk = tid / nvec;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    if (kk < kl) {
        for (int j = kk; j < n; j += kl) {
            const float p = sc[j];
            const uint4 vv = *reinterpret_cast<const uint4*>(v_cache + base + (size_t)(j0 + j) * cs_s + vi * 8);
            const __half2* v2 = reinterpret_cast<const __half2*>(&vv);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = __half22float2(v2[e]);
                acc[2 * e] = fmaf(p, f.x, acc[2 * e]);
                acc[2 * e + 1] = fmaf(p, f.y, acc[2 * e + 1]);
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) red[kk * head_dim + vi * 8 + e] = acc[e];
    }
    __syncthreads();

    const size_t bh = (size_t)b * heads + h;
    for (int d = tid; d < head_dim; d += DEC_THREADS) {
        float o = 0.0f;
        for (int r = 0; r < kl; ++r) o += red[r * head_dim + d];
        if (gridDim.z == 1) {
            const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            out[(size_t)b * out_stride + (size_t)h * head_dim + d] = __float2half_rn(o * inv);
        } else {
            part_o[(bh * gridDim.z + z) * head_dim + d] = o;
        }
    }
    if (gridDim.z > 1 && tid == 0) {
        part_ml[(bh * gridDim.z + z) * 2] = mx;
        part_ml[(bh * gridDim.z + z) * 2 + 1] = sum;
    }
}

// Merges the splits of attention_decode_f16: with M = max_z m_z and w_z = exp(m_z - M),
// out = sum_z w_z o_z / sum_z w_z l_z. Splits whose keys were all padding have m = -inf and
// weigh nothing; a sequence with no visible key at all gets zeros.
// grid = (heads, batch), block = 128 threads.
extern "C" __global__ void attention_decode_reduce_f16(__half* __restrict__ out,
                                                       const float* __restrict__ part_o,
                                                       const float* __restrict__ part_ml,
                                                       int heads, int head_dim, int splits,
                                                       long long out_stride) {
    const int h = blockIdx.x, b = blockIdx.y;
    const size_t bh = (size_t)b * heads + h;
    const float* ml = part_ml + bh * splits * 2;
    float M = NEG_INF;
    for (int z = 0; z < splits; ++z) M = fmaxf(M, ml[2 * z]);
    float L = 0.0f;
    if (M != NEG_INF)
        for (int z = 0; z < splits; ++z) L += ml[2 * z + 1] * __expf(ml[2 * z] - M);
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        if (M != NEG_INF)
            for (int z = 0; z < splits; ++z) o += part_o[(bh * splits + z) * head_dim + d] * __expf(ml[2 * z] - M);
        out[(size_t)b * out_stride + (size_t)h * head_dim + d] = __float2half_rn(o * inv);
    }
}
