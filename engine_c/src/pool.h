/*
 * pool.h — where entries live on flash: the record format, the data file's geometry and
 * dual-head pools.
 *
 * A data file is a header page followed by pools of equal size. A pool holds up to
 * `pool_cap` records (twice the maximum cluster size) and has two heads: head 0 grows from
 * the pool's start upward, head 1 from its end downward, so two clusters share a pool and
 * either can append without moving the other. A cluster is a chain of segments, each a head
 * of some pool; usually one, so a cluster is one contiguous read.
 *
 * A record is: int64 id, uint32 CRC-32C of (id, key, value), uint32 record size, the key, the
 * value, padded to 8 bytes.
 *
 * Page padding (format 2): records never straddle a KVT_LAYOUT_PAGE page. A pool is a row of
 * pages of `rpp` records each, the rest of a page left as padding, so a head that has written
 * whole pages can go on appending whole pages, and a page once written is never programmed
 * again (the page-aligned write buffers of docs/design.md §2.2 rely on this). Positions in a pool count
 * records: position p is record p % rpp of page p / rpp. Head 0's slot s is position s, head
 * 1's is pool_cap - 1 - s. Format-1 files (rpp == 0) pack records back to back; they are read
 * and appended to as they are. Records wider than a page, or whose padding would waste more
 * than an eighth of a page, are not padded either.
 */
#ifndef KVT_POOL_H
#define KVT_POOL_H

#include <stdint.h>

#include "io.h"
#include "kvtier.h"

#define KVT_DATA_MAGIC "KVTDATA1"
/* The header page: one I/O alignment unit, so that pools start aligned (16 KiB builds too). */
#define KVT_DATA_HEADER (KVT_IO_ALIGN > 4096u ? KVT_IO_ALIGN : 4096u)
#define KVT_REC_HEADER 16u
/* The page that format-2 files pad records to: the smallest flash page of the profiles. */
#define KVT_LAYOUT_PAGE 4096u

typedef struct kvt_layout {
    uint32_t dim, value_dim, elsize;
    uint32_t key_bytes, value_bytes, esz;
    uint32_t pool_cap;     /* records per pool */
    uint64_t pool_bytes;   /* a multiple of the I/O alignment */
    uint32_t format;       /* the data file's format version (1 or 2) */
    uint32_t rpp;          /* records per KVT_LAYOUT_PAGE page when padded, else 0 */
    uint32_t log;          /* 1: the token layout's log (never padded), recorded in the header */
} kvt_layout;

typedef struct kvt_seg { uint32_t pool, head, n; } kvt_seg;
typedef struct kvt_pool { int32_t owner[2]; uint32_t used[2]; } kvt_pool;

/* The pool table. Heads are free (owner -1), owned by a cluster (owner >= 0), or retired
 * (owner -2): released since the last catalog commit and not reusable until it, because the
 * committed catalog may still name their data. A head claimed since the last checkpoint was
 * captured (its bit in fresh) is named by no catalog: released, it is free at once, so a
 * decoding run that never commits reuses the heads its splits give up. */
#define KVT_HEAD_FREE (-1)
#define KVT_HEAD_RETIRED (-2)
typedef struct kvt_pools {
    kvt_pool *p;
    uint32_t n, cap;
    uint32_t *avail;       /* pools that had a free head when pushed (checked when popped) */
    uint32_t navail;
    kvt_seg *retired;      /* heads released since the last commit */
    uint32_t nretired;
    uint8_t *fresh;        /* per pool, bit h: head h claimed since the last checkpoint */
} kvt_pools;

/* format: the data file's (1 packs records; 2 pads them to pages when that pays). `padded`:
 * 0 never pads (the token layout's log: L->log). */
void kvt_layout_init(kvt_layout *L, uint32_t dim, uint32_t value_dim, int dtype, uint32_t max_cluster,
                     uint32_t format, int padded);

static inline uint64_t kvt_pool_base(const kvt_layout *L, uint32_t pool) {
    return KVT_DATA_HEADER + (uint64_t)pool * L->pool_bytes;
}
/* Offset of position pos from its pool's start. */
static inline uint64_t kvt_pos_rel(const kvt_layout *L, uint32_t pos) {
    return L->rpp ? (uint64_t)(pos / L->rpp) * KVT_LAYOUT_PAGE + (uint64_t)(pos % L->rpp) * L->esz
                  : (uint64_t)pos * L->esz;
}
/* The lowest position of the slots first..first+n-1 of a head. */
static inline uint32_t kvt_run_pos(const kvt_layout *L, uint32_t head, uint32_t first, uint32_t n) {
    return head == 0 ? first : L->pool_cap - first - n;
}
/* File offset of the slot-th record of a head (slot 0 is the first appended). */
static inline uint64_t kvt_slot_offset(const kvt_layout *L, uint32_t pool, uint32_t head, uint32_t slot) {
    return kvt_pool_base(L, pool) + kvt_pos_rel(L, kvt_run_pos(L, head, slot, 1));
}
/* Offset of the lowest-addressed record of the first `n` slots of a head. */
static inline uint64_t kvt_run_offset(const kvt_layout *L, uint32_t pool, uint32_t head, uint32_t first, uint32_t n) {
    return kvt_pool_base(L, pool) + kvt_pos_rel(L, kvt_run_pos(L, head, first, n ? n : 1));
}
/* Bytes from the record at position pos to the end of the record at pos + n - 1: what a read
 * of those n records spans, page padding included. */
static inline uint64_t kvt_span(const kvt_layout *L, uint32_t pos, uint32_t n) {
    return n ? kvt_pos_rel(L, pos + n - 1) + L->esz - kvt_pos_rel(L, pos) : 0;
}
/* kvt_span of the slots first..first+n-1 of a head. */
static inline uint64_t kvt_run_span(const kvt_layout *L, uint32_t head, uint32_t first, uint32_t n) {
    return kvt_span(L, kvt_run_pos(L, head, first, n ? n : 1), n);
}
/* Copies n records laid out as on flash from position pos (src points at the first) to dst
 * back to back, dropping page padding. dst may overlap src if dst <= src. */
void kvt_unpad(const kvt_layout *L, uint8_t *dst, const uint8_t *src, uint32_t pos, uint32_t n);

/* Bytes at the end of a pool that no record uses (a page's padding in a padded layout, the
 * rounding to the I/O alignment otherwise): the back head's last record ends there, the next
 * pool's front head starts right after, so two extents that far apart are back to back. */
static inline uint64_t kvt_pool_tail(const kvt_layout *L) {
    return L->pool_bytes - kvt_pos_rel(L, L->pool_cap - 1) - L->esz;
}
static inline uint32_t kvt_pool_room(const kvt_layout *L, const kvt_pool *p) {
    return L->pool_cap - p->used[0] - p->used[1];
}

void kvt_rec_encode(const kvt_layout *L, uint8_t *dst, int64_t id, const void *key, const void *value);
/* 0 if the record's checksum and size hold, else KVT_ECORRUPT; *id gets the stored id. */
int kvt_rec_check(const kvt_layout *L, const uint8_t *rec, int64_t *id);
static inline const void *kvt_rec_key(const uint8_t *rec) { return rec + KVT_REC_HEADER; }
static inline const void *kvt_rec_value(const kvt_layout *L, const uint8_t *rec) {
    return rec + KVT_REC_HEADER + L->key_bytes;
}
/* Reverses the order of n records in place (head-1 runs are stored last-first). */
void kvt_rec_reverse(const kvt_layout *L, uint8_t *recs, uint32_t n);

/* The data file's header page: the fields (magic, format, geometry, their CRC-32C) in its
 * first 64 bytes, zeros, and a trailer with the CRC-32C of the whole page. */
void kvt_data_header(const kvt_layout *L, const kvt_coll_params *p, uint8_t page[KVT_DATA_HEADER]);
/* The format version a header page declares, or 0 if it is no data file header. */
uint32_t kvt_data_header_version(const uint8_t page[KVT_DATA_HEADER]);
/* 0 if the page is the header of a file of this layout and parameters and intact; KVT_EFORMAT
 * if it declares a format this engine does not read; else KVT_ECORRUPT. *fields_ok: the fields
 * match; *checksummed: the page carries the page checksum (files written before it did are
 * intact when they are zeros past the fields). */
int kvt_data_header_check(const kvt_layout *L, const kvt_coll_params *p, const uint8_t page[KVT_DATA_HEADER],
                          int *fields_ok, int *checksummed);

/* Claims a head for `owner` with room for at least one record: a free head of a pool whose
 * other head belongs to another cluster (so two clusters pair up), else a free pool, else a
 * new pool at the end of the file. The table must have room (kvt_pools_reserve). */
int kvt_pools_claim(kvt_pools *P, const kvt_layout *L, int32_t owner, kvt_seg *seg);
/* Claims the back head (1) of one pool for own0 and the front head (0) of the next pool for
 * own1, so that what they hold lies back to back across the pool boundary: head 1 fills a
 * pool from its end, head 0 the next from its start. Looks among recently freed pools for
 * such a pair with room for n0 and n1 records, else appends two pools (reserve two first). */
int kvt_pools_claim_pair(kvt_pools *P, const kvt_layout *L, int32_t own0, uint32_t n0, int32_t own1, uint32_t n1,
                         kvt_seg *s0, kvt_seg *s1);
/* Gives back a head claimed in this same uncommitted operation (its data was never named). */
void kvt_pools_unclaim(kvt_pools *P, const kvt_seg *seg);
/* Releases a head: free at once when no checkpoint was captured since it was claimed (no
 * catalog can name it), else retired until the commit of a later checkpoint. */
void kvt_pools_retire(kvt_pools *P, const kvt_seg *seg);
/* After a catalog commit: the first `count` retired heads (those retired before the
 * committed state was captured) become free. */
void kvt_pools_committed(kvt_pools *P, uint32_t count);
/* Offers the free heads of pools from..n-1 to later claims. */
void kvt_pools_push_free(kvt_pools *P, const kvt_layout *L, uint32_t from);
/* A checkpoint is being captured: every head owned now is named by it. */
void kvt_pools_named(kvt_pools *P);
/* Rebuilds the free lists from owners (after loading). */
void kvt_pools_rebuild(kvt_pools *P, const kvt_layout *L);
/* Makes room for `need` pools (and their list entries). */
int kvt_pools_reserve(kvt_pools *P, uint32_t need);
/* Bytes of memory per pool of capacity, for budget accounting. */
#define KVT_POOL_BYTES (sizeof(kvt_pool) + sizeof(uint32_t) * 2 + sizeof(kvt_seg) * 2 + 1)
void kvt_pools_free(kvt_pools *P);

#endif
