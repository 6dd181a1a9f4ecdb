/*
 * score.c — scoring clusters against a query group (the best over the group, GQA), choosing
 * the clusters that fit an entry budget, and the result object that retrieves fill.
 *
 * Invariants:
 * 1. Scoring reads only DRAM (representatives, norms, variances): choosing what to read
 *    costs no I/O.
 * 2. A selection's scratch is reserved against the budget (store.c 4) and given back by
 *    selection_release_budget/selection_free.
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "score.h"
#include "simd.h"
#include "store.h"

/* ---- scoring ------------------------------------------------------------------------------ */

/* Each cluster's score against a query group: the best over the group (GQA). q2 is scratch
 * for nq * dim floats (the squared queries, when score_temp > 0). */
void kvt_score_clusters(kvt_coll *c, const float *q, uint64_t nq, float *scores, float *q2) {
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim;
    float half_t = (float)(0.5 * c->p.score_temp);
    if (half_t > 0)
        for (uint64_t i = 0; i < nq * d; i++) q2[i] = q[i] * q[i];
    for (uint32_t j = 0; j < c->ncl; j++) {
        const uint16_t *r = c->cent + (size_t)j * d;
        float best = -FLT_MAX, inv_n = c->cl[j].n ? 1.0f / (float)c->cl[j].n : 0;
        for (uint64_t i = 0; i < nq; i++) {
            const float *qi = q + i * d;
            float sc = K->dot_f16_f32(r, qi, d);
            if (c->p.metric == KVT_METRIC_L2) sc = 2 * sc - c->cnorm[j] - K->dot_f32(qi, qi, d);
            if (half_t > 0) sc += half_t * inv_n * K->dot_f32(q2 + i * d, c->m2d + (size_t)j * d, d);
            if (sc > best) best = sc;
        }
        scores[j] = c->cl[j].n ? best : -FLT_MAX;
    }
}

static const float *sort_scores;

static int by_score_desc(const void *a, const void *b) {
    float x = sort_scores[*(const uint32_t *)a], y = sort_scores[*(const uint32_t *)b];
    if (x != y) return x < y ? 1 : -1;
    return *(const uint32_t *)a < *(const uint32_t *)b ? -1 : 1;
}

/* Sorts indices by descending score (ties by index, so the order is total). Runs under the
 * store mutex, which also guards the comparator's static. */
void kvt_order_by_score(uint32_t *idx, uint32_t n, const float *scores) {
    for (uint32_t i = 0; i < n; i++) idx[i] = i;
    sort_scores = scores;
    qsort(idx, n, sizeof *idx, by_score_desc);
}

/* Puts the m best indices (descending score, ties by index) first, in order, without
 * sorting the rest: a quickselect partition, then a sort of the m. A search probes a few
 * of thousands of clusters per query, where a full sort would dominate its time. */
static inline int better(const float *sc, uint32_t a, uint32_t b) { return sc[a] > sc[b] || (sc[a] == sc[b] && a < b); }

/* The one of a, b, c that ranks neither first nor last (ties by index). */
static uint32_t median3(const float *sc, uint32_t a, uint32_t b, uint32_t c) {
    if (better(sc, a, b)) {
        uint32_t t = a;
        a = b;
        b = t;
    }                            /* now b ranks before a */
    if (better(sc, b, c)) b = c; /* b: the later of b and c */
    return better(sc, a, b) ? a : b;
}

void kvt_top_by_score(uint32_t *idx, uint32_t n, uint32_t m, const float *scores) {
    for (uint32_t i = 0; i < n; i++) idx[i] = i;
    if (m >= n) {
        kvt_order_by_score(idx, n, scores);
        return;
    }
    uint32_t lo = 0, hi = n; /* the m-th best lies in [lo, hi) */
    while (hi - lo > 1) {
        uint32_t pivot = median3(scores, idx[lo], idx[lo + (hi - lo) / 2], idx[hi - 1]);
        uint32_t i = lo, j = hi;
        for (uint32_t k = lo; k < j;) {
            if (better(scores, idx[k], pivot)) {
                uint32_t t = idx[k];
                idx[k] = idx[i];
                idx[i] = t;
                i++, k++;
            } else if (better(scores, pivot, idx[k])) {
                j--;
                uint32_t t = idx[k];
                idx[k] = idx[j];
                idx[j] = t;
            } else {
                k++;
            }
        }
        /* [lo,i) better than pivot, [i,j) equal to it (just the pivot: ties break by index), [j,hi) worse */
        if (m <= i)
            hi = i;
        else if (m <= j)
            break;
        else
            lo = j;
    }
    sort_scores = scores;
    qsort(idx, m, sizeof *idx, by_score_desc);
}

int kvt_by_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

void kvt_put_result(kvt_result *r, const kvt_layout *L, const uint8_t *rec, int32_t ci) {
    memcpy(&r->ids[r->n], rec, 8);
    memcpy(r->keys + r->n * L->key_bytes, kvt_rec_key(rec), L->key_bytes);
    memcpy(r->values + r->n * L->value_bytes, kvt_rec_value(L, rec), L->value_bytes);
    r->clusters[r->n] = ci;
    r->n++;
}

void kvt_result_free(kvt_result *r) {
    if (!r) return;
    free(r->ids);
    free(r->keys);
    free(r->values);
    free(r->clusters);
    free(r->est_lse);
    free(r->est_val);
    free(r);
}

void kvt_result_estimate(const kvt_result *r, float *lse, float *values, uint64_t *clusters, uint64_t *entries) {
    for (uint64_t i = 0; lse && i < r->nq; i++) lse[i] = r->est_lse ? r->est_lse[i] : -INFINITY;
    if (values && r->est_val)
        memcpy(values, r->est_val, r->nq * r->vdim * 4);
    else if (values)
        memset(values, 0, r->nq * r->vdim * 4);
    if (clusters) *clusters = r->est_ncl;
    if (entries) *entries = r->est_n;
}

uint64_t kvt_result_count(const kvt_result *r) { return r->n; }

uint64_t kvt_result_nclusters(const kvt_result *r) { return r->ncl; }

void kvt_result_copy(const kvt_result *r, int64_t *ids, void *keys, void *values, int32_t *clusters) {
    if (ids) memcpy(ids, r->ids, r->n * 8);
    if (keys) memcpy(keys, r->keys, r->n * r->key_bytes);
    if (values) memcpy(values, r->values, r->n * r->value_bytes);
    if (clusters) memcpy(clusters, r->clusters, r->n * 4);
}

int kvt_result_alloc(kvt_result *r, const kvt_layout *L, uint64_t total) {
    r->key_bytes = L->key_bytes;
    r->value_bytes = L->value_bytes;
    r->ids = malloc(total * 8 + 8);
    r->keys = malloc(total * L->key_bytes + 8);
    r->values = malloc(total * L->value_bytes + 8);
    r->clusters = malloc(total * 4 + 4);
    if (!r->ids || !r->keys || !r->values || !r->clusters)
        return kvt_fail(ENOMEM, "retrieve: out of memory for %llu entries", (unsigned long long)total);
    return 0;
}

int kvt_selection_alloc(kvt_coll *c, uint64_t nq, selection *sel) {
    uint64_t bytes = (uint64_t)c->ncl * 12 + 12 + nq * c->p.dim * 4;
    int rc = kvt_mem_reserve(&c->st->mem, bytes);
    if (rc) return rc;
    sel->reserved = bytes;
    sel->scores = malloc((size_t)c->ncl * 8 + 8);
    sel->idx = malloc((size_t)c->ncl * 4 + 4);
    sel->q2 = malloc(nq * c->p.dim * 4);
    if (!sel->scores || !sel->idx || !sel->q2) return kvt_fail(ENOMEM, "out of memory selecting clusters");
    return 0;
}

void kvt_selection_release_budget(kvt_coll *c, selection *sel) {
    kvt_mem_release(&c->st->mem, sel->reserved);
    sel->reserved = 0;
}

void kvt_selection_free(kvt_coll *c, selection *sel) {
    free(sel->scores);
    free(sel->idx);
    free(sel->q2);
    kvt_selection_release_budget(c, sel);
}

/* Whole clusters in score order while they fit the budget; the first that does not fit is
 * taken in part (*part_out entries, its best, chosen when it is read: retrieve.c), so the
 * budget is filled. Only the best few need ordering: twice the clusters the budget holds at
 * the mean size, and all of them if that falls short. */
void kvt_select_clusters(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, float *scores, float *q2,
                         uint32_t *idx, uint64_t *taken_out, uint64_t *total_out, uint32_t *part_out) {
    kvt_score_clusters(c, q, nq, scores, q2);
    uint64_t total = 0, taken = 0, part = 0;
    uint64_t mean = c->ncl ? c->n / c->ncl + 1 : 1, guess = 2 * (budget / mean) + 16;
    uint32_t m = guess < c->ncl ? (uint32_t)guess : c->ncl;
    for (int pass = 0; pass < 2; pass++) {
        kvt_top_by_score(idx, c->ncl, m, scores);
        total = taken = part = 0;
        for (uint32_t j = 0; j < m && total < budget; j++) {
            uint32_t n = c->cl[idx[j]].n;
            if (!n) continue;
            uint32_t cj = idx[j];
            if (total + n > budget) part = budget - total; /* the rest of the budget, from its best */
            idx[taken++] = cj;
            total += part ? part : n;
        }
        if (total >= budget || m == c->ncl) break;
        m = c->ncl;
    }
    *taken_out = taken;
    *total_out = total;
    *part_out = (uint32_t)part;
}
