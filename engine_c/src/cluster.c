/*
 * cluster.c — k-means, assignment and incremental statistics.
 *
 * Invariants:
 * 1. kvt_kmeans never leaves a cluster empty when n >= k: an emptied cluster is reseeded
 *    with the point farthest from its centroid among a deterministic sample.
 * 2. Every function here is pure computation on caller-owned memory plus scratch it frees
 *    before returning; no I/O, no engine state.
 * 3. Results depend only on inputs and the seed (no time, no thread count).
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "cluster.h"
#include "common.h"

void kvt_key_to_f32(const kvt_kernels *K, int dtype, const void *key, float *out, uint32_t dim) {
    if (dtype == KVT_F16)
        K->f16_to_f32((const uint16_t *)key, out, dim);
    else
        memcpy(out, key, (size_t)dim * 4);
}

/* Keys are rows `stride` bytes apart: a plain key matrix, or the keys inside records. */
static inline const void *row(size_t stride, const void *keys, uint64_t i) {
    return (const uint8_t *)keys + i * stride;
}

uint32_t kvt_nearest(const kvt_kernels *K, int dtype, const void *key, const float *centroids, const float *norms,
                     uint32_t k, uint32_t dim) {
    uint32_t best = 0;
    float bestd = FLT_MAX;
    for (uint32_t c = 0; c < k; c++) {
        float d = norms[c] - 2.0f * kvt_dot_key(K, dtype, key, centroids + (size_t)c * dim, dim);
        if (d < bestd) {
            bestd = d;
            best = c;
        }
    }
    return best;
}

uint32_t kvt_nearest_rep(const kvt_kernels *K, int dtype, const void *key, const uint16_t *reps, const float *norms,
                         uint32_t k, uint32_t dim, float *x) {
    kvt_key_to_f32(K, dtype, key, x, dim);
    uint32_t best = 0;
    float bestd = FLT_MAX;
    for (uint32_t c = 0; c < k; c++) {
        float d = norms[c] - 2.0f * K->dot_f16_f32(reps + (size_t)c * dim, x, dim);
        if (d < bestd) {
            bestd = d;
            best = c;
        }
    }
    return best;
}

void kvt_welford_add(float *mean, double *m2, float *m2d, uint32_t n, const float *x, uint32_t dim) {
    double inv = 1.0 / (double)(n + 1), acc = 0;
    for (uint32_t j = 0; j < dim; j++) {
        double delta = (double)x[j] - mean[j];
        double nm = mean[j] + delta * inv;
        double t = delta * ((double)x[j] - nm);
        acc += t;
        if (m2d) m2d[j] = (float)(m2d[j] + t);
        mean[j] = (float)nm;
    }
    *m2 += acc;
}

uint64_t kvt_kmeans_bytes(uint64_t n, uint32_t k, uint32_t dim) {
    uint32_t k1 = (uint32_t)ceil(sqrt((double)k));
    uint64_t flat = (uint64_t)k * dim * 8 + (uint64_t)k * 8 + (uint64_t)dim * 4;
    /* two-level adds a coarse assignment, a sorted index and the coarse centroids */
    return flat + n * 8 + (uint64_t)k1 * dim * 4 + 64;
}

static uint64_t gcd_u64(uint64_t a, uint64_t b) {
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static void centroid_norms(const kvt_kernels *K, const float *c, uint32_t k, uint32_t dim, float *norms) {
    for (uint32_t i = 0; i < k; i++) norms[i] = K->dot_f32(c + (size_t)i * dim, c + (size_t)i * dim, dim);
}

/* The points of one k-means run: rows idx[0..n) of `keys` (rows 0..n-1 when idx is NULL). */
typedef struct kpoints {
    const kvt_kernels *K;
    int dtype;
    const void *keys;
    uint32_t dim;
    size_t stride;
    const uint32_t *idx;
    uint64_t n;
} kpoints;

static const void *kp_row(const kpoints *P, uint64_t i) { return row(P->stride, P->keys, P->idx ? P->idx[i] : i); }

/* Seeds: k distinct points, taken along a random stride coprime with n (a permutation of the
 * positions without an n-sized shuffle buffer). *s is the generator, left for the reseeds. */
static void seed_centroids(const kpoints *P, uint32_t k, uint64_t *s, float *cent) {
    uint64_t n = P->n, start = kvt_rng_next(s) % n, step;
    do { step = kvt_rng_next(s) % n; } while (n > 1 && (step == 0 || gcd_u64(step, n) != 1));
    if (n == 1) step = 1;
    for (uint32_t c = 0; c < k; c++) {
        uint64_t i = (start + (uint64_t)c * step) % n;
        kvt_key_to_f32(P->K, P->dtype, kp_row(P, i), cent + (size_t)c * P->dim, P->dim);
    }
}

/* An empty cluster is reseeded with the worst-fitting of a few sampled points. */
static void reseed(const kpoints *P, const uint32_t *assign, const float *norms, uint64_t *s, float *x,
                   const float *cent, float *cc) {
    const kvt_kernels *K = P->K;
    uint32_t dim = P->dim;
    float worst = -1;
    uint64_t pick = 0;
    for (int t = 0; t < 16; t++) {
        uint64_t i = kvt_rng_next(s) % P->n;
        kvt_key_to_f32(K, P->dtype, kp_row(P, i), x, dim);
        const float *ca = cent + (size_t)assign[i] * dim;
        float d = norms[assign[i]] - 2 * K->dot_f32(x, ca, dim) + K->dot_f32(x, x, dim);
        if (d > worst) {
            worst = d;
            pick = i;
        }
    }
    kvt_key_to_f32(K, P->dtype, kp_row(P, pick), cc, dim);
}

/* Lloyd's update: each centroid the mean of its points (an empty one reseeded). */
static void update_centroids(const kpoints *P, uint32_t k, const uint32_t *assign, const float *norms, uint64_t *s,
                             double *sums, uint32_t *counts, float *x, float *cent) {
    uint32_t dim = P->dim;
    memset(sums, 0, (size_t)k * dim * sizeof *sums);
    memset(counts, 0, (size_t)k * sizeof *counts);
    for (uint64_t i = 0; i < P->n; i++) {
        kvt_key_to_f32(P->K, P->dtype, kp_row(P, i), x, dim);
        double *sm = sums + (size_t)assign[i] * dim;
        for (uint32_t j = 0; j < dim; j++) sm[j] += x[j];
        counts[assign[i]]++;
    }
    for (uint32_t c = 0; c < k; c++) {
        float *cc = cent + (size_t)c * dim;
        if (counts[c]) {
            for (uint32_t j = 0; j < dim; j++) cc[j] = (float)(sums[(size_t)c * dim + j] / counts[c]);
        } else {
            reseed(P, assign, norms, s, x, cent, cc);
        }
    }
}

/* Flat Lloyd iterations over the points. */
static int kmeans_flat(const kpoints *P, uint32_t k, uint32_t iters, uint64_t seed, float *cent, uint32_t *assign) {
    const kvt_kernels *K = P->K;
    uint32_t dim = P->dim;
    double *sums = calloc((size_t)k * dim, sizeof *sums);
    uint32_t *counts = calloc(k, sizeof *counts);
    float *norms = malloc((size_t)k * sizeof *norms), *x = malloc((size_t)dim * sizeof *x);
    if (!sums || !counts || !norms || !x) {
        free(sums);
        free(counts);
        free(norms);
        free(x);
        return kvt_fail(ENOMEM, "k-means: out of memory for %u centroids", k);
    }
    uint64_t s = seed ^ (P->n * 0x9E3779B97F4A7C15ull);
    seed_centroids(P, k, &s, cent);
    for (uint32_t it = 0; it <= iters; it++) {
        centroid_norms(K, cent, k, dim, norms);
        int changed = 0;
        for (uint64_t i = 0; i < P->n; i++) {
            uint32_t a = kvt_nearest(K, P->dtype, kp_row(P, i), cent, norms, k, dim);
            if (it == 0 || a != assign[i]) changed = 1;
            assign[i] = a;
        }
        if (!changed || it == iters) break;
        update_centroids(P, k, assign, norms, &s, sums, counts, x, cent);
    }
    free(sums);
    free(counts);
    free(norms);
    free(x);
    return 0;
}

/* Two-level k-means: how many of the k parts coarse cluster c (m of the n points, the points
 * before it start_c) gets: its share of what is left, at least one, at most its points; the
 * last one takes the rest, so that the total is exactly k. */
static uint32_t parts_of(uint32_t k, uint32_t given, uint64_t n, uint64_t start_c, uint64_t m, int last) {
    uint32_t left_parts = k - given;
    uint64_t left_pts = n - start_c;
    uint32_t kc = (uint32_t)llround((double)left_parts * (double)m / (double)left_pts);
    if (kc < 1) kc = 1;
    if (kc > m) kc = (uint32_t)m;
    if (kc > left_parts) kc = left_parts;
    if (last) kc = left_parts < m ? left_parts : (uint32_t)m;
    if (kc == 0) kc = 1;
    return kc;
}

/* Coarse cluster c's m points (order[0..m), positions in the points) split into kc clusters,
 * centroids at `cent`, their numbers from `given` into assign. */
static int split_coarse(const kpoints *P, const uint32_t *order, uint64_t m, uint32_t kc, uint32_t given,
                        uint32_t iters, uint64_t seed, float *cent, uint32_t *assign) {
    /* sub-clustering works on original row numbers */
    uint32_t *sub = malloc(m * sizeof *sub), *sa = malloc(m * sizeof *sa);
    int rc = 0;
    if (!sub || !sa) rc = kvt_fail(ENOMEM, "k-means: out of memory");
    for (uint64_t i = 0; !rc && i < m; i++) sub[i] = P->idx ? P->idx[order[i]] : order[i];
    kpoints S = {P->K, P->dtype, P->keys, P->dim, P->stride, sub, m};
    if (!rc) rc = kmeans_flat(&S, kc, iters, seed, cent, sa);
    for (uint64_t i = 0; !rc && i < m; i++) assign[order[i]] = given + sa[i];
    free(sub);
    free(sa);
    return rc;
}

int kvt_kmeans(const kvt_kernels *K, int dtype, const void *keys, uint32_t dim, size_t stride, const uint32_t *idx,
               uint64_t n, uint32_t k, uint32_t iters, uint64_t seed, float *centroids, uint32_t *assign) {
    if (n == 0 || k == 0 || k > n)
        return kvt_fail(KVT_EINVAL, "k-means: need 0 < k <= n (k=%u, n=%llu)", k, (unsigned long long)n);
    kpoints P = {K, dtype, keys, dim, stride, idx, n};
    if (k <= 256) return kmeans_flat(&P, k, iters, seed, centroids, assign);
    uint32_t k1 = (uint32_t)ceil(sqrt((double)k));
    float *c1 = malloc((size_t)k1 * dim * sizeof *c1);
    uint32_t *a1 = malloc(n * sizeof *a1), *order = malloc(n * sizeof *order);
    uint64_t *start = calloc(k1 + 1, sizeof *start);
    if (!c1 || !a1 || !order || !start) {
        free(c1);
        free(a1);
        free(order);
        free(start);
        return kvt_fail(ENOMEM, "k-means: out of memory for %llu points", (unsigned long long)n);
    }
    int rc = kmeans_flat(&P, k1, iters, seed, c1, a1);
    if (!rc) {
        for (uint64_t i = 0; i < n; i++) start[a1[i] + 1]++;
        for (uint32_t c = 0; c < k1; c++) start[c + 1] += start[c];
        uint64_t *fill = calloc(k1, sizeof *fill);
        if (!fill) rc = kvt_fail(ENOMEM, "k-means: out of memory");
        for (uint64_t i = 0; !rc && i < n; i++) order[start[a1[i]] + fill[a1[i]]++] = (uint32_t)i;
        free(fill);
        /* Split each coarse cluster in proportion to its size (parts_of). */
        uint32_t given = 0;
        for (uint32_t c = 0; !rc && c < k1; c++) {
            uint64_t m = start[c + 1] - start[c];
            if (!m) continue;
            uint32_t kc = parts_of(k, given, n, start[c], m, c == k1 - 1 || start[c + 1] == n);
            rc = split_coarse(&P, order + start[c], m, kc, given, iters, seed + c + 1, centroids + (size_t)given * dim,
                              assign);
            given += kc;
        }
        if (!rc && given != k) {
            /* Fewer parts than asked (tiny coarse clusters): the unused centroids get no
             * points, and the caller drops empty clusters. */
            for (uint32_t c = given; c < k; c++)
                memcpy(centroids + (size_t)c * dim, centroids + (size_t)(given - 1) * dim, (size_t)dim * 4);
        }
    }
    free(c1);
    free(a1);
    free(order);
    free(start);
    return rc;
}
