/* What one core of this CPU can do at most, to judge a kernel's figures against:

       cc -O2 benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak

   - its clock while busy: a chain of dependent integer additions (one a cycle on every x86 core
     since the Pentium 4), which /proc/cpuinfo's "cpu MHz" does not give on a machine whose cores
     boost (a 2-vCPU Zen 5 EPYC reports 2.6 GHz and runs at about 4.2);
   - its fp32 multiply-adds per second: 12 independent chains of FMAs, 256-bit (AVX2) and, where the
     CPU has it, 512-bit (AVX-512), long enough for the FMA units' latency to be hidden.

   One thread; run it on an idle core (a busy machine gives less). Prints GHz and GFLOP/s
   (an FMA is two operations), each the best of five runs. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double clock_ghz(void) {
    const long n = 500000000;
    unsigned long x = 0;
    const double start = now();
    for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    return 4.0 * n / (now() - start) / 1e9;
}

#define CHAINS 12
#define FMA_RATE(name, isa, type, set1, fmadd, lanes)                                                 \
    __attribute__((target(isa))) static double name(void) {                                           \
        const long n = 50000000;                                                                      \
        type acc[CHAINS], m = set1(1.0000001f), c = set1(1e-7f);                                      \
        for (int j = 0; j < CHAINS; j++) acc[j] = set1((float)j);                                     \
        const double start = now();                                                                   \
        for (long i = 0; i < n; i++) {                                                                \
            _Pragma("GCC unroll 12") /* the chains in registers */                                    \
            for (int j = 0; j < CHAINS; j++) acc[j] = fmadd(acc[j], m, c);                            \
        }                                                                                             \
        const double seconds = now() - start;                                                         \
        float kept = 0, part[lanes]; /* the sums used, so that the loop is not dropped */             \
        for (int j = 0; j < CHAINS; j++) {                                                            \
            __builtin_memcpy(part, &acc[j], sizeof(part));                                            \
            kept += part[0];                                                                          \
        }                                                                                             \
        __asm__ volatile("" : : "x"(kept));                                                           \
        return 2.0 * lanes * CHAINS * n / seconds / 1e9;                                              \
    }

FMA_RATE(avx2_gflops, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, 8)
FMA_RATE(avx512_gflops, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, 16)

static double best(double (*run)(void)) {
    double most = 0;
    for (int i = 0; i < 5; i++) {
        const double r = run();
        if (r > most) most = r;
    }
    return most;
}

int main(void) {
    __builtin_cpu_init();
    const double ghz = best(clock_ghz);
    printf("clock while busy: %.2f GHz\n", ghz);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        const double r = best(avx2_gflops);
        printf("256-bit FMA: %.1f GFLOP/s a core (%.1f fp32 operations a cycle)\n", r, r / ghz);
    }
    if (__builtin_cpu_supports("avx512f")) {
        const double r = best(avx512_gflops);
        printf("512-bit FMA: %.1f GFLOP/s a core (%.1f fp32 operations a cycle)\n", r, r / ghz);
    }
    return 0;
}
