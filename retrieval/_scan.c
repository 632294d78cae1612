/* The search core's fused scan: scores of a block of rows for up to 16 queries at a time, kept in
 * registers and compared at once with each query's running threshold, so no (N, Q) score matrix
 * is ever written or read back (retrieval/scan.py loads this with ctypes and explains the
 * contract; retrieval/search.py, _windows_numpy, is the reference it must agree with).
 *
 * Score of row i for query q: sum over chosen chunks c of fl(w_c * norm_c[i]) and of the float32
 * dot product x_c[i] . qt_c[q] (qt = -2 w_c q_c), each chunk's dot product in its own accumulator:
 * 2|S| float32 terms, as the numpy path sums them, so search.py's error bound covers both.
 * Each query keeps a max-heap of the kk smallest scores it has seen; a row whose score is at most
 * up(heap top + e) is kept as a candidate. Thresholds only fall, so every row within e of the
 * final kk-th score was kept when it was seen; the caller re-ranks the candidates in float64.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16 /* queries per vector */
#define ROWS 8   /* rows per register tile: 8 accumulators of 16 lanes, a third of AVX-512's registers */
#define BLOCK 128 /* rows per block: its scores (8 KB per 16 queries) stay in the L1 cache */
#define SHARE (BLOCK * 128) /* rows a thread takes at a time */

typedef float v16 __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t v16i __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef float v16u __attribute__((vector_size(LANES * sizeof(float)), aligned(4))); /* numpy's alignment */

typedef struct {
    float *heap;      /* max-heap of the kk smallest scores seen */
    int64_t size;
    int64_t *cand;    /* candidate rows and their scores */
    float *cscore;
    int64_t n, cap;
} query_state;

typedef struct {
    /* shared, read only */
    int nsel, d, nq, ntiles;
    const float *const *x;
    const float *const *norms;
    const float *wnorm;
    const float *qt;
    const uint8_t *mask;
    const int64_t *kk;
    const double *e;
    int64_t n, *next;  /* rows in all, and the first not yet taken by a thread */
    /* this thread's rows and state */
    int64_t lo, hi;
    query_state *qs;
    float *thr;       /* ntiles * LANES thresholds; -inf on padding lanes and for kk = 0 */
    v16 *buf;         /* ntiles * BLOCK score vectors of the block being scanned */
    int failed;
} work;

static float up(double r) { return nextafterf((float)r, INFINITY); }

static void sift_down(float *h, int64_t size) {
    int64_t i = 0;
    float v = h[0];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= size) break;
        if (c + 1 < size && h[c + 1] > h[c]) c++;
        if (h[c] <= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
}

static void sift_up(float *h, int64_t i) {
    float v = h[i];
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (h[p] >= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

/* Keep only the candidates at or under thr; grow the buffer when that frees too little. */
static int make_room(query_state *s, float thr) {
    int64_t m = 0;
    for (int64_t j = 0; j < s->n; j++)
        if (s->cscore[j] <= thr) { s->cand[m] = s->cand[j]; s->cscore[m] = s->cscore[j]; m++; }
    s->n = m;
    if (m * 2 <= s->cap) return 0;
    int64_t cap = s->cap * 2;
    int64_t *c = realloc(s->cand, cap * sizeof(int64_t));
    if (!c) return -1;
    s->cand = c;
    float *sc = realloc(s->cscore, cap * sizeof(float));
    if (!sc) return -1;
    s->cscore = sc;
    s->cap = cap;
    return 0;
}

static void admit(work *w, int q, int64_t row, float score) {
    query_state *s = &w->qs[q];
    int64_t kk = w->kk[q];
    if (s->n == s->cap && make_room(s, w->thr[q]) != 0) { w->failed = 1; return; }
    s->cand[s->n] = row;
    s->cscore[s->n++] = score;
    if (s->size < kk) {
        s->heap[s->size] = score;
        sift_up(s->heap, s->size++);
    } else if (score < s->heap[0]) {
        s->heap[0] = score;
        sift_down(s->heap, s->size);
    }
    if (s->size == kk) w->thr[q] = up((double)s->heap[0] + w->e[q]);
}

/* Adds chunk c's dot products of rows [i, i + rows) to their scores in buf (row j of the block at
 * buf[(t * BLOCK + j) * LANES], query tile t), or starts them from base on the first chunk. */
static inline __attribute__((always_inline)) void chunk_tile(const work *w, int c, int64_t i, int j,
                                                             const int rows, const int d, v16 *buf,
                                                             const float *base, int first) {
    const float *xc = w->x[c] + i * d;
    for (int t = 0; t < w->ntiles; t++) {
        const v16u *qv = (const v16u *)(w->qt + ((int64_t)t * w->nsel + c) * d * LANES);
        v16 acc[ROWS];
        for (int r = 0; r < rows; r++) acc[r] = (v16){0};
        for (int k = 0; k < d; k++) {
            v16 qk = qv[k];
            for (int r = 0; r < rows; r++) acc[r] += xc[r * d + k] * qk;
        }
        v16 *out = buf + (size_t)t * BLOCK + j;
        for (int r = 0; r < rows; r++) out[r] = first ? acc[r] + base[j + r] : out[r] + acc[r];
    }
}

/* Compares the scores sc of rows [i, i + rows) for query tile t with the thresholds. */
static inline __attribute__((always_inline)) void compare_tile(work *w, int t, int64_t i, const int rows,
                                                               const v16 *sc) {
    v16 thr;
    memcpy(&thr, w->thr + t * LANES, sizeof thr);
    v16i hit = (v16i){0};
    for (int r = 0; r < rows; r++) hit |= sc[r] <= thr;
    uint64_t words[LANES / 2];
    memcpy(words, &hit, sizeof words);
    uint64_t any = 0;
    for (int m = 0; m < LANES / 2; m++) any |= words[m];
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
static inline __attribute__((always_inline)) void single_tile(work *w, int64_t i, int j, const int rows,
                                                              const int d, const float *base) {
    const float *x = w->x[0] + i * d;
    for (int t = 0; t < w->ntiles; t++) {
        const v16u *qv = (const v16u *)(w->qt + (int64_t)t * d * LANES);
        v16 acc[ROWS];
        for (int r = 0; r < rows; r++) acc[r] = (v16){0};
        for (int k = 0; k < d; k++) {
            v16 qk = qv[k];
            for (int r = 0; r < rows; r++) acc[r] += x[r * d + k] * qk;
        }
        for (int r = 0; r < rows; r++) acc[r] += base[j + r];
        compare_tile(w, t, i, rows, acc);
    }
}

/* Scores a block of rows one chunk after another, so that each chunk is read in runs of BLOCK
 * rows (interleaving 8 chunks a tile of 8 rows at a time ran 1.5 times as long; software prefetches
 * gained nothing), then compares. */
static inline __attribute__((always_inline)) void scan_range(work *w, const int d) {
    float base[BLOCK];
    for (int64_t b = w->lo; b < w->hi && !w->failed; b += BLOCK) {
        const int n = w->hi - b < BLOCK ? (int)(w->hi - b) : BLOCK;
        for (int j = 0; j < n; j++) base[j] = 0.0f;
        for (int c = 0; c < w->nsel; c++)
            for (int j = 0; j < n; j++) base[j] += w->wnorm[c] * w->norms[c][b + j];
        if (w->nsel == 1) { /* scored and compared in registers: a fifth faster than through buf */
            int j = 0;
            for (; j + ROWS <= n; j += ROWS) single_tile(w, b + j, j, ROWS, d, base);
            for (; j < n; j++) single_tile(w, b + j, j, 1, d, base);
            continue;
        }
        for (int c = 0; c < w->nsel; c++) {
            int j = 0;
            for (; j + ROWS <= n; j += ROWS) chunk_tile(w, c, b + j, j, ROWS, d, w->buf, base, c == 0);
            for (; j < n; j++) chunk_tile(w, c, b + j, j, 1, d, w->buf, base, c == 0);
        }
        for (int t = 0; t < w->ntiles; t++) {
            const v16 *sc = w->buf + (size_t)t * BLOCK;
            int j = 0;
            for (; j + ROWS <= n; j += ROWS) compare_tile(w, t, b + j, ROWS, sc + j);
            for (; j < n; j++) compare_tile(w, t, b + j, 1, sc + j);
        }
    }
}

static void scan_rows(work *w) {
    /* Threads take SHARE rows at a time rather than a fixed half each: on this VM a core that
     * was idle runs slower for milliseconds, and the other then takes more of the work. */
    for (;;) {
        int64_t lo = __atomic_fetch_add(w->next, SHARE, __ATOMIC_RELAXED);
        if (lo >= w->n || w->failed) return;
        w->lo = lo;
        w->hi = lo + SHARE < w->n ? lo + SHARE : w->n;
        /* a constant chunk width lets the compiler address each row by an immediate offset,
         * which ran the FMA loop half again as fast as a width in a register */
        switch (w->d) {
        case 16: scan_range(w, 16); break;
        case 32: scan_range(w, 32); break;
        case 64: scan_range(w, 64); break;
        case 128: scan_range(w, 128); break;
        default: scan_range(w, w->d);
        }
    }
}

/* The widest x86-64 level this CPU runs (4: AVX-512, 3: AVX2 and FMA, 0: other or unknown):
 * setup.py builds this file once per level, and retrieval/scan.py asks the plain build which
 * to load. (GCC's target_clones ran the AVX-512 loop a third slower than a whole build.) */
int scan_cpu_level(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return 4;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 3;
#endif
    return 0;
}

static void *run(void *arg) {
    scan_rows((work *)arg);
    return NULL;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void free_states(query_state *qs, int nq) {
    if (!qs) return;
    for (int q = 0; q < nq; q++) { free(qs[q].heap); free(qs[q].cand); free(qs[q].cscore); }
    free(qs);
}

/* Per query q, the rows whose float32 score is at most up(kk[q]-th smallest score + e[q]), rows
 * with mask[row] == 0 left out (mask may be NULL). Writes at most cap rows of query q to
 * out[q * cap ...] and their number, which may exceed cap, to count[q]. Needs kk[q] allowed rows.
 * Returns 0; -1 when memory ran out, -2 when fewer than kk[q] rows were allowed (nothing usable
 * written then). */
int scan_windows(int nsel, int64_t n, int d, const float *const *x, const float *const *norms,
                 const float *wnorm, const float *qt, int nq, const uint8_t *mask, const int64_t *kk,
                 const double *e, int threads, int64_t cap, int64_t *out, int64_t *count) {
    int ntiles = (nq + LANES - 1) / LANES;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (n / 4096 < threads) threads = n >= 8192 ? (int)(n / 4096) : 1; /* 4096 rows a thread at least */
    work ws[64];
    pthread_t tid[64];
    int status = 0;
    char started[64] = {0};
    int64_t next = 0;
    for (int t = 0; t < threads; t++) {
        work *w = &ws[t];
        *w = (work){.nsel = nsel, .d = d, .nq = nq, .ntiles = ntiles, .x = x, .norms = norms, .wnorm = wnorm,
                    .qt = qt, .mask = mask, .kk = kk, .e = e, .n = n, .next = &next};
        w->qs = calloc(nq, sizeof(query_state));
        w->thr = malloc((size_t)ntiles * LANES * sizeof(float));
        if (posix_memalign((void **)&w->buf, sizeof(v16), (size_t)ntiles * BLOCK * sizeof(v16))) w->buf = NULL;
        if (!w->qs || !w->thr || !w->buf) { status = -1; threads = t + 1; break; }
        for (int l = 0; l < ntiles * LANES; l++) w->thr[l] = l < nq && kk[l] > 0 ? INFINITY : -INFINITY;
        for (int q = 0; q < nq; q++) {
            query_state *s = &w->qs[q];
            s->cap = 2 * kk[q] + 64;
            s->heap = malloc((kk[q] + 1) * sizeof(float));
            s->cand = malloc(s->cap * sizeof(int64_t));
            s->cscore = malloc(s->cap * sizeof(float));
            if (!s->heap || !s->cand || !s->cscore) { status = -1; threads = t + 1; break; }
        }
        if (status) break;
    }
    if (!status) {
        for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], NULL, run, &ws[t]) == 0;
        for (int t = 0; t < threads; t++)
            if (!started[t]) scan_rows(&ws[t]); /* this thread's share, and any a thread could not take */
        for (int t = 1; t < threads; t++)
            if (started[t]) pthread_join(tid[t], NULL);
        for (int t = 0; t < threads; t++) if (ws[t].failed) status = -1;
    }
    for (int q = 0; q < nq && !status; q++) {
        /* the kk-th smallest score overall lies among the threads' heaps */
        int64_t m = 0;
        float *all = malloc((size_t)threads * (kk[q] + 1) * sizeof(float));
        if (!all) { status = -1; break; }
        for (int t = 0; t < threads; t++) {
            memcpy(all + m, ws[t].qs[q].heap, ws[t].qs[q].size * sizeof(float));
            m += ws[t].qs[q].size;
        }
        count[q] = 0;
        if (kk[q] > m) status = -2; /* fewer allowed rows than asked for: the caller's mistake */
        if (kk[q] > 0 && m >= kk[q]) {
            qsort(all, m, sizeof(float), cmp_float);
            float thr = up((double)all[kk[q] - 1] + e[q]);
            for (int t = 0; t < threads; t++) {
                query_state *s = &ws[t].qs[q];
                for (int64_t j = 0; j < s->n; j++)
                    if (s->cscore[j] <= thr) {
                        if (count[q] < cap) out[(int64_t)q * cap + count[q]] = s->cand[j];
                        count[q]++;
                    }
            }
        }
        free(all);
    }
    for (int t = 0; t < threads; t++) { free_states(ws[t].qs, nq); free(ws[t].thr); free(ws[t].buf); }
    return status;
}
