/*
 * pool.h — where entries live on flash: the record format, the data file's geometry and
 * dual-head pools.
 *
 * A data file is a header page followed by pools. A pool has two heads: head 0 grows from the
 * pool's start upward, head 1 from its end downward, so two clusters share a pool and either
 * can append without moving the other. A cluster is a chain of segments, each a head of some
 * pool; usually one, so a cluster is one contiguous read.
 *
 * Pool sizes (format 3): a pool is a run of allocation units (KVT_POOL_UNIT bytes: a layout
 * page, or the I/O alignment when that is larger) sized when it is made to what claims it:
 * room for half as much again as the claiming cluster writes, to grow into or for a smaller
 * partner (docs/design.md §2.2). Freed pools give their units back to a first-fit list of free runs
 * that later pools reuse; the file only grows when no run fits. Files of formats 1 and 2 keep
 * pools of one size, `pool_bytes` (twice max_cluster_size records), and are read and appended
 * to as they are.
 *
 * A record is: int64 id, uint32 CRC-32C of (id, key, value), uint32 record size, the key, the
 * value, padded to 8 bytes.
 *
 * Page padding (formats 2 and 3): records never straddle a KVT_LAYOUT_PAGE page. A pool is a
 * row of pages of `rpp` records each, the rest of a page left as padding, so a head that has
 * written whole pages can go on appending whole pages, and a page once written is never
 * programmed again (the page-aligned write buffers of docs/design.md §2.2 rely on this).
 * Positions in a pool count records: position p is record p % rpp of page p / rpp. Head 0's
 * slot s is position s, head 1's is cap - 1 - s. Format-1 files (rpp == 0) pack records back
 * to back. Records wider than a page, or whose padding would waste more than an eighth of a
 * page, are not padded either.
 *
 * Slots (format 3): a head's slots hold records in the order they were written; a cluster's
 * slots are its segments' in order. A slot need not hold a live record of the cluster that
 * owns the head: a split keeps its larger child in the parent's segments, and the other
 * child's records there are dead slots (store.h, kvt_cluster.dead); the id map says which
 * slot holds each live record.
 */
#ifndef KVT_POOL_H
#define KVT_POOL_H

#include <stdint.h>

#include "io.h"
#include "kvtier.h"

#define KVT_DATA_MAGIC "KVTDATA1"
/* The header page: one I/O alignment unit, so that pools start aligned (16 KiB builds too). */
#if KVT_IO_ALIGN > 4096
#define KVT_DATA_HEADER KVT_IO_ALIGN
#else
#define KVT_DATA_HEADER 4096u
#endif
#define KVT_REC_HEADER 16u
/* The page that format-2 files pad records to: the smallest flash page of the profiles. */
#define KVT_LAYOUT_PAGE 4096u

typedef struct kvt_layout {
    uint32_t dim, value_dim, elsize;
    uint32_t key_bytes, value_bytes, esz;
    uint32_t pool_cap;   /* records of a format-1/2 pool, and of format 3's largest */
    uint64_t pool_bytes; /* bytes of such a pool (a multiple of the I/O alignment) */
    uint32_t format;     /* the data file's format version (1 to 3) */
    uint32_t rpp;        /* records per KVT_LAYOUT_PAGE page when padded, else 0 */
    uint32_t log;        /* 1: the token layout's log (never padded), recorded in the header */
} kvt_layout;

/* The unit pools are made of (format 3): a layout page, or the I/O alignment if larger, so
 * that pools never share an aligned page and direct reads of one pool never touch bytes
 * another writer is appending. */
#if KVT_IO_ALIGN > KVT_LAYOUT_PAGE
#define KVT_POOL_UNIT KVT_IO_ALIGN
#else
#define KVT_POOL_UNIT KVT_LAYOUT_PAGE
#endif

typedef struct kvt_seg {
    uint32_t pool, head, n;
} kvt_seg;
/* A pool: its heads' slots used, and where it lies: `units` allocation units from unit `base`
 * (a format-1/2 pool: base = index x units). units == 0: a free slot of the table (format 3:
 * the pool was given back). Its heads' states are in the table's byte per pool (kvt_pools.st):
 * 16 bytes here and one there are all a pool keeps resident (issue 26). */
typedef struct kvt_pool {
    uint32_t used[2];
    uint32_t base, units;
} kvt_pool;
/* A run of free allocation units of the data file (format 3). */
typedef struct kvt_run {
    uint32_t base, units;
} kvt_run;

/* The pool table. A head is free, owned by a cluster (the cluster's segment list names it: a
 * head does not know its owner), or retired: released since a checkpoint named it and not
 * reusable before a commit of a later checkpoint, because the committed catalog may still name
 * its data. A retired head is due once a checkpoint was captured after it was retired: the
 * commit of the latest capture frees the due heads. A head claimed since the last checkpoint
 * was captured (fresh) is named by no catalog: released, it is free at once, so a decoding run
 * that never commits reuses the heads its splits give up. */
#define KVT_HEAD_FREE    0
#define KVT_HEAD_OWNED   1
#define KVT_HEAD_RETIRED 2
#define KVT_HEAD_DUE     3
/* A pool's state byte: two bits per head (its KVT_HEAD_ state), a fresh bit per head, and
 * whether the pool is listed in avail. */
#define KVT_POOL_FRESH(h) (0x10u << (h))
#define KVT_POOL_LISTED   0x40u
typedef struct kvt_pools {
    kvt_pool *p;
    uint8_t *st; /* per pool: head states, fresh bits, listed (above) */
    uint32_t n, cap;
    uint32_t *avail; /* pools that had a free head when listed (checked when popped), each once */
    uint32_t navail;
    uint32_t nretired; /* heads retired or due */
    uint32_t captures; /* checkpoints captured (kvt_pools_named) */
    /* format 3: pools sized when made, their units from free runs or the file's end */
    int sized;
    kvt_run *runs; /* free runs of units, sorted by base, coalesced */
    uint32_t nruns;
    /* table slots of given-back pools (units == 0), for reuse: a chain through their base */
    uint32_t spare_head, nspare;
    uint32_t end, peak; /* units up to the last pool's end; the most it ever was */
} kvt_pools;

static inline int kvt_head_state(const kvt_pools *P, uint32_t pool, uint32_t head) {
    return (P->st[pool] >> (2 * head)) & 3;
}
static inline void kvt_head_set(kvt_pools *P, uint32_t pool, uint32_t head, int state) {
    P->st[pool] = (uint8_t)((P->st[pool] & ~(3u << (2 * head))) | (unsigned)state << (2 * head));
}

/* format: the data file's (1 packs records; 2 pads them to pages when that pays). `padded`:
 * 0 never pads (the token layout's log: L->log). */
void kvt_layout_init(kvt_layout *L, uint32_t dim, uint32_t value_dim, int dtype, uint32_t max_cluster, uint32_t format,
                     int padded);

/* Records a pool holds (its two heads together). */
static inline uint32_t kvt_pool_cap(const kvt_layout *L, const kvt_pool *p) {
    uint64_t bytes = (uint64_t)p->units * KVT_POOL_UNIT;
    return (uint32_t)(L->rpp ? bytes / KVT_LAYOUT_PAGE * L->rpp : bytes / L->esz);
}
static inline uint64_t kvt_pool_base(const kvt_pool *p) { return KVT_DATA_HEADER + (uint64_t)p->base * KVT_POOL_UNIT; }
/* Offset of position pos from its pool's start. */
static inline uint64_t kvt_pos_rel(const kvt_layout *L, uint32_t pos) {
    return L->rpp ? (uint64_t)(pos / L->rpp) * KVT_LAYOUT_PAGE + (uint64_t)(pos % L->rpp) * L->esz
                  : (uint64_t)pos * L->esz;
}
/* The lowest position of the slots first..first+n-1 of a head. */
static inline uint32_t kvt_run_pos(const kvt_layout *L, const kvt_pool *p, uint32_t head, uint32_t first, uint32_t n) {
    return head == 0 ? first : kvt_pool_cap(L, p) - first - n;
}
/* File offset of the slot-th record of a head (slot 0 is the first appended). */
static inline uint64_t kvt_slot_offset(const kvt_layout *L, const kvt_pool *p, uint32_t head, uint32_t slot) {
    return kvt_pool_base(p) + kvt_pos_rel(L, kvt_run_pos(L, p, head, slot, 1));
}
/* Offset of the lowest-addressed record of the first `n` slots of a head. */
static inline uint64_t kvt_run_offset(const kvt_layout *L, const kvt_pool *p, uint32_t head, uint32_t first,
                                      uint32_t n) {
    return kvt_pool_base(p) + kvt_pos_rel(L, kvt_run_pos(L, p, head, first, n ? n : 1));
}
/* Bytes from the record at position pos to the end of the record at pos + n - 1: what a read
 * of those n records spans, page padding included. */
static inline uint64_t kvt_span(const kvt_layout *L, uint32_t pos, uint32_t n) {
    return n ? kvt_pos_rel(L, pos + n - 1) + L->esz - kvt_pos_rel(L, pos) : 0;
}
/* kvt_span of the slots first..first+n-1 of a head. */
static inline uint64_t kvt_run_span(const kvt_layout *L, const kvt_pool *p, uint32_t head, uint32_t first, uint32_t n) {
    return kvt_span(L, kvt_run_pos(L, p, head, first, n ? n : 1), n);
}
/* Copies n records laid out as on flash from position pos (src points at the first) to dst
 * back to back, dropping page padding. dst may overlap src if dst <= src. */
void kvt_unpad(const kvt_layout *L, uint8_t *dst, const uint8_t *src, uint32_t pos, uint32_t n);

/* Bytes at the end of a pool that no record uses (a page's padding in a padded layout, the
 * rounding to the unit otherwise): the back head's last record ends there, the next pool's
 * front head starts right after, so two extents that far apart are back to back. */
static inline uint64_t kvt_pool_tail(const kvt_layout *L, const kvt_pool *p) {
    uint32_t cap = kvt_pool_cap(L, p);
    return cap ? (uint64_t)p->units * KVT_POOL_UNIT - kvt_pos_rel(L, cap - 1) - L->esz : 0;
}
static inline uint32_t kvt_pool_room(const kvt_layout *L, const kvt_pool *p) {
    return kvt_pool_cap(L, p) - p->used[0] - p->used[1];
}
/* The most a pool's end leaves unused, over every pool size: a page's padding (padded), less
 * than a record (packed). read.c: two extents that far apart are back to back. */
static inline uint64_t kvt_pool_slack(const kvt_layout *L) {
    return L->rpp ? KVT_LAYOUT_PAGE - (uint64_t)L->rpp * L->esz : L->esz;
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

/* Claims a head for a cluster whose segments are own[0..nown-1], with `live` records on flash
 * already, that will take `need` records now: a free head of a pool that is none of its own
 * (so two clusters pair up) with room for them and a quarter as many again to grow into (format
 * 1/2: room for one), else a new pool. Format 3 sizes it for one and a half times the
 * cluster's size (`need`, or `live` up to two thirds of a format-2 pool when it grows a
 * chain), to grow into or for a smaller partner, and never larger than a format-2 pool (a
 * larger write chains pools), from the free runs or the file's end; format
 * 1/2 takes a free pool, else one at the end of the file. The table must have room
 * (kvt_pools_reserve). */
int kvt_pools_claim(kvt_pools *P, const kvt_layout *L, const kvt_seg *own, uint32_t nown, uint32_t need, uint32_t live,
                    kvt_seg *seg);
/* Format 1/2: claims the back head (1) of one pool and the front head (0) of the next pool
 * for two clusters that own no segments (a split's children), so that what they hold lies back to back across the pool boundary:
 * head 1 fills a pool from its end, head 0 the next from its start. Looks among recently
 * freed pools for such a pair with room for n0 and n1 records, else appends two pools
 * (reserve two first). */
int kvt_pools_claim_pair(kvt_pools *P, const kvt_layout *L, uint32_t n0, uint32_t n1, kvt_seg *s0, kvt_seg *s1);
/* Format 3: makes a pool of `units` units at the file's end (never from a free run), both
 * heads free, and returns its index: the co-location rewrite lays pools back to back. */
int kvt_pools_append(kvt_pools *P, uint32_t units, uint32_t *pool);
/* Format 1/2: appends a pool slot, both heads free, where the file's fixed-size pools lie. */
int kvt_pools_append_fixed(kvt_pools *P, const kvt_layout *L, uint32_t *pool);
/* Table slot `pool` made empty: no units, both heads free (loading a catalog). */
void kvt_pools_blank(kvt_pools *P, uint32_t pool);
/* Head `head` of pool `pool`, free, becomes a cluster's, claimed now (co-location). */
void kvt_pools_own(kvt_pools *P, uint32_t pool, uint32_t head);
/* Format 3: the units a pool needs to hold `records` records. */
uint32_t kvt_pool_units(const kvt_layout *L, uint64_t records);
/* Gives back a head claimed in this same uncommitted operation (its data was never named). */
void kvt_pools_unclaim(kvt_pools *P, const kvt_seg *seg);
/* Releases a head: free at once when no checkpoint was captured since it was claimed (no
 * catalog can name it), else retired until the commit of a later checkpoint. */
void kvt_pools_retire(kvt_pools *P, const kvt_seg *seg);
/* After a catalog commit of the checkpoint captured as number `capture` (kvt_pools_named's):
 * if it was the latest capture, the due heads (retired before it) become free; an older one
 * frees nothing, since the table cannot tell which due heads it still names (the commit of
 * the latest capture frees them). */
void kvt_pools_committed(kvt_pools *P, uint32_t capture);
/* Offers the free heads of pools from..n-1 to later claims. */
void kvt_pools_push_free(kvt_pools *P, const kvt_layout *L, uint32_t from);
/* A checkpoint is being captured: every head owned now is named by it, and every retired
 * head is due (the checkpoint does not name it). Returns the capture's number. */
uint32_t kvt_pools_named(kvt_pools *P);
/* Rebuilds the free lists from owners (after loading): heads nobody owns are free, and
 * (format 3) pools with no owner give their units back. */
int kvt_pools_rebuild(kvt_pools *P, const kvt_layout *L); /* KVT_ECORRUPT: pools overlap */
/* Format 1/2: lays out pool slots n0..n-1 as the fixed-size pools of the file. */
void kvt_pools_fixed(kvt_pools *P, const kvt_layout *L, uint32_t n0);
/* The data file's size: the header and every pool it ever held (format 3: up to the most
 * units it ever used). */
static inline uint64_t kvt_pools_file_bytes(const kvt_pools *P, const kvt_layout *L) {
    return P->sized ? KVT_DATA_HEADER + (uint64_t)P->peak * KVT_POOL_UNIT
                    : KVT_DATA_HEADER + (uint64_t)P->n * L->pool_bytes;
}
/* Makes room for exactly `need` pools (and their list entries), growing or, when every pool
 * of the table is below `need`, shrinking the table. */
int kvt_pools_reserve(kvt_pools *P, uint32_t need);
/* Bytes of memory per pool of capacity, for budget accounting: the pool, its state byte, its
 * place in avail, and a free run (runs lie between pools: at most one more than the pools). */
#define KVT_POOL_BYTES (sizeof(kvt_pool) + 1 + sizeof(uint32_t) + sizeof(kvt_run))
void kvt_pools_free(kvt_pools *P);

#endif
