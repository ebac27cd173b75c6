/* The MNN engine's inner loop on CPU, with the reductions fused into the products: the x86-64 kernels
   (AVX2, AVX-VNNI, AVX-512, AMX; the ARM ones are in _mnn_arm.c, the loop they share in _mnn_driver.h).

   For one query map against a batch of candidate maps each kernel computes, without ever writing a
   similarity to memory:
   - for each candidate position i, its best query position (row argmax), and
   - for each query position j, its best candidate position among rows [i0, i1) (column argmax),
   ties going to the lowest index on both sides, as torch.argmax decides.

   A micro-tile is a few candidate rows x 16 or 32 query positions. Its similarities stay in registers
   (or, from AMX tiles, in 4 KiB of L1): they update per-lane running (max, first index) pairs for the
   rows, and the column (max, first index) pairs of those positions in L1. Query positions are visited a
   chunk at a time (about 256 KiB of packed query: it stays in L2 while all candidate rows stream past).

   float32 (AVX-512 or AVX2 FMA): each similarity is one fused multiply-add chain over the channels in
   order, starting from zero, the order oneDNN's and MKL's GEMMs use at these sizes; the Python side
   checks that the bits agree with torch.mm before it uses a float32 kernel (model/matching/native.py).
   int8, exact int32 dot products on every kernel:
   - VNNI (AVX-512 or AVX-VNNI on 256 bits) multiplies unsigned by signed bytes, so candidate bytes are
     shifted by +128 (a xor) and every sum starts from -128 * (sum of the query vector's components),
     which cancels the shift exactly.
   - AVX2 without VNNI: see tile_i8_avx2 (vpmaddubsw cannot saturate on these operands).
   - AMX tiles multiply signed bytes (int8 and bfloat16, selavpr_mnn_i8_amx / _bf16_amx).

   Every kernel has the same arguments (mnn_run in _mnn_driver.h) and returns -2 where this CPU lacks its
   instructions: which kernel runs is chosen in model/matching/native.py from selavpr_mnn_caps().
   Loaded with ctypes (no Python API), built at install time as an optional extension: where it does
   not build or the CPU has none of these instructions, the engine runs its torch tiles instead. */

/* Bumped whenever an exported function's arguments change: native.py refuses a library built from
   another version of this file (an editable install not rebuilt) rather than call it wrongly. */
int selavpr_mnn_abi(void) { return 2; }

#if defined(__x86_64__) && defined(__GNUC__)
#include "_mnn_driver.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Candidate rows per micro-tile: enough independent accumulators (2 per row) to keep both vector units
   busy (measured on a 2-core Xeon with AMX: float32 4 -> 8 rows ran 1.9x faster, int8 best at 6).
   AVX2 has 16 vector registers: 6 rows x 2 accumulators, 4 for int8 without VNNI (it needs temporaries). */
#define R_F32 8
#define R_I8 6
#define R_F32_AVX2 6
#define R_I8_AVX2 4
#define R_I8_AVXVNNI 6
#define JV 16 /* lanes per AVX-512 vector */
#define JT 32 /* query positions per AVX-512 micro-tile (16 per AVX2 one) */

#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TARGET_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define TARGET_F32 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define TARGET_I8 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define TARGET_AMX \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,amx-tile,amx-int8,amx-bf16")))
#define INLINE static inline __attribute__((always_inline))

/* CAP_AMX_INT8 | CAP_AMX_BF16 as CPUID has AMX-TILE with AMX-INT8 / AMX-BF16, once Linux has granted
   the tile state (asked once per process; it holds for every thread; asking again is harmless). */
static int amx_caps(void) {
    static volatile int known = -1;
    if (known >= 0) return known;
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !((edx >> 24) & 1) ||
        syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0)
        return known = 0;
    return known = (((edx >> 25) & 1) ? CAP_AMX_INT8 : 0) | (((edx >> 22) & 1) ? CAP_AMX_BF16 : 0);
}

/* AVX-VNNI: CPUID leaf 7 sub-leaf 1, EAX bit 4 (older compilers' __builtin_cpu_supports lack it). */
static int avx_vnni(void) {
    unsigned eax, ebx, ecx, edx;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 4) & 1);
}

int selavpr_mnn_caps(void) {
    static volatile int known = -1;
    if (known >= 0) return known;
    __builtin_cpu_init();
    int caps = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) caps |= CAP_AVX2;
    if ((caps & CAP_AVX2) && avx_vnni()) caps |= CAP_AVX_VNNI;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        caps |= CAP_AVX512;
    if ((caps & CAP_AVX512) && __builtin_cpu_supports("avx512vnni")) caps |= CAP_AVX512_VNNI;
    if (caps & CAP_AVX512_VNNI) caps |= amx_caps();
    return known = caps;
}

#define NEEDS(cap) \
    if (!(selavpr_mnn_caps() & (cap))) return -2

/* The candidate bytes shifted to unsigned (+128) for the VNNI kernels. */
static void shift_rows(const uint8_t *map, uint8_t *out, int lc, int c, int i0, int i1) {
    (void)lc;
    for (size_t e = (size_t)i0 * c; e < (size_t)i1 * c; e++) out[e] = map[e] ^ 0x80u;
}

/* ---- AVX-512 ---------------------------------------------------------------------------------- */

static __mmask16 lane_mask(int valid) {
    return valid >= JV ? (__mmask16)0xFFFF : valid <= 0 ? (__mmask16)0 : (__mmask16)((1u << valid) - 1);
}

/* Running per-row bests of one chunk, folded into the row's best so far. Chunks come in increasing
   j, so a strict > keeps the first maximum. */
TARGET_F32 INLINE void fold_row_f32(__m512 v, __m512i idx, float *best_v, int32_t *best_i) {
    float m = _mm512_reduce_max_ps(v);
    if (m > *best_v) {
        __mmask16 eq = _mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_EQ_OQ);
        *best_v = m;
        *best_i = _mm512_mask_reduce_min_epi32(eq, idx);
    }
}

TARGET_AVX512 INLINE void fold_row_i32(__m512i v, __m512i idx, int32_t *best_v, int32_t *best_i) {
    int32_t m = _mm512_reduce_max_epi32(v);
    if (m > *best_v) {
        __mmask16 eq = _mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(m));
        *best_v = m;
        *best_i = _mm512_mask_reduce_min_epi32(eq, idx);
    }
}

/* The running bests after rows i .. i + rows - 1 of a block of 32 query positions: s0[r] and s1[r]
   hold row r's similarities (int32 dot products, or keys that order like floats) for positions
   j .. j + 15 and j + 16 .. j + 31; m0, m1 mask the positions past the query. rv, ri: each row's
   per-lane (max, first index); cv, ci: each position's (max, first row), in memory. */
TARGET_AVX512 INLINE void reduce_block_i32(const __m512i *s0, const __m512i *s1, int rows, int i, int j,
                                           __mmask16 m0, __mmask16 m1, __m512i *rv, __m512i *ri,
                                           int32_t *cv, int32_t *ci) {
    __m512i j0 = _mm512_add_epi32(_mm512_set1_epi32(j),
                                  _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    __m512i j1 = _mm512_add_epi32(j0, _mm512_set1_epi32(JV));
    __m512i c0 = _mm512_loadu_si512(cv + j), c1 = _mm512_loadu_si512(cv + j + JV);
    __m512i k0 = _mm512_loadu_si512(ci + j), k1 = _mm512_loadu_si512(ci + j + JV);
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++) {
        __mmask16 g = _mm512_mask_cmpgt_epi32_mask(m0, s0[r], rv[r]);
        rv[r] = _mm512_mask_mov_epi32(rv[r], g, s0[r]);
        ri[r] = _mm512_mask_mov_epi32(ri[r], g, j0);
        g = _mm512_mask_cmpgt_epi32_mask(m1, s1[r], rv[r]);
        rv[r] = _mm512_mask_mov_epi32(rv[r], g, s1[r]);
        ri[r] = _mm512_mask_mov_epi32(ri[r], g, j1);
        __m512i row = _mm512_set1_epi32(i + r);
        g = _mm512_cmpgt_epi32_mask(s0[r], c0);
        c0 = _mm512_mask_mov_epi32(c0, g, s0[r]);
        k0 = _mm512_mask_mov_epi32(k0, g, row);
        g = _mm512_cmpgt_epi32_mask(s1[r], c1);
        c1 = _mm512_mask_mov_epi32(c1, g, s1[r]);
        k1 = _mm512_mask_mov_epi32(k1, g, row);
    }
    _mm512_storeu_si512(cv + j, c0);
    _mm512_storeu_si512(cv + j + JV, c1);
    _mm512_storeu_si512(ci + j, k0);
    _mm512_storeu_si512(ci + j + JV, k1);
}

/* float32: `rows` (<= R_F32) candidate rows a (stride c) against query positions j .. j + 31, packed as
   two [c][16] blocks at q. */
TARGET_F32 INLINE void tile_f32(const float *a, int c, const float *q, int rows, int i, int j,
                                __mmask16 m0, __mmask16 m1, __m512 *rv, __m512i *ri, float *cv,
                                int32_t *ci) {
    __m512 s0[R_F32], s1[R_F32];
    for (int r = 0; r < rows; r++) s0[r] = s1[r] = _mm512_setzero_ps();
    const float *q0 = q, *q1 = q + (size_t)c * JV;
    for (int ch = 0; ch < c; ch++) {
        __m512 b0 = _mm512_loadu_ps(q0 + (size_t)ch * JV), b1 = _mm512_loadu_ps(q1 + (size_t)ch * JV);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            __m512 x = _mm512_set1_ps(a[(size_t)r * c + ch]);
            s0[r] = _mm512_fmadd_ps(x, b0, s0[r]);
            s1[r] = _mm512_fmadd_ps(x, b1, s1[r]);
        }
    }
    __m512i j0 = _mm512_add_epi32(_mm512_set1_epi32(j),
                                  _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    __m512i j1 = _mm512_add_epi32(j0, _mm512_set1_epi32(JV));
    __m512 c0 = _mm512_loadu_ps(cv + j), c1 = _mm512_loadu_ps(cv + j + JV);
    __m512i k0 = _mm512_loadu_si512(ci + j), k1 = _mm512_loadu_si512(ci + j + JV);
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) {
        __mmask16 g = _mm512_mask_cmp_ps_mask(m0, s0[r], rv[r], _CMP_GT_OQ);
        rv[r] = _mm512_mask_mov_ps(rv[r], g, s0[r]);
        ri[r] = _mm512_mask_mov_epi32(ri[r], g, j0);
        g = _mm512_mask_cmp_ps_mask(m1, s1[r], rv[r], _CMP_GT_OQ);
        rv[r] = _mm512_mask_mov_ps(rv[r], g, s1[r]);
        ri[r] = _mm512_mask_mov_epi32(ri[r], g, j1);
        __m512i row = _mm512_set1_epi32(i + r);
        g = _mm512_cmp_ps_mask(s0[r], c0, _CMP_GT_OQ);
        c0 = _mm512_mask_mov_ps(c0, g, s0[r]);
        k0 = _mm512_mask_mov_epi32(k0, g, row);
        g = _mm512_cmp_ps_mask(s1[r], c1, _CMP_GT_OQ);
        c1 = _mm512_mask_mov_ps(c1, g, s1[r]);
        k1 = _mm512_mask_mov_epi32(k1, g, row);
    }
    _mm512_storeu_ps(cv + j, c0);
    _mm512_storeu_ps(cv + j + JV, c1);
    _mm512_storeu_si512(ci + j, k0);
    _mm512_storeu_si512(ci + j + JV, k1);
}

TARGET_F32 INLINE void rows_f32_of(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    __m512 rv[R_F32];
    __m512i ri[R_F32];
    for (int r = 0; r < rows; r++) {
        rv[r] = _mm512_set1_ps(-INFINITY);
        ri[r] = _mm512_setzero_si512();
    }
    const float *a = (const float *)p->rows + (size_t)i * p->c;
    for (int j = j_lo; j < j_hi; j += JT) {
        const float *q = (const float *)p->qp + (size_t)(j / JV) * p->c * JV;
        tile_f32(a, p->c, q, rows, i, j, lane_mask(p->lq - j), lane_mask(p->lq - j - JV), rv, ri, p->cv,
                 p->ci);
    }
    for (int r = 0; r < rows; r++) fold_row_f32(rv[r], ri[r], (float *)p->best_v + i + r, p->best_i + i + r);
}

TARGET_F32 static void rows_f32(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    if (rows == R_F32) return rows_f32_of(p, R_F32, i, j_lo, j_hi);
    for (int r = 0; r < rows; r++) rows_f32_of(p, 1, i + r, j_lo, j_hi);
}

/* qp: the query packed as [lq_pad / 16][c][16] floats (padding lanes zero). */
int selavpr_mnn_f32_avx512(MNN_KERNEL_ARGS) {
    NEEDS(CAP_AVX512);
    static const mnn_kernel kernel = {rows_f32, NULL, R_F32, 4, 1, 0};
    return mnn_run(&kernel, MNN_PASS_ARGS);
}

/* int8 on VNNI: a's bytes shifted to unsigned (u = a + 128) and q packed as [c / 4][16][4] bytes per
   block of 16 positions; bias holds -128 * sum(q_j) for the 32 positions. */
TARGET_I8 INLINE void tile_i8(const uint8_t *a, int c, const int8_t *q, const int32_t *bias, int rows,
                              int i, int j, __mmask16 m0, __mmask16 m1, __m512i *rv, __m512i *ri,
                              int32_t *cv, int32_t *ci) {
    __m512i s0[R_I8], s1[R_I8];
    __m512i z0 = _mm512_loadu_si512(bias), z1 = _mm512_loadu_si512(bias + JV);
    for (int r = 0; r < rows; r++) s0[r] = z0, s1[r] = z1;
    const int8_t *q0 = q, *q1 = q + (size_t)c * JV;
    for (int g = 0; g < c; g += 4) {
        __m512i b0 = _mm512_loadu_si512(q0 + (size_t)g * JV), b1 = _mm512_loadu_si512(q1 + (size_t)g * JV);
#pragma GCC unroll 6
        for (int r = 0; r < rows; r++) {
            int32_t word;
            memcpy(&word, a + (size_t)r * c + g, 4);
            __m512i x = _mm512_set1_epi32(word);
            s0[r] = _mm512_dpbusd_epi32(s0[r], x, b0);
            s1[r] = _mm512_dpbusd_epi32(s1[r], x, b1);
        }
    }
    reduce_block_i32(s0, s1, rows, i, j, m0, m1, rv, ri, cv, ci);
}

TARGET_I8 INLINE void rows_i8_of(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    __m512i rv[R_I8], ri[R_I8];
    for (int r = 0; r < rows; r++) {
        rv[r] = _mm512_set1_epi32(INT32_MIN);
        ri[r] = _mm512_setzero_si512();
    }
    const uint8_t *a = (const uint8_t *)p->rows + (size_t)i * p->c;
    for (int j = j_lo; j < j_hi; j += JT) {
        const int8_t *q = (const int8_t *)p->qp + (size_t)(j / JV) * p->c * JV;
        tile_i8(a, p->c, q, p->bias + j, rows, i, j, lane_mask(p->lq - j), lane_mask(p->lq - j - JV), rv,
                ri, p->cv, p->ci);
    }
    for (int r = 0; r < rows; r++)
        fold_row_i32(rv[r], ri[r], (int32_t *)p->best_v + i + r, p->best_i + i + r);
}

TARGET_I8 static void rows_i8(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    if (rows == R_I8) return rows_i8_of(p, R_I8, i, j_lo, j_hi);
    for (int r = 0; r < rows; r++) rows_i8_of(p, 1, i + r, j_lo, j_hi);
}

/* qp packed as [lq_pad / 16][c / 4][16][4] bytes (c a multiple of 4), bias (lq_pad) = -128 * (sum of
   each query vector's components); col_val holds exact dot products. */
int selavpr_mnn_i8_avx512vnni(MNN_KERNEL_ARGS) {
    NEEDS(CAP_AVX512_VNNI);
    static const mnn_kernel kernel = {rows_i8, shift_rows, R_I8, 1, 0, 0};
    return mnn_run(&kernel, MNN_PASS_ARGS);
}

/* ---- AVX2 (and AVX-VNNI on 256 bits) ---------------------------------------------------------- */

/* The 8 positions j .. j + 7, and all ones in the lanes of those before lq. */
TARGET_AVX2 INLINE __m256i positions8(int j) {
    return _mm256_add_epi32(_mm256_set1_epi32(j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

TARGET_AVX2 INLINE __m256i before8(__m256i positions, int lq) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lq), positions);
}

/* As reduce_block_i32 for 16 positions j .. j + 15 (s0: the first 8, s1: the next 8); float32
   similarities are compared as floats (is_float) or as int32. rv, ri: one 8-lane (max, first index) per
   row for both halves (s0 is folded before s1, whose positions are higher: a strict > keeps the first). */
#define GT(x, y) \
    (is_float ? _mm256_castps_si256(_mm256_cmp_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(y), _CMP_GT_OQ)) \
              : _mm256_cmpgt_epi32(x, y))
TARGET_AVX2 INLINE void reduce16(int is_float, const __m256i *s0, const __m256i *s1, int rows, int i, int j,
                                 int lq, __m256i *rv, __m256i *ri, int32_t *cv, int32_t *ci) {
    __m256i j0 = positions8(j), j1 = positions8(j + 8);
    __m256i v0 = before8(j0, lq), v1 = before8(j1, lq);
    __m256i c0 = _mm256_loadu_si256((const __m256i *)(cv + j));
    __m256i c1 = _mm256_loadu_si256((const __m256i *)(cv + j + 8));
    __m256i k0 = _mm256_loadu_si256((const __m256i *)(ci + j));
    __m256i k1 = _mm256_loadu_si256((const __m256i *)(ci + j + 8));
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) {
        __m256i g = _mm256_and_si256(GT(s0[r], rv[r]), v0);
        rv[r] = _mm256_blendv_epi8(rv[r], s0[r], g);
        ri[r] = _mm256_blendv_epi8(ri[r], j0, g);
        g = _mm256_and_si256(GT(s1[r], rv[r]), v1);
        rv[r] = _mm256_blendv_epi8(rv[r], s1[r], g);
        ri[r] = _mm256_blendv_epi8(ri[r], j1, g);
        __m256i row = _mm256_set1_epi32(i + r);
        g = GT(s0[r], c0);
        c0 = _mm256_blendv_epi8(c0, s0[r], g);
        k0 = _mm256_blendv_epi8(k0, row, g);
        g = GT(s1[r], c1);
        c1 = _mm256_blendv_epi8(c1, s1[r], g);
        k1 = _mm256_blendv_epi8(k1, row, g);
    }
    _mm256_storeu_si256((__m256i *)(cv + j), c0);
    _mm256_storeu_si256((__m256i *)(cv + j + 8), c1);
    _mm256_storeu_si256((__m256i *)(ci + j), k0);
    _mm256_storeu_si256((__m256i *)(ci + j + 8), k1);
}
#undef GT

TARGET_AVX2 INLINE void fold8(int is_float, __m256i v, __m256i idx, void *best_v, int32_t *best_i) {
    int32_t values[8], indices[8];
    _mm256_storeu_si256((__m256i *)values, v);
    _mm256_storeu_si256((__m256i *)indices, idx);
    if (is_float)
        mnn_fold_f32((const float *)values, indices, 8, best_v, best_i);
    else
        mnn_fold_i32(values, indices, 8, best_v, best_i);
}

/* float32 on AVX2: rows against the 16 positions of one [c][16] block, 6 rows x 2 accumulators. */
TARGET_AVX2 INLINE void rows_f32_avx2_of(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    int c = p->c;
    __m256i rv[R_F32_AVX2], ri[R_F32_AVX2];
    for (int r = 0; r < rows; r++) {
        rv[r] = _mm256_castps_si256(_mm256_set1_ps(-INFINITY));
        ri[r] = _mm256_setzero_si256();
    }
    const float *a = (const float *)p->rows + (size_t)i * c;
    for (int j = j_lo; j < j_hi; j += MNN_LANES) {
        const float *q = (const float *)p->qp + (size_t)(j / MNN_LANES) * c * MNN_LANES;
        __m256 s0[R_F32_AVX2], s1[R_F32_AVX2];
        for (int r = 0; r < rows; r++) s0[r] = s1[r] = _mm256_setzero_ps();
        for (int ch = 0; ch < c; ch++) {
            __m256 b0 = _mm256_loadu_ps(q + (size_t)ch * MNN_LANES);
            __m256 b1 = _mm256_loadu_ps(q + (size_t)ch * MNN_LANES + 8);
#pragma GCC unroll 6
            for (int r = 0; r < rows; r++) {
                __m256 x = _mm256_broadcast_ss(a + (size_t)r * c + ch);
                s0[r] = _mm256_fmadd_ps(x, b0, s0[r]);
                s1[r] = _mm256_fmadd_ps(x, b1, s1[r]);
            }
        }
        __m256i t0[R_F32_AVX2], t1[R_F32_AVX2];
        for (int r = 0; r < rows; r++) t0[r] = _mm256_castps_si256(s0[r]), t1[r] = _mm256_castps_si256(s1[r]);
        reduce16(1, t0, t1, rows, i, j, p->lq, rv, ri, p->cv, p->ci);
    }
    for (int r = 0; r < rows; r++) fold8(1, rv[r], ri[r], (float *)p->best_v + i + r, p->best_i + i + r);
}

TARGET_AVX2 static void rows_f32_avx2(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    if (rows == R_F32_AVX2) return rows_f32_avx2_of(p, R_F32_AVX2, i, j_lo, j_hi);
    for (int r = 0; r < rows; r++) rows_f32_avx2_of(p, 1, i + r, j_lo, j_hi);
}

/* As selavpr_mnn_f32_avx512 (the same packed query), on AVX2 + FMA. */
int selavpr_mnn_f32_avx2(MNN_KERNEL_ARGS) {
    NEEDS(CAP_AVX2);
    static const mnn_kernel kernel = {rows_f32_avx2, NULL, R_F32_AVX2, 4, 1, 0};
    return mnn_run(&kernel, MNN_PASS_ARGS);
}

/* int8 on AVX2 without VNNI. vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16
   with saturation, so operands are chosen so that no pair can saturate: the unsigned operand is the
   candidate's |a| (vpabsb; |-128| = 128 read as unsigned), the signed one the query's q * sign(a)
   (vpsignb). The query is int8 in [-127, 127] (quantize_int8's range; native.py refuses -128), so
   |q * sign(a)| <= 127 and every pair is at most 2 * 128 * 127 = 32512 <= 32767 in magnitude: each
   product |a| * (q * sign(a)) = a * q is exact, and so is their int16 pair sum. vpmaddwd with ones then
   widens pairs of pairs into int32, exact. Rows against the 16 positions of one [c / 4][16][4] block. */
TARGET_AVX2 INLINE void rows_i8_avx2_of(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    int c = p->c;
    __m256i rv[R_I8_AVX2], ri[R_I8_AVX2];
    for (int r = 0; r < rows; r++) rv[r] = _mm256_set1_epi32(INT32_MIN), ri[r] = _mm256_setzero_si256();
    const int8_t *a = (const int8_t *)p->rows + (size_t)i * c;
    __m256i ones = _mm256_set1_epi16(1);
    for (int j = j_lo; j < j_hi; j += MNN_LANES) {
        const int8_t *q = (const int8_t *)p->qp + (size_t)(j / MNN_LANES) * c * MNN_LANES;
        __m256i s0[R_I8_AVX2], s1[R_I8_AVX2];
        for (int r = 0; r < rows; r++) s0[r] = s1[r] = _mm256_setzero_si256();
        for (int g = 0; g < c; g += 4) {
            __m256i b0 = _mm256_loadu_si256((const __m256i *)(q + (size_t)g * MNN_LANES));
            __m256i b1 = _mm256_loadu_si256((const __m256i *)(q + (size_t)g * MNN_LANES + 32));
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                int32_t word;
                memcpy(&word, a + (size_t)r * c + g, 4);
                __m256i x = _mm256_set1_epi32(word), ax = _mm256_abs_epi8(x);
                __m256i p0 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(b0, x));
                __m256i p1 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(b1, x));
                s0[r] = _mm256_add_epi32(s0[r], _mm256_madd_epi16(p0, ones));
                s1[r] = _mm256_add_epi32(s1[r], _mm256_madd_epi16(p1, ones));
            }
        }
        reduce16(0, s0, s1, rows, i, j, p->lq, rv, ri, p->cv, p->ci);
    }
    for (int r = 0; r < rows; r++) fold8(0, rv[r], ri[r], (int32_t *)p->best_v + i + r, p->best_i + i + r);
}

TARGET_AVX2 static void rows_i8_avx2(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    if (rows == R_I8_AVX2) return rows_i8_avx2_of(p, R_I8_AVX2, i, j_lo, j_hi);
    for (int r = 0; r < rows; r++) rows_i8_avx2_of(p, 1, i + r, j_lo, j_hi);
}

/* As selavpr_mnn_i8_avx512vnni (the same packed query) with no bias: the candidates stay signed. */
int selavpr_mnn_i8_avx2(MNN_KERNEL_ARGS) {
    NEEDS(CAP_AVX2);
    static const mnn_kernel kernel = {rows_i8_avx2, NULL, R_I8_AVX2, 1, 0, 0};
    return mnn_run(&kernel, MNN_PASS_ARGS);
}

/* int8 on AVX-VNNI (vpdpbusd on 256 bits): as the AVX-512 VNNI kernel, 16 positions at a time. */
TARGET_AVXVNNI INLINE void rows_i8_avxvnni_of(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    int c = p->c;
    __m256i rv[R_I8_AVXVNNI], ri[R_I8_AVXVNNI];
    for (int r = 0; r < rows; r++) rv[r] = _mm256_set1_epi32(INT32_MIN), ri[r] = _mm256_setzero_si256();
    const uint8_t *a = (const uint8_t *)p->rows + (size_t)i * c;
    for (int j = j_lo; j < j_hi; j += MNN_LANES) {
        const int8_t *q = (const int8_t *)p->qp + (size_t)(j / MNN_LANES) * c * MNN_LANES;
        __m256i s0[R_I8_AVXVNNI], s1[R_I8_AVXVNNI];
        __m256i z0 = _mm256_loadu_si256((const __m256i *)(p->bias + j));
        __m256i z1 = _mm256_loadu_si256((const __m256i *)(p->bias + j + 8));
        for (int r = 0; r < rows; r++) s0[r] = z0, s1[r] = z1;
        for (int g = 0; g < c; g += 4) {
            __m256i b0 = _mm256_loadu_si256((const __m256i *)(q + (size_t)g * MNN_LANES));
            __m256i b1 = _mm256_loadu_si256((const __m256i *)(q + (size_t)g * MNN_LANES + 32));
#pragma GCC unroll 6
            for (int r = 0; r < rows; r++) {
                int32_t word;
                memcpy(&word, a + (size_t)r * c + g, 4);
                __m256i x = _mm256_set1_epi32(word);
                s0[r] = _mm256_dpbusd_avx_epi32(s0[r], x, b0);
                s1[r] = _mm256_dpbusd_avx_epi32(s1[r], x, b1);
            }
        }
        reduce16(0, s0, s1, rows, i, j, p->lq, rv, ri, p->cv, p->ci);
    }
    for (int r = 0; r < rows; r++) fold8(0, rv[r], ri[r], (int32_t *)p->best_v + i + r, p->best_i + i + r);
}

TARGET_AVXVNNI static void rows_i8_avxvnni(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    if (rows == R_I8_AVXVNNI) return rows_i8_avxvnni_of(p, R_I8_AVXVNNI, i, j_lo, j_hi);
    for (int r = 0; r < rows; r++) rows_i8_avxvnni_of(p, 1, i + r, j_lo, j_hi);
}

/* The packed query and bias of selavpr_mnn_i8_avx512vnni. */
int selavpr_mnn_i8_avxvnni(MNN_KERNEL_ARGS) {
    NEEDS(CAP_AVX_VNNI);
    static const mnn_kernel kernel = {rows_i8_avxvnni, shift_rows, R_I8_AVXVNNI, 1, 0, 0};
    return mnn_run(&kernel, MNN_PASS_ARGS);
}

/* ---- quantize_int8's elementwise pass ------------------------------------------------------------ */

/* 8 values times the scale, rounded half to even, clamped: as mnn_quantize_one, as int32. */
TARGET_AVX2 INLINE __m256i quantize8(const float *x, __m256 scale) {
    __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x), scale);
    y = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y = _mm256_max_ps(_mm256_min_ps(y, _mm256_set1_ps(127.0f)), _mm256_set1_ps(-127.0f));
    return _mm256_cvtps_epi32(y);
}

TARGET_AVX2 static void quantize_avx2(const float *x, int8_t *out, int64_t e0, int64_t e1, int64_t per_map,
                                      const float *scales) {
    /* packs work within 128-bit lanes: this puts the 32 bytes back in order */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t e = e0; e < e1;) {
        int64_t end = mnn_map_run_end(e, e1, per_map);
        float s = scales[e / per_map];
        __m256 scale = _mm256_set1_ps(s);
        for (; e + 32 <= end; e += 32) {
            __m256i a = _mm256_packs_epi32(quantize8(x + e, scale), quantize8(x + e + 8, scale));
            __m256i b = _mm256_packs_epi32(quantize8(x + e + 16, scale), quantize8(x + e + 24, scale));
            __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
            _mm256_storeu_si256((__m256i *)(out + e), bytes);
        }
        for (; e < end; e++) out[e] = mnn_quantize_one(x[e], s);
    }
}

/* out[e] for elements [e0, e1) of maps of per_map float32 values x, each map with its own scale: the
   bits of quantize_int8's torch.mul(x, scale).round_().clamp_(-127, 127).to(torch.int8), in one pass. */
int selavpr_quantize_i8(const float *x, int8_t *out, int64_t e0, int64_t e1, int64_t per_map,
                        const float *scales) {
    if (selavpr_mnn_caps() & CAP_AVX2)
        quantize_avx2(x, out, e0, e1, per_map, scales);
    else
        mnn_quantize_scalar(x, out, e0, e1, per_map, scales);
    return 0;
}

/* ---- int8 and bfloat16 on AMX ------------------------------------------------------------------- */

/* Tiles: 0, 1 the 16 x 32 similarities (int32, or float32 for bfloat16); 2 a 16-row x 64-byte block of
   candidate rows (64 int8 or 32 bfloat16 channels); 3, 4 the query's two 16-position blocks for those
   channels (the VNNI packing: 16 rows of 4-byte channel groups x 16 positions). The products come from
   the tiles, the reductions from AVX-512 over the 16 x 32 block stored in L1.
   int8: exact int32 dot products, results equal the VNNI kernel's. bfloat16: products of bfloat16 values
   are exact in float32 and the tile sums them in float32, so similarities stay float32 (the torch
   tiles round them to 16 bits); they are reduced as int32 keys that order like the floats. */
enum { AMX_INT8 = 0, AMX_BF16 = 1 };

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

#define AMX_ROWS 16

TARGET_AMX static void amx_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 5; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* The 16 x 32 block of rows a (row_bytes apart) against the query block q (two 16-position blocks). */
TARGET_AMX INLINE void amx_block(int kind, const uint8_t *a, int row_bytes, const uint8_t *q, int32_t *out) {
    const uint8_t *q1 = q + (size_t)row_bytes * JV;
    _tile_zero(0);
    _tile_zero(1);
    for (int kb = 0; kb < row_bytes; kb += 64) {
        _tile_loadd(2, a + kb, row_bytes);
        _tile_loadd(3, q + (size_t)kb * JV, 64);
        _tile_loadd(4, q1 + (size_t)kb * JV, 64);
        if (kind == AMX_INT8) {
            _tile_dpbssd(0, 2, 3);
            _tile_dpbssd(1, 2, 4);
        } else {
            _tile_dpbf16ps(0, 2, 3);
            _tile_dpbf16ps(1, 2, 4);
        }
    }
    _tile_stored(0, out, JT * 4);
    _tile_stored(1, out + JV, JT * 4);
}

/* float32 bit patterns -> int32 keys in the floats' order (no NaN; a sum that starts from +0.0 is
   never -0.0, which would sort below +0.0). */
TARGET_AVX512 INLINE __m512i float_order(__m512i bits) {
    __m512i sign = _mm512_srai_epi32(bits, 31);
    return _mm512_xor_si512(bits, _mm512_and_si512(sign, _mm512_set1_epi32(0x7FFFFFFF)));
}

TARGET_AMX INLINE void amx_reduce(int kind, const int32_t *sim, int rows, int i, int j, __mmask16 m0,
                                  __mmask16 m1, __m512i *rv, __m512i *ri, int32_t *cv, int32_t *ci) {
    __m512i s0[AMX_ROWS], s1[AMX_ROWS];
    for (int r = 0; r < rows; r++) {
        s0[r] = _mm512_loadu_si512(sim + r * JT);
        s1[r] = _mm512_loadu_si512(sim + r * JT + JV);
        if (kind == AMX_BF16) s0[r] = float_order(s0[r]), s1[r] = float_order(s1[r]);
    }
    reduce_block_i32(s0, s1, rows, i, j, m0, m1, rv, ri, cv, ci);
}

/* The AMX kernels' loop: kind AMX_INT8 (the packed query of the VNNI kernels, no bias: the tiles
   multiply signed bytes) or AMX_BF16 (maps and query bfloat16, the query packed as
   [lq_pad / 16][c / 2][16][2]). row_bytes = channels x bytes per value, a multiple of 64. col_val holds
   int32 dot products, or for bfloat16 int32 keys that order like the float32 similarities. Returns -2
   where the CPU or the kernel does not allow the tiles (they would fault). */
TARGET_AMX static int amx_run(int kind, const uint8_t *qp, int lq, int lq_pad, const uint8_t *maps,
                              int64_t k, int lc, int row_bytes, int i0, int i1, int32_t *row_arg,
                              int32_t *col_val, int32_t *col_arg) {
    if (!(amx_caps() & (kind == AMX_INT8 ? CAP_AMX_INT8 : CAP_AMX_BF16))) return -2;
    int32_t *best_v = malloc(sizeof(int32_t) * (size_t)lc);
    uint8_t *last = malloc((size_t)AMX_ROWS * row_bytes); /* a last block of < 16 rows, zero-padded */
    if (!best_v || !last) {
        free(best_v);
        free(last);
        return -1;
    }
    int32_t sim[AMX_ROWS * JT] __attribute__((aligned(64)));
    __m512i rv[AMX_ROWS], ri[AMX_ROWS];
    int chunk = mnn_chunk_positions(row_bytes);
    amx_configure();
    for (int64_t m = 0; m < k; m++) {
        const uint8_t *map = maps + (size_t)m * lc * row_bytes;
        int32_t *best_i = row_arg + (size_t)m * lc;
        int32_t *cv = col_val + (size_t)m * lq_pad;
        int32_t *ci = col_arg + (size_t)m * lq_pad;
        for (int j = 0; j < lq_pad; j++) cv[j] = INT32_MIN, ci[j] = 0;
        for (int i = i0; i < i1; i++) best_v[i] = INT32_MIN, best_i[i] = 0;
        for (int j_lo = 0; j_lo < lq_pad; j_lo += chunk) {
            int j_hi = j_lo + chunk < lq_pad ? j_lo + chunk : lq_pad;
            for (int i = i0; i < i1; i += AMX_ROWS) {
                int rows = i1 - i < AMX_ROWS ? i1 - i : AMX_ROWS;
                const uint8_t *a = map + (size_t)i * row_bytes;
                if (rows < AMX_ROWS) {
                    memcpy(last, a, (size_t)rows * row_bytes);
                    memset(last + (size_t)rows * row_bytes, 0, (size_t)(AMX_ROWS - rows) * row_bytes);
                    __asm__ volatile("" ::: "memory"); /* the tile load below reads it */
                    a = last;
                }
                for (int r = 0; r < rows; r++) {
                    rv[r] = _mm512_set1_epi32(INT32_MIN);
                    ri[r] = _mm512_setzero_si512();
                }
                for (int j = j_lo; j < j_hi; j += JT) {
                    amx_block(kind, a, row_bytes, qp + (size_t)(j / JV) * row_bytes * JV, sim);
                    __mmask16 m0 = lane_mask(lq - j), m1 = lane_mask(lq - j - JV);
                    amx_reduce(kind, sim, rows, i, j, m0, m1, rv, ri, cv, ci);
                }
                for (int r = 0; r < rows; r++) fold_row_i32(rv[r], ri[r], best_v + i + r, best_i + i + r);
            }
        }
    }
    _tile_release();
    free(best_v);
    free(last);
    return 0;
}

int selavpr_mnn_i8_amx(MNN_KERNEL_ARGS) {
    (void)bias;
    return amx_run(AMX_INT8, qp, lq, lq_pad, maps, k, lc, c, i0, i1, row_arg, col_val, col_arg);
}

int selavpr_mnn_bf16_amx(MNN_KERNEL_ARGS) {
    (void)bias;
    return amx_run(AMX_BF16, qp, lq, lq_pad, maps, k, lc, 2 * c, i0, i1, row_arg, col_val, col_arg);
}

#elif !defined(__aarch64__) /* neither x86-64 with GCC or Clang nor ARM: the engine runs its torch tiles */

int selavpr_mnn_caps(void) { return 0; }

#endif
