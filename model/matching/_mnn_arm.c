/* The MNN engine's kernels for ARM (AArch64): float32 on NEON FMA; int8 on the dot-product instruction
   (sdot) or, where the CPU has i8mm, the 2 x 2 matrix multiply-accumulate (smmla). The same contract,
   loop and reductions as the x86-64 kernels (_mnn_cpu.c, _mnn_driver.h); the library is built from
   both files, each compiling only on its own architecture.

   float32: one fused multiply-add chain per similarity over the channels in order from zero (native.py
   checks those bits against torch.mm before it uses the kernel). int8: exact int32 dot products of
   signed bytes, no shift. Tested bit for bit against a scalar reference under qemu-user
   (tests/model/native/arm_check.sh), on emulated CPUs with and without dot product and i8mm. */

#if defined(__aarch64__) && defined(__GNUC__)
#include <arm_neon.h>

#include "_mnn_driver.h"

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
static int sysctl_flag(const char *name) {
    int value = 0;
    size_t size = sizeof value;
    return sysctlbyname(name, &value, &size, NULL, 0) == 0 && value;
}
#endif

int selavpr_mnn_caps(void) {
    static volatile int known = -1;
    if (known >= 0) return known;
    int caps = CAP_NEON; /* every AArch64 CPU has Advanced SIMD with FMA */
#if defined(__linux__)
    unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if (!(hw & HWCAP_ASIMD)) return known = 0;
    if (hw & HWCAP_ASIMDDP) caps |= CAP_DOTPROD;
    if (hw2 & HWCAP2_I8MM) caps |= CAP_I8MM;
#elif defined(__APPLE__)
    if (sysctl_flag("hw.optional.arm.FEAT_DotProd")) caps |= CAP_DOTPROD;
    if (sysctl_flag("hw.optional.arm.FEAT_I8MM")) caps |= CAP_I8MM;
#endif
    return known = caps;
}

#define NEEDS(cap) \
    if (!(selavpr_mnn_caps() & (cap))) return -2

#define R_F32 4  /* rows per micro-tile: 4 rows x 4 vectors of 4 positions = 16 accumulators */
#define R_SDOT 4
#define R_MMLA 4 /* two pairs of rows, 8 accumulators of 2 x 2 each */
#define INLINE static inline __attribute__((always_inline))
#define TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define TARGET_I8MM __attribute__((target("arch=armv8.2-a+i8mm")))

INLINE uint32x4_t greater(int is_float, uint32x4_t x, uint32x4_t y) {
    return is_float ? vcgtq_f32(vreinterpretq_f32_u32(x), vreinterpretq_f32_u32(y))
                    : vcgtq_s32(vreinterpretq_s32_u32(x), vreinterpretq_s32_u32(y));
}

/* The running bests after rows i .. i + rows - 1 of 16 query positions j .. j + 15: s[r][v] holds row
   r's similarities (float32 or int32 bits) for positions j + 4v .. j + 4v + 3. rv, ri: each row's
   per-lane (max, first index), v in increasing order so a strict > keeps the first; cv, ci: each
   position's (max, first row), in memory. */
INLINE void reduce16(int is_float, uint32x4_t s[][4], int rows, int i, int j, int lq, uint32x4_t *rv,
                     uint32x4_t *ri, void *cv, int32_t *ci) {
    static const uint32_t lanes[4] = {0, 1, 2, 3};
    uint32x4_t pos[4], before[4], c[4], k[4];
    for (int v = 0; v < 4; v++) {
        pos[v] = vaddq_u32(vdupq_n_u32((uint32_t)(j + 4 * v)), vld1q_u32(lanes));
        before[v] = vcltq_u32(pos[v], vdupq_n_u32((uint32_t)lq));
        c[v] = vld1q_u32((const uint32_t *)cv + j + 4 * v);
        k[v] = vld1q_u32((const uint32_t *)ci + j + 4 * v);
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
        uint32x4_t row = vdupq_n_u32((uint32_t)(i + r));
        for (int v = 0; v < 4; v++) {
            uint32x4_t g = vandq_u32(greater(is_float, s[r][v], rv[r]), before[v]);
            rv[r] = vbslq_u32(g, s[r][v], rv[r]);
            ri[r] = vbslq_u32(g, pos[v], ri[r]);
            g = greater(is_float, s[r][v], c[v]);
            c[v] = vbslq_u32(g, s[r][v], c[v]);
            k[v] = vbslq_u32(g, row, k[v]);
        }
    }
    for (int v = 0; v < 4; v++) {
        vst1q_u32((uint32_t *)cv + j + 4 * v, c[v]);
        vst1q_u32((uint32_t *)ci + j + 4 * v, k[v]);
    }
}

INLINE void start_rows(int is_float, int rows, uint32x4_t *rv, uint32x4_t *ri) {
    for (int r = 0; r < rows; r++) {
        rv[r] = is_float ? vreinterpretq_u32_f32(vdupq_n_f32(-INFINITY)) : vdupq_n_u32(0x80000000u);
        ri[r] = vdupq_n_u32(0);
    }
}

INLINE void fold_rows(int is_float, int rows, const uint32x4_t *rv, const uint32x4_t *ri, const mnn_pass *p,
                      int i) {
    for (int r = 0; r < rows; r++) {
        uint32_t values[4], indices[4];
        vst1q_u32(values, rv[r]);
        vst1q_u32(indices, ri[r]);
        if (is_float)
            mnn_fold_f32((const float *)values, (const int32_t *)indices, 4, (float *)p->best_v + i + r,
                         p->best_i + i + r);
        else
            mnn_fold_i32((const int32_t *)values, (const int32_t *)indices, 4, (int32_t *)p->best_v + i + r,
                         p->best_i + i + r);
    }
}

/* ---- float32 on NEON: the query packed as [lq_pad / 16][c][16] floats ---------------------------- */

INLINE void rows_f32_of(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    int c = p->c;
    uint32x4_t rv[R_F32], ri[R_F32];
    start_rows(1, rows, rv, ri);
    const float *a = (const float *)p->rows + (size_t)i * c;
    for (int j = j_lo; j < j_hi; j += MNN_LANES) {
        const float *q = (const float *)p->qp + (size_t)(j / MNN_LANES) * c * MNN_LANES;
        float32x4_t s[R_F32][4];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < 4; v++) s[r][v] = vdupq_n_f32(0.0f);
        for (int ch = 0; ch < c; ch++) {
            float32x4_t b[4];
            for (int v = 0; v < 4; v++) b[v] = vld1q_f32(q + (size_t)ch * MNN_LANES + 4 * v);
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                float x = a[(size_t)r * c + ch];
                for (int v = 0; v < 4; v++) s[r][v] = vfmaq_n_f32(s[r][v], b[v], x);
            }
        }
        uint32x4_t t[R_F32][4];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < 4; v++) t[r][v] = vreinterpretq_u32_f32(s[r][v]);
        reduce16(1, t, rows, i, j, p->lq, rv, ri, p->cv, p->ci);
    }
    fold_rows(1, rows, rv, ri, p, i);
}

static void rows_f32(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    if (rows == R_F32) return rows_f32_of(p, R_F32, i, j_lo, j_hi);
    for (int r = 0; r < rows; r++) rows_f32_of(p, 1, i + r, j_lo, j_hi);
}

int selavpr_mnn_f32_neon(MNN_KERNEL_ARGS) {
    NEEDS(CAP_NEON);
    static const mnn_kernel kernel = {rows_f32, NULL, R_F32, 4, 1, 0};
    return mnn_run(&kernel, MNN_PASS_ARGS);
}

/* ---- quantize_int8's elementwise pass (as selavpr_quantize_i8 in _mnn_cpu.c) ------------------------ */

/* 4 values times the scale, rounded half to even (vrndnq), clamped: as mnn_quantize_one, as int32. */
INLINE int32x4_t quantize4(const float *x, float32x4_t scale) {
    float32x4_t y = vrndnq_f32(vmulq_f32(vld1q_f32(x), scale));
    y = vmaxq_f32(vminq_f32(y, vdupq_n_f32(127.0f)), vdupq_n_f32(-127.0f));
    return vcvtq_s32_f32(y);
}

int selavpr_quantize_i8(const float *x, int8_t *out, int64_t e0, int64_t e1, int64_t per_map,
                        const float *scales) {
    for (int64_t e = e0; e < e1;) {
        int64_t end = mnn_map_run_end(e, e1, per_map);
        float s = scales[e / per_map];
        float32x4_t scale = vdupq_n_f32(s);
        for (; e + 16 <= end; e += 16) {
            int16x8_t lo = vcombine_s16(vmovn_s32(quantize4(x + e, scale)),
                                        vmovn_s32(quantize4(x + e + 4, scale)));
            int16x8_t hi = vcombine_s16(vmovn_s32(quantize4(x + e + 8, scale)),
                                        vmovn_s32(quantize4(x + e + 12, scale)));
            vst1q_s8(out + e, vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
        }
        for (; e < end; e++) out[e] = mnn_quantize_one(x[e], s);
    }
    return 0;
}

/* ---- int8 on sdot: the query packed as [lq_pad / 16][c / 4][16][4] bytes -------------------------- */

TARGET_DOTPROD INLINE void rows_sdot_of(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    int c = p->c;
    uint32x4_t rv[R_SDOT], ri[R_SDOT];
    start_rows(0, rows, rv, ri);
    const int8_t *a = (const int8_t *)p->rows + (size_t)i * c;
    for (int j = j_lo; j < j_hi; j += MNN_LANES) {
        const int8_t *q = (const int8_t *)p->qp + (size_t)(j / MNN_LANES) * c * MNN_LANES;
        int32x4_t s[R_SDOT][4];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < 4; v++) s[r][v] = vdupq_n_s32(0);
        for (int g = 0; g < c; g += 4) {
            int8x16_t b[4];
            for (int v = 0; v < 4; v++) b[v] = vld1q_s8(q + (size_t)g * MNN_LANES + 16 * v);
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                int32_t word;
                memcpy(&word, a + (size_t)r * c + g, 4);
                int8x16_t x = vreinterpretq_s8_s32(vdupq_n_s32(word));
                for (int v = 0; v < 4; v++) s[r][v] = vdotq_s32(s[r][v], x, b[v]);
            }
        }
        uint32x4_t t[R_SDOT][4];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < 4; v++) t[r][v] = vreinterpretq_u32_s32(s[r][v]);
        reduce16(0, t, rows, i, j, p->lq, rv, ri, p->cv, p->ci);
    }
    fold_rows(0, rows, rv, ri, p, i);
}

TARGET_DOTPROD static void rows_sdot(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    if (rows == R_SDOT) return rows_sdot_of(p, R_SDOT, i, j_lo, j_hi);
    for (int r = 0; r < rows; r++) rows_sdot_of(p, 1, i + r, j_lo, j_hi);
}

int selavpr_mnn_i8_sdot(MNN_KERNEL_ARGS) {
    NEEDS(CAP_DOTPROD);
    static const mnn_kernel kernel = {rows_sdot, NULL, R_SDOT, 1, 0, 0};
    return mnn_run(&kernel, MNN_PASS_ARGS);
}

/* ---- int8 on smmla (i8mm) ------------------------------------------------------------------------
   smmla multiplies a 2 x 8 matrix (two candidate rows' 8 channels) by an 8 x 2 one (two query positions'
   8 channels) into a 2 x 2 int32 block [r0.q0, r0.q1, r1.q0, r1.q1]. The query is packed as
   [lq_pad / 16][c / 8][16][8] bytes (a vector: 2 positions x 8 channels), the candidate rows as pairs,
   [lc / 2][c / 8][2][8] (an odd last row paired with zeros). */

static void pair_rows(const uint8_t *map, uint8_t *out, int lc, int c, int i0, int i1) {
    for (int i = i0; i < i1; i += 2) {
        uint8_t *pair = out + (size_t)i * c;
        for (int h = 0; h < c; h += 8) {
            memcpy(pair + 2 * h, map + (size_t)i * c + h, 8);
            if (i + 1 < lc)
                memcpy(pair + 2 * h + 8, map + (size_t)(i + 1) * c + h, 8);
            else
                memset(pair + 2 * h + 8, 0, 8);
        }
    }
}

/* `pairs` pairs of rows from row i (even), of which the first `valid` rows are real. */
TARGET_I8MM INLINE void rows_mmla_of(const mnn_pass *p, int pairs, int valid, int i, int j_lo, int j_hi) {
    int c = p->c;
    uint32x4_t rv[R_MMLA], ri[R_MMLA];
    start_rows(0, valid, rv, ri);
    const int8_t *a = (const int8_t *)p->rows + (size_t)i * c;
    for (int j = j_lo; j < j_hi; j += MNN_LANES) {
        const int8_t *q = (const int8_t *)p->qp + (size_t)(j / MNN_LANES) * c * MNN_LANES;
        int32x4_t s[R_MMLA / 2][8];
        for (int pr = 0; pr < pairs; pr++)
            for (int v = 0; v < 8; v++) s[pr][v] = vdupq_n_s32(0);
        for (int h = 0; h < c; h += 8) {
            int8x16_t b[8];
            for (int v = 0; v < 8; v++) b[v] = vld1q_s8(q + (size_t)h * MNN_LANES + 16 * v);
            for (int pr = 0; pr < pairs; pr++) {
                int8x16_t x = vld1q_s8(a + (size_t)pr * 2 * c + 2 * h);
                for (int v = 0; v < 8; v++) s[pr][v] = vmmlaq_s32(s[pr][v], x, b[v]);
            }
        }
        /* Row 2pr + e's positions 4w .. 4w + 3: half e of blocks 2w and 2w + 1. */
        uint32x4_t t[R_MMLA][4];
        for (int pr = 0; pr < pairs; pr++)
            for (int w = 0; w < 4; w++) {
                uint64x2_t lo = vreinterpretq_u64_s32(s[pr][2 * w]), hi = vreinterpretq_u64_s32(s[pr][2 * w + 1]);
                t[2 * pr][w] = vreinterpretq_u32_u64(vzip1q_u64(lo, hi));
                t[2 * pr + 1][w] = vreinterpretq_u32_u64(vzip2q_u64(lo, hi));
            }
        reduce16(0, t, valid, i, j, p->lq, rv, ri, p->cv, p->ci);
    }
    fold_rows(0, valid, rv, ri, p, i);
}

TARGET_I8MM static void rows_mmla(const mnn_pass *p, int rows, int i, int j_lo, int j_hi) {
    if (rows == R_MMLA) return rows_mmla_of(p, R_MMLA / 2, R_MMLA, i, j_lo, j_hi);
    for (int r = 0; r < rows; r += 2) rows_mmla_of(p, 1, rows - r < 2 ? rows - r : 2, i + r, j_lo, j_hi);
}

int selavpr_mnn_i8_smmla(MNN_KERNEL_ARGS) {
    NEEDS(CAP_I8MM);
    static const mnn_kernel kernel = {rows_mmla, pair_rows, R_MMLA, 1, 0, 1};
    return mnn_run(&kernel, MNN_PASS_ARGS);
}

#endif
