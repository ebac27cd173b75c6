/* The ARM kernels (model/matching/_mnn_arm.c) against a scalar reference, bit for bit: every similarity a
   kernel reports (each query position's best in a range of candidate rows) and both argmaxes with ties to
   the lowest index, on odd shapes, tied and extreme values, and the row ranges of 1 to 3 threads.
   Built with an AArch64 cross compiler and run under qemu-user by arm_check.sh.

   Usage: arm_check EXPECTED_FEATURES (a comma list of neon, dotprod, i8mm: what the emulated CPU has);
   the kernels the CPU has run, and the library's feature detection must find exactly the expected. */

#include <math.h>
#include <stdio.h>

#include "../../../model/matching/_mnn_arm.c"

typedef int (*kernel_fn)(MNN_KERNEL_ARGS);

typedef struct {
    const char *name;
    kernel_fn fn;
    int feature, group, is_float;
} kernel_case;

static const kernel_case KERNELS[] = {
    {"float32 on NEON", selavpr_mnn_f32_neon, CAP_NEON, 1, 1},
    {"int8 on dot product", selavpr_mnn_i8_sdot, CAP_DOTPROD, 4, 0},
    {"int8 on i8mm", selavpr_mnn_i8_smmla, CAP_I8MM, 8, 0},
};

static uint32_t rng = 12345;
static uint32_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}

enum { RANDOM, COARSE, EXTREME };

/* A value of `kind`: uniform in [-1, 1) (floats) or in the int8 range; coarse: -1, 0, 1 (many ties);
   extreme: the int8 limits (-128 for candidates, +-127 for the query: quantize_int8's range). */
static float value(int kind, int is_float, int is_query) {
    if (kind == COARSE) return (float)((int)(next() % 3) - 1);
    if (kind == EXTREME) return next() % 2 ? 127.0f : (is_query ? -127.0f : -128.0f);
    if (is_float) return (float)(next() % 2000001) / 1000000.0f - 1.0f;
    return (float)((int)(next() % 255) - 127);
}

/* The reference similarity: floats as one fmaf chain over the channels in order from zero, int8 exact. */
static float sim_f32(const float *a, const float *q, int c) {
    float s = 0.0f;
    for (int ch = 0; ch < c; ch++) s = fmaf(a[ch], q[ch], s);
    return s;
}

static int32_t sim_i8(const int8_t *a, const int8_t *q, int c) {
    int32_t s = 0;
    for (int ch = 0; ch < c; ch++) s += (int32_t)a[ch] * q[ch];
    return s;
}

static int greater_bits(int is_float, uint32_t x, uint32_t y) {
    if (is_float) {
        float a, b;
        memcpy(&a, &x, 4), memcpy(&b, &y, 4);
        return a > b;
    }
    return (int32_t)x > (int32_t)y;
}

static int failures = 0;

static void fail(const char *kernel, const char *what, int lq, int lc, int c, int kind, int at) {
    if (failures++ < 10)
        fprintf(stderr, "FAIL %s: %s at %d (lq %d, lc %d, c %d, values %d)\n", kernel, what, at, lq, lc, c,
                kind);
}

/* One kernel on k maps of lc x c against a query of lq x c, for the thread split into `parts` ranges. */
static void check(const kernel_case *kc, int lq, int lc, int c, int k, int kind, int parts) {
    int c_pad = (c + kc->group - 1) / kc->group * kc->group;
    int lq_pad = (lq + MNN_POSITIONS - 1) / MNN_POSITIONS * MNN_POSITIONS;
    size_t bytes = kc->is_float ? 4 : 1;
    float *qf = calloc((size_t)lq * c_pad, sizeof(float));
    float *mf = calloc((size_t)k * lc * c_pad, sizeof(float));
    for (int j = 0; j < lq; j++)
        for (int ch = 0; ch < c; ch++) qf[(size_t)j * c_pad + ch] = value(kind, kc->is_float, 1);
    for (int m = 0; m < k; m++)
        for (int i = 0; i < lc; i++)
            for (int ch = 0; ch < c; ch++)
                mf[((size_t)m * lc + i) * c_pad + ch] = m == 1 ? 0.0f : value(kind, kc->is_float, 0);
    /* the operands as the kernel takes them: the query packed [lq_pad / 16][c_pad / group][16][group] */
    uint8_t *packed = calloc((size_t)lq_pad * c_pad, bytes);
    uint8_t *maps = calloc((size_t)k * lc * c_pad, bytes);
    for (int j = 0; j < lq; j++)
        for (int ch = 0; ch < c_pad; ch++) {
            size_t at = ((size_t)(j / 16) * (c_pad / kc->group) + ch / kc->group) * 16 * kc->group +
                        (size_t)(j % 16) * kc->group + ch % kc->group;
            float x = qf[(size_t)j * c_pad + ch];
            if (kc->is_float)
                ((float *)packed)[at] = x;
            else
                ((int8_t *)packed)[at] = (int8_t)x;
        }
    for (size_t e = 0; e < (size_t)k * lc * c_pad; e++) {
        if (kc->is_float)
            ((float *)maps)[e] = mf[e];
        else
            ((int8_t *)maps)[e] = (int8_t)mf[e];
    }
    int8_t *qi = malloc((size_t)lq * c_pad), *mi = malloc((size_t)k * lc * c_pad);
    for (size_t e = 0; e < (size_t)lq * c_pad; e++) qi[e] = (int8_t)qf[e];
    for (size_t e = 0; e < (size_t)k * lc * c_pad; e++) mi[e] = (int8_t)mf[e];

    /* the reference similarities, (k, lc, lq), as float bits or int32 */
    uint32_t *sim = malloc(4 * (size_t)k * lc * lq);
    for (int m = 0; m < k; m++)
        for (int i = 0; i < lc; i++)
            for (int j = 0; j < lq; j++) {
                size_t a = ((size_t)m * lc + i) * c_pad, at = ((size_t)m * lc + i) * lq + j;
                if (kc->is_float) {
                    float s = sim_f32(mf + a, qf + (size_t)j * c_pad, c);
                    memcpy(sim + at, &s, 4);
                } else {
                    int32_t s = sim_i8(mi + a, qi + (size_t)j * c_pad, c);
                    memcpy(sim + at, &s, 4);
                }
            }
    int32_t *row_arg = malloc(sizeof(int32_t) * (size_t)k * lc);
    uint32_t *col_val = malloc(4 * (size_t)k * lq_pad);
    int32_t *col_arg = malloc(sizeof(int32_t) * (size_t)k * lq_pad);
    int step = (lc + parts - 1) / parts;
    step = (step + 47) / 48 * 48; /* native.py's _row_ranges: multiples of 48 rows */
    for (int i0 = 0; i0 < lc; i0 += step) {
        int i1 = i0 + step < lc ? i0 + step : lc;
        if (kc->fn(packed, NULL, lq, lq_pad, maps, k, lc, c_pad, i0, i1, row_arg, col_val, col_arg) != 0) {
            fail(kc->name, "kernel returned an error", lq, lc, c, kind, i0);
            continue;
        }
        for (int m = 0; m < k; m++) {
            const uint32_t *sm = sim + (size_t)m * lc * lq;
            for (int i = i0; i < i1; i++) { /* row argmax over all query positions, first of the best */
                int best = 0;
                for (int j = 1; j < lq; j++)
                    if (greater_bits(kc->is_float, sm[(size_t)i * lq + j], sm[(size_t)i * lq + best])) best = j;
                if (row_arg[(size_t)m * lc + i] != best) fail(kc->name, "row argmax", lq, lc, c, kind, i);
            }
            for (int j = 0; j < lq; j++) { /* column argmax over the range's rows, and its value's bits */
                int best = i0;
                for (int i = i0 + 1; i < i1; i++)
                    if (greater_bits(kc->is_float, sm[(size_t)i * lq + j], sm[(size_t)best * lq + j])) best = i;
                if (col_arg[(size_t)m * lq_pad + j] != best) fail(kc->name, "column argmax", lq, lc, c, kind, j);
                if (col_val[(size_t)m * lq_pad + j] != sm[(size_t)best * lq + j])
                    fail(kc->name, "column value", lq, lc, c, kind, j);
            }
        }
    }
    free(sim);
    free(qf), free(mf), free(packed), free(maps), free(qi), free(mi), free(row_arg), free(col_val),
        free(col_arg);
}

/* Round half to even by hand, clamped to [-127, 127]: the reference for selavpr_quantize_i8. */
static int8_t quantized(float x, float scale) {
    float y = x * scale, r = floorf(y), rest = y - r;
    if (rest > 0.5f || (rest == 0.5f && fmodf(r, 2.0f) != 0.0f)) r += 1.0f;
    return (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
}

/* selavpr_quantize_i8 on maps of 37 values (not a multiple of the vector width), element ranges that
   split maps, values half-way between integers (scale 1), past +-127, and random. */
static void check_quantize(void) {
    enum { PER_MAP = 37, MAPS = 9, N = PER_MAP * MAPS };
    float x[N], scales[MAPS];
    int8_t out[N];
    for (int m = 0; m < MAPS; m++) scales[m] = m == 0 ? 1.0f : 1.0f + (float)(next() % 30000) / 100.0f;
    for (int e = 0; e < N; e++) x[e] = ((float)(next() % 20001) - 10000.0f) / 10000.0f;
    for (int e = 0; e < PER_MAP; e++) x[e] = (float)(e - 18) * 7.0f + 0.5f; /* -125.5 .. 126.5, map 0 */
    x[1] = 300.0f, x[2] = -300.0f;
    static const int64_t cuts[][2] = {{0, N}, {0, 40}, {40, 100}, {100, N}, {5, 6}};
    for (size_t c = 0; c < sizeof cuts / sizeof *cuts; c++) {
        memset(out, 99, sizeof out);
        selavpr_quantize_i8(x, out, cuts[c][0], cuts[c][1], PER_MAP, scales);
        for (int64_t e = cuts[c][0]; e < cuts[c][1]; e++)
            if (out[e] != quantized(x[e], scales[e / PER_MAP])) {
                printf("FAIL quantize: element %lld: %d, expected %d\n", (long long)e, out[e],
                       quantized(x[e], scales[e / PER_MAP]));
                failures++;
                return;
            }
    }
    printf("ok int8 quantize on NEON\n");
}

static int features_named(const char *list) {
    int caps = 0;
    if (strstr(list, "neon")) caps |= CAP_NEON;
    if (strstr(list, "dotprod")) caps |= CAP_DOTPROD;
    if (strstr(list, "i8mm")) caps |= CAP_I8MM;
    return caps;
}

int main(int argc, char **argv) {
    int caps = selavpr_mnn_caps();
    if (argc > 1 && caps != features_named(argv[1])) {
        fprintf(stderr, "FAIL feature detection: found %#x, expected %#x (%s)\n", caps,
                features_named(argv[1]), argv[1]);
        return 1;
    }
    /* (query positions, candidate positions, channels, maps): off every kernel's grid, one map all
       zeros (every similarity 0: every best index 0), chunks of query positions (700 > one chunk). */
    static const int shapes[][4] = {{1, 1, 8, 2}, {35, 21, 24, 3}, {36, 25, 22, 2}, {3, 3, 4, 2},
                                    {99, 26, 130, 2}, {97, 61, 128, 2}, {61, 97, 40, 2}, {700, 50, 128, 1},
                                    {300, 13, 1024, 1}};
    check_quantize();
    int ran = 0;
    for (size_t kc = 0; kc < sizeof KERNELS / sizeof *KERNELS; kc++) {
        if (!(caps & KERNELS[kc].feature)) {
            printf("skipped %s: this CPU lacks it\n", KERNELS[kc].name);
            continue;
        }
        int before = failures, cases = 0;
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
            for (int kind = RANDOM; kind <= EXTREME; kind++)
                for (int parts = 1; parts <= 3; parts += 2, cases++)
                    check(&KERNELS[kc], shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], kind, parts);
        printf("%s %s: %d cases\n", failures == before ? "ok" : "FAILED", KERNELS[kc].name, cases);
        ran++;
    }
    return failures || !ran ? 1 : 0;
}
