/* What this CPU's vector units allow for the inner loops of the re-ranking kernels
   (model/matching/_mnn_cpu.c): each loop below is a kernel's multiply-add sequence on operands in L1,
   without its reductions or memory traffic, run on T threads for about S seconds. It prints one line
   per loop, "name GMAC/s", or "name -" where the CPU lacks the instructions. bench/vector_peak.py
   builds and runs it.

   Usage: vector_peak THREADS SECONDS */

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>

#define ROWS 4      /* candidate rows per step, two accumulators each: as the AVX2 int8 kernel */
#define CHANNELS 128
#define STEPS 4096 /* passes over the L1 block between clock reads */

static int8_t a8_[ROWS * CHANNELS], q8_[2 * 32 * CHANNELS];
static float af_[6 * CHANNELS], qf_[16 * CHANNELS];
static volatile int64_t sink;

/* The same pointer, which the optimiser must assume may have changed: each pass reloads its operands,
   and the compiler can neither fold passes together nor spill the accumulators to keep memory in sync
   (a "memory" barrier would). */
static inline const int8_t *hidden_i8(const int8_t *p) {
    __asm__("" : "+r"(p));
    return p;
}
static inline const float *hidden_f(const float *p) {
    __asm__("" : "+r"(p));
    return p;
}

typedef double (*loop_fn)(long passes); /* runs `passes` passes, returns multiply-adds */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* float32 FMA on 256 bits: 6 rows x 16 positions, one broadcast per row and channel. */
__attribute__((target("avx2,fma"))) static double f32_avx2(long passes) {
    __m256 s[12];
    #pragma GCC unroll 12
    for (int r = 0; r < 12; r++) s[r] = _mm256_setzero_ps();
    for (long pass = 0; pass < passes; pass++) {
        for (int it = 0; it < STEPS; it++) {
            const float *af = hidden_f(af_), *qf = hidden_f(qf_);
            for (int ch = 0; ch < CHANNELS; ch++) {
                __m256 b0 = _mm256_loadu_ps(qf + ch * 16), b1 = _mm256_loadu_ps(qf + ch * 16 + 8);
#pragma GCC unroll 6
                for (int r = 0; r < 6; r++) {
                    __m256 x = _mm256_broadcast_ss(af + r * CHANNELS + ch);
                    s[2 * r] = _mm256_fmadd_ps(x, b0, s[2 * r]);
                    s[2 * r + 1] = _mm256_fmadd_ps(x, b1, s[2 * r + 1]);
                }
            }
        }
    }
    __m256 t = s[0];
    #pragma GCC unroll 12
    for (int r = 1; r < 12; r++) t = _mm256_add_ps(t, s[r]);
    sink += (int64_t)_mm256_cvtss_f32(t);
    return (double)passes * STEPS * CHANNELS * 6 * 16;
}

/* One step of each int8 loop: the products of the broadcast candidate bytes x and the query bytes b,
   added to acc. */
#define STEP_OF(TARGET) __attribute__((target(TARGET), always_inline)) static inline __m256i

/* As the AVX2 int8 kernel: |a| x (q * sign(a)) with vpmaddubsw, widened with vpmaddwd. */
STEP_OF("avx2") step_sign(__m256i acc, __m256i x, __m256i b) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(b, x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* Unsigned x signed bytes with no sign step: what vpmaddubsw gives where one operand is known to be
   non-negative and small enough never to saturate (not the kernel's case: a reference only). */
STEP_OF("avx2") step_unsigned(__m256i acc, __m256i x, __m256i b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, b), _mm256_set1_epi16(1)));
}

/* As the AVX-VNNI kernel: vpdpbusd on 256 bits. */
STEP_OF("avx2,avxvnni") step_vnni(__m256i acc, __m256i x, __m256i b) {
    return _mm256_dpbusd_avx_epi32(acc, x, b);
}

/* An int8 loop: ROWS candidate rows x 16 query positions per group of 4 channels, as the int8
   kernels; STEP is the only difference between them. */
#define INT8_LOOP(NAME, TARGET, STEP)                                                                 \
    __attribute__((target(TARGET))) static double NAME(long passes) {                                 \
        __m256i s[2 * ROWS];                                                                          \
        _Pragma("GCC unroll 12") for (int r = 0; r < 2 * ROWS; r++) s[r] = _mm256_setzero_si256();    \
        for (long pass = 0; pass < passes; pass++) {                                                  \
            for (int it = 0; it < STEPS; it++) {                                                      \
                const int8_t *a8 = hidden_i8(a8_), *q8 = hidden_i8(q8_);                              \
                for (int g = 0; g < CHANNELS; g += 4) {                                               \
                    __m256i b0 = _mm256_loadu_si256((const __m256i *)(q8 + g * 16));                  \
                    __m256i b1 = _mm256_loadu_si256((const __m256i *)(q8 + g * 16 + 32));             \
                    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {                          \
                        int32_t word;                                                                 \
                        memcpy(&word, a8 + r * CHANNELS + g, 4);                                      \
                        __m256i x = _mm256_set1_epi32(word);                                          \
                        s[2 * r] = STEP(s[2 * r], x, b0);                                             \
                        s[2 * r + 1] = STEP(s[2 * r + 1], x, b1);                                     \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        __m256i t = s[0];                                                                             \
        _Pragma("GCC unroll 12") for (int r = 1; r < 2 * ROWS; r++) t = _mm256_add_epi32(t, s[r]);    \
        sink += _mm256_extract_epi32(t, 0);                                                           \
        return (double)passes * STEPS * CHANNELS * ROWS * 16;                                         \
    }

INT8_LOOP(i8_avx2, "avx2", step_sign)
INT8_LOOP(u8_avx2, "avx2", step_unsigned)
INT8_LOOP(i8_avxvnni, "avx2,avxvnni", step_vnni)

typedef struct {
    loop_fn fn;
    double seconds, rate;
} job;

/* One pass to size the run, then about `seconds` of passes, timed (no calls inside a loop: the
   accumulators stay in registers). */
static void *run_job(void *arg) {
    job *j = arg;
    double start = now();
    j->fn(1);
    long passes = (long)(j->seconds / (now() - start + 1e-9)) + 1;
    start = now();
    double macs = j->fn(passes);
    j->rate = macs / (now() - start);
    return NULL;
}

/* The loop on `threads` threads at once: their rates summed. */
static double on_threads(loop_fn fn, int threads, double seconds) {
    pthread_t ids[256];
    job jobs[256];
    double total = 0;
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job){fn, seconds, 0};
        pthread_create(&ids[t], NULL, run_job, &jobs[t]);
    }
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        total += jobs[t].rate;
    }
    return total;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    double seconds = argc > 2 ? atof(argv[2]) : 1.0;
    if (threads < 1 || threads > 256) return 2;
    srand((unsigned)argc); /* operands the compiler cannot know */
    for (size_t i = 0; i < sizeof a8_; i++) a8_[i] = (int8_t)(rand() % 255 - 127);
    for (size_t i = 0; i < sizeof q8_; i++) q8_[i] = (int8_t)(rand() % 255 - 127);
    for (size_t i = 0; i < sizeof af_ / sizeof *af_; i++) af_[i] = (float)rand() / RAND_MAX;
    for (size_t i = 0; i < sizeof qf_ / sizeof *qf_; i++) qf_[i] = (float)rand() / RAND_MAX;
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    unsigned eax, ebx, ecx, edx;
    int avxvnni = avx2 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax >> 4 & 1);
    struct {
        const char *name;
        loop_fn fn;
        int present;
    } loops[] = {
        {"float32_fma_avx2", f32_avx2, avx2},
        {"int8_vpmaddubsw_avx2", i8_avx2, avx2},
        {"int8_unsigned_no_sign_avx2", u8_avx2, avx2},
        {"int8_vpdpbusd_avx_vnni", i8_avxvnni, avxvnni},
    };
    for (size_t l = 0; l < sizeof loops / sizeof *loops; l++) {
        if (loops[l].present)
            printf("%s %.2f\n", loops[l].name, on_threads(loops[l].fn, threads, seconds) / 1e9);
        else
            printf("%s -\n", loops[l].name);
    }
    return (int)(sink & 0);
}

#else
int main(void) {
    puts("no x86-64 loops on this architecture");
    return 0;
}
#endif
