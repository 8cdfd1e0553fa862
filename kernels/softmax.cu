// Row softmax with temperature, fp16 or f32 logits in, f32 probabilities out (probabilities feed
// sampling, where fp16's 11-bit mantissa would flatten the tail of a 50k-entry distribution).
#include "common.cuh"

// One block per row: max, then sum of exp, then normalise; three passes over the row because a
// 50k-entry row does not fit in registers, and the re-reads hit L2.
// probs[r, c] = exp((x[r, c] - max_r) / T) / sum_c exp((x[r, c] - max_r) / T).
extern "C" __global__ void softmax_f16_f32(float* __restrict__ probs, const __half* __restrict__ x,
                                           int rows, int cols, float temperature) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const __half* xr = x + (size_t)r * cols;
    float* pr = probs + (size_t)r * cols;
    const float inv_t = 1.0f / temperature;

    float m = NEG_INF;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, __half2float(xr[i]));
    m = block_max(m, scratch);

    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float e = __expf((__half2float(xr[i]) - m) * inv_t);
        pr[i] = e;
        s += e;
    }
    const float inv_s = 1.0f / block_sum(s, scratch);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) pr[i] *= inv_s;
}
