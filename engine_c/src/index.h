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
/* Cluster k's side record (store.h kvt_cside): freed once it holds neither a pending buffer
 * nor a member list (release), or freed with both (free). */
void kvt_side_release(kvt_coll *c, kvt_cluster *k);
/* A side record made ahead of the cluster it will belong to (so that installing cannot fail),
 * discarded unused, or attached to cluster k with a pending buffer of pcap records (pbuf,
 * reserved as pending) that k now owns. */
kvt_cside *kvt_side_new(kvt_coll *c, int use, int *rc);
void kvt_side_discard(kvt_coll *c, kvt_cside *x);
void kvt_side_attach(kvt_coll *c, kvt_cluster *k, kvt_cside *x, uint8_t *pbuf, uint32_t pcap);
void kvt_side_free(kvt_coll *c, kvt_cluster *k);
int kvt_ensure_pools(kvt_coll *c, uint32_t need);
int kvt_ensure_ids(kvt_coll *c, uint64_t need);
/* The id map widened to 4 bytes an entry if cluster slots up to `need` (exclusive) do not
 * all fit its 2 (KVT_LOC_NARROW): before any such slot is named in it. */
int kvt_widen_ids(kvt_coll *c, uint64_t need);
uint64_t kvt_shrink_array(kvt_coll *c, void **ptr, size_t size, uint64_t *cap, uint64_t target);
uint64_t kvt_trim_slack(kvt_coll *c);

/* The resident bytes of one cluster slot under parameters p: its kvt_cluster, its float16
 * representative and squared norm, and with them per-dimension variances (score_temp > 0)
 * and a value sum (value_sums) when the collection keeps them. kvt_ensure_clusters grows
 * these arrays together; budget.c sizes the index with the same figure. */
uint64_t kvt_cluster_slot_bytes(const kvt_coll_params *p);

/* Cluster slots and their statistics. */
void kvt_update_norm(kvt_coll *c, uint32_t k);
int kvt_new_cluster(kvt_coll *c, uint32_t *out);
/* Cluster j's representative in float32 (dim floats), and stored back rounded to float16
 * (invariant 4 of index.c; then kvt_update_norm). */
void kvt_rep_load(const kvt_coll *c, uint32_t j, float *out);
void kvt_rep_store(kvt_coll *c, uint32_t j, const float *mean);
/* Exact mean and squared-distance sum of n records' keys (x: 2 x dim floats of scratch). */
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
