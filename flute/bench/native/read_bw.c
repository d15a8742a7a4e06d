/* Read-only memory bandwidth: every thread XOR-reduces its own slice of one large buffer.
 *
 * Written for flute's CPU benchmark (flute/bench/toolchain.py compiles it with the system C
 * compiler, -O3 -march=native -fopenmp). The buffer is filled first (pages touched by the thread
 * that later reads them), then swept `runs` times; each sweep is timed with a monotonic clock and
 * the median is reported. XOR of 64-bit words vectorizes to one instruction per 64-byte load, so
 * the sweep is bound by memory reads, not by arithmetic.
 *
 * STREAMS (default 1) splits each thread's slice into that many equal parts read in turn, one
 * 64-byte line of each per step, the parts SKEW_WORDS apart so that their addresses do not alias.
 * One core of a Zen 3 VM read 1.4-1.7x more from three runs than from one (15.7-25.7 against
 * 9.3-18.6 GB/s), about what torch's fp32 matrix-vector product reads there, so a one-run sweep
 * understates what a core can read (benchmarks/CPU_NOTES.md item 128).
 *
 * PREFETCH (bytes, default 0 = none) adds a software prefetch that far ahead in each run, as the
 * flute kernels issue one: on the Intel AMX VM four runs with a 2 KB prefetch read 5-8% more than
 * without at 1 thread and 2-4% more at 2 (CPU_NOTES item 164), so without it the roofline was not
 * a ceiling for a kernel that prefetches.
 *
 * Usage: read_bw MIB THREADS RUNS [STREAMS [PREFETCH]]  ->  one JSON line: {"bytes", "threads",
 *        "streams", "prefetch", "runs", "median_gbps", "best_gbps", "checksum" (the XOR of all
 *        words)}
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

#define MAX_STREAMS 8
#ifndef SKEW_WORDS
#define SKEW_WORDS 296
#endif

/* XOR of the words [b, e) read as `streams` equal runs in turn, one 64-byte line of each per
 * step (the fixed 8-word inner loop vectorizes); the skew gaps and the rest of an uneven split
 * are read last. With `prefetch`, a software prefetch `ahead` words ahead in each run. Always
 * inlined with a constant `prefetch`, so that each call gets its own loop: a prefetch branch
 * left inside the loop kept GCC from vectorizing the XOR (one run then read 5 GB/s instead of 14). */
static inline __attribute__((always_inline)) uint64_t sweep(const uint64_t *buf, size_t b, size_t e,
                                                            int streams, int prefetch, size_t ahead) {
    uint64_t acc[8] = {0};
    size_t skew = streams > 1 ? SKEW_WORDS : 0;
    size_t len = (e - b - (streams - 1) * skew) / streams / 8 * 8, start[MAX_STREAMS];
    for (int s = 0; s < streams; ++s) start[s] = b + s * (len + skew);
    for (size_t i = 0; i < len; i += 8)
        for (int s = 0; s < streams; ++s) {
            const uint64_t *p = buf + start[s] + i;
            if (prefetch) __builtin_prefetch(p + ahead, 0, 3);
            for (int k = 0; k < 8; ++k) acc[k] ^= p[k];
        }
    for (size_t i = b + streams * len + (streams - 1) * skew; i < e; ++i) acc[i % 8] ^= buf[i];
    for (int s = 1; s < streams; ++s)
        for (size_t i = start[s] - skew; i < start[s]; ++i) acc[i % 8] ^= buf[i];
    uint64_t r = 0;
    for (int k = 0; k < 8; ++k) r ^= acc[k];
    return r;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MIB THREADS RUNS [STREAMS]\n", argv[0]);
        return 2;
    }
    size_t bytes = (size_t)atol(argv[1]) << 20;
    int threads = atoi(argv[2]), runs = atoi(argv[3]), streams = argc > 4 ? atoi(argv[4]) : 1;
    long prefetch = argc > 5 ? atol(argv[5]) : 0;
    if (threads < 1 || runs < 1 || bytes < (1u << 20) || streams < 1 || streams > MAX_STREAMS ||
        prefetch < 0 || prefetch % 64)
        return 2;
    size_t n = bytes / sizeof(uint64_t);
    uint64_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, n * sizeof(uint64_t))) return 3;
    omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;
    double *t = malloc(sizeof(double) * runs);
    uint64_t xor_all = 0; /* the XOR of every word, from the last sweep (tests check it) */
    for (int r = -1; r < runs; ++r) { /* r = -1: warm-up sweep */
        uint64_t acc = 0;
        double t0 = now_s();
#pragma omp parallel reduction(^ : acc)
        {
            size_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            size_t b = n * t / nt, e = n * (t + 1) / nt;
            acc ^= prefetch > 0 ? sweep(buf, b, e, streams, 1, (size_t)prefetch / 8) : sweep(buf, b, e, streams, 0, 0);
        }
        double dt = now_s() - t0;
        xor_all = acc;
        if (r >= 0) t[r] = dt;
    }
    qsort(t, runs, sizeof(double), cmp);
    double med = runs % 2 ? t[runs / 2] : 0.5 * (t[runs / 2 - 1] + t[runs / 2]);
    printf("{\"bytes\": %zu, \"threads\": %d, \"streams\": %d, \"prefetch\": %ld, \"runs\": %d, "
           "\"median_gbps\": %.3f, \"best_gbps\": %.3f, \"checksum\": %llu}\n",
           n * sizeof(uint64_t), threads, streams, prefetch, runs, n * sizeof(uint64_t) / med / 1e9,
           n * sizeof(uint64_t) / t[0] / 1e9, (unsigned long long)xor_all);
    free(t);
    free(buf);
    return 0;
}
