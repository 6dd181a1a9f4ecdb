/*
 * coll.h — the collection layer's internal interface: what the files that together make a
 * collection (store, add, adapt, local, layout, read, retrieve, token, search, loader,
 * virtualize, checkpoint; see engine_c/README.md for the map) share with each other.
 * Nothing here is public: kvtier.h is the API, store.h the structures the C tests inspect.
 * Every function declared here expects the store mutex held (store.c, invariant 1) unless
 * its comment says otherwise.
 */
#ifndef KVT_COLL_H
#define KVT_COLL_H

#include <float.h>
#include <pthread.h>
#include <string.h>

#include "common.h"
#include "estimate.h"
#include "store.h"

#define LOCK(s) pthread_mutex_lock(&(s)->mu)

#define UNLOCK(s) pthread_mutex_unlock(&(s)->mu)

/* The token layout's member lists hold 32-bit ids: it takes up to 2^32 - 1 entries. */
#define KVT_TOKEN_MAX_ENTRIES ((uint64_t)UINT32_MAX)

/* Where the records of an append come from: encoded on the fly from the caller's key and
 * value rows (add), or copied from records already in memory (split, pending flush). */
typedef struct rec_src {
    const uint32_t *members;    /* row numbers, encode mode */
    const uint8_t *keys, *values;
    int64_t first_id;
    const uint8_t *recs;        /* copy mode when not NULL */
    uint8_t *mrecs;             /* in-place mode: records in a buffer the writer may permute */
    const uint8_t *pre;         /* encode mode: npre records that come first (a pending buffer) */
    uint32_t npre;
} rec_src;

typedef struct undo { uint32_t cl, seg, run; int claimed; } undo;

typedef struct undo_log { undo *u; size_t n, cap; } undo_log;

/* A cluster's segments, moved aside (to be retired or restored). */
typedef struct seg_save { kvt_seg *segs; uint32_t nseg, segcap; } seg_save;

typedef void (*visit_fn)(void *ctx, uint32_t cluster, const uint8_t *recs, uint32_t n);

/* Runs `call` (an int expression using c) on collection c under the store mutex, once c is
 * ready. A call that failed for want of budget runs once more after what can give way did:
 * reads in flight (their buffers are pinned until they land) are waited for, and pending
 * buffers are written to flash, token-level keys dropped and array slack given back
 * (kvt_give_way); the second run buffers nothing new and grows no slack (store->tight). A failed add, retrieve or search changes nothing a second run
 * depends on. Sets rc. */
#define RUN_READY(c, call)                                                                     \
    do {                                                                                       \
        LOCK((c)->st);                                                                         \
        rc = kvt_ready(c);                                                                     \
        if (!rc) rc = (call);                                                                  \
        if (rc == KVT_EBUDGET && ((c)->st->loading_bytes || kvt_give_way((c)->st))) {          \
            while ((c)->st->loading_bytes) pthread_cond_wait(&(c)->st->done_cv, &(c)->st->mu); \
            kvt_give_way((c)->st);                                                             \
            kvt_clear_error();                                                                 \
            (c)->st->tight = 1;                                                                \
            rc = kvt_ready(c);                                                                 \
            if (!rc) rc = (call);                                                              \
            (c)->st->tight = 0;                                                                \
        }                                                                                      \
        UNLOCK((c)->st);                                                                       \
    } while (0)

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

/* Scratch of one cluster selection (scores, squared queries, order), reserved against the
 * budget. scores has 8 bytes per cluster: retrieve reuses it for result row positions. */
typedef struct selection { float *scores, *q2; uint32_t *idx; uint64_t reserved; } selection;

/* store.c */
int kvt_grow_array(kvt_coll *c, void **ptr, size_t size, uint64_t *cap, uint64_t need);
void kvt_free_array(kvt_coll *c, void *p, uint64_t cap, size_t size);
/* ... for a use of the budget (enum kvt_use: pending buffers are KVT_USE_PENDING) */
int kvt_grow_as(kvt_coll *c, int use, void **ptr, size_t size, uint64_t *cap, uint64_t need);
void kvt_free_as(kvt_coll *c, int use, void *p, uint64_t cap, size_t size);
int kvt_ensure_clusters(kvt_coll *c, uint32_t need);
int kvt_ensure_segs(kvt_coll *c, kvt_cluster *k, uint32_t need);
int kvt_ensure_mem(kvt_coll *c, kvt_cluster *k, uint32_t need);
int kvt_rebuild_members(kvt_coll *c);
int kvt_ensure_pbuf(kvt_coll *c, kvt_cluster *k, uint32_t need);
int kvt_ensure_pools(kvt_coll *c, uint32_t need);
int kvt_ensure_ids(kvt_coll *c, uint64_t need);
void kvt_drop_keys(kvt_coll *c);
uint64_t kvt_trim_slack(kvt_coll *c);
void kvt_update_norm(kvt_coll *c, uint32_t k);
int kvt_new_cluster(kvt_coll *c, uint32_t *out);
void kvt_stats_from_records(kvt_coll *c, uint32_t j, const uint8_t *recs, uint32_t n, float *x);
double kvt_variance(const kvt_cluster *k);
int kvt_coll_new(kvt_store *s, uint32_t no, const kvt_coll_params *p, int truncate, kvt_coll **out);
void kvt_coll_forget(kvt_store *s, kvt_coll *c);
void kvt_cluster_stats(kvt_coll *c, kvt_coll_stats *o);

/* read.c */
/* One extent of a cluster on flash: a segment (clustered layouts) or a run of consecutive ids
 * (token layout); its bytes (len, page padding included) land at byte boff of a buffer that
 * stacks the cluster's extents, to hold records base.. base+nrec-1 once unpacked. slot is
 * the caller's (read.c: the cluster's place in a batch). */
typedef struct kvt_extent {
    uint64_t off, len, boff;
    uint32_t nrec, base, slot;
} kvt_extent;
/* The extent provider: where cluster k's records are, for either layout, from the segments
 * given (the cluster's own, or a loader job's copy); out holds at least nseg (token layout:
 * k->n) entries. Returns how many it wrote. */
uint32_t kvt_cluster_extents(const kvt_coll *c, const kvt_cluster *k, const kvt_seg *segs, uint32_t nseg,
                             kvt_extent *out);
/* Packs a stacked read of segs (kvt_cluster_extents) into the cluster's records in order:
 * padding dropped, head-1 runs put first-first. Token-layout reads need no packing. */
void kvt_unpack_segs(const kvt_layout *L, const kvt_seg *segs, uint32_t nseg, uint8_t *buf);
int kvt_check_run(kvt_coll *c, uint32_t ci, uint32_t first_idx, const uint8_t *recs, uint32_t n, uint64_t off);
uint32_t kvt_read_buffer_records(const kvt_coll *c, const kvt_cluster *k);
int kvt_visit_clusters(kvt_coll *c, const uint32_t *list, uint32_t nlist, visit_fn fn, void *ctx);
int kvt_visit_cluster(kvt_coll *c, uint32_t ci, visit_fn fn, void *ctx);
int kvt_load_records(kvt_coll *c, uint32_t j, uint8_t **recs, uint64_t *owned, kvt_cache_ent **pinned, uint64_t *read_bytes);
void kvt_release_records(kvt_coll *c, uint8_t *recs, uint64_t owned, kvt_cache_ent *pinned, int consumed);

/* loader.c */
void kvt_wait_idle(kvt_coll *c);
void kvt_start_loaders(kvt_store *s, int *rc);

/* virtualize.c */
int kvt_ready(kvt_coll *c);
int kvt_give_way(kvt_store *s);
int kvt_peek_begin(kvt_coll *c, int *was_parked);
void kvt_peek_end(kvt_coll *c, int was_parked);

/* layout.c */
void kvt_rollback(kvt_coll *c, undo_log *log);
int kvt_append_flash(kvt_coll *c, uint32_t ci, const rec_src *src, uint32_t m, uint8_t *scratch, uint32_t scratch_recs, undo_log *log);
uint32_t kvt_scratch_records(const kvt_coll *c, uint64_t m);
int kvt_write_fresh(kvt_coll *c, const uint32_t *dst, uint8_t *const *recs, const uint32_t *counts, uint32_t nt);
seg_save kvt_detach_segs(kvt_coll *c, uint32_t j);
void kvt_drop_segs(kvt_coll *c, uint32_t j);
void kvt_restore_segs(kvt_coll *c, uint32_t j, seg_save s);
void kvt_retire_segs(kvt_coll *c, seg_save s);
void kvt_free_pending(kvt_coll *c, kvt_cluster *k);
int kvt_write_pending(kvt_coll *c, uint32_t j);
uint32_t kvt_tail_fill(const kvt_coll *c, const kvt_cluster *k);
uint64_t kvt_tail_share(const kvt_coll *c);
void kvt_trim_tails(kvt_coll *c);
void kvt_count_coretrieval(kvt_coll *c, const uint32_t *sel, uint64_t nsel);
int kvt_relayout(kvt_coll *c);

/* adapt.c */
void kvt_maybe_flag(kvt_coll *c, uint32_t j);
void kvt_derive_tau(kvt_coll *c);
int kvt_regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt, uint32_t *first_new);
void kvt_split_records(kvt_coll *c, uint32_t j, uint8_t *recs, int forced);
void kvt_relieve_pending(kvt_coll *c);
void kvt_split_oversized(kvt_coll *c, uint32_t j);

/* local.c */
int kvt_recluster_staging(kvt_coll *c);

/* score.c */
void kvt_score_clusters(kvt_coll *c, const float *q, uint64_t nq, float *scores, float *q2);
void kvt_order_by_score(uint32_t *idx, uint32_t n, const float *scores);
void kvt_top_by_score(uint32_t *idx, uint32_t n, uint32_t m, const float *scores);
int kvt_by_u32(const void *a, const void *b);
void kvt_put_result(kvt_result *r, const kvt_layout *L, const uint8_t *rec, int32_t ci);
int kvt_result_alloc(kvt_result *r, const kvt_layout *L, uint64_t total);
int kvt_selection_alloc(kvt_coll *c, uint64_t nq, selection *sel);
void kvt_selection_release_budget(kvt_coll *c, selection *sel);
void kvt_selection_free(kvt_coll *c, selection *sel);
void kvt_select_clusters(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, float *scores, float *q2, uint32_t *idx, uint64_t *taken_out, uint64_t *total_out, uint32_t *part_out);

/* token.c */
int kvt_record_offset(kvt_coll *c, uint64_t id, uint64_t *off);
int kvt_retrieve_tokens(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result *r);
typedef void (*key_fn)(void *ctx, uint64_t id, const void *key);
int kvt_scan_keys(kvt_coll *c, key_fn fn, void *ctx);

/* Token layout (kvt_coll_params.layout): records sit in one log in id order. */
static inline int token(const kvt_coll *c) {
    return c->p.layout == KVT_LAYOUT_TOKEN && c->p.policy != KVT_POLICY_NONE;
}

static inline uint64_t token_offset(const kvt_coll *c, uint64_t id) {
    return KVT_DATA_HEADER + id * c->L.esz;
}

/* Token layout: the end of the run of consecutive ids starting at member i0 (one read). */
static inline uint32_t token_run_end(const kvt_cluster *k, uint32_t i0) {
    uint32_t i1 = i0 + 1;
    while (i1 < k->n && k->mem[i1] == k->mem[i1 - 1] + 1) i1++;
    return i1;
}

static inline void set_loc(kvt_coll *c, uint64_t id, uint32_t cl, uint32_t idx) {
    c->loc[id] = (kvt_loc){cl, idx};
    c->mod[id / KVT_LOC_CHUNK] = ++c->modc;
}

static inline int buffering(const kvt_coll *c) {
    return c->st->write_buffer && c->L.rpp && !token(c);
}

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
