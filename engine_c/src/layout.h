/*
 * layout.h — the continuity-centric flash layout (layout.c): appending records to a
 * cluster's dual-head pool segments with an undo log, writing whole new clusters, moving a
 * cluster's segments aside (copy on write), and the page-aligned write buffers (a cluster's
 * pending buffer, kept in DRAM until it fills a page). Every function expects the store
 * mutex held.
 */
#ifndef KVT_LAYOUT_H
#define KVT_LAYOUT_H

#include <stdint.h>

#include "store.h"

/* Where the records of an append come from: encoded on the fly from the caller's key and
 * value rows (add), or copied from records already in memory (split, pending flush). */
typedef struct rec_src {
    const uint32_t *members; /* row numbers, encode mode */
    const uint8_t *keys, *values;
    int64_t first_id;
    const uint8_t *recs; /* copy mode when not NULL */
    uint8_t *mrecs;      /* in-place mode: records in a buffer the writer may permute */
    const uint8_t *pre;  /* encode mode: npre records that come first (a pending buffer) */
    uint32_t npre;
} rec_src;

typedef struct undo {
    uint32_t cl, seg, run;
    int claimed;
} undo;

typedef struct undo_log {
    undo *u;
    size_t n, cap;
} undo_log;

/* A cluster's segments, moved aside (to be retired or restored). */
typedef struct seg_save {
    kvt_seg *segs;
    uint32_t nseg, segcap;
} seg_save;

/* Whether appends keep write-buffer tails (kvt_store_opts.write_buffer, padded layouts). */
static inline int buffering(const kvt_coll *c) { return c->st->write_buffer && c->L.rpp && !token(c); }

/* Appending records to a cluster's flash segments, and undoing appends. */
void kvt_rollback(kvt_coll *c, undo_log *log);
int kvt_append_flash(kvt_coll *c, uint32_t ci, const rec_src *src, uint32_t m, uint8_t *scratch, uint32_t scratch_recs,
                     undo_log *log);
uint32_t kvt_scratch_records(const kvt_coll *c, uint64_t m);
int kvt_append_log(kvt_coll *c, uint64_t n0, const void *keys, const void *values, uint64_t n, uint8_t *scratch,
                   uint32_t sr);
int kvt_write_fresh(kvt_coll *c, const uint32_t *dst, uint8_t *const *recs, const uint32_t *counts, uint32_t nt);

/* A cluster's segments: moved aside, given back, restored, retired until the next commit. */
seg_save kvt_detach_segs(kvt_coll *c, uint32_t j);
void kvt_drop_segs(kvt_coll *c, uint32_t j);
void kvt_restore_segs(kvt_coll *c, uint32_t j, seg_save s);
void kvt_retire_segs(kvt_coll *c, seg_save s);

/* Pending buffers and the write buffers' tails. */
void kvt_free_pending(kvt_coll *c, kvt_cluster *k);
void kvt_tail_push(kvt_coll *c, kvt_cluster *k, int64_t id, const void *key, const void *value);
void kvt_tail_written(kvt_coll *c, kvt_cluster *k, uint32_t n);
/* A cluster the policy starts holding: its tail, if any, now waits with its held entries;
 * one it stops holding: what waited is a tail again. */
void kvt_tail_hold(kvt_coll *c, kvt_cluster *k);
void kvt_tail_release(kvt_coll *c, kvt_cluster *k);
int kvt_write_pending(kvt_coll *c, uint32_t j);
uint32_t kvt_tail_fill(const kvt_coll *c, const kvt_cluster *k);
uint64_t kvt_tail_share(const kvt_coll *c);
void kvt_trim_tails(kvt_coll *c);

#endif
