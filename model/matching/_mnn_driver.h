/* The loop every CPU kernel of _mnn_cpu.c and _mnn_arm.c shares: maps, query chunks, groups of candidate
   rows. A kernel supplies only what depends on its instructions: `rows`, the products and fused
   reductions of a few candidate rows against a chunk of query positions, and optionally `prepare`, which
   rewrites a map's rows once into the layout its instructions take. See _mnn_cpu.c for the contract. */

#ifndef SELAVPR_MNN_DRIVER_H
#define SELAVPR_MNN_DRIVER_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* CPU features (selavpr_mnn_caps), one bit each; model/matching/native.py's table maps them to kernels. */
enum {
    CAP_AVX2 = 1 << 0, /* with FMA */
    CAP_AVX_VNNI = 1 << 1,
    CAP_AVX512 = 1 << 2, /* F, BW, DQ, VL */
    CAP_AVX512_VNNI = 1 << 3,
    CAP_AMX_INT8 = 1 << 4,
    CAP_AMX_BF16 = 1 << 5,
    CAP_NEON = 1 << 6,
    CAP_DOTPROD = 1 << 7,
    CAP_I8MM = 1 << 8,
};

#define MNN_LANES 16      /* query positions per packed block */
#define MNN_POSITIONS 32  /* lq_pad is a multiple of this */
#define MNN_CHUNK_BYTES (256 * 1024)

typedef struct {
    const void *qp;        /* the packed query: [lq_pad / 16][c / group][16][group] values */
    const int32_t *bias;   /* per query position, where the kernel needs one */
    int lq, c;             /* query positions, channels (a multiple of the kernel's) */
    const void *rows;      /* this map's candidate rows, as `prepare` left them */
    void *best_v;          /* per candidate row: its best similarity so far (float or int32) */
    int32_t *best_i;       /* ... and its first query position */
    void *cv;              /* per query position: its best similarity among the rows so far */
    int32_t *ci;           /* ... and its first row */
} mnn_pass;

/* Every exported kernel's arguments, passed on to mnn_run as they are. */
#define MNN_KERNEL_ARGS                                                                                  \
    const void *qp, const int32_t *bias, int lq, int lq_pad, const void *maps, int64_t k, int lc, int c, \
        int i0, int i1, int32_t *row_arg, void *col_val, int32_t *col_arg
#define MNN_PASS_ARGS qp, bias, lq, lq_pad, maps, k, lc, c, i0, i1, row_arg, col_val, col_arg

/* Rows i .. i + rows - 1 (rows <= the kernel's tile_rows) against query positions [j_lo, j_hi). */
typedef void (*mnn_rows_fn)(const mnn_pass *p, int rows, int i, int j_lo, int j_hi);
/* Rows [i0, i1) of a map of lc rows of c values into `out` (the kernel's layout). */
typedef void (*mnn_prepare_fn)(const uint8_t *map, uint8_t *out, int lc, int c, int i0, int i1);

typedef struct {
    mnn_rows_fn rows;
    mnn_prepare_fn prepare; /* NULL: the rows are read as they are */
    int tile_rows;
    int value_bytes;        /* of one candidate channel */
    int is_float;           /* similarities float32 (else int32) */
    int prepared_extra_rows; /* zero rows `prepare` may write past lc */
} mnn_kernel;

/* Query positions per chunk: a multiple of MNN_POSITIONS whose packed query fills about 256 KiB, so
   that it stays in L2 while every candidate row streams past it. */
static inline int mnn_chunk_positions(int row_bytes) {
    int n = MNN_CHUNK_BYTES / row_bytes;
    n -= n % MNN_POSITIONS;
    return n < MNN_POSITIONS ? MNN_POSITIONS : n;
}

/* Lanes' running (max, first index) folded into a row's best so far. The index of a lane is not in
   order across lanes, so among the lanes holding the maximum the lowest index wins; chunks come in
   increasing j, so a strict > keeps the first maximum. */
static inline void mnn_fold_f32(const float *v, const int32_t *idx, int lanes, float *best_v,
                                int32_t *best_i) {
    float m = v[0];
    for (int l = 1; l < lanes; l++) m = v[l] > m ? v[l] : m;
    if (!(m > *best_v)) return;
    int32_t first = INT32_MAX;
    for (int l = 0; l < lanes; l++)
        if (v[l] == m && idx[l] < first) first = idx[l];
    *best_v = m;
    *best_i = first;
}

static inline void mnn_fold_i32(const int32_t *v, const int32_t *idx, int lanes, int32_t *best_v,
                                int32_t *best_i) {
    int32_t m = v[0];
    for (int l = 1; l < lanes; l++) m = v[l] > m ? v[l] : m;
    if (m <= *best_v) return;
    int32_t first = INT32_MAX;
    for (int l = 0; l < lanes; l++)
        if (v[l] == m && idx[l] < first) first = idx[l];
    *best_v = m;
    *best_i = first;
}

/* quantize_int8's elementwise step (model/matching/quantize.py), one value: times its map's scale
   (one IEEE float32 product, as torch.mul), rounded half to even (torch.round), clamped to [-127, 127].
   Inputs are finite. The vector versions (selavpr_quantize_i8 per architecture) give the same bits. */
static inline int8_t mnn_quantize_one(float x, float scale) {
    float y = nearbyintf(x * scale); /* the default rounding mode: to nearest, ties to even */
    y = y > 127.0f ? 127.0f : y;
    y = y < -127.0f ? -127.0f : y;
    return (int8_t)y;
}

/* Where the run of elements from e that share its map ends (at most e1). */
static inline int64_t mnn_map_run_end(int64_t e, int64_t e1, int64_t per_map) {
    int64_t end = (e / per_map + 1) * per_map;
    return end < e1 ? end : e1;
}

static inline void mnn_quantize_scalar(const float *x, int8_t *out, int64_t e0, int64_t e1, int64_t per_map,
                                       const float *scales) {
    for (int64_t e = e0; e < e1; e++) out[e] = mnn_quantize_one(x[e], scales[e / per_map]);
}

/* Rows [i0, i1) of each of k maps (lc rows of c values) against the packed query. row_arg (k, lc):
   written for rows [i0, i1). col_val, col_arg (k, lq_pad): the first best row in [i0, i1) of each
   query position. Returns 0, or -1 when out of memory. */
static int mnn_run(const mnn_kernel *kernel, const void *qp, const int32_t *bias, int lq, int lq_pad,
                   const void *maps, int64_t k, int lc, int c, int i0, int i1, int32_t *row_arg,
                   void *col_val, int32_t *col_arg) {
    size_t row_bytes = (size_t)c * kernel->value_bytes;
    void *best_v = malloc(4 * (size_t)lc);
    uint8_t *prepared = NULL;
    if (kernel->prepare) prepared = malloc(row_bytes * (size_t)(lc + kernel->prepared_extra_rows));
    if (!best_v || (kernel->prepare && !prepared)) {
        free(best_v);
        free(prepared);
        return -1;
    }
    int chunk = mnn_chunk_positions((int)row_bytes);
    mnn_pass p = {qp, bias, lq, c, NULL, best_v, NULL, NULL, NULL};
    for (int64_t m = 0; m < k; m++) {
        const uint8_t *map = (const uint8_t *)maps + (size_t)m * lc * row_bytes;
        if (kernel->prepare) {
            kernel->prepare(map, prepared, lc, c, i0, i1);
            map = prepared;
        }
        p.rows = map;
        p.best_i = row_arg + (size_t)m * lc;
        p.cv = (uint8_t *)col_val + (size_t)m * lq_pad * 4;
        p.ci = col_arg + (size_t)m * lq_pad;
        for (int j = 0; j < lq_pad; j++) {
            if (kernel->is_float)
                ((float *)p.cv)[j] = -INFINITY;
            else
                ((int32_t *)p.cv)[j] = INT32_MIN;
            p.ci[j] = 0;
        }
        for (int i = i0; i < i1; i++) {
            if (kernel->is_float)
                ((float *)best_v)[i] = -INFINITY;
            else
                ((int32_t *)best_v)[i] = INT32_MIN;
            p.best_i[i] = 0;
        }
        for (int j_lo = 0; j_lo < lq_pad; j_lo += chunk) {
            int j_hi = j_lo + chunk < lq_pad ? j_lo + chunk : lq_pad;
            int i = i0;
            for (; i + kernel->tile_rows <= i1; i += kernel->tile_rows)
                kernel->rows(&p, kernel->tile_rows, i, j_lo, j_hi);
            if (i < i1) kernel->rows(&p, i1 - i, i, j_lo, j_hi);
        }
    }
    free(best_v);
    free(prepared);
    return 0;
}

#endif
