/*
 * score.h — scoring clusters against a query group, choosing those that fit an entry budget
 * (score.c), and the result object retrieves fill. Every function that takes a collection
 * expects the store mutex held.
 */
#ifndef KVT_SCORE_H
#define KVT_SCORE_H

#include <float.h>
#include <stdint.h>

#include "cluster.h"
#include "simd.h"
#include "store.h"

struct kvt_result {
    uint64_t n, ncl;
    size_t key_bytes, value_bytes;
    int64_t *ids;
    uint8_t *keys, *values;
    int32_t *clusters;
    /* estimate.c: per query row, with kvt_coll_retrieve_est */
    uint64_t nq, vdim, est_ncl, est_n;
    float *est_lse, *est_val;
};

/* Scratch of one cluster selection, reserved against the budget: each cluster's score, the
 * squared queries, the clusters in score order. The scores' buffer has 8 bytes per cluster:
 * once they are spent, a retrieve keeps each taken cluster's first result row there. */
typedef struct selection {
    union {
        float *scores;
        uint64_t *rows;
    };
    float *q2;
    uint32_t *idx;
    uint64_t reserved;
} selection;

void kvt_score_clusters(kvt_coll *c, const float *q, uint64_t nq, float *scores, float *q2);
void kvt_order_by_score(uint32_t *idx, uint32_t n, const float *scores);
void kvt_top_by_score(uint32_t *idx, uint32_t n, uint32_t m, const float *scores);
int kvt_by_u32(const void *a, const void *b);
void kvt_put_result(kvt_result *r, const kvt_layout *L, const uint8_t *rec, int32_t ci);
int kvt_result_alloc(kvt_result *r, const kvt_layout *L, uint64_t total);
int kvt_selection_alloc(kvt_coll *c, uint64_t nq, selection *sel);
void kvt_selection_release_budget(kvt_coll *c, selection *sel);
void kvt_selection_free(kvt_coll *c, selection *sel);
void kvt_select_clusters(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, float *scores, float *q2,
                         uint32_t *idx, uint64_t *taken_out, uint64_t *total_out, uint32_t *part_out);

/* Score of one stored key against a query, by the collection's metric. */
static inline float entry_score(kvt_coll *c, const void *key, const float *qv, float *x) {
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim;
    if (c->p.metric == KVT_METRIC_L2) {
        kvt_key_to_f32(K, c->p.dtype, key, x, d);
        return 2 * K->dot_f32(x, qv, d) - K->dot_f32(x, x, d) - K->dot_f32(qv, qv, d);
    }
    return kvt_dot_key(K, c->p.dtype, key, qv, d);
}

/* Score of one stored key against a query group: its best over the nq queries. */
static inline float group_entry_score(kvt_coll *c, const void *key, const float *q, uint64_t nq, float *x) {
    float best = -FLT_MAX;
    for (uint64_t t = 0; t < nq; t++) {
        float sc = entry_score(c, key, q + t * c->p.dim, x);
        if (sc > best) best = sc;
    }
    return best;
}

#endif
