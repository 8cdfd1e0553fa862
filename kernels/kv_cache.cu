// KV-cache maintenance: appending a step's keys/values into the [batch, heads, max_len, head_dim]
// cache, and picking each sequence's last row (the only logits a decode step needs).
#include "common.cuh"

// cache[b, h, past_len + i, d] = src[b * new_len + i, h * head_dim + d]. The source rows are the
// projection outputs ([tokens, heads * head_dim]); the cache is sequence-major so one sequence's
// slab is contiguous for the offloader. One block per source row; threads walk the row in order
// so both the read and (per head) the write are contiguous.
extern "C" __global__ void kv_append_f16(__half* __restrict__ cache, const __half* __restrict__ src,
                                         int batch, int new_len, int heads, int head_dim,
                                         int past_len, int max_len) {
    const int row = blockIdx.x;
    if (row >= batch * new_len) return;
    const int b = row / new_len, i = row % new_len;
    const int width = heads * head_dim;
    const __half* s = src + (size_t)row * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const int h = c / head_dim, d = c % head_dim;
        cache[(((size_t)b * heads + h) * max_len + past_len + i) * head_dim + d] = s[c];
    }
}

// out[b, :] = x[b * seq + seq - 1, :]: with left padding every sequence's newest token is its
// group's last row.
extern "C" __global__ void last_rows_f16(__half* __restrict__ out, const __half* __restrict__ x,
                                         int batch, int seq, int width) {
    const int b = blockIdx.x;
    if (b >= batch) return;
    const __half* s = x + ((size_t)b * seq + seq - 1) * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[(size_t)b * width + c] = s[c];
}
