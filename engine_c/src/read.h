/*
 * read.h — reading clusters (read.c): where a cluster's records are on flash (the extent
 * provider, for either layout), reading them in merged batches, checking them against the
 * id map and handing them, cached or freshly read, to a visitor.
 * Every function expects the store mutex held (store.c 1).
 */
#ifndef KVT_READ_H
#define KVT_READ_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

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
/* Packs a stacked read of segs (kvt_cluster_extents) into the cluster's slots in order:
 * padding dropped, head-1 runs put first-first. Token-layout reads need no packing. */
void kvt_unpack_segs(const kvt_coll *c, const kvt_seg *segs, uint32_t nseg, uint8_t *buf);
/* Damaged records (read.c 2). A read call (search, retrieve, get, open) runs with the thread's
 * choice (kvt_set_on_corrupt) in coll->read_mode; reads made for the engine's own work (splits,
 * co-location rewrites, prefetch jobs, value sums at open) run KVT_READ_OWN, which raises and
 * lists nothing, so that a rewrite never drops what it could not read. */
enum kvt_read_mode {
    KVT_READ_OWN = 0,   /* KVT_ECORRUPT naming the ids; nothing listed */
    KVT_READ_RAISE = 1, /* KVT_ECORRUPT naming the ids, which are listed (kvt_last_unreadable) */
    KVT_READ_SKIP = 2   /* the damaged records are listed and left out; the call goes on */
};
/* The mode of a read call starting on this thread (and its unreadable list emptied). */
int kvt_read_begin(void);
/* 1 if record i of recs, a run of consecutive slots of cluster ci, is intact: its checksum
 * holds, the id map puts its id in ci, and it comes after record i-1 in id order when that
 * one is intact (store.c 2). */
int kvt_rec_ok(const kvt_coll *c, uint32_t ci, const uint8_t *recs, uint32_t i);
/* Checks n records read from flash at offset off, slots first_idx.. of cluster ci, in
 * `mode`. All intact: 0. Else the damaged ones are named by id (through the id map): in
 * KVT_READ_SKIP they are listed, counted in *bad (dead slots, format 3, are not: read.c 2;
 * may be NULL otherwise) and 0 is returned, the caller leaving out those kvt_rec_ok rejects;
 * else KVT_ECORRUPT. */
int kvt_check_run(kvt_coll *c, int mode, uint32_t ci, uint32_t first_idx, const uint8_t *recs, uint32_t n, uint64_t off,
                  uint32_t *bad);
/* Format 3: 1 if record i of recs (as kvt_rec_ok) is intact and in order but the id map puts
 * it in another cluster: a dead slot (a split moved that record to the other child). */
int kvt_slot_dead(const kvt_coll *c, uint32_t ci, const uint8_t *recs, uint32_t i);
/* n records of cluster ci, slots first_idx.., in slot order, at least one not intact: the
 * damaged ones (dead slots are not) named by id through the id map; in KVT_READ_SKIP listed
 * and counted in *bad, and 0; else KVT_ECORRUPT. */
int kvt_damaged_run(kvt_coll *c, int mode, uint32_t ci, uint32_t first_idx, const uint8_t *recs, uint32_t n,
                    uint64_t off, uint32_t *bad);
/* 1 if cluster ci was found damaged by the call in progress. */
int kvt_cluster_damaged(const kvt_coll *c, uint32_t ci);
/* Packs and checks a stacked read of cluster ci's segments (its own, or a loader job's copy),
 * in `mode` (kvt_check_run): its live records, in order, at the front of buf; dead slots
 * (format 3) dropped and counted (read.c 2). *kept (may be NULL): the live records intact (in
 * skip mode the damaged ones are left out). */
int kvt_settle_segs(kvt_coll *c, int mode, uint32_t ci, const kvt_seg *segs, uint32_t nseg, uint8_t *buf,
                    uint32_t *kept);
/* Skip mode's read: len bytes at off, of which what lies past the end of the file is zeros
 * (records there then fail their check) instead of a short-read error. */
int kvt_read_clamped(kvt_coll *c, uint64_t off, size_t len, void *dst, uint64_t entries);
/* Records a buffer that reads cluster k needs room for (padding included). */
uint32_t kvt_read_buffer_records(const kvt_coll *c, const kvt_cluster *k);

/* A visitor: all of a cluster's records, in order. */
typedef void (*visit_fn)(void *ctx, uint32_t cluster, const uint8_t *recs, uint32_t n);
int kvt_visit_clusters(kvt_coll *c, const uint32_t *list, uint32_t nlist, visit_fn fn, void *ctx);
int kvt_visit_cluster(kvt_coll *c, uint32_t ci, visit_fn fn, void *ctx);

/* Cluster ci's live records handed to fn in pieces (runs, in order: fn is called several
 * times for the cluster) that fit what the budget leaves (pieces.c): what reads a cluster too
 * large for the free room (kvt_visit_cluster's KVT_EBUDGET) without failing the call. A
 * cached cluster is one piece. */
int kvt_visit_cluster_pieces(kvt_coll *c, uint32_t ci, visit_fn fn, void *ctx);
/* kvt_visit_clusters, where a cluster no buffer fits for (alone in its batch) goes to
 * `pieces` instead of failing the call with KVT_EBUDGET. */
int kvt_visit_clusters_or_pieces(kvt_coll *c, const uint32_t *list, uint32_t nlist, visit_fn fn, visit_fn pieces,
                                 void *ctx);
/* All records of cluster j in one buffer: the cached copy, pinned, or a reserved buffer read
 * from flash (its reads added to *read_bytes); kvt_release_records undoes it. */
int kvt_load_records(kvt_coll *c, uint32_t j, uint8_t **recs, uint64_t *owned, kvt_cache_ent **pinned,
                     uint64_t *read_bytes);
void kvt_release_records(kvt_coll *c, uint8_t *recs, uint64_t owned, kvt_cache_ent *pinned, int consumed);

#endif
