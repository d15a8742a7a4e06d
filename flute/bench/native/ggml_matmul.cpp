// Times ggml's CPU matrix multiplication (the kernels llama.cpp runs) at arbitrary shapes.
//
// Written for flute's CPU benchmark (flute/bench/peers.py builds it against a ggml built from the
// llama.cpp tree of the llama-cpp-python sdist). Only ggml's public API is used:
//   weights W [N rows, K columns] of one ggml type, quantized from random floats with
//   ggml_quantize_chunk, stored in `copies` separate tensors (rotated so that each call reads its
//   weight from memory, not from the last-level cache); activations x [M, K] float32;
//   y = ggml_mul_mat(W, x) computed by the CPU backend (ggml_backend_graph_compute) with the
//   given thread count. With --repack the weights live in the CPU backend's CPU_REPACK buffer type
//   (row-interleaved layouts that llama.cpp uses for model weights by default) when ggml has a
//   repacked kernel for the type and shape.
//
// Usage: ggml_matmul --type q4_0 --n 4096 --k 4096 --m 1,16 --threads 1,2 --copies 8
//                    [--repack] [--target-ms 300] [--min-runs 10] [--max-runs 2000]
//                    [--budget-ms 3000] [--hot] [--qcache PATH]
// --budget-ms caps a slow point: fewer than --min-runs samples (at least one) when one call takes
// so long that --min-runs of them would exceed it. --qcache: the quantized weight's bytes are read
// from PATH when it holds exactly their size, else quantized and written there. Quantizing is most
// of a large shape's run (14336x4096: ~140 s of a ~150 s round for the 4 types), and the bytes
// are the same every time (fixed seed), so later rounds of one benchmark reuse them.
// Output: one JSON object per line and (threads, M, cache) point on stdout; errors on stderr.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static std::vector<int> parse_list(const char *s) {
    std::vector<int> out;
    std::string cur;
    for (const char *p = s;; ++p) {
        if (*p == ',' || *p == '\0') {
            if (!cur.empty()) out.push_back(std::atoi(cur.c_str()));
            cur.clear();
            if (*p == '\0') break;
        } else {
            cur += *p;
        }
    }
    return out;
}

static ggml_type parse_type(const std::string &name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char *n = ggml_type_name((ggml_type) t);
        if (n && name == n) return (ggml_type) t;
    }
    return GGML_TYPE_COUNT;
}

static ggml_backend_buffer_type_t repack_buffer_type() {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    auto get = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        reg, "ggml_backend_dev_get_extra_bufts");
    if (!get) return nullptr;
    for (ggml_backend_buffer_type_t *b = get(dev); b && *b; ++b) {
        if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
    }
    return nullptr;
}

static double now_ms() {
    using clk = std::chrono::steady_clock;  // monotonic
    return std::chrono::duration<double, std::milli>(clk::now().time_since_epoch()).count();
}

static double quantile(std::vector<double> v, double q) {
    std::sort(v.begin(), v.end());
    size_t i = (size_t) std::lround(q * (double) (v.size() - 1));
    return v[std::min(i, v.size() - 1)];
}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
    std::string type_name = "q4_0";
    int64_t N = 4096, K = 4096;
    std::vector<int> Ms = {1}, threads = {1};
    int copies = 1, min_runs = 10, max_runs = 2000;
    double target_ms = 300.0, budget_ms = 1e30;
    bool repack = false, hot = false;
    std::string qcache;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) { std::fprintf(stderr, "missing value for %s\n", a.c_str()); std::exit(2); }
            return argv[++i];
        };
        if (a == "--type") type_name = next();
        else if (a == "--n") N = std::atoll(next());
        else if (a == "--k") K = std::atoll(next());
        else if (a == "--m") Ms = parse_list(next());
        else if (a == "--threads") threads = parse_list(next());
        else if (a == "--copies") copies = std::max(1, std::atoi(next()));
        else if (a == "--target-ms") target_ms = std::atof(next());
        else if (a == "--min-runs") min_runs = std::max(1, std::atoi(next()));
        else if (a == "--max-runs") max_runs = std::max(1, std::atoi(next()));
        else if (a == "--budget-ms") budget_ms = std::atof(next());
        else if (a == "--repack") repack = true;
        else if (a == "--hot") hot = true;
        else if (a == "--qcache") qcache = next();
        else { std::fprintf(stderr, "unknown argument %s\n", a.c_str()); return 2; }
    }
    ggml_type type = parse_type(type_name);
    if (type == GGML_TYPE_COUNT) { std::fprintf(stderr, "unknown ggml type %s\n", type_name.c_str()); return 2; }
    if (K % ggml_blck_size(type) != 0) {
        std::fprintf(stderr, "K=%lld is not a multiple of the %s block size %lld\n", (long long) K,
                     type_name.c_str(), (long long) ggml_blck_size(type));
        return 3;
    }
    if (ggml_quantize_requires_imatrix(type)) {
        std::fprintf(stderr, "%s needs an importance matrix\n", type_name.c_str());
        return 3;
    }
    ggml_time_init();
    ggml_cpu_init();

    // Random weights (normal, std 0.02), quantized once; every copy holds the same bytes.
    const size_t row_bytes = ggml_row_size(type, K);
    const size_t w_bytes = row_bytes * (size_t) N;
    std::vector<uint8_t> qdata(w_bytes);
    bool cached = false;
    if (!qcache.empty()) {
        if (FILE *f = std::fopen(qcache.c_str(), "rb")) {
            cached = std::fread(qdata.data(), 1, w_bytes, f) == w_bytes && std::fgetc(f) == EOF;
            std::fclose(f);
        }
    }
    if (!cached) {
        std::vector<float> src((size_t) N * K);
        std::mt19937 rng(1234);
        std::normal_distribution<float> nd(0.0f, 0.02f);
        for (auto &v : src) v = nd(rng);
        size_t got = ggml_quantize_chunk(type, src.data(), qdata.data(), 0, N, K, nullptr);
        if (got != w_bytes) { std::fprintf(stderr, "quantize wrote %zu bytes, expected %zu\n", got, w_bytes); return 4; }
        if (!qcache.empty()) {  // written whole, then renamed: a reader never sees a partial file
            const std::string tmp = qcache + ".part";
            FILE *f = std::fopen(tmp.c_str(), "wb");
            const bool ok = f && std::fwrite(qdata.data(), 1, w_bytes, f) == w_bytes;
            if (f) std::fclose(f);
            if (!ok || std::rename(tmp.c_str(), qcache.c_str()) != 0) std::remove(tmp.c_str());
        }
    }

    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    const char *layout = "plain";
    if (repack) {
        buft = repack_buffer_type();
        if (!buft) { std::fprintf(stderr, "this ggml has no CPU_REPACK buffer type\n"); return 5; }
        layout = "repack";
    }

    const int n_w = hot ? 1 : copies;
    ggml_init_params wp = {ggml_tensor_overhead() * (size_t) (n_w + 1), nullptr, true};
    ggml_context *wctx = ggml_init(wp);
    std::vector<ggml_tensor *> W(n_w);
    for (int c = 0; c < n_w; ++c) W[c] = ggml_new_tensor_2d(wctx, type, K, N);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft);
    if (!wbuf) { std::fprintf(stderr, "could not allocate %d weight copies of %zu bytes\n", n_w, w_bytes); return 6; }
    if (repack && W[0]->extra == nullptr) {
        std::fprintf(stderr, "ggml has no repacked kernel for %s at N=%lld\n", type_name.c_str(), (long long) N);
        return 7;
    }
    for (int c = 0; c < n_w; ++c) ggml_backend_tensor_set(W[c], qdata.data(), 0, w_bytes);

    ggml_backend_t be = ggml_backend_cpu_init();
    std::mt19937 rng(99);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (int t : threads) {
        ggml_backend_cpu_set_n_threads(be, t);
        for (int M : Ms) {
            ggml_init_params cp = {ggml_tensor_overhead() * (size_t) (2 * n_w + 4) +
                                       ggml_graph_overhead() * (size_t) n_w, nullptr, true};
            ggml_context *cctx = ggml_init(cp);
            ggml_tensor *x = ggml_new_tensor_2d(cctx, GGML_TYPE_F32, K, M);
            std::vector<ggml_cgraph *> graphs(n_w);
            for (int c = 0; c < n_w; ++c) {
                ggml_tensor *y = ggml_mul_mat(cctx, W[c], x);
                graphs[c] = ggml_new_graph(cctx);
                ggml_build_forward_expand(graphs[c], y);
            }
            ggml_backend_buffer_t cbuf = ggml_backend_alloc_ctx_tensors(cctx, be);
            std::vector<float> xv((size_t) M * K);
            for (auto &v : xv) v = nd(rng);
            ggml_backend_tensor_set(x, xv.data(), 0, xv.size() * sizeof(float));

            int call = 0;
            auto one = [&]() {
                double t0 = now_ms();
                if (ggml_backend_graph_compute(be, graphs[call % n_w]) != GGML_STATUS_SUCCESS) {
                    std::fprintf(stderr, "graph compute failed\n");
                    std::exit(8);
                }
                ++call;
                return now_ms() - t0;
            };
            double first = 0.0;
            for (int w = 0; w < std::max(3, std::min(n_w, 8)); ++w) first = one();  // warm-up
            int runs = (int) std::ceil(target_ms / std::max(first, 1e-3));
            runs = std::max(min_runs, std::min(max_runs, runs));
            if (runs * first > budget_ms) runs = std::max(1, std::min(runs, (int) (budget_ms / first)));
            std::vector<double> samples;
            samples.reserve(runs);
            for (int r = 0; r < runs; ++r) samples.push_back(one());
            std::printf("{\"type\": \"%s\", \"layout\": \"%s\", \"N\": %lld, \"K\": %lld, \"M\": %d, "
                        "\"threads\": %d, \"copies\": %d, \"cache\": \"%s\", \"weight_bytes\": %zu, "
                        "\"median_ms\": %.6f, \"p10_ms\": %.6f, \"p90_ms\": %.6f, \"runs\": %d}\n",
                        type_name.c_str(), layout, (long long) N, (long long) K, M, t, n_w,
                        hot ? "hot" : "cold", w_bytes, median(samples), quantile(samples, 0.1),
                        quantile(samples, 0.9), runs);
            std::fflush(stdout);
            ggml_backend_buffer_free(cbuf);
            ggml_free(cctx);
        }
    }
    ggml_backend_free(be);
    ggml_backend_buffer_free(wbuf);
    ggml_free(wctx);
    return 0;
}
