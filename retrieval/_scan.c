/* The search core's fused scan: scores of a block of rows for 4, 8 or 16 queries at a time (or for
 * one query alone, _scan_single.h), kept in registers and compared at once with each query's
 * running threshold, so no (N, Q) score matrix is ever written or read back (retrieval/scan.py
 * loads this with ctypes and explains the contract; retrieval/search.py, _windows_numpy, is the
 * reference it must agree with).
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

#define ROWS 8   /* rows per register tile: 8 accumulators of 16 lanes, a third of AVX-512's registers */
#define BLOCK 512 /* rows per block, read chunk by chunk: runs of 128 KB for the prefetchers */
#define SHARE (BLOCK * 64) /* most rows a thread takes at a time (8 MB of a 64-wide chunk) */
#define LAST_SHARE (BLOCK * 4) /* fewest, but for the end of the rows */
#define SCAN_ABI 3        /* scan_abi_version(): raise with any change of scan_windows' arguments */


typedef struct {
    float *heap;      /* max-heap of the kk smallest scores seen */
    int64_t size;
    int64_t *cand;    /* candidate rows and their scores */
    float *cscore;
    int64_t n, cap;
} query_state;

typedef struct {
    /* shared, read only */
    int nsel, d, ntiles;
    const float *const *x;
    const float *const *norms;
    const float *wnorm;
    const float *qt;
    const uint8_t *mask;
    const int64_t *kk;
    const double *e;
    int64_t n, *next;  /* rows in all, and the first not yet taken by a thread */
    int threads;       /* threads sharing the rows */
    /* this thread's rows and state */
    int64_t lo, hi;
    query_state *qs;
    int lanes;        /* queries per vector: 16, 8 or 4; 1 for a single query (_scan_single.h) */
    float *thr;       /* ntiles * lanes thresholds; -inf on padding lanes and for kk = 0 */
    void *buf;        /* ntiles * BLOCK score vectors of the block being scanned */
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

/* Rows [b, b + n)'s scores before their dot products: sum over chosen chunks of fl(w_c * norm_c). */
static inline __attribute__((always_inline)) void block_base(const work *w, int64_t b, int n, float *base) {
    for (int j = 0; j < n; j++) base[j] = 0.0f;
    for (int c = 0; c < w->nsel; c++)
        for (int j = 0; j < n; j++) base[j] += w->wnorm[c] * w->norms[c][b + j];
}

#define LANES 16
#include "_scan_lanes.h"
#define LANES 8
#include "_scan_lanes.h"
#define LANES 4
#include "_scan_lanes.h"
#include "_scan_single.h"

/* The widest x86-64 level this CPU runs (4: AVX-512, 3: AVX2 and FMA, 0: other or unknown):
 * setup.py builds this file once per level, and retrieval/scan.py asks the plain build which
 * to load. (GCC's target_clones ran the AVX-512 loop a third slower than a whole build.) */
int scan_cpu_level(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
    __builtin_cpu_init(); /* the levels by name: every feature -march=x86-64-vN may use */
    return __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
#elif defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2"))
        return 4;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
        return 3;
#endif
    return 0;
}

/* The calling convention retrieval/scan.py was written for: a library built from an older
 * _scan.c (left in the source tree by an earlier install) is not loaded. */
int scan_abi_version(void) { return SCAN_ABI; }

/* Rows a thread takes when lo is the first left: half of its even part of what is left, in whole
 * blocks, from LAST_SHARE to SHARE. Shares shrink as the rows run out, so the threads finish
 * within a small share of each other (with SHARE rows each, 200K rows were 7 shares: 4 for one
 * thread, 3 for the other). */
static int64_t share(const work *w, int64_t lo) {
    int64_t rows = (w->n - lo) / (2 * w->threads) / BLOCK * BLOCK;
    return rows < LAST_SHARE ? LAST_SHARE : rows > SHARE ? SHARE : rows;
}

static void scan_rows(work *w) {
    /* Threads take shares as they go rather than a fixed part each: on this VM a core that was
     * idle runs slower for milliseconds, and the other then takes more of the work. */
    for (;;) {
        int64_t lo = __atomic_load_n(w->next, __ATOMIC_RELAXED), rows;
        do {
            if (lo >= w->n || w->failed) return;
            rows = share(w, lo);
        } while (!__atomic_compare_exchange_n(w->next, &lo, lo + rows, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        w->lo = lo;
        w->hi = lo + rows < w->n ? lo + rows : w->n;
        switch (w->lanes) {
        case 16: scan_share_16(w); break;
        case 8: scan_share_8(w); break;
        case 1: scan_share_1(w); break;
        default: scan_share_4(w);
        }
    }
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
 * with mask[row] == 0 left out (mask may be NULL). qt holds -2 w_c q_c per tile of `lanes`
 * queries (16, 8 or 4; 1 when nq is 1) and chunk, dimension-major:
 * qt[((t * nsel + c) * d + k) * lanes + l].
 * Writes at most cap rows of query q to out[q * cap ...] and their number, which may exceed cap,
 * to count[q]. Needs kk[q] allowed rows.
 * Returns 0; -1 when memory ran out, -2 when fewer than kk[q] rows were allowed (nothing usable
 * written then). */
int scan_windows(int nsel, int64_t n, int d, const float *const *x, const float *const *norms,
                 const float *wnorm, const float *qt, int nq, const uint8_t *mask, const int64_t *kk,
                 const double *e, int lanes, int threads, int64_t cap, int64_t *out, int64_t *count) {
    if (lanes != 16 && lanes != 8 && !(lanes == 1 && nq == 1)) lanes = 4;
    int ntiles = (nq + lanes - 1) / lanes;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if ((n + SHARE - 1) / SHARE < threads) threads = (int)((n + SHARE - 1) / SHARE); /* a share each */
    if (threads < 1) threads = 1;
    work ws[64];
    pthread_t tid[64];
    int status = 0;
    char started[64] = {0};
    int64_t next = 0;
    for (int t = 0; t < threads; t++) {
        work *w = &ws[t];
        *w = (work){.nsel = nsel, .d = d, .ntiles = ntiles, .x = x, .norms = norms, .wnorm = wnorm,
                    .qt = qt, .mask = mask, .kk = kk, .e = e, .n = n, .next = &next,
                    .threads = threads};
        w->qs = calloc(nq, sizeof(query_state));
        w->lanes = lanes;
        w->thr = malloc((size_t)ntiles * lanes * sizeof(float));
        if (posix_memalign(&w->buf, 64, (size_t)ntiles * BLOCK * lanes * sizeof(float))) w->buf = NULL;
        if (!w->qs || !w->thr || !w->buf) { status = -1; threads = t + 1; break; }
        for (int l = 0; l < ntiles * lanes; l++) w->thr[l] = l < nq && kk[l] > 0 ? INFINITY : -INFINITY;
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
