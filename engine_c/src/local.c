/*
 * local.c — the local-update baseline (ClusterKV-like): every local_window new entries are
 * clustered on their own into clusters of about local_cluster_size, in the staging cluster.
 *
 * Invariants:
 * 1. The staging cluster is the only cluster new entries join under this policy, up to what
 *    its recluster can hold in the DRAM budget: past that, the older entries of an add join
 *    their nearest cluster (add.c), so that the staging never outgrows DRAM. Once
 *    reclustered, its entries are in ordinary clusters written copy-on-write (adapt.c 3).
 */
#include <errno.h>
#include <stdlib.h>

#include "adapt.h"
#include "cluster.h"
#include "common.h"
#include "local.h"
#include "read.h"
#include "store.h"

/* Local policy: the staging cluster reached its window: cluster its entries on their own. */
int kvt_recluster_staging(kvt_coll *c) {
    uint32_t s = c->staging, n = c->cl[s].n;
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
        rc = kvt_kmeans(c->st->K, c->p.dtype, recs + KVT_REC_HEADER, c->p.dim, c->L.esz, NULL, n, k,
                        c->p.kmeans_iters, c->p.seed + c->ctr.splits, cent, part);
    if (!rc) {
        /* renumber the parts that got points, so that every new cluster is non-empty */
        for (uint32_t i = 0; i < n; i++) map[part[i]] = 1;
        for (uint32_t t = 0; t < k; t++) map[t] = map[t] ? used++ : 0;
        for (uint32_t i = 0; i < n; i++) part[i] = map[part[i]];
        uint32_t first_new;
        rc = kvt_regroup(c, s, recs, part, used, &first_new);
        if (!rc) c->staging = KVT_NONE;
    }
    kvt_release_records(c, recs, owned, pinned, rc == 0);
    free(part);
    free(map);
    free(cent);
    kvt_mem_release(&c->st->mem, tmp);
    return rc;
}
