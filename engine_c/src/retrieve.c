/*
 * retrieve.c — retrieving whole clusters under an entry budget (the clustered policies;
 * prefetch.c queues the same selection's reads on the loader threads).
 *
 * Invariants:
 * 1. A retrieve returns whole clusters in score order while they fit the budget, then the
 *    best entries of the next-ranked cluster that fit the rest (scored on the keys its read
 *    brought in), so it returns min(budget, entries) entries; its reads of one call are
 *    submitted together.
 * 2. Splits of clusters this retrieve read happen before it returns, on the records it read
 *    (adapt.c 1-2), whatever the cache kept of them; the result is taken before any split
 *    changes them.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapt.h"
#include "colocate.h"
#include "common.h"
#include "estimate.h"
#include "layout.h"
#include "read.h"
#include "score.h"
#include "store.h"
#include "token.h"
#include "virtualize.h"

/* ---- retrieve ----------------------------------------------------------------------------- */

/* Result rows go where their cluster's place in the selection puts them (pos[ci]), so the
 * order does not depend on which clusters came from the cache first. The cluster taken in
 * part (part_cl, when the next-ranked cluster overflows the budget) gives its part_n best
 * entries by score against the query group (the best over the group, as clusters are
 * scored), on the keys its read brought in; when it is flagged, its records are kept
 * (keep) for its split. */
typedef struct fill_ctx {
    kvt_coll *c;
    kvt_result *r;
    const kvt_layout *L;
    const uint64_t *pos;
    const float *q;
    uint64_t nq;
    uint32_t part_cl, part_n;
    float *sc, *x;       /* scratch of the partial cluster: a score per entry, a key */
    uint32_t *ord;
    uint8_t *keep;       /* its records, when it is flagged (NULL otherwise) */
} fill_ctx;

static void fill_result(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    fill_ctx *x = vctx;
    const kvt_layout *L = x->L;
    uint64_t keep = x->r->n;
    x->r->n = x->pos[ci];
    if (ci != x->part_cl) {
        for (uint32_t i = 0; i < n; i++) kvt_put_result(x->r, L, recs + (size_t)i * L->esz, (int32_t)ci);
        x->r->n = keep + n;
        return;
    }
    for (uint32_t i = 0; i < n; i++) x->sc[i] = group_entry_score(x->c, kvt_rec_key(recs + (size_t)i * L->esz), x->q, x->nq, x->x);
    uint32_t m = x->part_n < n ? x->part_n : n;
    kvt_top_by_score(x->ord, n, m, x->sc);
    for (uint32_t i = 0; i < m; i++) kvt_put_result(x->r, L, recs + (size_t)x->ord[i] * L->esz, (int32_t)ci);
    if (x->keep) memcpy(x->keep, recs, (size_t)n * L->esz);
    x->r->n = keep + m;
}

void kvt_result_estimate(const kvt_result *r, float *lse, float *values, uint64_t *clusters, uint64_t *entries) {
    for (uint64_t i = 0; lse && i < r->nq; i++) lse[i] = r->est_lse ? r->est_lse[i] : -INFINITY;
    if (values && r->est_val) memcpy(values, r->est_val, r->nq * r->vdim * 4);
    else if (values) memset(values, 0, r->nq * r->vdim * 4);
    if (clusters) *clusters = r->est_ncl;
    if (entries) *entries = r->est_n;
}

/* Splits the flagged clusters this retrieve read, from the records it read (adapt.c 1-2):
 * a whole cluster's records are its rows of the result, in order; the cluster taken in part
 * kept its records aside. Nothing is read, and nothing depends on what the cache kept. */
static void split_read(kvt_coll *c, const kvt_result *r, const uint32_t *idx, uint64_t taken, fill_ctx *fx) {
    const kvt_layout *L = &c->L;
    for (uint64_t t = 0; t < taken; t++) {
        uint32_t j = idx[t];
        kvt_cluster *k = &c->cl[j];
        if (!k->flagged) continue;
        if (j == fx->part_cl) {
            if (fx->keep) kvt_split_records(c, j, fx->keep, 0);
            continue;
        }
        uint64_t bytes = (uint64_t)k->n * L->esz, row = fx->pos[j];
        if (kvt_mem_reserve(&c->st->mem, bytes)) {
            kvt_clear_error();
            c->ctr.split_skipped++;
            continue;
        }
        uint8_t *recs = malloc(bytes + 1);
        if (!recs) {
            c->ctr.split_errors++;
        } else {
            for (uint32_t i = 0; i < k->n; i++, row++)
                kvt_rec_encode(L, recs + (size_t)i * L->esz, r->ids[row], r->keys + row * L->key_bytes,
                               r->values + row * L->value_bytes);
            kvt_split_records(c, j, recs, 0);
            free(recs);
        }
        kvt_mem_release(&c->st->mem, bytes);
    }
}

static int retrieve_locked(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget,
                           const kvt_estimate_opts *est, kvt_result **out) {
    kvt_store *s = c->st;
    int rc = 0;
    selection sel = {0};
    kvt_result *r = calloc(1, sizeof *r);
    if (!r) {
        rc = kvt_fail(ENOMEM, "retrieve: out of memory");
        goto out;
    }
    r->nq = nq;
    r->vdim = c->p.value_dim;
    if (est && (!(r->est_lse = malloc(nq * 4)) || !(r->est_val = calloc(nq * c->p.value_dim + 1, 4)))) {
        rc = kvt_fail(ENOMEM, "retrieve: out of memory for the estimate");
        goto out;
    }
    for (uint64_t i = 0; est && i < nq; i++) r->est_lse[i] = -INFINITY;
    if (c->p.policy == KVT_POLICY_NONE) {
        rc = kvt_retrieve_tokens(c, q, nq, budget, r);
        goto out;
    }
    rc = kvt_selection_alloc(c, nq, &sel);
    if (rc) goto out;
    uint32_t *idx = sel.idx, part = 0;
    uint64_t total = 0, taken = 0;
    kvt_select_clusters(c, q, nq, budget, sel.scores, sel.q2, idx, &taken, &total, &part);
    r->ncl = taken;
    if (est) { /* estimate.c: from the scores, before they are spent below. The cluster taken
                * in part counts as fetched: its other entries are neither returned nor estimated */
        double scale = est->scale > 0 ? est->scale : 1.0 / sqrt((double)c->p.dim);
        rc = kvt_estimate(c, q, nq, sel.scores, idx, taken, est->clusters, scale, est->variance, r->est_lse, r->est_val,
                          &r->est_ncl, &r->est_n);
    }
    if (!rc) rc = kvt_result_alloc(r, &c->L, total);
    fill_ctx fx = {c, r, &c->L, (const uint64_t *)sel.scores, q, nq, KVT_NONE, 0, NULL, NULL, NULL, NULL};
    uint64_t part_bytes = 0;
    if (!rc && part) { /* scratch for the partial cluster, and its records if it will split */
        kvt_cluster *k = &c->cl[idx[taken - 1]];
        int split = c->p.policy == KVT_POLICY_ADAPTIVE && k->flagged;
        part_bytes = (uint64_t)k->n * 8 + (uint64_t)c->p.dim * 4 + (split ? (uint64_t)k->n * c->L.esz : 0);
        rc = kvt_mem_reserve(&s->mem, part_bytes);
        if (rc) part_bytes = 0;
        fx.part_cl = idx[taken - 1];
        fx.part_n = part;
        if (!rc && (!(fx.sc = malloc((size_t)k->n * 4 + 4)) || !(fx.ord = malloc((size_t)k->n * 4 + 4)) ||
                    !(fx.x = malloc((size_t)c->p.dim * 4)) || (split && !(fx.keep = malloc((size_t)k->n * c->L.esz)))))
            rc = kvt_fail(ENOMEM, "retrieve: out of memory");
    }
    if (!rc) { /* the scores are spent: their buffer holds each cluster's first result row */
        uint64_t *pos = (uint64_t *)sel.scores, at = 0;
        for (uint64_t t = 0; t < taken; t++) {
            pos[idx[t]] = at;
            at += c->cl[idx[t]].n;
        }
    }
    if (!rc) {
        kvt_io_batch_begin(&s->io);
        kvt_cache_owner_read(&s->cache, &c->cache_state);
        rc = kvt_visit_clusters(c, idx, (uint32_t)taken, fill_result, &fx);
        if (!rc) kvt_count_coretrieval(c, idx, taken);
        kvt_io_batch_end(&s->io);
    }
    /* the clusters just read are in DRAM: the moment to split the flagged ones */
    if (!rc && c->p.policy == KVT_POLICY_ADAPTIVE) {
        kvt_selection_release_budget(c, &sel); /* room for the splits; idx is still read */
        split_read(c, r, idx, taken, &fx);
        kvt_relieve_pending(c);
        kvt_trim_tails(c); /* splits may have left new tails */
    }
    if (!rc && c->cofreq && c->retrieves >= c->p.colocate_after && kvt_relayout(c)) c->ctr.split_errors++;
    /* report the clusters the entries belong to now, after any split */
    for (uint64_t i = 0; !rc && i < r->n; i++) r->clusters[i] = (int32_t)c->loc[r->ids[i]].cl;
    free(fx.sc);
    free(fx.ord);
    free(fx.x);
    free(fx.keep);
    kvt_mem_release(&s->mem, part_bytes);
out:
    if (!rc && budget) { /* mean fill: returned entries / budget, every policy alike */
        c->ctr.fill_retrieves++;
        c->ctr.fill_sum += (double)r->n / (double)budget;
    }
    kvt_selection_free(c, &sel);
    if (rc) kvt_result_free(r);
    else *out = r;
    return rc;
}

int kvt_coll_retrieve(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result **out) {
    kvt_clear_error();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "retrieve: query_group must hold at least one query");
    int rc;
    RUN_READY(c, retrieve_locked(c, q, nq, budget, NULL, out));
    return rc;
}

int kvt_coll_retrieve_est(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget,
                          const kvt_estimate_opts *est, kvt_result **out) {
    kvt_clear_error();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "retrieve: query_group must hold at least one query");
    if (!est) return kvt_fail(KVT_EINVAL, "retrieve: estimate options expected");
    if (!(est->scale >= 0) || !isfinite(est->scale)) return kvt_fail(KVT_EINVAL, "scale: a finite value > 0 (or 0 for 1/sqrt(dim)) expected");
    int rc;
    RUN_READY(c, retrieve_locked(c, q, nq, budget, est, out));
    return rc;
}
