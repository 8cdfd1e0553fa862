// Bias add with optional ReLU, in place, for the outputs of cuBLAS GEMMs (cuBLAS gives x = A*B;
// OPT's linear layers add a bias and fc1 follows with ReLU). Done as one pass so the activation is
// read and written once.
#include "common.cuh"

// x[r, c] = act(x[r, c] + bias[c]) over rows x cols. A grid-stride loop over elements: cols need
// not be even (opt-tiny-odd's vocab), so this uses scalar halves; the kernel is bandwidth-bound
// and fp16 scalar loads coalesce across the warp. The add is done in f32 and rounded once, as the
// CPU reference does.
extern "C" __global__ void bias_act_f16(__half* __restrict__ x, const __half* __restrict__ bias,
                                        long long rows, int cols, int relu) {
    const long long n = rows * (long long)cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float y = __half2float(x[i]) + __half2float(bias[i % cols]);
        if (relu) y = fmaxf(y, 0.0f);
        x[i] = __float2half_rn(y);
    }
}
