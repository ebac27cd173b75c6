/* The MNN engine's inner loop on CPU, with the reductions fused into the products (AVX-512, AMX).

   For one query map against a batch of candidate maps it computes, without ever writing a similarity
   to memory:
   - for each candidate position i, its best query position (row argmax), and
   - for each query position j, its best candidate position among rows [i0, i1) (column argmax),
   ties going to the lowest index on both sides, as torch.argmax decides.

   A micro-tile is a few candidate rows x 32 query positions (two vectors of 16). Its similarities stay
   in registers (or, from AMX tiles, in 4 KiB of L1): they update per-lane running (max, first index)
   pairs for the rows, and the column (max, first index) pairs of those 32 positions in L1. Query
   positions are visited a chunk at a time (about 256 KiB of packed query: it stays in L2 while all
   candidate rows stream past it).

   float32: each similarity is one fused multiply-add chain over the channels in order, starting from
   zero, the order oneDNN's and MKL's GEMMs use at these sizes; the Python side checks that the bits
   agree with torch.mm before it uses this kernel (model/matching/native.py).
   int8: AVX-512 VNNI, exact int32 dot products. The instruction multiplies unsigned by signed bytes,
   so candidate bytes are shifted by +128 (a xor) and every sum starts from -128 * (sum of the query
   vector's components), which cancels the shift exactly. Where the CPU has AMX, selavpr_mnn_amx
   (int8 and bfloat16) takes over.

   Loaded with ctypes (no Python API), built at install time as an optional extension: where it does
   not build or the CPU lacks AVX-512, the engine runs its torch tiles instead. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { CAP_FLOAT32 = 1, CAP_INT8 = 2, CAP_INT8_AMX = 4, CAP_BF16_AMX = 8 };

/* Bumped whenever an exported function's arguments change: native.py refuses a library built from
   another version of this file (an editable install not rebuilt) rather than call it wrongly. */
int selavpr_mnn_abi(void) { return 1; }

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Candidate rows per micro-tile: enough independent accumulators (2 per row) to keep both vector units
   busy (measured on a 2-core Xeon with AMX: float32 4 -> 8 rows ran 1.9x faster, int8 best at 6). */
#define R_F32 8
#define R_I8 6
#define JV 16    /* lanes per vector */
#define JT 32    /* query positions per micro-tile */
#define CHUNK_BYTES (256 * 1024)

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define TARGET_F32 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define TARGET_I8 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define TARGET_AMX \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,amx-tile,amx-int8,amx-bf16")))
#define INLINE static inline __attribute__((always_inline))

/* CAP_INT8_AMX | CAP_BF16_AMX as CPUID has AMX-TILE with AMX-INT8 / AMX-BF16, once Linux has granted
   the tile state (asked once per process; it holds for every thread; asking again is harmless). */
static int amx_caps(void) {
    static volatile int known = -1;
    if (known >= 0) return known;
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !((edx >> 24) & 1) ||
        syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0)
        return known = 0;
    return known = (((edx >> 25) & 1) ? CAP_INT8_AMX : 0) | (((edx >> 22) & 1) ? CAP_BF16_AMX : 0);
}

int selavpr_mnn_caps(void) {
    __builtin_cpu_init();
    int caps = 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        caps |= CAP_FLOAT32;
    if ((caps & CAP_FLOAT32) && __builtin_cpu_supports("avx512vnni")) caps |= CAP_INT8;
    if (caps & CAP_INT8) caps |= amx_caps();
    return caps;
}

/* Query positions per chunk: a multiple of JT whose packed query fills about CHUNK_BYTES. */
static int chunk_positions(int channels, int bytes_per_value) {
    int n = CHUNK_BYTES / (channels * bytes_per_value);
    n -= n % JT;
    return n < JT ? JT : n;
}

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

/* ---- float32 ---------------------------------------------------------------------------------- */

/* One micro-tile: `rows` (<= R_F32) candidate rows a (stride c) against query positions j .. j + 31,
   packed as two [c][16] vectors blocks at q. */
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

/* Rows i .. i + rows - 1 of one map against query positions [j_lo, j_hi). */
TARGET_F32 INLINE void rows_f32(const float *map, const float *qp, int lq, int c, int rows, int i,
                                int j_lo, int j_hi, float *best_v, int32_t *best_i, float *cv,
                                int32_t *ci) {
    __m512 rv[R_F32];
    __m512i ri[R_F32];
    for (int r = 0; r < rows; r++) {
        rv[r] = _mm512_set1_ps(-INFINITY);
        ri[r] = _mm512_setzero_si512();
    }
    const float *a = map + (size_t)i * c;
    for (int j = j_lo; j < j_hi; j += JT) {
        const float *q = qp + (size_t)(j / JV) * c * JV;
        tile_f32(a, c, q, rows, i, j, lane_mask(lq - j), lane_mask(lq - j - JV), rv, ri, cv, ci);
    }
    for (int r = 0; r < rows; r++) fold_row_f32(rv[r], ri[r], best_v + i + r, best_i + i + r);
}

/* qp: the query packed as [lq_pad / 16][c][16] floats, lq_pad a multiple of 32 (padding lanes zero).
   maps: k maps of lc rows of c floats. Rows [i0, i1) of every map are matched.
   row_arg (k, lc): written for rows [i0, i1). col_val, col_arg (k, lq_pad): the first best row in
   [i0, i1) of each query position. Returns 0, or -1 when out of memory. */
TARGET_F32 int selavpr_mnn_f32(const float *qp, int lq, int lq_pad, const float *maps, int64_t k, int lc,
                               int c, int i0, int i1, int32_t *row_arg, float *col_val,
                               int32_t *col_arg) {
    float *best_v = malloc(sizeof(float) * (size_t)lc);
    if (!best_v) return -1;
    int chunk = chunk_positions(c, 4);
    for (int64_t m = 0; m < k; m++) {
        const float *map = maps + (size_t)m * lc * c;
        int32_t *best_i = row_arg + (size_t)m * lc;
        float *cv = col_val + (size_t)m * lq_pad;
        int32_t *ci = col_arg + (size_t)m * lq_pad;
        for (int j = 0; j < lq_pad; j++) cv[j] = -INFINITY, ci[j] = 0;
        for (int i = i0; i < i1; i++) best_v[i] = -INFINITY, best_i[i] = 0;
        for (int j_lo = 0; j_lo < lq_pad; j_lo += chunk) {
            int j_hi = j_lo + chunk < lq_pad ? j_lo + chunk : lq_pad;
            int i = i0;
            for (; i + R_F32 <= i1; i += R_F32)
                rows_f32(map, qp, lq, c, R_F32, i, j_lo, j_hi, best_v, best_i, cv, ci);
            for (; i < i1; i++) rows_f32(map, qp, lq, c, 1, i, j_lo, j_hi, best_v, best_i, cv, ci);
        }
    }
    free(best_v);
    return 0;
}

/* ---- int8 ------------------------------------------------------------------------------------- */

/* As tile_f32, with a's bytes shifted to unsigned (u = a + 128) and q packed as [c / 4][16][4] bytes
   per vector block; bias holds -128 * sum(q_j) for the 32 positions. */
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

TARGET_I8 INLINE void rows_i8(const uint8_t *map, const int8_t *qp, const int32_t *bias, int lq, int c,
                              int rows, int i, int j_lo, int j_hi, int32_t *best_v, int32_t *best_i,
                              int32_t *cv, int32_t *ci) {
    __m512i rv[R_I8], ri[R_I8];
    for (int r = 0; r < rows; r++) {
        rv[r] = _mm512_set1_epi32(INT32_MIN);
        ri[r] = _mm512_setzero_si512();
    }
    const uint8_t *a = map + (size_t)i * c;
    for (int j = j_lo; j < j_hi; j += JT) {
        const int8_t *q = qp + (size_t)(j / JV) * c * JV;
        tile_i8(a, c, q, bias + j, rows, i, j, lane_mask(lq - j), lane_mask(lq - j - JV), rv, ri, cv, ci);
    }
    for (int r = 0; r < rows; r++) fold_row_i32(rv[r], ri[r], best_v + i + r, best_i + i + r);
}

/* As selavpr_mnn_f32 for int8 maps: qp packed as [lq_pad / 16][c / 4][16][4] bytes (c a multiple of
   4), bias (lq_pad) = -128 * (sum of each query vector's components); col_val holds exact dot
   products. */
TARGET_I8 int selavpr_mnn_i8(const int8_t *qp, const int32_t *bias, int lq, int lq_pad, const int8_t *maps,
                             int64_t k, int lc, int c, int i0, int i1, int32_t *row_arg, int32_t *col_val,
                             int32_t *col_arg) {
    int32_t *best_v = malloc(sizeof(int32_t) * (size_t)lc);
    uint8_t *shifted = malloc((size_t)lc * c);
    if (!best_v || !shifted) {
        free(best_v);
        free(shifted);
        return -1;
    }
    int chunk = chunk_positions(c, 1);
    for (int64_t m = 0; m < k; m++) {
        const int8_t *map = maps + (size_t)m * lc * c;
        for (size_t e = (size_t)i0 * c; e < (size_t)i1 * c; e++) shifted[e] = (uint8_t)map[e] ^ 0x80u;
        int32_t *best_i = row_arg + (size_t)m * lc;
        int32_t *cv = col_val + (size_t)m * lq_pad;
        int32_t *ci = col_arg + (size_t)m * lq_pad;
        for (int j = 0; j < lq_pad; j++) cv[j] = INT32_MIN, ci[j] = 0;
        for (int i = i0; i < i1; i++) best_v[i] = INT32_MIN, best_i[i] = 0;
        for (int j_lo = 0; j_lo < lq_pad; j_lo += chunk) {
            int j_hi = j_lo + chunk < lq_pad ? j_lo + chunk : lq_pad;
            int i = i0;
            for (; i + R_I8 <= i1; i += R_I8)
                rows_i8(shifted, qp, bias, lq, c, R_I8, i, j_lo, j_hi, best_v, best_i, cv, ci);
            for (; i < i1; i++) rows_i8(shifted, qp, bias, lq, c, 1, i, j_lo, j_hi, best_v, best_i, cv, ci);
        }
    }
    free(best_v);
    free(shifted);
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

/* As selavpr_mnn_i8, for kind AMX_INT8 (the same packed query, no bias: the tiles multiply signed
   bytes) or AMX_BF16 (maps and query bfloat16, the query packed as [lq_pad / 16][c / 2][16][2]).
   row_bytes = channels x bytes per value, a multiple of 64. col_val holds int32 dot products, or for
   bfloat16 int32 keys that order like the float32 similarities. Returns -2 where the CPU or the kernel
   does not allow the tiles (they would fault). */
TARGET_AMX int selavpr_mnn_amx(int kind, const uint8_t *qp, int lq, int lq_pad, const uint8_t *maps,
                               int64_t k, int lc, int row_bytes, int i0, int i1, int32_t *row_arg,
                               int32_t *col_val, int32_t *col_arg) {
    if (!(amx_caps() & (kind == AMX_INT8 ? CAP_INT8_AMX : CAP_BF16_AMX))) return -2;
    int32_t *best_v = malloc(sizeof(int32_t) * (size_t)lc);
    uint8_t *last = malloc((size_t)AMX_ROWS * row_bytes); /* a last block of < 16 rows, zero-padded */
    if (!best_v || !last) {
        free(best_v);
        free(last);
        return -1;
    }
    int32_t sim[AMX_ROWS * JT] __attribute__((aligned(64)));
    __m512i rv[AMX_ROWS], ri[AMX_ROWS];
    int chunk = chunk_positions(row_bytes, 1);
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

#else /* not x86-64 with GCC or Clang: no kernels, the engine runs its torch tiles */

int selavpr_mnn_caps(void) { return 0; }

#endif
