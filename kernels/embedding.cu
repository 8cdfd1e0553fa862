// Embedding lookups: token embeddings (gather rows of the table) and OPT's learned position
// embeddings (add gathered rows). OPT's position ids are cumsum(attention_mask) - 1 + 2 (the "+2"
// is a fairseq legacy: the table has max_position_embeddings + 2 rows); the engine computes them on
// the host, where the mask lives, and both devices share that code, so these kernels only gather.
#include "common.cuh"

// out[t, :] = table[ids[t], :]. One block per row; threads stride over the width. Ids were
// validated on the host; out-of-range ids are clamped only so a bad id can never read outside
// the table.
extern "C" __global__ void gather_rows_f16(__half* __restrict__ out, const __half* __restrict__ table,
                                           const unsigned* __restrict__ ids, int n, int width,
                                           int table_rows) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const unsigned id = min(ids[t], (unsigned)(table_rows - 1));
    const __half* src = table + (size_t)id * width;
    __half* dst = out + (size_t)t * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// x[t, :] += table[ids[t], :], summed in f32 and rounded once (as the CPU reference and
// transformers' fp16 add do).
extern "C" __global__ void add_gathered_rows_f16(__half* __restrict__ x, const __half* __restrict__ table,
                                                 const unsigned* __restrict__ ids, int n, int width,
                                                 int table_rows) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const unsigned id = min(ids[t], (unsigned)(table_rows - 1));
    const __half* src = table + (size_t)id * width;
    __half* dst = x + (size_t)t * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        dst[i] = __float2half_rn(__half2float(dst[i]) + __half2float(src[i]));
}
