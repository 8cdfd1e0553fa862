// Decode attention over a 4-bit compressed KV cache, and sparse attention (FlexLLMGen's
// attn_sparsity) over an fp16 or a compressed cache.
//
// One query per sequence (decode), as attention_decode_f16, with the rows read through a loader:
// fp16 rows, or compressed rows (per (sequence, head, position) its codes then its (scale, min)
// pairs, see common.cuh), decoded inside the dot products. The step's own key and value (the
// newest position, len - 1) are read exact from the projection outputs instead of the cache, as
// FlexLLMGen attends to them before compressing them.
//
// Sparse attention: one block per (sequence, head) holds every score of the row; after the
// softmax it keeps the newest key and the ceil(s * n) - 1 largest weights of the others (n = the
// visible keys, ties to the earlier position; computed in double with the CPU's 1e-9 rounding)
// and sums only their values, with the dense softmax's weights (not renormalised).
#include "common.cuh"

#define AQ_THREADS 128
#define AQ_WARPS (AQ_THREADS / 32)
#define AQ_MAX_CHUNK 1024  // keys per block of the split dense kernel
#define AQ_MAX_LEN 2048    // keys of the sparse kernel's one block (OPT: at most 2048 positions)

// fp16 rows: position j of the pair at base + j * cs_s.
struct AqF16Rows {
    const __half* base;
    long long cs_s;
    // elements 8v .. 8v + 7 of row j as f32
    __device__ __forceinline__ void load8(int j, int v, float* o) const {
        const uint4 raw = *reinterpret_cast<const uint4*>(base + (long long)j * cs_s + v * 8);
        const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(h2[e]);
            o[2 * e] = f.x;
            o[2 * e + 1] = f.y;
        }
    }
};

// Compressed rows: position j at base + j * rb (rb = 36 bytes per group of head_dim); from
// position `fresh_at` on, the exact fp16 row `fresh` instead (when not null).
struct AqQ4Rows {
    const unsigned char* base;
    long long rb;
    int groups;
    const __half* fresh;
    int fresh_at;
    __device__ __forceinline__ void load8(int j, int v, float* o) const {
        if (fresh != nullptr && j >= fresh_at) {
            AqF16Rows f{fresh, 0};
            f.load8(0, v, o);
            return;
        }
        const unsigned char* row = base + (long long)j * rb;
        const unsigned bytes = *reinterpret_cast<const unsigned*>(row + v * 4);
        const __half* sm = reinterpret_cast<const __half*>(row + groups * Q4_GROUP_BYTES) + 2 * (v / 8);
        const float inv = 1.0f / __half2float(sm[0]), mn = __half2float(sm[1]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const unsigned b = (bytes >> (8 * e)) & 0xFFu;
            o[2 * e] = (float)(b >> 4) * inv + mn;
            o[2 * e + 1] = (float)(b & 15u) * inv + mn;
        }
    }
};

__device__ __forceinline__ int aq_pow2_at_least(int n) {
    int g = 1;
    while (g < n) g <<= 1;
    return g;
}

// Scores of keys [j0, j0 + n) into sc (masked keys -inf), as attention_decode_f16's phase 1: G
// lanes share a key, each with one 8-value vector of it.
template <class Rows>
__device__ __forceinline__ void aq_scores(float* sc, const Rows& k, const __half* qrow, int head_dim,
                                          float scale, const unsigned* mrow, int j0, int n) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nvec = head_dim / 8;
    const int G = aq_pow2_at_least(nvec);
    const int sub = lane / G, gl = lane % G;
    const int keys_per_step = AQ_WARPS * (32 / G);
    float qf[8];
    {
        float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (gl < nvec) {
            AqF16Rows qr{qrow, 0};
            qr.load8(0, gl, t);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[e] = t[e] * scale;
    }
    for (int jb = 0; jb < n; jb += keys_per_step) {
        const int jl = jb + warp * (32 / G) + sub;
        float acc = 0.0f;
        if (jl < n && gl < nvec) {
            float kv[8];
            k.load8(j0 + jl, gl, kv);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc = fmaf(qf[e], kv[e], acc);
        }
        for (int o = G / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (jl < n && gl == 0) sc[jl] = mrow[j0 + jl] != 0 ? acc : NEG_INF;
    }
}

// o[d] for this thread's share: sum over keys j of p[j] * v[j0 + j], thread t owning vector t % nvec
// of keys t / nvec, t / nvec + kl, ...; the partial sums merged through `red`. Returns, for
// threads d < head_dim in the caller's loop, nothing: the caller reads red.
template <class Rows>
__device__ __forceinline__ void aq_values(float* red, const Rows& v, const float* p, int head_dim,
                                          int j0, int n) {
    const int tid = threadIdx.x;
    const int nvec = head_dim / 8;
    const int kl = AQ_THREADS / nvec;
    const int vi = tid % nvec, kk = tid / nvec;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (kk < kl) {
        for (int j = kk; j < n; j += kl) {
            const float w = p[j];
            if (w == 0.0f) continue;
            float vv[8];
            v.load8(j0 + j, vi, vv);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] = fmaf(w, vv[e], acc[e]);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) red[kk * head_dim + vi * 8 + e] = acc[e];
    }
    __syncthreads();
}

// The dense decode over a compressed cache: attention_decode_f16 with compressed rows (and the
// fresh newest row). Splits are merged by attention_decode_reduce_f16. cs_b, cs_h count rows
// ([batch, heads, max_len] rows of rb bytes); k_new, v_new: [batch, heads * head_dim] fp16 rows,
// row stride new_stride, or null to read the newest position from the cache too.
// grid = (heads, batch, splits), block = 128 threads. Host checks: head_dim % 8 == 0, <= 128.
extern "C" __global__ void __launch_bounds__(AQ_THREADS)
    attention_decode_q4(__half* __restrict__ out, float* __restrict__ part_o,
                        float* __restrict__ part_ml, const __half* __restrict__ q,
                        long long q_stride, const unsigned char* __restrict__ k_cache,
                        const unsigned char* __restrict__ v_cache, long long cs_b, long long cs_h,
                        long long rb, const __half* __restrict__ k_new,
                        const __half* __restrict__ v_new, long long new_stride,
                        const unsigned* __restrict__ mask, long long mask_stride, int heads,
                        int head_dim, int len, int chunk, long long out_stride, float scale) {
    __shared__ float sc[AQ_MAX_CHUNK];
    __shared__ float red[AQ_THREADS * 8];
    __shared__ float scratch[32];
    const int h = blockIdx.x, b = blockIdx.y, z = blockIdx.z, tid = threadIdx.x;
    const int j0 = z * chunk, j1 = min(len, j0 + chunk);
    const int n = max(0, j1 - j0);
    const int groups = (head_dim + Q4_GROUP - 1) / Q4_GROUP;
    const long long pair = (long long)b * cs_b + (long long)h * cs_h;
    const long long fresh = (long long)b * new_stride + (long long)h * head_dim;
    // without the step's own rows (null), every position comes from the cache
    const AqQ4Rows k{k_cache + pair * rb, rb, groups, k_new ? k_new + fresh : nullptr, len - 1};
    const AqQ4Rows v{v_cache + pair * rb, rb, groups, v_new ? v_new + fresh : nullptr, len - 1};
    const unsigned* mrow = mask + (size_t)b * mask_stride;
    aq_scores(sc, k, q + (size_t)b * q_stride + (size_t)h * head_dim, head_dim, scale, mrow, j0, n);
    __syncthreads();
    float mx = NEG_INF;
    for (int j = tid; j < n; j += AQ_THREADS) mx = fmaxf(mx, sc[j]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = tid; j < n; j += AQ_THREADS) {
        const float p = mx == NEG_INF ? 0.0f : __expf(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    sum = block_sum(sum, scratch);
    aq_values(red, v, sc, head_dim, j0, n);
    const int kl = AQ_THREADS / (head_dim / 8);
    const size_t bh = (size_t)b * heads + h;
    for (int d = tid; d < head_dim; d += AQ_THREADS) {
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

// Sparse decode attention over rows `k`, `v` of one (sequence, head) pair: all len keys in one
// block.
template <class Rows>
__device__ __forceinline__ void aq_sparse_body(__half* out, const Rows& k, const Rows& v,
                                               const __half* qrow, const unsigned* mrow, int head_dim,
                                               int len, float scale, double sparsity) {
    __shared__ float sc[AQ_MAX_LEN];
    __shared__ float red[AQ_THREADS * 8];
    __shared__ float scratch[32];
    const int tid = threadIdx.x;
    aq_scores(sc, k, qrow, head_dim, scale, mrow, 0, len);
    __syncthreads();
    float mx = NEG_INF, vis = 0.0f;
    for (int j = tid; j < len; j += AQ_THREADS) {
        mx = fmaxf(mx, sc[j]);
        vis += mrow[j] != 0 ? 1.0f : 0.0f;
    }
    mx = block_max(mx, scratch);
    const int visible = (int)block_sum(vis, scratch);
    float sum = 0.0f;
    for (int j = tid; j < len; j += AQ_THREADS) {
        const float p = mx == NEG_INF ? 0.0f : __expf(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    sum = block_sum(sum, scratch);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int j = tid; j < len; j += AQ_THREADS) sc[j] *= inv;
    __syncthreads();
    // the keys kept: the newest (len - 1) and the `need` largest of the other visible ones
    int keep = visible;
    if (sparsity < 1.0 && visible > 0) {
        keep = (int)ceil(sparsity * (double)visible - 1e-9);
        keep = min(max(keep, 1), visible);
    }
    const int need = keep - 1;
    const int others = visible - (mrow[len - 1] != 0 ? 1 : 0);
    if (need < others) {
        // the need-th largest weight's bits, built from the top bit down (weights are >= 0, so
        // their bit patterns order as the values do)
        unsigned thr = 0xFFFFFFFFu;
        if (need > 0) {
            unsigned prefix = 0;
            for (int bit = 31; bit >= 0; --bit) {
                const unsigned cand = prefix | (1u << bit);
                float cnt = 0.0f;
                for (int j = tid; j < len - 1; j += AQ_THREADS)
                    cnt += (mrow[j] != 0 && __float_as_uint(sc[j]) >= cand) ? 1.0f : 0.0f;
                if ((int)block_sum(cnt, scratch) >= need) prefix = cand;
            }
            thr = prefix;
        }
        float gt = 0.0f;
        for (int j = tid; j < len - 1; j += AQ_THREADS)
            gt += (mrow[j] != 0 && need > 0 && __float_as_uint(sc[j]) > thr) ? 1.0f : 0.0f;
        const int ties = need - (int)block_sum(gt, scratch);
        for (int j = tid; j < len - 1; j += AQ_THREADS)
            if (mrow[j] != 0 && (need == 0 || __float_as_uint(sc[j]) < thr)) sc[j] = 0.0f;
        __syncthreads();
        if (tid == 0 && need > 0) {
            // weights equal to the threshold: the earliest `ties` of them stay
            int kept = 0;
            for (int j = 0; j < len - 1; ++j)
                if (mrow[j] != 0 && __float_as_uint(sc[j]) == thr && sc[j] != 0.0f) {
                    if (kept < ties) ++kept;
                    else sc[j] = 0.0f;
                }
        }
        __syncthreads();
    }
    aq_values(red, v, sc, head_dim, 0, len);
    const int kl = AQ_THREADS / (head_dim / 8);
    for (int d = tid; d < head_dim; d += AQ_THREADS) {
        float o = 0.0f;
        for (int r = 0; r < kl; ++r) o += red[r * head_dim + d];
        out[d] = __float2half_rn(o);
    }
}

// Sparse decode over an fp16 cache (strides in elements, as attention_decode_f16's).
// grid = (heads, batch), block = 128 threads. Host checks: head_dim % 8 == 0, <= 128,
// len <= AQ_MAX_LEN.
extern "C" __global__ void __launch_bounds__(AQ_THREADS)
    attention_decode_sparse_f16(__half* __restrict__ out, const __half* __restrict__ q,
                                long long q_stride, const __half* __restrict__ k_cache,
                                const __half* __restrict__ v_cache, long long cs_b, long long cs_h,
                                long long cs_s, const unsigned* __restrict__ mask,
                                long long mask_stride, int head_dim, int len, long long out_stride,
                                float scale, double sparsity) {
    const int h = blockIdx.x, b = blockIdx.y;
    const long long base = (long long)b * cs_b + (long long)h * cs_h;
    const AqF16Rows k{k_cache + base, cs_s}, v{v_cache + base, cs_s};
    aq_sparse_body(out + (size_t)b * out_stride + (size_t)h * head_dim, k, v,
                   q + (size_t)b * q_stride + (size_t)h * head_dim, mask + (size_t)b * mask_stride,
                   head_dim, len, scale, sparsity);
}

// Sparse decode over a compressed cache (strides in rows, fresh rows as attention_decode_q4's).
// grid = (heads, batch), block = 128 threads.
extern "C" __global__ void __launch_bounds__(AQ_THREADS)
    attention_decode_sparse_q4(__half* __restrict__ out, const __half* __restrict__ q,
                               long long q_stride, const unsigned char* __restrict__ k_cache,
                               const unsigned char* __restrict__ v_cache, long long cs_b,
                               long long cs_h, long long rb, const __half* __restrict__ k_new,
                               const __half* __restrict__ v_new, long long new_stride,
                               const unsigned* __restrict__ mask, long long mask_stride,
                               int head_dim, int len, long long out_stride, float scale,
                               double sparsity) {
    const int h = blockIdx.x, b = blockIdx.y;
    const int groups = (head_dim + Q4_GROUP - 1) / Q4_GROUP;
    const long long pair = (long long)b * cs_b + (long long)h * cs_h;
    const long long fresh = (long long)b * new_stride + (long long)h * head_dim;
    const AqQ4Rows k{k_cache + pair * rb, rb, groups, k_new ? k_new + fresh : nullptr, len - 1};
    const AqQ4Rows v{v_cache + pair * rb, rb, groups, v_new ? v_new + fresh : nullptr, len - 1};
    aq_sparse_body(out + (size_t)b * out_stride + (size_t)h * head_dim, k, v,
                   q + (size_t)b * q_stride + (size_t)h * head_dim, mask + (size_t)b * mask_stride,
                   head_dim, len, scale, sparsity);
}
