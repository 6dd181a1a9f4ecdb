/*
 * batch.c — one engine call for a group of collections (for an LLM: the KV heads of one
 * layer), so that a decoding step crosses the language boundary once per layer, not once
 * per head, and its results land in buffers the caller allocated once.
 *
 * Invariants:
 * 1. kvt_retrieve_batch and kvt_step_batch check every argument of every member before they
 *    add, prefetch or retrieve anything: a rejected call changes nothing stored.
 * 2. Member i's results are exactly kvt_coll_retrieve(colls[i], queries of i, nq,
 *    budgets[i]) (kvt_coll_retrieve_est with an estimate) — same entries, same order —
 *    written to rows [i*cap, i*cap + counts[i]) of ids and clusters, and to rows
 *    [i*stride, i*stride + counts[i]) of keys and values (stride = cap for
 *    kvt_retrieve_batch), as stored or widened to float32 (a float16 value widens exactly);
 *    rows past counts[i] hold id -1 and cluster -1 (keys and values untouched).
 * 3. The members are retrieved in order, each under its store's mutex as a single retrieve
 *    is; nothing here holds a lock across members, so loader threads and other callers
 *    interleave as they would with n separate calls.
 * 4. kvt_step_batch runs its parts in the order a decoding adapter made them as separate
 *    calls — the previous layer's adds, the next layer's prefetch, this layer's retrieve —
 *    so a run through it is the run through the separate calls, call for call.
 * 5. Each member reads in the calling thread's on_corrupt mode; the entries they met damaged
 *    are listed together after the call (kvt_last_unreadable), the failing member's included.
 */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "score.h"
#include "simd.h"
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

/* One group's checks: no NULL member, no member twice, one shape (dim, value_dim, dtype). */
static int check_group(const char *what, kvt_coll *const *colls, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!colls[i]) return kvt_fail(KVT_EINVAL, "%s: colls[%zu] is NULL", what, i);
        const kvt_coll_params *p = &colls[i]->p, *p0 = &colls[0]->p;
        if (p->dim != p0->dim || p->value_dim != p0->value_dim || p->dtype != p0->dtype)
            return kvt_fail(KVT_EINVAL, "%s: colls[%zu] has dim %u, value_dim %u, dtype %d; colls[0] has %u, %u, %d",
                            what, i, p->dim, p->value_dim, p->dtype, p0->dim, p0->value_dim, p0->dtype);
        for (size_t j = 0; j < i; j++)
            if (colls[j] == colls[i]) return kvt_fail(KVT_EINVAL, "%s: colls[%zu] repeats colls[%zu]", what, i, j);
    }
    return 0;
}

static int check_retrieve(const char *what, const kvt_step_args *a) {
    if (!a->colls || a->n == 0) return kvt_fail(KVT_EINVAL, "%s: colls must hold at least one collection", what);
    if (!a->queries || a->nq == 0)
        return kvt_fail(KVT_EINVAL, "%s: queries must hold at least one query per collection", what);
    if (!a->budgets || !a->counts) return kvt_fail(KVT_EINVAL, "%s: budgets and counts are required", what);
    if (a->stride && a->stride < a->cap)
        return kvt_fail(KVT_EINVAL, "%s: stride %llu is below cap %llu rows", what, (unsigned long long)a->stride,
                        (unsigned long long)a->cap);
    if (a->est && (!a->est_lse || !a->est_values || !a->est_entries))
        return kvt_fail(KVT_EINVAL, "%s: an estimate needs est_lse, est_values and est_entries", what);
    int rc = check_group(what, a->colls, a->n);
    for (size_t i = 0; !rc && i < a->n; i++)
        if (a->budgets[i] > a->cap)
            rc = kvt_fail(KVT_EINVAL, "%s: budgets[%zu] = %llu exceeds cap %llu rows per collection", what, i,
                          (unsigned long long)a->budgets[i], (unsigned long long)a->cap);
    return rc;
}

/* Copies m rows of keys or values (row_bytes each as stored) to dst, widened to float32 when
 * f32 and the collection stores float16. */
static void copy_rows(void *dst, const uint8_t *src, uint64_t m, size_t row_bytes, int dtype, int f32) {
    if (!m || !row_bytes) return;
    if (f32 && dtype == KVT_F16)
        kvt_simd()->f16_to_f32((const uint16_t *)src, (float *)dst, m * row_bytes / 2);
    else
        memcpy(dst, src, m * row_bytes);
}

/* Member i's retrieve into the outputs (invariant 2). */
static int retrieve_member(const kvt_step_args *a, size_t i) {
    kvt_coll *c = a->colls[i];
    const kvt_coll_params *p = &c->p;
    kvt_result *r = NULL;
    const float *q = a->queries + (size_t)i * a->nq * p->dim;
    int rc = a->est ? kvt_coll_retrieve_est(c, q, a->nq, a->budgets[i], a->est, &r)
                    : kvt_coll_retrieve(c, q, a->nq, a->budgets[i], &r);
    if (rc) return rc;
    uint64_t m = kvt_result_count(r), cap = a->cap, stride = a->stride ? a->stride : cap;
    if (m > cap) { /* a retrieve returns at most its budget: this is an engine bug */
        kvt_result_free(r);
        return kvt_fail(KVT_ECORRUPT, "retrieve_batch: colls[%zu] returned %llu entries, more than cap %llu", i,
                        (unsigned long long)m, (unsigned long long)cap);
    }
    size_t base = i * (size_t)cap, krow = c->L.key_bytes, vrow = c->L.value_bytes;
    size_t kout = a->out_f32 ? (size_t)p->dim * 4 : krow, vout = a->out_f32 ? (size_t)p->value_dim * 4 : vrow;
    kvt_result_copy(r, a->ids ? a->ids + base : NULL, NULL, NULL, a->clusters ? a->clusters + base : NULL);
    if (a->keys) copy_rows((uint8_t *)a->keys + i * stride * kout, r->keys, m, krow, p->dtype, a->out_f32);
    if (a->values) copy_rows((uint8_t *)a->values + i * stride * vout, r->values, m, vrow, p->dtype, a->out_f32);
    if (a->est)
        kvt_result_estimate(r, a->est_lse + i * a->nq, a->est_values + i * a->nq * p->value_dim, NULL,
                            a->est_entries + i);
    kvt_result_free(r);
    a->counts[i] = m;
    for (uint64_t k = m; k < cap; k++) {
        if (a->ids) a->ids[base + k] = -1;
        if (a->clusters) a->clusters[base + k] = -1;
    }
    return 0;
}

static int retrieve_members(const kvt_step_args *a) {
    for (size_t i = 0; i < a->n; i++) a->counts[i] = 0;
    gathered g = {0};
    for (size_t i = 0; i < a->n; i++) {
        if (i) gather(&g);
        int rc = retrieve_member(a, i);
        if (rc) return put_back(&g, rc);
    }
    return put_back(&g, 0);
}

/* ids, clusters and counts are written through the args struct (clang-tidy does not follow it) */
// NOLINTBEGIN(readability-non-const-parameter)
int kvt_retrieve_batch(kvt_coll *const *colls, size_t n, const float *queries, uint64_t nq, const uint64_t *budgets,
                       uint64_t cap, int64_t *ids, void *keys, void *values, int32_t *clusters, uint64_t *counts) {
    // NOLINTEND(readability-non-const-parameter)
    kvt_clear_error();
    kvt_unreadable_clear();
    kvt_step_args a = {.colls = colls,
                       .n = n,
                       .queries = queries,
                       .nq = nq,
                       .budgets = budgets,
                       .cap = cap,
                       .ids = ids,
                       .keys = keys,
                       .values = values,
                       .clusters = clusters,
                       .counts = counts};
    int rc = check_retrieve("retrieve_batch", &a);
    return rc ? rc : retrieve_members(&a);
}

static int check_step(const kvt_step_args *a) {
    if (!a) return kvt_fail(KVT_EINVAL, "step_batch: args is NULL");
    if (a->n_add) {
        if (!a->add_colls) return kvt_fail(KVT_EINVAL, "step_batch: add_colls is NULL");
        if (a->add_rows && !a->add_keys) return kvt_fail(KVT_EINVAL, "step_batch: add_keys is NULL");
        int rc = check_group("step_batch: add", a->add_colls, a->n_add);
        if (rc) return rc;
        if (a->add_rows && a->add_colls[0]->p.value_dim && !a->add_values)
            return kvt_fail(KVT_EINVAL, "step_batch: add_values is NULL");
    }
    if (a->n_prefetch) {
        if (!a->prefetch_colls || !a->prefetch_queries || !a->prefetch_budgets || !a->prefetch_nq)
            return kvt_fail(KVT_EINVAL, "step_batch: a prefetch needs prefetch_colls, prefetch_queries (at least one "
                                        "per collection) and prefetch_budgets");
        int rc = check_group("step_batch: prefetch", a->prefetch_colls, a->n_prefetch);
        if (rc) return rc;
    }
    return a->n ? check_retrieve("step_batch", a) : 0;
}

int kvt_step_batch(const kvt_step_args *a, uint64_t *queued) {
    kvt_clear_error();
    kvt_unreadable_clear();
    if (queued) *queued = 0;
    int rc = check_step(a);
    if (rc) return rc;
    if (a->add_rows) {
        const kvt_coll_params *p = &a->add_colls[0]->p;
        size_t kb = (size_t)a->add_rows * p->dim * (p->dtype == KVT_F16 ? 2 : 4);
        size_t vb = (size_t)a->add_rows * p->value_dim * (p->dtype == KVT_F16 ? 2 : 4);
        for (size_t i = 0; i < a->n_add; i++) {
            int64_t first;
            rc = kvt_coll_add(a->add_colls[i], (const uint8_t *)a->add_keys + i * kb,
                              vb ? (const uint8_t *)a->add_values + i * vb : NULL, a->add_rows, &first);
            if (rc) return rc;
        }
    }
    for (size_t i = 0; i < a->n_prefetch; i++) {
        uint64_t got = 0;
        const float *q = a->prefetch_queries + i * a->prefetch_nq * a->prefetch_colls[i]->p.dim;
        rc = kvt_coll_prefetch(a->prefetch_colls[i], q, a->prefetch_nq, a->prefetch_budgets[i], &got);
        if (rc) return rc;
        if (queued) *queued += got;
    }
    if (!a->n) return 0;
    kvt_unreadable_clear();
    return retrieve_members(a);
}
