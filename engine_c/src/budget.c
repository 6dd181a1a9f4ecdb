/*
 * budget.c — how much DRAM a collection needs, told before it is built (kvt_budget_estimate).
 *
 * The sizes are the engine's own: the same structures (sizeof), the same array growth rule
 * (kvt_grow_step), the same record layout (kvt_layout_init) and the same k-means scratch
 * (kvt_kmeans_bytes) that the store reserves against its budget, so an estimate cannot drift
 * from what the engine accounts. What it cannot know is assumed and reported: the number of
 * clusters (the size the policy aims for) and the largest cluster.
 *
 * Invariants:
 * 1. minimum <= recommended, and minimum = index + buffers: the resident index without any
 *    growth slack, plus the working memory of the smallest step the engine takes (one add
 *    chunk, one cluster read; for policy none, one scan of the key column from flash). Below it an operation fails with KVT_EBUDGET; at or above it
 *    the engine works, the cache and the write buffers shrinking to what is left.
 * 2. recommended adds growth slack, the pending and write buffers, and a cache that holds
 *    the clusters of one retrieve of `fetch` x the entries.
 */
#include <math.h>
#include <string.h>

#include "cluster.h"
#include "common.h"
#include "index.h"
#include "policy.h"
#include "store.h"

/* The capacity an array reaches when grown one element at a time to n (slack = 1), or to
 * exactly n when the budget allows no slack. */
static uint64_t grown(uint64_t n, int slack) {
    if (!n) return 0;
    if (!slack) return n;
    uint64_t cap = 0;
    while (cap < n) cap = kvt_grow_step(cap, cap + 1);
    return cap;
}

int kvt_budget_estimate(const kvt_coll_params *p, uint64_t n, uint64_t write_buffer, double fetch, kvt_budget_t *o) {
    kvt_clear_error();
    if (!p || !o) return kvt_fail(KVT_EINVAL, "estimate: NULL argument");
    memset(o, 0, sizeof *o);
    if (p->dim < 1 || p->dim > 4096) return kvt_fail(KVT_EINVAL, "dim: 1..4096 expected, got %u", p->dim);
    if (p->value_dim > 4096) return kvt_fail(KVT_EINVAL, "value_dim: 0..4096 expected, got %u", p->value_dim);
    if (p->dtype != KVT_F32 && p->dtype != KVT_F16) return kvt_fail(KVT_EINVAL, "dtype: float32 or float16 expected");
    const kvt_policy_ops *ops = kvt_policy_ops_for(p->policy);
    if (!ops) return kvt_fail(KVT_EINVAL, "policy: unknown value %d", p->policy);
    if (p->init_cluster_size < 1 || p->max_cluster_size < 2 || p->local_cluster_size < 1)
        return kvt_fail(KVT_EINVAL, "cluster sizes: init >= 1, max >= 2, local >= 1 expected");
    if (!(fetch >= 0 && fetch <= 1)) return kvt_fail(KVT_EINVAL, "fetch: a share in [0, 1] expected");
    if (n > ((uint64_t)1 << 40)) return kvt_fail(KVT_EINVAL, "n_entries: at most 2^40 expected");
    kvt_layout L;
    int tok = kvt_token_log(p);
    kvt_layout_init(&L, p->dim, p->value_dim, p->dtype, p->max_cluster_size, KVT_FORMAT_VERSION, !tok);
    o->entry_bytes = L.esz;

    /* clusters: the size the policy aims for (policy.h; static keeps the first partition's);
     * a policy without clusters keeps one chain */
    uint64_t per = ops->cluster_size ? ops->cluster_size(p) : p->init_cluster_size;
    uint64_t ncl = !ops->clustered ? (n ? 1 : 0) : (n + per - 1) / per;
    o->clusters = ncl;
    uint64_t cl_bytes = kvt_cluster_slot_bytes(p);
    /* a cluster's segment list: most clusters have one (a first allocation is exact) */
    uint64_t seg_bytes = sizeof(kvt_seg);
    /* pool table: a pool has two heads, and heads retired by splits wait for a checkpoint */
    uint64_t pools = (n + L.pool_cap - 1) / L.pool_cap;
    if (ops->clustered && ncl > pools) pools = ncl;
    uint64_t chunks = n / KVT_LOC_CHUNK + 1;
    /* what the policy keeps beside the clusters: resident keys, its own read scratch, entries
     * waiting for splits */
    uint64_t keys = 0, own_read = 0, waiting = 0;
    if (ops->budget) ops->budget(p, n, &L, fetch, &keys, &own_read, &waiting);
    uint64_t mem = tok ? 4 : 0;
    /* the id map: 2 bytes an entry while the clusters fit KVT_LOC_NARROW slots (store.h) */
    uint64_t locw = ncl > KVT_LOC_NARROW ? 4 : 2;
    for (int slack = 0; slack < 2; slack++) {
        uint64_t b = grown(ncl, slack) * cl_bytes + ncl * seg_bytes + grown(pools, slack) * KVT_POOL_BYTES +
                     grown(n, slack) * (locw + mem) + grown(chunks, slack) * 8;
        if (slack)
            o->index_grown = b;
        else
            o->index = b;
    }
    o->keys = keys;

    /* buffers: the smallest add chunk the engine stages (KVT_ADD_CHUNK_MIN entries: row
     * numbers, scratch for one pool's records, the first partition's k-means), and a read
     * of the largest cluster assumed (twice the mean, at least a pool) */
    uint64_t ch = n < KVT_ADD_CHUNK_MIN ? (n ? n : 1) : KVT_ADD_CHUNK_MIN;
    uint64_t kch = !ops->clustered ? 1 : (ch + p->init_cluster_size - 1) / p->init_cluster_size;
    uint64_t stage = ch * 8 + (uint64_t)L.pool_cap * L.esz + (uint64_t)p->dim * 4 + (kch + 2) * 9 +
                     (!ops->clustered ? 0 : kvt_kmeans_bytes(ch, (uint32_t)kch, p->dim) + kch * p->dim * 4);
    uint64_t largest = ncl && ops->clustered ? 2 * ((n + ncl - 1) / ncl) : 0;
    /* a policy with a read of its own (none: token-level, single records) sizes it itself */
    uint64_t read = own_read ? own_read : largest * L.esz + L.pool_bytes;
    o->buffers = stage > read ? stage : read;
    o->minimum = o->index + o->buffers;

    /* pending: the write buffer's share and the entries waiting for splits, both shrinkable */
    o->pending = write_buffer + waiting;
    o->cache = (uint64_t)ceil(fetch * (double)n) * L.esz;
    o->recommended = o->index_grown + o->keys + o->buffers + o->pending + o->cache;
    o->resident_per_entry = n ? (double)o->index / (double)n : 0;
    return 0;
}
