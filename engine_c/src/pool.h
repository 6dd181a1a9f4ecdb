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

typedef struct kvt_layout {
    uint32_t dim, value_dim, elsize;
    uint32_t key_bytes, value_bytes, esz;
    uint32_t pool_cap;     /* records per pool */
    uint64_t pool_bytes;   /* a multiple of the I/O alignment */
} kvt_layout;

typedef struct kvt_seg { uint32_t pool, head, n; } kvt_seg;
typedef struct kvt_pool { int32_t owner[2]; uint32_t used[2]; } kvt_pool;

/* The pool table. Heads are free (owner -1), owned by a cluster (owner >= 0), or retired
 * (owner -2): released since the last catalog commit and not reusable until it, because the
 * committed catalog may still name their data. */
#define KVT_HEAD_FREE (-1)
#define KVT_HEAD_RETIRED (-2)
typedef struct kvt_pools {
    kvt_pool *p;
    uint32_t n, cap;
    uint32_t *avail;       /* pools that had a free head when pushed (checked when popped) */
    uint32_t navail;
    kvt_seg *retired;      /* heads released since the last commit */
    uint32_t nretired;
} kvt_pools;

void kvt_layout_init(kvt_layout *L, uint32_t dim, uint32_t value_dim, int dtype, uint32_t max_cluster);

static inline uint64_t kvt_pool_base(const kvt_layout *L, uint32_t pool) {
    return KVT_DATA_HEADER + (uint64_t)pool * L->pool_bytes;
}
/* File offset of the slot-th record of a head (slot 0 is the first appended). */
static inline uint64_t kvt_slot_offset(const kvt_layout *L, uint32_t pool, uint32_t head, uint32_t slot) {
    uint32_t pos = head == 0 ? slot : L->pool_cap - 1 - slot;
    return kvt_pool_base(L, pool) + (uint64_t)pos * L->esz;
}
/* Offset of the lowest-addressed record of the first `n` slots of a head. */
static inline uint64_t kvt_run_offset(const kvt_layout *L, uint32_t pool, uint32_t head, uint32_t first, uint32_t n) {
    return head == 0 ? kvt_slot_offset(L, pool, 0, first) : kvt_slot_offset(L, pool, 1, first + n - 1);
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

/* The data file's header page. */
void kvt_data_header(const kvt_layout *L, const kvt_coll_params *p, uint8_t page[KVT_DATA_HEADER]);
int kvt_data_header_check(const kvt_layout *L, const kvt_coll_params *p, const uint8_t page[KVT_DATA_HEADER]);

/* Claims a head for `owner` with room for at least one record: a free head of a pool whose
 * other head belongs to another cluster (so two clusters pair up), else a free pool, else a
 * new pool at the end of the file. The table must have room (kvt_pools_reserve). */
int kvt_pools_claim(kvt_pools *P, const kvt_layout *L, int32_t owner, kvt_seg *seg);
/* Gives back a head claimed in this same uncommitted operation (its data was never named). */
void kvt_pools_unclaim(kvt_pools *P, const kvt_seg *seg);
/* Retires a head whose data the committed catalog may name. */
void kvt_pools_retire(kvt_pools *P, const kvt_seg *seg);
/* After a catalog commit: the first `count` retired heads (those retired before the
 * committed state was captured) become free. */
void kvt_pools_committed(kvt_pools *P, uint32_t count);
/* Offers the free heads of pools from..n-1 to later claims. */
void kvt_pools_push_free(kvt_pools *P, const kvt_layout *L, uint32_t from);
/* Rebuilds the free lists from owners (after loading). */
void kvt_pools_rebuild(kvt_pools *P, const kvt_layout *L);
/* Makes room for `need` pools (and their list entries). */
int kvt_pools_reserve(kvt_pools *P, uint32_t need);
/* Bytes of memory per pool of capacity, for budget accounting. */
#define KVT_POOL_BYTES (sizeof(kvt_pool) + sizeof(uint32_t) * 2 + sizeof(kvt_seg) * 2)
void kvt_pools_free(kvt_pools *P);

#endif
