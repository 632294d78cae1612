/* The scan's code for a single query, included by _scan.c. A query alone has no second query to
 * share a vector with, so the vector runs along the row instead: each row's dot product with the
 * query's chunk is summed in 16 lanes, whose lanes are then added. Rows are read in order, one
 * after another, which the hardware prefetchers follow: at 200K x 64 one thread scans a chunk in
 * about 1.7 ms, where OpenBLAS's GEMV (numpy's path for one query) took 2.6 to 2.8 ms. Kept out,
 * measured: 16 rows at a time with their lanes added while transposed (2.8 ms: reading 16 rows
 * side by side defeated the prefetchers) and non-temporal prefetches (slower, and the request's
 * Python after the scan ran no faster). A chunk's dot product is still its d products summed in
 * some order, which search.py's error bound allows for (any order, FMA or not). */

typedef float vec1x16 __attribute__((vector_size(16 * sizeof(float))));
typedef float vec1x16u __attribute__((vector_size(16 * sizeof(float)), aligned(4))); /* numpy's alignment */
typedef float vec1x8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vec1x4 __attribute__((vector_size(4 * sizeof(float))));

static inline __attribute__((always_inline)) float lane_sum(const vec1x16 *v) {
    const vec1x16 a = *v;
    vec1x8 h = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    vec1x4 g = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (g[0] + g[2]) + (g[1] + g[3]);
}

/* x . q over d floats. */
static inline __attribute__((always_inline)) float dot_one(const float *x, const float *q, const int d) {
    vec1x16 acc = {0};
    int k = 0;
    for (; k + 16 <= d; k += 16) acc += *(const vec1x16u *)(x + k) * *(const vec1x16u *)(q + k);
    float s = lane_sum(&acc), tail = 0.0f;
    for (; k < d; k++) tail += x[k] * q[k];
    return s + tail;
}

/* Scores a block of rows chunk after chunk (runs of BLOCK rows, as the batch kernels read), then
 * compares them with the query's threshold. */
static inline __attribute__((always_inline)) void scan_range_1(work *w, const int d) {
    float sc[BLOCK];
    for (int64_t b = w->lo; b < w->hi && !w->failed; b += BLOCK) {
        const int n = w->hi - b < BLOCK ? (int)(w->hi - b) : BLOCK;
        block_base(w, b, n, sc);
        for (int c = 0; c < w->nsel; c++) {
            const float *x = w->x[c] + b * d, *q = w->qt + (int64_t)c * d;
            for (int j = 0; j < n; j++) sc[j] += dot_one(x + (int64_t)j * d, q, d);
        }
        for (int j = 0; j < n; j++) /* the threshold falls as rows are admitted */
            if (sc[j] <= w->thr[0] && (!w->mask || w->mask[b + j])) admit(w, 0, b + j, sc[j]);
    }
}

/* Rows [w->lo, w->hi), the chunk width a constant as in _scan_lanes.h. */
static void scan_share_1(work *w) {
    switch (w->d) {
    case 16: scan_range_1(w, 16); break;
    case 32: scan_range_1(w, 32); break;
    case 64: scan_range_1(w, 64); break;
    case 128: scan_range_1(w, 128); break;
    default: scan_range_1(w, w->d);
    }
}
