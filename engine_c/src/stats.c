/*
 * stats.c — a collection's statistics and cluster sizes, read without bringing a parked
 * collection back for good (peek).
 *
 * Invariants:
 * 1. Reading statistics changes nothing: a parked collection is peeked at and parked again.
 */
#include <string.h>

#include "common.h"
#include "estimate.h"
#include "index.h"
#include "policy.h"
#include "store.h"
#include "virtualize.h"

/* ---- stats -------------------------------------------------------------------------------- */

int kvt_coll_stats_get(kvt_coll *c, kvt_coll_stats *o) {
    LOCK(c->st);
    kvt_coll_stats parked = c->parked_stats;
    *o = c->ctr;
    o->entries = c->n;
    o->pools = c->pools.n - c->pools.nspare;
    o->data_file_bytes = token(c) ? token_offset(c, c->n) : kvt_pools_file_bytes(&c->pools, &c->L);
    o->tau = c->ops->tau ? c->ops->tau(c) : c->p.tau;
    o->pending_entries = c->pending_total - c->tail_total;
    o->write_buffer_entries = c->tail_total;
    o->parked = (uint64_t)c->parked;
    if (c->ops->stats) c->ops->stats(c, o);
    o->mean_fill = c->ctr.fill_retrieves ? c->ctr.fill_sum / (double)c->ctr.fill_retrieves : 0;
    if (c->parked) { /* as it was when parked: nothing changes a parked collection */
        o->clusters = parked.clusters;
        o->mean_cluster_size = parked.mean_cluster_size;
        o->mean_variance = parked.mean_variance;
        o->max_cluster_size = parked.max_cluster_size;
        o->flagged_clusters = parked.flagged_clusters;
        o->dead_slots = parked.dead_slots;
        o->cached_clusters = 0;
    } else {
        kvt_cluster_stats(c, o);
    }
    UNLOCK(c->st);
    return 0;
}

int kvt_coll_cluster_sizes(kvt_coll *c, uint32_t *sizes, uint64_t cap, uint64_t *n_clusters) {
    kvt_clear_error();
    LOCK(c->st);
    int was_parked, rc = kvt_peek_begin(c, &was_parked);
    uint64_t m = 0;
    for (uint32_t j = 0; j < c->ncl && !rc; j++) {
        if (!c->cl[j].n) continue;
        if (m < cap) sizes[m] = c->cl[j].n;
        m++;
    }
    *n_clusters = m;
    if (!rc) kvt_peek_end(c, was_parked);
    UNLOCK(c->st);
    return rc;
}

/* estimate.c: every cluster slot's size and value sum, by cluster number (introspection) */
int kvt_coll_value_sums(kvt_coll *c, uint32_t *sizes, float *sums, uint64_t cap, uint64_t *n_clusters) {
    kvt_clear_error();
    LOCK(c->st);
    int was_parked, rc = kvt_peek_begin(c, &was_parked);
    uint32_t vd = c->p.value_dim;
    for (uint32_t j = 0; j < c->ncl && j < cap && !rc; j++) {
        if (sizes) sizes[j] = c->cl[j].n;
        if (sums && c->vsum) memcpy(sums + (size_t)j * vd, c->vsum + (size_t)j * vd, (size_t)vd * 4);
    }
    *n_clusters = rc ? 0 : c->ncl;
    if (!rc) kvt_peek_end(c, was_parked);
    UNLOCK(c->st);
    if (!rc && !kvt_vsum_kept(c))
        rc = kvt_fail(KVT_EINVAL, "value_sums: this collection keeps none (policy none or value_dim 0)");
    return rc;
}
