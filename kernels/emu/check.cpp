// Runs every kernel of kernels/*.cu under the CPU emulation (emu.h) against naive double-precision
// references on fresh random inputs, with the launch shapes the CUDA device uses
// (crates/backend-native/src/device/cuda/device.rs), and the 4-bit kernels against the CPU
// device's own outputs, which `cargo xtask check-kernels --emulate` writes to the file named by
// the first argument (xtask/src/emu_reference.rs). Prints one line per check and exits non-zero on
// any failure.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "../attention_decode.cu"
#include "../attention_prefill.cu"
#include "../attention_q4.cu"
#include "../compress.cu"
#include "../bias_relu.cu"
#include "../convert.cu"
#include "../embedding.cu"
#include "../kv_cache.cu"
#include "../layernorm.cu"
#include "../residual.cu"
#include "../sampling.cu"
#include "../softmax.cu"

static uint64_t g_state;
static double unit() {
    g_state ^= g_state << 13;
    g_state ^= g_state >> 7;
    g_state ^= g_state << 17;
    return (double)(g_state >> 11) / (double)(1ull << 53);
}
static std::vector<__half> halves(size_t n, float a) {
    std::vector<__half> v(n);
    for (auto& h : v) h = __float2half_rn((float)((unit() * 2 - 1) * a));
    return v;
}
static std::vector<float> wide(const std::vector<__half>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = __half2float(v[i]);
    return o;
}
static std::vector<__half> poison(size_t n) { return std::vector<__half>(n, __half{0x7e00}); }  // NaN: unwritten shows

static int g_failures = 0;
static void report(const std::string& name, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    double num = 0, den = 0;
    bool finite = true;
    for (size_t i = 0; i < got.size(); ++i) {
        finite &= std::isfinite(got[i]);
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    const double e = finite ? std::sqrt(num / std::max(den, 1e-300)) : INFINITY;
    const bool ok = e <= tol;
    std::printf("%-4s %-52s rel_err=%.3e tol=%.0e\n", ok ? "ok" : "FAIL", name.c_str(), e, tol);
    if (!ok) ++g_failures;
}
static void check(const std::string& name, bool ok, const std::string& detail) {
    std::printf("%-4s %-52s %s\n", ok ? "ok" : "FAIL", name.c_str(), detail.c_str());
    if (!ok) ++g_failures;
}

static const double TOL = 2e-3;

static void test_embedding() {
    const int vocab = 97, prow = 30, width = 80, n = 37;
    auto tok = halves(vocab * width, 1), pos = halves(prow * width, 1);
    std::vector<unsigned> ids(n), pids(n);
    for (auto& i : ids) i = (unsigned)(unit() * vocab);
    for (auto& i : pids) i = (unsigned)(unit() * prow);
    auto out = poison(n * width);
    emu_launch(gather_rows_f16, dim3(n), dim3(256), out.data(), (const __half*)tok.data(), (const unsigned*)ids.data(), n, width, vocab);
    emu_launch(add_gathered_rows_f16, dim3(n), dim3(256), out.data(), (const __half*)pos.data(), (const unsigned*)pids.data(), n, width, prow);
    std::vector<double> want(n * width);
    for (int t = 0; t < n; ++t)
        for (int c = 0; c < width; ++c) want[t * width + c] = __half2float(tok[ids[t] * width + c]) + __half2float(pos[pids[t] * width + c]);
    report("gather_rows + add_gathered_rows", wide(out), want, TOL);
}

static void test_layernorm() {
    for (auto [rows, cols, threads] : {std::tuple{5, 80, 256}, std::tuple{3, 2048, 512}}) {
        auto x = halves(rows * cols, 2);
        for (auto& h : x) h = __float2half_rn(__half2float(h) + 30.0f);
        auto w = halves(cols, 1.5), b = halves(cols, 0.5);
        auto out = poison(rows * cols);
        emu_launch(layernorm_f16, dim3(rows), dim3(threads), out.data(), (const __half*)x.data(), (const __half*)w.data(), (const __half*)b.data(), rows, cols, 1e-5f);
        std::vector<double> want(rows * cols);
        for (int r = 0; r < rows; ++r) {
            double m = 0, v = 0;
            for (int c = 0; c < cols; ++c) m += __half2float(x[r * cols + c]);
            m /= cols;
            for (int c = 0; c < cols; ++c) v += std::pow(__half2float(x[r * cols + c]) - m, 2);
            v /= cols;
            for (int c = 0; c < cols; ++c)
                want[r * cols + c] = (__half2float(x[r * cols + c]) - m) / std::sqrt(v + 1e-5) * __half2float(w[c]) + __half2float(b[c]);
        }
        report("layernorm " + std::to_string(rows) + "x" + std::to_string(cols), wide(out), want, TOL);
    }
}

static void test_elementwise() {
    const long long rows = 7;
    const int cols = 997;
    auto x = halves(rows * cols, 3), bias = halves(cols, 1), y = halves(rows * cols, 3);
    for (int relu = 0; relu < 2; ++relu) {
        auto t = x;
        emu_launch(bias_act_f16, dim3(4), dim3(256), t.data(), (const __half*)bias.data(), rows, cols, relu);
        std::vector<double> want(rows * cols);
        for (long long i = 0; i < rows * cols; ++i) {
            double v = (double)__half2float(x[i]) + __half2float(bias[i % cols]);
            want[i] = relu ? std::max(v, 0.0) : v;
        }
        report(relu ? "bias_act (relu)" : "bias_act", wide(t), want, TOL);
    }
    auto t = x;
    emu_launch(residual_add_f16, dim3(3), dim3(256), t.data(), (const __half*)t.data(), (const __half*)y.data(), rows * cols);
    std::vector<double> want(rows * cols);
    for (long long i = 0; i < rows * cols; ++i) want[i] = (double)__half2float(x[i]) + __half2float(y[i]);
    report("residual_add (in place)", wide(t), want, TOL);

    std::vector<float> f(rows * cols);
    for (auto& v : f) v = (float)((unit() * 2 - 1) * 1000);
    auto h = poison(f.size());
    std::vector<float> back(f.size(), NAN);
    emu_launch(f32_to_f16, dim3(2), dim3(256), h.data(), (const float*)f.data(), (long long)f.size());
    emu_launch(f16_to_f32, dim3(2), dim3(256), back.data(), (const __half*)h.data(), (long long)f.size());
    bool exact = true;
    for (size_t i = 0; i < f.size(); ++i) exact &= back[i] == __half2float(__float2half_rn(f[i]));
    check("f32_to_f16 + f16_to_f32", exact, exact ? "round trip exact" : "mismatch");
}

// Naive attention over a [B, H, max_len, D] cache with left padding and causality.
static std::vector<double> attention_ref(const std::vector<__half>& q, const std::vector<__half>& kc, const std::vector<__half>& vc,
                                         const std::vector<unsigned>& mask, int B, int H, int D, int max_len, int past, int nnew) {
    const int total = past + nnew;
    std::vector<double> out((size_t)B * nnew * H * D, 0.0);
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < nnew; ++i)
            for (int h = 0; h < H; ++h) {
                std::vector<double> s(total, -INFINITY);
                double m = -INFINITY;
                for (int j = 0; j <= past + i; ++j) {
                    if (!mask[b * total + j]) continue;
                    double acc = 0;
                    for (int d = 0; d < D; ++d)
                        acc += (double)__half2float(q[((size_t)(b * nnew + i)) * H * D + h * D + d]) *
                               __half2float(kc[(((size_t)b * H + h) * max_len + j) * D + d]);
                    s[j] = acc / std::sqrt((double)D);
                    m = std::max(m, s[j]);
                }
                if (m == -INFINITY) continue;
                double l = 0;
                for (int j = 0; j < total; ++j) l += s[j] == -INFINITY ? 0 : std::exp(s[j] - m);
                for (int d = 0; d < D; ++d) {
                    double o = 0;
                    for (int j = 0; j < total; ++j)
                        if (s[j] != -INFINITY) o += std::exp(s[j] - m) / l * __half2float(vc[(((size_t)b * H + h) * max_len + j) * D + d]);
                    out[((size_t)(b * nnew + i)) * H * D + h * D + d] = o;
                }
            }
    return out;
}

// Appends steps through kv_append_f16 and checks attention after each (prefill kernel when more
// than one new token, decode kernel with the device's split rule otherwise).
static void test_attention(int B, int H, int D, std::vector<int> steps, int sm_count) {
    int total_final = 0;
    for (int s : steps) total_final += s;
    const int max_len = total_final + 3;
    std::vector<unsigned> mask_final(B * total_final, 1);
    for (int b = 1; b < B; ++b) {
        const int pads = (int)(unit() * (steps[0] / 2 + 1));
        for (int j = 0; j < pads; ++j) mask_final[b * total_final + j] = 0;
    }
    std::vector<__half> kc(B * H * max_len * D, __half{0}), vc = kc;
    int past = 0;
    for (size_t st = 0; st < steps.size(); ++st) {
        const int nnew = steps[st], total = past + nnew, rows = B * nnew, hid = H * D;
        auto q = halves(rows * hid, 1), k = halves(rows * hid, 1), v = halves(rows * hid, 1);
        emu_launch(kv_append_f16, dim3(rows), dim3(256), kc.data(), (const __half*)k.data(), B, nnew, H, D, past, max_len);
        emu_launch(kv_append_f16, dim3(rows), dim3(256), vc.data(), (const __half*)v.data(), B, nnew, H, D, past, max_len);
        std::vector<unsigned> mask(B * total);
        for (int b = 0; b < B; ++b)
            for (int j = 0; j < total; ++j) mask[b * total + j] = mask_final[b * total_final + j];
        auto out = poison(rows * hid);
        const long long cs_s = D, cs_h = (long long)max_len * D, cs_b = (long long)H * max_len * D;
        const float scale = 1.0f / std::sqrt((float)D);
        std::string kind;
        if (nnew == 1) {
            // The split rule of CudaDevice::attention_decode.
            const int bh = B * H;
            const int min_splits = (total + 1023) / 1024;
            int want = std::max(1, std::min((2 * sm_count + bh - 1) / bh, (total + 63) / 64));
            int splits = std::max(want, min_splits);
            const int chunk = (total + splits - 1) / splits;
            splits = (total + chunk - 1) / chunk;
            std::vector<float> po((size_t)bh * splits * D, NAN), pml((size_t)bh * splits * 2, NAN);
            emu_launch(attention_decode_f16, dim3(H, B, splits), dim3(128), out.data(), po.data(), pml.data(), (const __half*)q.data(),
                       (long long)hid, (const __half*)kc.data(), (const __half*)vc.data(), cs_b, cs_h, cs_s, (const unsigned*)mask.data(),
                       (long long)total, H, D, total, chunk, (long long)hid, scale);
            if (splits > 1)
                emu_launch(attention_decode_reduce_f16, dim3(H, B), dim3(128), out.data(), (const float*)po.data(), (const float*)pml.data(), H, D,
                           splits, (long long)hid);
            kind = "decode(splits=" + std::to_string(splits) + ")";
        } else {
            emu_launch(attention_prefill_f16, dim3((nnew + 15) / 16, H, B), dim3(128), out.data(), (const __half*)q.data(), (const __half*)kc.data(),
                       (const __half*)vc.data(), cs_b, cs_h, cs_s, (const unsigned*)mask.data(), (long long)total, past, nnew, H, D, (long long)hid,
                       (long long)hid, scale);
            kind = "prefill";
        }
        auto want = attention_ref(q, kc, vc, mask, B, H, D, max_len, past, nnew);
        char name[128];
        std::snprintf(name, sizeof name, "attention %s b%d h%d d%d past%d new%d", kind.c_str(), B, H, D, past, nnew);
        report(name, wide(out), want, TOL);
        past = total;
    }
}

static void test_last_rows() {
    const int B = 3, S = 7, W = 200;
    auto x = halves(B * S * W, 2);
    auto out = poison(B * W);
    emu_launch(last_rows_f16, dim3(B), dim3(256), out.data(), (const __half*)x.data(), B, S, W);
    std::vector<double> want(B * W);
    for (int b = 0; b < B; ++b)
        for (int c = 0; c < W; ++c) want[b * W + c] = __half2float(x[((size_t)b * S + S - 1) * W + c]);
    report("last_rows", wide(out), want, 0);
}

static void test_sampling() {
    const int rows = 4, cols = 50272;
    auto x = halves(rows * cols, 8);
    x[123] = x[4567] = __float2half_rn(20.0f);  // a tie: the lowest index must win
    std::vector<int> ids(rows, -1);
    emu_launch(argmax_f16, dim3(rows), dim3(1024), ids.data(), (const __half*)x.data(), rows, cols);
    bool ok = ids[0] == 123;
    for (int r = 0; r < rows; ++r) {
        int best = 0;
        for (int c = 1; c < cols; ++c)
            if (__half2float(x[r * cols + c]) > __half2float(x[r * cols + best])) best = c;
        ok &= ids[r] == best;
    }
    check("argmax (ties to the lowest index)", ok, "ids " + std::to_string(ids[0]) + " " + std::to_string(ids[1]));

    const float t = 0.8f;
    std::vector<float> probs(rows * cols, NAN);
    emu_launch(softmax_f16_f32, dim3(rows), dim3(1024), probs.data(), (const __half*)x.data(), rows, cols, t);
    std::vector<double> want(rows * cols);
    for (int r = 0; r < rows; ++r) {
        double m = -INFINITY, s = 0;
        for (int c = 0; c < cols; ++c) m = std::max(m, (double)__half2float(x[r * cols + c]));
        for (int c = 0; c < cols; ++c) s += std::exp((__half2float(x[r * cols + c]) - m) / t);
        for (int c = 0; c < cols; ++c) want[r * cols + c] = std::exp((__half2float(x[r * cols + c]) - m) / t) / s;
    }
    report("softmax (temperature 0.8)", probs, want, 1e-4);

    std::vector<float> u(rows);
    for (auto& v : u) v = (float)unit();
    u[rows - 1] = 0.999999f;  // near the end of the CDF
    emu_launch(sample_temperature_f16, dim3(rows), dim3(1024), ids.data(), (const __half*)x.data(), (const float*)u.data(), rows, cols, t);
    bool in = true;
    std::string detail;
    for (int r = 0; r < rows; ++r) {
        double before = 0;
        for (int c = 0; c < ids[r]; ++c) before += want[r * cols + c];
        const double after = before + want[r * cols + ids[r]];
        in &= before - 1e-5 <= u[r] && u[r] <= after + 1e-5;
        detail += std::to_string(ids[r]) + " ";
    }
    check("sample_temperature (inverse CDF brackets u)", in, "ids " + detail);
}

// ---- the 4-bit kernels against the CPU device's answers ----
struct Blob {
    int kind = 0;
    size_t count = 0;
    std::vector<uint8_t> data;
};
static std::map<std::string, Blob> g_ref;

static bool load_reference(const char* path) {
    std::ifstream f(path, std::ios::binary);
    std::vector<uint8_t> all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (all.size() < 6 || std::string(all.begin(), all.begin() + 6) != "FBEMU1") return false;
    size_t at = 6;
    auto take = [&](void* dst, size_t n) {
        if (at + n > all.size()) throw std::runtime_error("truncated reference file");
        std::memcpy(dst, all.data() + at, n);
        at += n;
    };
    while (at < all.size()) {
        uint32_t len;
        take(&len, 4);
        std::string name(len, ' ');
        take(name.data(), len);
        Blob b;
        uint8_t kind;
        take(&kind, 1);
        b.kind = kind;
        uint64_t count;
        take(&count, 8);
        b.count = count;
        const size_t size = kind == 0 ? 1 : kind == 1 ? 2 : kind == 4 ? 8 : 4;
        b.data.resize(count * size);
        take(b.data.data(), b.data.size());
        g_ref[name] = b;
    }
    return true;
}

template <class T> static std::vector<T> ref(const std::string& name) {
    auto it = g_ref.find(name);
    if (it == g_ref.end()) throw std::runtime_error("reference file lacks " + name);
    std::vector<T> v(it->second.data.size() / sizeof(T));
    std::memcpy(v.data(), it->second.data.data(), v.size() * sizeof(T));
    return v;
}
static std::vector<double> as_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

static void test_q4_pack() {
    for (const char* name : {"pack_w", "pack_c"}) {
        const std::string n = name;
        const auto shape = ref<long long>(n + ".shape");
        const auto x = ref<__half>(n + ".x");
        const auto want = ref<uint8_t>(n + ".packed");
        std::vector<uint8_t> got(want.size(), 0xAB);  // unwritten bytes show
        emu_launch(q4_pack_f16, dim3(3), dim3(128), got.data(), (const __half*)x.data(), shape[0], (int)shape[1], shape[2]);
        size_t diff = 0;
        for (size_t i = 0; i < want.size(); ++i) diff += got[i] != want[i];
        check("q4_pack_f16 " + n + " (bytes = the CPU quantizer's)", diff == 0, std::to_string(diff) + " of " + std::to_string(want.size()) + " bytes differ");
        const auto decoded = ref<float>(n + ".decoded");
        auto out = poison(decoded.size());
        emu_launch(q4_unpack_f16, dim3(3), dim3(128), out.data(), (const uint8_t*)want.data(), shape[0], (int)shape[1], shape[2]);
        report("q4_unpack_f16 " + n, wide(out), as_double(decoded), TOL);
    }
}

static void test_kv_append_q4() {
    const auto s = ref<long long>("append.shape");  // b, h, d, max_len, past, new
    const auto src = ref<__half>("append.src");
    const auto want = ref<uint8_t>("append.cache");
    std::vector<uint8_t> got(want.size(), 0);
    emu_launch(kv_append_q4, dim3(2), dim3(128), got.data(), (const __half*)src.data(), (int)s[0], (int)s[5], (int)s[1], (int)s[2], (int)s[4], (int)s[3]);
    size_t diff = 0;
    for (size_t i = 0; i < want.size(); ++i) diff += got[i] != want[i];
    check("kv_append_q4 (bytes = the CPU cache's)", diff == 0, std::to_string(diff) + " of " + std::to_string(want.size()) + " bytes differ");
}

static void test_q4_matvec() {
    const auto s = ref<long long>("matvec.shape");  // k, m
    const int k = (int)s[0], m = (int)s[1];
    const auto w = ref<uint8_t>("matvec.w");
    const auto bias = ref<__half>("matvec.bias");
    for (int n : {1, 4, 6}) {
        const auto x = ref<__half>("matvec.x" + std::to_string(n));
        const auto want = ref<float>("matvec.y" + std::to_string(n));
        auto y = poison((size_t)n * m);
        // the device's launches: rows of x 4 at a time, columns in chunks of 128
        const int kchunk = 128, chunks = (k + kchunk - 1) / kchunk;
        for (int i0 = 0; i0 < n; i0 += 4) {
            const int nn = std::min(4, n - i0);
            std::vector<float> part((size_t)chunks * nn * m, NAN);
            emu_launch(q4_matvec_f16, dim3((m + 63) / 64, chunks), dim3(128), part.data(), (const __half*)x.data() + (size_t)i0 * k, (const uint8_t*)w.data(), nn, k, m, kchunk);
            emu_launch(q4_matvec_reduce_f16, dim3(2), dim3(256), y.data() + (size_t)i0 * m, (const float*)part.data(), (const __half*)bias.data(), nn, m, chunks, 1);
        }
        report("q4_matvec_f16 + reduce (bias, relu) n=" + std::to_string(n), wide(y), as_double(want), TOL);
    }
}

static void test_q4_gather() {
    const auto s = ref<long long>("gather.shape");
    const int rows = (int)s[0], width = (int)s[1];
    const auto table = ref<uint8_t>("gather.table");
    const auto ids = ref<unsigned>("gather.ids");
    const auto want = ref<float>("gather.rows");
    const int n = (int)ids.size();
    auto out = poison((size_t)n * width);
    emu_launch(gather_rows_q4, dim3(n), dim3(256), out.data(), (const uint8_t*)table.data(), (const unsigned*)ids.data(), n, width, rows);
    report("gather_rows_q4", wide(out), as_double(want), TOL);
    std::vector<__half> acc((size_t)n * width, __float2half_rn(0.0f));
    emu_launch(add_gathered_rows_q4, dim3(n), dim3(256), acc.data(), (const uint8_t*)table.data(), (const unsigned*)ids.data(), n, width, rows);
    report("add_gathered_rows_q4", wide(acc), as_double(want), TOL);
}

static void test_q4_attention() {
    for (const char* kv : {"q4", "f16"})
        for (int d : {64, 80})
            for (int s10 : {10, 3}) {
                const std::string name = std::string("attn.") + kv + ".d" + std::to_string(d) + ".s" + std::to_string(s10);
                if (!g_ref.count(name + ".shape")) continue;
                const auto sh = ref<long long>(name + ".shape");  // b, h, d, max_len, len
                const int B = (int)sh[0], H = (int)sh[1], D = (int)sh[2], max_len = (int)sh[3], len = (int)sh[4];
                const double sparsity = ref<float>(name + ".sparsity")[0];
                const auto q = ref<__half>(name + ".q"), kn = ref<__half>(name + ".k_new"), vn = ref<__half>(name + ".v_new");
                const auto kc = ref<uint8_t>(name + ".k_cache"), vc = ref<uint8_t>(name + ".v_cache");
                const auto mask = ref<unsigned>(name + ".mask");
                const auto want = ref<float>(name + ".out");
                const long long hid = (long long)H * D;
                const float scale = 1.0f / std::sqrt((float)D);
                const bool q4 = std::string(kv) == "q4";
                const long long rb = 36LL * ((D + 63) / 64);
                auto run_dense = [&](int chunk, bool fresh) {
                    auto out = poison((size_t)B * hid);
                    const int splits = (len + chunk - 1) / chunk;
                    std::vector<float> po((size_t)B * H * splits * D, NAN), pml((size_t)B * H * splits * 2, NAN);
                    emu_launch(attention_decode_q4, dim3(H, B, splits), dim3(128), out.data(), po.data(), pml.data(), (const __half*)q.data(), hid,
                               (const uint8_t*)kc.data(), (const uint8_t*)vc.data(), (long long)H * max_len, (long long)max_len, rb,
                               fresh ? (const __half*)kn.data() : nullptr, fresh ? (const __half*)vn.data() : nullptr, hid,
                               (const unsigned*)mask.data(), (long long)len, H, D, len, chunk, hid, scale);
                    if (splits > 1)
                        emu_launch(attention_decode_reduce_f16, dim3(H, B), dim3(128), out.data(), (const float*)po.data(), (const float*)pml.data(), H, D, splits, hid);
                    const auto expected = fresh ? want : ref<float>(name + ".out_from_cache");
                    report(name + " attention_decode_q4 splits=" + std::to_string(splits) + (fresh ? "" : " (all from the cache)"), wide(out),
                           as_double(expected), TOL);
                };
                if (q4 && sparsity >= 1.0) {
                    run_dense(len, true);
                    run_dense(16, true);
                    run_dense(16, false);
                    continue;
                }
                auto out = poison((size_t)B * hid);
                if (q4) {
                    emu_launch(attention_decode_sparse_q4, dim3(H, B), dim3(128), out.data(), (const __half*)q.data(), hid, (const uint8_t*)kc.data(),
                               (const uint8_t*)vc.data(), (long long)H * max_len, (long long)max_len, rb, (const __half*)kn.data(), (const __half*)vn.data(), hid,
                               (const unsigned*)mask.data(), (long long)len, D, len, hid, scale, sparsity);
                } else {
                    emu_launch(attention_decode_sparse_f16, dim3(H, B), dim3(128), out.data(), (const __half*)q.data(), hid, (const __half*)kc.data(),
                               (const __half*)vc.data(), (long long)H * max_len * D, (long long)max_len * D, (long long)D, (const unsigned*)mask.data(),
                               (long long)len, D, len, hid, scale, sparsity);
                }
                report(name + " attention_decode_sparse_" + kv, wide(out), as_double(want), TOL);
            }
}

int main(int argc, char** argv) {
    const char* seed_env = std::getenv("FLEXBENCH_TEST_SEED");
    g_state = seed_env ? std::strtoull(seed_env, nullptr, 10) : (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count();
    g_state |= 1;
    std::printf("emulated kernel check, seed %llu (FLEXBENCH_TEST_SEED replays it)\n", (unsigned long long)g_state);
    test_embedding();
    test_layernorm();
    test_elementwise();
    test_last_rows();
    // H100: 132 SMs. Few heads and batch force the decode split path; long caches force several
    // prefill tiles and multiple K tiles; head_dim 8 (golden fixtures), 16, 80, 128.
    test_attention(3, 4, 16, {9, 1, 1, 3}, 132);
    test_attention(2, 2, 80, {37, 1, 2, 1}, 132);
    test_attention(2, 2, 128, {70, 1}, 132);
    test_attention(1, 2, 8, {5, 1, 1}, 132);
    test_attention(1, 1, 64, {300, 1, 40, 1}, 132);
    test_attention(1, 1, 64, {1, 1}, 132);
    test_sampling();
    if (argc > 1) {
        if (!load_reference(argv[1])) {
            std::printf("FAIL could not read the CPU reference file %s\n", argv[1]);
            return 1;
        }
        test_q4_pack();
        test_kv_append_q4();
        test_q4_matvec();
        test_q4_gather();
        test_q4_attention();
    } else {
        std::printf("note: no CPU reference file given, the 4-bit kernels are not checked\n");
    }
    if (g_failures) {
        std::printf("%d check(s) FAILED\n", g_failures);
        return 1;
    }
    std::printf("all emulated kernel checks passed\n");
    return 0;
}
