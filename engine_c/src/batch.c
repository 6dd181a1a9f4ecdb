/*
 * batch.c — one engine call for a group of collections (for an LLM: the KV heads of one
 * layer), so that a decoding step crosses the language boundary once per layer, not once
 * per head, and its results land in buffers the caller allocated once.
 *
 * Invariants:
 * 1. kvt_retrieve_batch checks every argument of every member before it retrieves anything:
 *    a rejected call changes nothing stored.
 * 2. Member i's results are exactly kvt_coll_retrieve(colls[i], queries of i, nq,
 *    budgets[i]) (same entries, same order), written to rows [i*cap, i*cap + counts[i]) of
 *    each output; rows past counts[i] hold id -1 and cluster -1 (keys and values untouched).
 * 3. The members are retrieved in order, each under its store's mutex as a single retrieve
 *    is; nothing here holds a lock across members, so loader threads and other callers
 *    interleave as they would with n separate calls.
 * 4. Each member reads in the calling thread's on_corrupt mode; the entries they met damaged
 *    are listed together after the call (kvt_last_unreadable), the failing member's included.
 */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "store.h"

/* The unreadable entries of the members retrieved so far (each retrieve empties the thread's
 * list when it starts): gathered, then put back together. */
typedef struct gathered {
    kvt_unreadable *v;
    size_t n, cap;
} gathered;

static void gather(gathered *g) {
    const kvt_unreadable *u;
    size_t m = kvt_last_unreadable(&u);
    if (!m) return;
    if (g->n + m > g->cap) {
        size_t cap = (g->n + m) * 2;
        kvt_unreadable *v = realloc(g->v, cap * sizeof *v);
        if (!v) return; /* out of memory: the list keeps what it can */
        g->v = v;
        g->cap = cap;
    }
    memcpy(g->v + g->n, u, m * sizeof *u);
    g->n += m;
}

static int put_back(gathered *g, int rc) {
    gather(g);
    kvt_unreadable_clear();
    for (size_t i = 0; i < g->n; i++) kvt_unreadable_add(g->v[i].coll, g->v[i].id);
    free(g->v);
    return rc;
}

int kvt_retrieve_batch(kvt_coll *const *colls, size_t n, const float *queries, uint64_t nq, const uint64_t *budgets,
                       uint64_t cap, int64_t *ids, void *keys, void *values, int32_t *clusters, uint64_t *counts) {
    kvt_clear_error();
    kvt_unreadable_clear();
    if (!colls || n == 0) return kvt_fail(KVT_EINVAL, "retrieve_batch: colls must hold at least one collection");
    if (!queries || nq == 0)
        return kvt_fail(KVT_EINVAL, "retrieve_batch: queries must hold at least one query per collection");
    if (!budgets || !counts) return kvt_fail(KVT_EINVAL, "retrieve_batch: budgets and counts are required");
    for (size_t i = 0; i < n; i++) {
        if (!colls[i]) return kvt_fail(KVT_EINVAL, "retrieve_batch: colls[%zu] is NULL", i);
        const kvt_coll_params *p = &colls[i]->p, *p0 = &colls[0]->p;
        if (p->dim != p0->dim || p->value_dim != p0->value_dim || p->dtype != p0->dtype)
            return kvt_fail(KVT_EINVAL,
                            "retrieve_batch: colls[%zu] has dim %u, value_dim %u, dtype %d; colls[0] has %u, %u, %d", i,
                            p->dim, p->value_dim, p->dtype, p0->dim, p0->value_dim, p0->dtype);
        if (budgets[i] > cap)
            return kvt_fail(KVT_EINVAL, "retrieve_batch: budgets[%zu] = %llu exceeds cap %llu rows per collection", i,
                            (unsigned long long)budgets[i], (unsigned long long)cap);
        for (size_t j = 0; j < i; j++)
            if (colls[j] == colls[i])
                return kvt_fail(KVT_EINVAL, "retrieve_batch: colls[%zu] repeats colls[%zu]", i, j);
    }
    const kvt_coll_params *p = &colls[0]->p;
    size_t krow = colls[0]->L.key_bytes, vrow = colls[0]->L.value_bytes; /* one row of each */
    for (size_t i = 0; i < n; i++) counts[i] = 0;
    gathered g = {0};
    for (size_t i = 0; i < n; i++) {
        kvt_result *r = NULL;
        if (i) gather(&g);
        int rc = kvt_coll_retrieve(colls[i], queries + (size_t)i * nq * p->dim, nq, budgets[i], &r);
        if (rc) return put_back(&g, rc);
        uint64_t m = kvt_result_count(r);
        if (m > cap) { /* a retrieve returns at most its budget: this is an engine bug */
            kvt_result_free(r);
            return put_back(&g, kvt_fail(KVT_ECORRUPT,
                                         "retrieve_batch: colls[%zu] returned %llu entries, more than cap %llu", i,
                                         (unsigned long long)m, (unsigned long long)cap));
        }
        size_t base = i * (size_t)cap;
        kvt_result_copy(r, ids ? ids + base : NULL, keys ? (uint8_t *)keys + base * krow : NULL,
                        values && vrow ? (uint8_t *)values + base * vrow : NULL, clusters ? clusters + base : NULL);
        kvt_result_free(r);
        counts[i] = m;
        for (uint64_t k = m; k < cap; k++) {
            if (ids) ids[base + k] = -1;
            if (clusters) clusters[base + k] = -1;
        }
    }
    return put_back(&g, 0);
}
