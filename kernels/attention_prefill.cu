// Prefill attention: every query of a prompt against the prompt's own keys, with the causal mask
// and left padding, fused flash-style: scores never go to global memory; each block streams tiles
// of K and V through shared memory and keeps a running (online) softmax per query row.
#include "common.cuh"

#define PF_BQ 16            // query rows per block
#define PF_BK 64            // keys per shared-memory tile
#define PF_WARPS 4          // 128 threads; each warp owns PF_BQ / PF_WARPS query rows
#define PF_ROWS (PF_BQ / PF_WARPS)
#define PF_MAX_HD 128       // every OPT size has head_dim <= 128 (64, 80 or 128)
#define PF_PAIRS (PF_MAX_HD / 64)  // output element pairs per lane (lane owns d = 2 * (lane + 32 e) + {0, 1})

// Queries: row (b * new_len + i) of q holds query i of sequence b, head h at column h * head_dim
// (row stride q_stride elements); its absolute position is past_len + i. Keys and values come from
// the KV cache, where position j of (b, h) starts at base + b * cs_b + h * cs_h + j * cs_s (the
// new keys have already been appended), so the same kernel serves a first prefill (past_len = 0)
// and a later multi-token step. `mask` is [batch, mask_stride] with 1 for real tokens and 0 for
// left padding. Query i sees key j when j <= past_len + i and mask[b, j] != 0. A query that sees
// no key at all (a padding row) gets zeros, never NaN: its output never reaches a real token.
// Requirements checked by the host: head_dim % 8 == 0, head_dim <= 128, cs_s and the bases
// 16-byte aligned (K and V tiles are loaded with 16-byte vectors).
//
// grid = (ceil(new_len / PF_BQ), heads, batch), block = 128 threads.
// Scores use scalar f32 FMAs from shared memory, not tensor cores: at OPT's prompt lengths
// (<= 2048) attention is a small share of prefill time next to the GEMMs.
extern "C" __global__ void __launch_bounds__(PF_WARPS * 32)
    attention_prefill_f16(__half* __restrict__ out, const __half* __restrict__ q,
                          const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
                          long long cs_b, long long cs_h, long long cs_s,
                          const unsigned* __restrict__ mask, long long mask_stride, int past_len,
                          int new_len, int heads, int head_dim, long long q_stride,
                          long long out_stride, float scale) {
    // K rows are padded to an odd number of 32-bit words so that the 32 lanes, each reading a
    // different key row at the same column, hit 32 different banks.
    const int kw = head_dim / 2;              // 32-bit words per key row
    const int kws = (kw & 1) ? kw : kw + 1;   // padded stride in words
    __shared__ __align__(16) float qs[PF_BQ][PF_MAX_HD];
    __shared__ __half2 ks[PF_BK * (PF_MAX_HD / 2 + 1)];
    __shared__ __align__(16) __half vs[PF_BK][PF_MAX_HD];
    __shared__ float ps[PF_WARPS][PF_BK];
    __shared__ int kvalid[PF_BK];

    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * PF_BQ;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nvec = head_dim / 8;  // 16-byte vectors per row
    const unsigned* mrow = mask + (size_t)b * mask_stride;
    const size_t kv_base = (size_t)b * cs_b + (size_t)h * cs_h;

    // The scale is applied once here, in f32, rather than on every score.
    for (int i = tid; i < PF_BQ * head_dim; i += blockDim.x) {
        const int r = i / head_dim, d = i % head_dim;
        const int qi = q0 + r;
        qs[r][d] = qi < new_len
                       ? __half2float(q[((size_t)b * new_len + qi) * q_stride + (size_t)h * head_dim + d]) * scale
                       : 0.0f;
    }

    float m[PF_ROWS], l[PF_ROWS], o[PF_ROWS][2 * PF_PAIRS];
#pragma unroll
    for (int r = 0; r < PF_ROWS; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < 2 * PF_PAIRS; ++e) o[r][e] = 0.0f;
    }

    // Causality: no query of this block looks past its last row's position.
    const int total = past_len + new_len;
    const int k_end = min(total, past_len + q0 + PF_BQ);
    for (int kt = 0; kt < k_end; kt += PF_BK) {
        __syncthreads();  // previous tile fully consumed (and qs written, on the first pass)
        for (int i = tid; i < PF_BK * nvec; i += blockDim.x) {
            const int j = i / nvec, c = i % nvec;
            const int kj = kt + j;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (kj < k_end) {
                const size_t off = kv_base + (size_t)kj * cs_s + c * 8;
                kv = *reinterpret_cast<const uint4*>(k_cache + off);
                vv = *reinterpret_cast<const uint4*>(v_cache + off);
            }
            const __half2* k2 = reinterpret_cast<const __half2*>(&kv);
#pragma unroll
            for (int e = 0; e < 4; ++e) ks[j * kws + c * 4 + e] = k2[e];
            *reinterpret_cast<uint4*>(&vs[j][c * 8]) = vv;
        }
        for (int j = tid; j < PF_BK; j += blockDim.x) kvalid[j] = (kt + j < k_end) && mrow[kt + j] != 0;
        __syncthreads();

#pragma unroll
        for (int r = 0; r < PF_ROWS; ++r) {
            const int row = warp * PF_ROWS + r;
            const int qi = q0 + row;
            if (qi >= new_len) continue;  // warp-uniform
            const int qpos = past_len + qi;
            // Each lane scores keys `lane` and `lane + 32` of the tile.
            float s[2];
#pragma unroll
            for (int t = 0; t < 2; ++t) {
                const int j = lane + 32 * t;
                float acc = 0.0f;
                const __half2* kr = ks + j * kws;
                // q pairs are read as float2 (one shared load per two FMAs instead of two).
                const float2* qr = reinterpret_cast<const float2*>(qs[row]);
                for (int w = 0; w < kw; ++w) {
                    const float2 kf = __half22float2(kr[w]);
                    const float2 qv = qr[w];
                    acc = fmaf(qv.x, kf.x, acc);
                    acc = fmaf(qv.y, kf.y, acc);
                }
                const bool ok = kvalid[j] && (kt + j) <= qpos;
                s[t] = ok ? acc : NEG_INF;
            }
            const float tile_max = warp_max(fmaxf(s[0], s[1]));
            const float m_new = fmaxf(m[r], tile_max);
            if (m_new == NEG_INF) continue;  // nothing visible yet for this row
            const float corr = __expf(m[r] - m_new);  // exp(-inf) = 0 on the first visible tile
            const float p0 = __expf(s[0] - m_new), p1 = __expf(s[1] - m_new);
            l[r] = l[r] * corr + warp_sum(p0 + p1);
            m[r] = m_new;
            ps[warp][lane] = p0;
            ps[warp][lane + 32] = p1;
            __syncwarp();
#pragma unroll
            for (int e = 0; e < 2 * PF_PAIRS; ++e) o[r][e] *= corr;
            const int jn = min(PF_BK, qpos + 1 - kt);  // later keys have p = 0
            for (int j = 0; j < jn; ++j) {
                const float p = ps[warp][j];
                const __half2* vr = reinterpret_cast<const __half2*>(vs[j]);
#pragma unroll
                for (int e = 0; e < PF_PAIRS; ++e) {
                    const int pi = lane + 32 * e;
                    if (2 * pi < head_dim) {
                        const float2 vf = __half22float2(vr[pi]);
                        o[r][2 * e] = fmaf(p, vf.x, o[r][2 * e]);
                        o[r][2 * e + 1] = fmaf(p, vf.y, o[r][2 * e + 1]);
                    }
                }
            }
            __syncwarp();  // ps is rewritten for the next row
        }
    }

#pragma unroll
    for (int r = 0; r < PF_ROWS; ++r) {
        const int qi = q0 + warp * PF_ROWS + r;
        if (qi >= new_len) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        __half* orow = out + ((size_t)b * new_len + qi) * out_stride + (size_t)h * head_dim;
#pragma unroll
        for (int e = 0; e < PF_PAIRS; ++e) {
            const int pi = lane + 32 * e;
            if (2 * pi < head_dim)
                reinterpret_cast<__half2*>(orow)[pi] = __floats2half2_rn(o[r][2 * e] * inv, o[r][2 * e + 1] * inv);
        }
    }
}
