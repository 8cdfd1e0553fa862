// A CPU emulation of the small part of CUDA that kernels/*.cu use, so that `cargo xtask
// check-kernels --emulate` can run every kernel on a machine without a GPU: one OS thread per
// CUDA thread, blocks run one after another (so `__shared__` can be a function-local static),
// warp shuffles go through a per-warp exchange buffer between two warp barriers, and fp16 is
// emulated bit-exactly (round to nearest even).
// Between two __syncthreads only one warp runs at a time, the warps taking turns in a random
// order drawn per phase: a missing __syncthreads (one warp reading shared memory another warp
// writes in the same phase) then reads stale data deterministically often instead of by luck.
// It checks indexing, synchronisation and numerics, not speed.
#pragma once
#include <algorithm>
#include <barrier>
#include <condition_variable>
#include <mutex>
#include <random>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct uint3_emu { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local uint3_emu threadIdx;
inline uint3_emu blockIdx;
inline uint3_emu blockDim;
inline uint3_emu gridDim;

// ---- fp16 ----
struct __half { uint16_t x; };
struct __half2 { __half a, b; };
struct float2 { float x, y; };
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

inline float __half2float(__half h) {
    const uint32_t s = (h.x >> 15) & 1, e = (h.x >> 10) & 31, m = h.x & 1023;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
inline __half __float2half_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = (u >> 16) & 0x8000;
    const float a = std::fabs(f);
    if (std::isnan(f)) return __half{(uint16_t)(sign | 0x7e00)};
    if (a >= 65520.0f) return __half{(uint16_t)(sign | 0x7c00)};  // rounds to infinity
    if (a < std::ldexp(1.0f, -14)) {  // subnormal: multiples of 2^-24
        const float q = std::nearbyint(a * std::ldexp(1.0f, 24));  // ties to even (default mode)
        return __half{(uint16_t)(sign | (uint16_t)q)};
    }
    int ex;
    const float fr = std::frexp(a, &ex);  // a = fr * 2^ex, fr in [0.5, 1)
    float mant = std::nearbyint(fr * 2048.0f);  // 11 significant bits, ties to even
    if (mant == 2048.0f) {
        mant = 1024.0f;
        ex += 1;
    }
    const int e = ex - 1 + 15;
    if (e >= 31) return __half{(uint16_t)(sign | 0x7c00)};
    return __half{(uint16_t)(sign | (e << 10) | ((int)mant - 1024))};
}
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.a), __half2float(h.b)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }

// ---- math ----
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __int_as_float(unsigned i) { return __int_as_float((int)i); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

// ---- synchronisation ----
struct EmuBlock {
    std::mutex mu;
    std::condition_variable cv;
    int nwarps = 0;
    std::vector<int> order;  // the warps' turns in this phase
    int turn = 0;            // index into order of the warp that may run
    int phase = 0;
    std::vector<int> arrived, alive;  // per warp, at the current __syncthreads / not exited
    std::mt19937_64 rng;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> xchg;  // 32 slots per warp

    bool warp_done(int w) const { return arrived[w] == alive[w]; }
    // The running warp has reached the barrier or exited: hand the turn on, and start the next
    // phase (new random order) once every warp is through.
    void advance() {
        do ++turn;
        while (turn < nwarps && warp_done(order[turn]));
        if (turn < nwarps) return;
        bool any = false;
        for (int w = 0; w < nwarps; ++w) any |= alive[w] > 0;
        if (!any) return;
        ++phase;
        std::fill(arrived.begin(), arrived.end(), 0);
        std::shuffle(order.begin(), order.end(), rng);
        turn = 0;
        while (turn < nwarps && alive[order[turn]] == 0) ++turn;
    }
    bool my_turn(int w) const { return turn < nwarps && order[turn] == w; }
};
inline EmuBlock* g_emu = nullptr;
inline uint64_t g_emu_seed = 1;

inline void __syncthreads() {
    EmuBlock& b = *g_emu;
    const int w = threadIdx.x / 32;
    std::unique_lock<std::mutex> lk(b.mu);
    const int my_phase = b.phase;
    if (++b.arrived[w] == b.alive[w]) {
        b.advance();
        b.cv.notify_all();
    }
    b.cv.wait(lk, [&] { return b.phase != my_phase && b.my_turn(w); });
}
inline void __syncwarp(unsigned = 0xffffffffu) { g_emu->warps[threadIdx.x / 32]->arrive_and_wait(); }
template <class T> inline T emu_shfl(T v, int src) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    std::memcpy(&g_emu->xchg[w * 32 + l], &v, sizeof(T));
    __syncwarp();
    T r;
    std::memcpy(&r, &g_emu->xchg[w * 32 + src], sizeof(T));
    __syncwarp();
    return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, (int)(threadIdx.x % 32) ^ o); }
template <class T> inline T __shfl_up_sync(unsigned, T v, int d) {
    const int l = threadIdx.x % 32;
    return emu_shfl(v, l >= d ? l - d : l);
}

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// Runs kernel `f` over `grid` x `block` (block: x only, a multiple of 32).
template <class F, class... A> void emu_launch(F f, dim3 grid, dim3 block, A... args) {
    const unsigned n = block.x;
    blockDim = {block.x, 1, 1};
    gridDim = {grid.x, grid.y, grid.z};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                EmuBlock b;
                b.nwarps = (int)((n + 31) / 32);
                b.order.resize(b.nwarps);
                for (int w = 0; w < b.nwarps; ++w) b.order[w] = w;
                b.rng.seed(g_emu_seed++);
                std::shuffle(b.order.begin(), b.order.end(), b.rng);
                b.arrived.assign(b.nwarps, 0);
                b.alive.assign(b.nwarps, 0);
                for (unsigned t = 0; t < n; ++t) b.alive[t / 32]++;
                for (int w = 0; w < b.nwarps; ++w) b.warps.push_back(std::make_unique<std::barrier<>>(b.alive[w]));
                b.xchg.assign((size_t)b.nwarps * 32, 0);
                g_emu = &b;
                std::vector<std::thread> ts;
                ts.reserve(n);
                for (unsigned t = 0; t < n; ++t)
                    ts.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        const int w = (int)(t / 32);
                        {
                            std::unique_lock<std::mutex> lk(b.mu);
                            b.cv.wait(lk, [&] { return b.phase == 0 && b.my_turn(w); });
                        }
                        f(args...);
                        // An exited thread no longer takes part in barriers, as on the GPU.
                        b.warps[w]->arrive_and_drop();
                        std::unique_lock<std::mutex> lk(b.mu);
                        --b.alive[w];
                        if (b.my_turn(w) && b.warp_done(w)) {
                            b.advance();
                            b.cv.notify_all();
                        }
                    });
                for (auto& t : ts) t.join();
                g_emu = nullptr;
            }
}
