/* The scan's vector code for one lane count, included by _scan.c once per LANES (16, 8, 4):
 * LANES queries share each vector, so a batch of up to 8 or 4 queries computes no padding lanes
 * of 16. Functions are named with the lane count (NAME(scan_share) is scan_share_16, ...). */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(f) CAT(f, LANES)
#define VEC CAT(vec, LANES)
#define VECI CAT(veci, LANES)
#define VECU CAT(vecu, LANES)

typedef float VEC __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t VECI __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef float VECU __attribute__((vector_size(LANES * sizeof(float)), aligned(4))); /* numpy's alignment */

/* acc[r]: chunk c's dot products of row i + r with query tile t, r < rows (8 register chains). */
static inline __attribute__((always_inline)) void NAME(dots)(const work *w, int c, int t, int64_t i,
                                                       const int rows, const int d, VEC *acc) {
    const float *x = w->x[c] + i * d;
    const VECU *qv = (const VECU *)(w->qt + ((int64_t)t * w->nsel + c) * d * LANES);
    for (int r = 0; r < rows; r++) acc[r] = (VEC){0};
    for (int k = 0; k < d; k++) {
        VEC qk = qv[k];
        for (int r = 0; r < rows; r++) acc[r] += x[r * d + k] * qk;
    }
}

/* Adds chunk c's dot products of rows [i, i + rows) to their scores in buf (row j of the block at
 * buf[(t * BLOCK + j) * LANES], query tile t), or starts them from base on the first chunk. */
static inline __attribute__((always_inline)) void NAME(chunk_tile)(const work *w, int c, int64_t i, int j,
                                                             const int rows, const int d, VEC *buf,
                                                             const float *base, int first) {
    for (int t = 0; t < w->ntiles; t++) {
        VEC acc[ROWS];
        NAME(dots)(w, c, t, i, rows, d, acc);
        VEC *out = buf + (size_t)t * BLOCK + j;
        for (int r = 0; r < rows; r++) out[r] = first ? acc[r] + base[j + r] : out[r] + acc[r];
    }
}

/* Compares the scores sc of rows [i, i + rows) for query tile t with the thresholds. */
static inline __attribute__((always_inline)) void NAME(compare_tile)(work *w, int t, int64_t i, const int rows,
                                                               const VEC *sc) {
    VEC thr;
    memcpy(&thr, w->thr + t * LANES, sizeof thr);
    VECI hit = (VECI){0};
    for (int r = 0; r < rows; r++) hit |= sc[r] <= thr;
    uint64_t words[sizeof(VECI) / sizeof(uint64_t)];
    memcpy(words, &hit, sizeof words);
    uint64_t any = 0;
    for (size_t m = 0; m < sizeof words / sizeof *words; m++) any |= words[m];
    if (!any) return; /* the common case once the thresholds have settled */
    for (int r = 0; r < rows; r++) {
        if (w->mask && !w->mask[i + r]) continue;
        for (int l = 0; l < LANES; l++) {
            int q = t * LANES + l;
            if (sc[r][l] <= w->thr[q]) admit(w, q, i + r, sc[r][l]);
        }
    }
}

/* One chosen chunk: the scores of rows [i, i + rows) (block row j) never leave the registers. */
static inline __attribute__((always_inline)) void NAME(single_tile)(work *w, int64_t i, int j, const int rows,
                                                              const int d, const float *base) {
    for (int t = 0; t < w->ntiles; t++) {
        VEC acc[ROWS];
        NAME(dots)(w, 0, t, i, rows, d, acc);
        for (int r = 0; r < rows; r++) acc[r] += base[j + r];
        NAME(compare_tile)(w, t, i, rows, acc);
    }
}

/* Scores a block of rows one chunk after another, so that each chunk is read in runs of BLOCK
 * rows, then compares. At 200K rows and 16 queries, interleaving 8 chunks a tile of 8 rows at a
 * time ran 1.5 times as long, and blocks of 128 rows (with shares of 16K) 1.3 to 1.8 times as
 * long as 512 (with 32K) for 1, 2 and 8 chunks; software prefetches gained nothing. */
static inline __attribute__((always_inline)) void NAME(scan_range)(work *w, const int d) {
    float base[BLOCK];
    for (int64_t b = w->lo; b < w->hi && !w->failed; b += BLOCK) {
        const int n = w->hi - b < BLOCK ? (int)(w->hi - b) : BLOCK;
        block_base(w, b, n, base);
        if (w->nsel == 1) { /* scored and compared in registers: a fifth faster than through buf */
            int j = 0;
            for (; j + ROWS <= n; j += ROWS) NAME(single_tile)(w, b + j, j, ROWS, d, base);
            for (; j < n; j++) NAME(single_tile)(w, b + j, j, 1, d, base);
            continue;
        }
        for (int c = 0; c < w->nsel; c++) {
            int j = 0;
            for (; j + ROWS <= n; j += ROWS) NAME(chunk_tile)(w, c, b + j, j, ROWS, d, (VEC *)w->buf, base, c == 0);
            for (; j < n; j++) NAME(chunk_tile)(w, c, b + j, j, 1, d, (VEC *)w->buf, base, c == 0);
        }
        for (int t = 0; t < w->ntiles; t++) {
            const VEC *sc = (const VEC *)w->buf + (size_t)t * BLOCK;
            int j = 0;
            for (; j + ROWS <= n; j += ROWS) NAME(compare_tile)(w, t, b + j, ROWS, sc + j);
            for (; j < n; j++) NAME(compare_tile)(w, t, b + j, 1, sc + j);
        }
    }
}

/* Rows [w->lo, w->hi). A constant chunk width lets the compiler address each row by an immediate
 * offset, which ran the FMA loop 1.1 to 1.3 times as fast as a width in a register. */
static void NAME(scan_share)(work *w) {
    switch (w->d) {
    case 16: NAME(scan_range)(w, 16); break;
    case 32: NAME(scan_range)(w, 32); break;
    case 64: NAME(scan_range)(w, 64); break;
    case 128: NAME(scan_range)(w, 128); break;
    default: NAME(scan_range)(w, w->d);
    }
}

#undef NAME
#undef VEC
#undef VECI
#undef VECU
#undef LANES
