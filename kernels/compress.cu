// 4-bit compressed tensors on the GPU (the format is in common.cuh): packing and unpacking in any
// layout, the KV-cache append that packs a step's keys and values, the embedding gathers from
// compressed tables, and the fused decode + matrix-vector product of compressed linear weights.
//
// A tensor grouped along one dimension is [outer, len, inner]; per outer index its data block
// [groups * 32, inner] bytes is followed by its scale block [groups, 2, inner] fp16 (scale row,
// then min row, per group). Weights: grouped along dimension 0 (outer = 1). The KV cache: along
// head_dim (inner = 1), so every (sequence, head, position) row is its codes then its
// (scale, min) pairs.
#include "common.cuh"

// Byte offset of the scale block within an outer block.
__device__ __forceinline__ long long q4_data_bytes(int len, long long inner) {
    return (long long)((len + Q4_GROUP - 1) / Q4_GROUP) * Q4_GROUP_BYTES * inner;
}

// out = the stored form of x ([outer, len, inner] fp16). One thread per (outer, group, column).
extern "C" __global__ void q4_pack_f16(unsigned char* __restrict__ out, const __half* __restrict__ x,
                                       long long outer, int len, long long inner) {
    const int groups = (len + Q4_GROUP - 1) / Q4_GROUP;
    const long long data_bytes = q4_data_bytes(len, inner);
    const long long block = data_bytes + 4LL * groups * inner;
    const long long total = outer * groups * inner;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long c = t % inner, g = (t / inner) % groups, o = t / (inner * groups);
        unsigned char* base = out + o * block;
        __half* scales = reinterpret_cast<__half*>(base + data_bytes);
        const int n = min(Q4_GROUP, len - (int)g * Q4_GROUP);
        q4_quantize(x + (o * len + g * Q4_GROUP) * inner + c, inner, n,
                    base + g * Q4_GROUP_BYTES * inner + c, inner, scales + (2 * g) * inner + c,
                    scales + (2 * g + 1) * inner + c);
    }
}

// out ([outer, len, inner] fp16) = the values of a stored tensor. One thread per element.
extern "C" __global__ void q4_unpack_f16(__half* __restrict__ out, const unsigned char* __restrict__ in,
                                         long long outer, int len, long long inner) {
    const int groups = (len + Q4_GROUP - 1) / Q4_GROUP;
    const long long data_bytes = q4_data_bytes(len, inner);
    const long long block = data_bytes + 4LL * groups * inner;
    const long long total = outer * len * inner;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long c = t % inner, i = (t / inner) % len, o = t / (inner * len);
        const unsigned char* base = in + o * block;
        const __half* scales = reinterpret_cast<const __half*>(base + data_bytes);
        const long long g = i / Q4_GROUP;
        const unsigned b = base[(i / 2) * inner + c];
        const unsigned q = (i % 2 == 0) ? (b >> 4) : (b & 15u);
        const float s = __half2float(scales[(2 * g) * inner + c]);
        const float mn = __half2float(scales[(2 * g + 1) * inner + c]);
        out[t] = __float2half_rn((float)q * (1.0f / s) + mn);
    }
}

// cache[b, h, past_len + i] = the packed row src[b * new_len + i, h * head_dim ..] (a compressed
// cache of shape [batch, heads, max_len, head_dim] grouped along head_dim). One thread per
// (row, head, group).
extern "C" __global__ void kv_append_q4(unsigned char* __restrict__ cache, const __half* __restrict__ src,
                                        int batch, int new_len, int heads, int head_dim,
                                        int past_len, int max_len) {
    const int groups = (head_dim + Q4_GROUP - 1) / Q4_GROUP;
    const long long rb = 36LL * groups;
    const long long total = (long long)batch * new_len * heads * groups;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int g = (int)(t % groups), h = (int)((t / groups) % heads);
        const long long row = t / ((long long)groups * heads);  // b * new_len + i
        const int b = (int)(row / new_len), i = (int)(row % new_len);
        unsigned char* dst = cache + (((long long)b * heads + h) * max_len + past_len + i) * rb;
        __half* scales = reinterpret_cast<__half*>(dst + (long long)groups * Q4_GROUP_BYTES);
        const int n = min(Q4_GROUP, head_dim - g * Q4_GROUP);
        q4_quantize(src + row * (long long)heads * head_dim + (long long)h * head_dim + g * Q4_GROUP, 1, n,
                    dst + g * Q4_GROUP_BYTES, 1, scales + 2 * g, scales + 2 * g + 1);
    }
}

// Row `id` of a compressed table [rows, width] (grouped along the rows), element c, decoded.
__device__ __forceinline__ float q4_table_at(const unsigned char* table, int rows, int width,
                                             unsigned id, int c) {
    const int g = id / Q4_GROUP;
    const __half* scales = reinterpret_cast<const __half*>(table + q4_data_bytes(rows, width));
    const unsigned b = table[(long long)(id / 2) * width + c];
    const unsigned q = (id % 2 == 0) ? (b >> 4) : (b & 15u);
    const float s = __half2float(scales[(2LL * g) * width + c]);
    const float mn = __half2float(scales[(2LL * g + 1) * width + c]);
    return (float)q * (1.0f / s) + mn;
}

// out[t, :] = the compressed table's row ids[t] (gather_rows_f16's compressed twin).
extern "C" __global__ void gather_rows_q4(__half* __restrict__ out, const unsigned char* __restrict__ table,
                                          const unsigned* __restrict__ ids, int n, int width,
                                          int table_rows) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const unsigned id = min(ids[t], (unsigned)(table_rows - 1));
    for (int c = threadIdx.x; c < width; c += blockDim.x)
        out[(size_t)t * width + c] = __float2half_rn(q4_table_at(table, table_rows, width, id, c));
}

// x[t, :] += the compressed table's row ids[t], in f32, rounded once.
extern "C" __global__ void add_gathered_rows_q4(__half* __restrict__ x, const unsigned char* __restrict__ table,
                                                const unsigned* __restrict__ ids, int n, int width,
                                                int table_rows) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const unsigned id = min(ids[t], (unsigned)(table_rows - 1));
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        __half* d = x + (size_t)t * width + c;
        *d = __float2half_rn(__half2float(*d) + q4_table_at(table, table_rows, width, id, c));
    }
}

#define MV_THREADS 128
#define MV_WARPS (MV_THREADS / 32)
#define MV_ROWS_PER_WARP (Q4_GROUP_BYTES / MV_WARPS)  // packed rows (pairs of outputs) per warp
#define MV_MAX_N 4                                      // rows of x per launch

// part[chunk, i, j] = sum over the chunk's columns c of W[j, c] * x[i, c], for the 64 output rows
// j of group blockIdx.x and the columns of chunk blockIdx.y ([chunk * kchunk, + kchunk)).
// W is a compressed [m, k] weight; x is fp16 [n, k] with n <= MV_MAX_N. Warp w owns packed rows
// w, w + 4, ... of the group (each byte holds output rows 2r and 2r + 1 of one column); lane l
// reads 4 consecutive columns per step, so a warp reads 128 consecutive bytes of a packed row at
// a time. Per column, x is scaled by 1 / scale once (xs), so a row's sum is
// sum_c q[j, c] xs[c] + sum_c min[c] x[c], the second term shared by the group's 64 rows.
// Requirements checked by the host: k % 4 == 0, kchunk % 128 == 0.
// grid = (ceil(m / 64), ceil(k / kchunk)), block = 128 threads.
template <int N>
__device__ __forceinline__ void q4_matvec_body(float* __restrict__ part, const __half* __restrict__ x,
                                               const unsigned char* __restrict__ w, int n, int k,
                                               int m, int kchunk) {
    const int g = blockIdx.x, chunk = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int groups = (m + Q4_GROUP - 1) / Q4_GROUP;
    const __half* scales = reinterpret_cast<const __half*>(w + (long long)groups * Q4_GROUP_BYTES * k);
    const int c0 = chunk * kchunk, c1 = min(k, c0 + kchunk);
    float acc[MV_ROWS_PER_WARP][2][N];
    float beta[N];
#pragma unroll
    for (int r = 0; r < MV_ROWS_PER_WARP; ++r)
#pragma unroll
        for (int i = 0; i < N; ++i) acc[r][0][i] = acc[r][1][i] = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) beta[i] = 0.0f;
    for (int c = c0 + lane * 4; c < c1; c += 128) {
        float xs[N][4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float inv = 1.0f / __half2float(scales[(2LL * g) * k + c + e]);
            const float mn = __half2float(scales[(2LL * g + 1) * k + c + e]);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const float xv = __half2float(x[(long long)i * k + c + e]);
                xs[i][e] = xv * inv;
                beta[i] = fmaf(xv, mn, beta[i]);
            }
        }
#pragma unroll
        for (int r = 0; r < MV_ROWS_PER_WARP; ++r) {
            const int pr = warp + r * MV_WARPS;  // packed row within the group
            const unsigned bytes = *reinterpret_cast<const unsigned*>(
                w + ((long long)g * Q4_GROUP_BYTES + pr) * k + c);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const unsigned b = (bytes >> (8 * e)) & 0xFFu;
                const float hi = (float)(b >> 4), lo = (float)(b & 15u);
#pragma unroll
                for (int i = 0; i < N; ++i) {
                    acc[r][0][i] = fmaf(hi, xs[i][e], acc[r][0][i]);
                    acc[r][1][i] = fmaf(lo, xs[i][e], acc[r][1][i]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < N; ++i) beta[i] = warp_sum(beta[i]);
#pragma unroll
    for (int r = 0; r < MV_ROWS_PER_WARP; ++r) {
        const int j0 = g * Q4_GROUP + 2 * (warp + r * MV_WARPS);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const float v = warp_sum(acc[r][half][i]);
                if (lane == 0 && j0 + half < m)
                    part[((long long)chunk * n + i) * m + j0 + half] = v + beta[i];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(MV_THREADS)
    q4_matvec_f16(float* __restrict__ part, const __half* __restrict__ x,
                  const unsigned char* __restrict__ w, int n, int k, int m, int kchunk) {
    switch (n) {
        case 1: q4_matvec_body<1>(part, x, w, n, k, m, kchunk); break;
        case 2: q4_matvec_body<2>(part, x, w, n, k, m, kchunk); break;
        case 3: q4_matvec_body<3>(part, x, w, n, k, m, kchunk); break;
        default: q4_matvec_body<4>(part, x, w, n, k, m, kchunk); break;
    }
}

// y[i, j] = act(sum over chunks of part[chunk, i, j] + bias[j]) as fp16 (bias may be null).
extern "C" __global__ void q4_matvec_reduce_f16(__half* __restrict__ y, const float* __restrict__ part,
                                                const __half* __restrict__ bias, int n, int m,
                                                int chunks, int relu) {
    const long long total = (long long)n * m;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(t % m);
        float v = bias ? __half2float(bias[j]) : 0.0f;
        for (int c = 0; c < chunks; ++c) v += part[(long long)c * total + t];
        if (relu) v = fmaxf(v, 0.0f);
        y[t] = __float2half_rn(v);
    }
}
