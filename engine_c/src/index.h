/*
 * index.h — a collection's resident index (index.c): making and freeing a collection in
 * DRAM, the arrays every file grows against the budget, cluster slots and their statistics.
 * Every function expects the store mutex held (store.c 1).
 */
#ifndef KVT_INDEX_H
#define KVT_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

/* Arrays grown against the budget (store.c 4): for the index (KVT_USE_INDEX), or for a use
 * of the budget (enum kvt_use: pending buffers are KVT_USE_PENDING). */
int kvt_grow_array(kvt_coll *c, void **ptr, size_t size, uint64_t *cap, uint64_t need);
void kvt_free_array(kvt_coll *c, void *p, uint64_t cap, size_t size);
int kvt_grow_as(kvt_coll *c, int use, void **ptr, size_t size, uint64_t *cap, uint64_t need);
void kvt_free_as(kvt_coll *c, int use, void *p, uint64_t cap, size_t size);
int kvt_ensure_clusters(kvt_coll *c, uint32_t need);
int kvt_ensure_segs(kvt_coll *c, kvt_cluster *k, uint32_t need);
int kvt_ensure_mem(kvt_coll *c, kvt_cluster *k, uint32_t need);
int kvt_rebuild_members(kvt_coll *c);
int kvt_ensure_pbuf(kvt_coll *c, kvt_cluster *k, uint32_t need);
int kvt_ensure_pools(kvt_coll *c, uint32_t need);
int kvt_ensure_ids(kvt_coll *c, uint64_t need);
uint64_t kvt_shrink_array(kvt_coll *c, void **ptr, size_t size, uint64_t *cap, uint64_t target);
uint64_t kvt_trim_slack(kvt_coll *c);

/* Cluster slots and their statistics. */
void kvt_update_norm(kvt_coll *c, uint32_t k);
int kvt_new_cluster(kvt_coll *c, uint32_t *out);
void kvt_stats_from_records(kvt_coll *c, uint32_t j, const uint8_t *recs, uint32_t n, float *x);
double kvt_variance(const kvt_cluster *k);
/* The fields of kvt_coll_stats that come from the cluster table. */
void kvt_cluster_stats(kvt_coll *c, kvt_coll_stats *o);

/* Collections: a new one (its data file opened, truncated if asked, and added to the
 * store's list), one dropped from the list and freed, one freed. */
int kvt_coll_new(kvt_store *s, uint32_t no, const kvt_coll_params *p, int truncate, kvt_coll **out);
void kvt_coll_forget(kvt_store *s, kvt_coll *c);
void kvt_coll_free(kvt_coll *c);

#endif
