/*
 * local.c — the local-update baseline (ClusterKV-like): every local_window new entries are
 * clustered on their own into clusters of about local_cluster_size, in the staging cluster.
 *
 * Invariants:
 * 1. The staging cluster is the only cluster new entries join under this policy, up to what
 *    its recluster can hold in the DRAM budget: past that, the older entries of an add join
 *    their nearest cluster (add.c), so that the staging never outgrows DRAM. Once
 *    reclustered, its entries are in ordinary clusters written copy-on-write (regroup.c 1).
 */
#include <errno.h>
#include <float.h>
#include <stdlib.h>

#include "add.h"
#include "cluster.h"
#include "common.h"
#include "index.h"
#include "policy.h"
#include "read.h"
#include "regroup.h"
#include "store.h"

/* The most entries the staging cluster may hold so that its recluster (the
 * records read, their k-means, the new clusters written) fits in three quarters of `room`
 * bytes (the index grows meanwhile); at least a window. */
static uint64_t staging_cap(const kvt_coll *c, uint64_t room) {
    uint64_t lo = c->p.local_window, hi = (uint64_t)1 << 32;
    room = room / 4 * 3;
    for (;;) {
        uint64_t s = lo + (hi - lo) / 2;
        if (s == lo) return lo;
        uint32_t k = (uint32_t)((s + c->p.local_cluster_size - 1) / c->p.local_cluster_size);
        /* a read of the staging holds its records up to three times at once: the cache
         * entry it fills, the read buffer and a direct read's bounce buffer */
        uint64_t need = s * (3 * (uint64_t)c->L.esz + 4) + (uint64_t)k * (c->p.dim * 4 + 4) +
                        kvt_kmeans_bytes(s, k, c->p.dim) + 2 * (uint64_t)c->L.pool_bytes;
        if (need <= room)
            lo = s;
        else
            hi = s;
    }
}

/* The staging cluster reached its window: its entries are clustered on their own. */
static int recluster_staging(kvt_coll *c) {
    uint32_t s = c->local.staging, n = c->cl[s].n;
    uint32_t k = (n + c->p.local_cluster_size - 1) / c->p.local_cluster_size;
    uint8_t *recs;
    uint64_t owned;
    kvt_cache_ent *pinned;
    int rc = kvt_load_records(c, s, &recs, &owned, &pinned, &c->ctr.split_read_bytes);
    if (rc) return rc;
    uint64_t tmp = (uint64_t)n * 4 + (uint64_t)k * (c->p.dim * 4 + 4) + kvt_kmeans_bytes(n, k, c->p.dim);
    rc = kvt_mem_reserve(&c->st->mem, tmp);
    if (rc) {
        kvt_release_records(c, recs, owned, pinned, 0);
        return rc;
    }
    uint32_t *part = malloc((size_t)n * 4), *map = calloc(k, 4), used = 0;
    float *cent = malloc((size_t)k * c->p.dim * 4);
    if (!part || !cent || !map) rc = kvt_fail(ENOMEM, "recluster: out of memory");
    if (!rc)
        rc = kvt_kmeans(c->st->K, c->p.dtype, recs + KVT_REC_HEADER, c->p.dim, c->L.esz, NULL, n, k, c->p.kmeans_iters,
                        c->p.seed + c->ctr.splits, cent, part);
    if (!rc) {
        /* renumber the parts that got points, so that every new cluster is non-empty */
        for (uint32_t i = 0; i < n; i++) map[part[i]] = 1;
        for (uint32_t t = 0; t < k; t++) map[t] = map[t] ? used++ : 0;
        for (uint32_t i = 0; i < n; i++) part[i] = map[part[i]];
        uint32_t first_new;
        rc = kvt_regroup(c, s, recs, part, used, &first_new, NULL);
        if (!rc) c->local.staging = KVT_NONE;
    }
    kvt_release_records(c, recs, owned, pinned, rc == 0);
    free(part);
    free(map);
    free(cent);
    kvt_mem_release(&c->st->mem, tmp);
    return rc;
}

/* ---- the policy's hooks (policy.h) -------------------------------------------------------- */

/* assign: the newest entries gather in the staging cluster, as many as its recluster can hold
 * in DRAM (invariant 1); older ones of a batch too large for that join their nearest cluster
 * (the staging left out), as the static policy would, rather than a staging cluster too large
 * ever to be reclustered. */
static int assign(kvt_coll *c, kvt_add *a) {
    int rc = c->local.staging == KVT_NONE ? kvt_new_cluster(c, &c->local.staging) : 0;
    if (rc) return rc;
    uint32_t st = c->local.staging;
    uint64_t cap = staging_cap(c, a->avail), have = c->cl[st].n, n = a->n;
    uint64_t direct = have + n > cap && c->ncl > 1 ? (have < cap ? have + n - cap : n) : 0;
    float keep = c->cnorm[st];
    c->cnorm[st] = FLT_MAX; /* nothing joins it here */
    for (uint64_t i = 0; i < direct; i++)
        kvt_loc_put(
            c, a->n0 + i,
            kvt_nearest_rep(c->st->K, c->p.dtype, kvt_add_key(c, a, i), c->cent, c->cnorm, c->ncl, c->p.dim, a->x));
    c->cnorm[st] = keep;
    for (uint64_t i = direct; i < n; i++) kvt_loc_put(c, a->n0 + i, st);
    a->k = c->ncl;
    return 0;
}

static void after_add(kvt_coll *c, const kvt_add *a) {
    uint32_t st = c->local.staging;
    if (st != KVT_NONE && c->cl[st].n >= c->p.local_window && recluster_staging(c)) c->ctr.split_errors++;
}

/* A failed add: a staging cluster it made is gone with the other new slots. */
static void undo_add(kvt_coll *c, const kvt_add *a) {
    if (c->local.staging != KVT_NONE && c->local.staging >= a->ncl0) c->local.staging = KVT_NONE;
}

static int check_params(const kvt_coll_params *p) {
    if (p->local_window < 2 || p->local_cluster_size < 1 || p->local_cluster_size > p->local_window)
        return kvt_fail(KVT_EINVAL, "local_window / local_cluster_size: 1 <= local_cluster_size <= local_window and "
                                    "local_window >= 2 expected");
    return 0;
}

static uint64_t cluster_size(const kvt_coll_params *p) { return p->local_cluster_size; }

static void init(kvt_coll *c) { c->local.staging = KVT_NONE; }

static uint32_t staging(const kvt_coll *c) { return c->local.staging; }

static void load_dir(kvt_coll *c, double tau, uint32_t st) { c->local.staging = st; }

const kvt_policy_ops kvt_policy_local = {
    .clustered = 1,
    .check_params = check_params,
    .cluster_size = cluster_size,
    .init = init,
    .staging = staging,
    .load_dir = load_dir,
    .assign = assign,
    .after_add = after_add,
    .undo_add = undo_add,
};
