/* Read-only memory bandwidth: every thread XOR-reduces its own slice of one large buffer.
 *
 * Written for flute's CPU benchmark (flute/bench/toolchain.py compiles it with the system C
 * compiler, -O3 -march=native -fopenmp). The buffer is filled first (pages touched by the thread
 * that later reads them), then swept `runs` times; each sweep is timed with a monotonic clock and
 * the median is reported. XOR of 64-bit words vectorizes to one instruction per 64-byte load, so
 * the sweep is bound by memory reads, not by arithmetic.
 *
 * Usage: read_bw MIB THREADS RUNS  ->  one JSON line: {"bytes", "threads", "runs", "median_gbps",
 *        "best_gbps"}
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MIB THREADS RUNS\n", argv[0]);
        return 2;
    }
    size_t bytes = (size_t)atol(argv[1]) << 20;
    int threads = atoi(argv[2]), runs = atoi(argv[3]);
    if (threads < 1 || runs < 1 || bytes < (1u << 20)) return 2;
    size_t n = bytes / sizeof(uint64_t);
    uint64_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, n * sizeof(uint64_t))) return 3;
    omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;
    double *t = malloc(sizeof(double) * runs);
    uint64_t sink = 0;
    for (int r = -1; r < runs; ++r) { /* r = -1: warm-up sweep */
        uint64_t acc = 0;
        double t0 = now_s();
#pragma omp parallel for schedule(static) reduction(^ : acc)
        for (size_t i = 0; i < n; ++i) acc ^= buf[i];
        double dt = now_s() - t0;
        sink ^= acc;
        if (r >= 0) t[r] = dt;
    }
    qsort(t, runs, sizeof(double), cmp);
    double med = runs % 2 ? t[runs / 2] : 0.5 * (t[runs / 2 - 1] + t[runs / 2]);
    printf("{\"bytes\": %zu, \"threads\": %d, \"runs\": %d, \"median_gbps\": %.3f, "
           "\"best_gbps\": %.3f, \"checksum\": %llu}\n",
           n * sizeof(uint64_t), threads, runs, n * sizeof(uint64_t) / med / 1e9,
           n * sizeof(uint64_t) / t[0] / 1e9, (unsigned long long)(sink & 0xffff));
    free(t);
    free(buf);
    return 0;
}
