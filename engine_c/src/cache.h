/*
 * cache.h — the DRAM budget and the cluster cache.
 *
 * Every byte the engine holds for data (representatives, the id map, pool tables, write and
 * read buffers, cached clusters) is reserved here first. A reservation that does not fit
 * evicts whole cached clusters, least recently used first, and fails with KVT_EBUDGET when
 * nothing evictable is left. The cache holds whole clusters as decoded record arrays in
 * insertion order.
 *
 * Replacement policies: LRU; LFU (fewest uses first, LRU among equals); and the
 * cluster-aligned policy of docs/design.md §2.3: entries updated recently (appended to, or made by a
 * split) are kept as long as they fit in a reserved share of the budget, and among the rest
 * the victim is the one with the largest (idle time x size), so small clusters, which read
 * least efficiently and cost least DRAM, stay longer. LFU and cluster-aligned choose among
 * the 64 least recently used unpinned entries (sampled, as Redis does), not all of them.
 */
#ifndef KVT_CACHE_H
#define KVT_CACHE_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvt_cache_ent {
    struct kvt_cache_ent *prev, *next; /* LRU list, most recent after the sentinel */
    void *owner;                       /* the collection */
    uint32_t cluster;
    uint32_t n, cap;                   /* records held / allocated */
    uint32_t pins;                     /* > 0: in use, not evictable */
    uint32_t loading;                  /* a loader thread is filling it: rec not ready, n == 0 */
    uint32_t prefetched;               /* loaded by a prefetch and not yet used */
    uint64_t uses, last_use, updated;  /* policy bookkeeping, in cache ticks */
    size_t esz;
    uint8_t *rec;
} kvt_cache_ent;

enum kvt_cache_policy { KVT_CACHE_LRU = 0, KVT_CACHE_LFU = 1, KVT_CACHE_CLUSTER = 2 };

/* What reserved DRAM is for (kvt_store_stats reports each, and its peak): the resident index
 * (directory, representatives, id map, pool table, token-level keys), cached clusters,
 * pending buffers (entries waiting in DRAM: write-buffer tails and adaptive pending entries),
 * and transient buffers of one operation (add staging, reads, split scratch). */
enum kvt_use { KVT_USE_INDEX = 0, KVT_USE_CACHE = 1, KVT_USE_PENDING = 2, KVT_USE_BUFFERS = 3, KVT_USES = 4 };

/* The capacity an array grown by the engine's rule reaches from cap when it must hold need
 * elements (1.5x, 1.25x past 128K elements). kvt_estimate sizes arrays by the same rule. */
uint64_t kvt_grow_step(uint64_t cap, uint64_t need);

/* An add larger than the budget can stage is consumed in chunks; no chunk is smaller than
 * this many entries (or the whole add), so the minimum budget covers staging one. */
#define KVT_ADD_CHUNK_MIN 256u

typedef struct kvt_cache {
    uint64_t budget, used, peak;
    uint64_t use[KVT_USES], use_peak[KVT_USES]; /* used split by enum kvt_use */
    uint64_t fixed_peak;               /* the peak of used - use[KVT_USE_CACHE] */
    int policy;
    uint64_t tick;
    double reserve_share;              /* cluster policy: budget share kept for recent updates */
    uint64_t recent_ticks;             /* ... updated within this many ticks */
    uint64_t cache_bytes, cached, hits, misses, evictions;
    kvt_cache_ent lru;                 /* sentinel */
    /* Called when an entry is evicted, so the owner can forget it. */
    void (*on_evict)(void *owner, uint32_t cluster);
} kvt_cache;

void kvt_cache_init(kvt_cache *c, uint64_t budget, void (*on_evict)(void *, uint32_t));
/* Frees every entry (without calling on_evict). */
void kvt_cache_destroy(kvt_cache *c);

/* Reserves bytes of the budget for a use (enum kvt_use), evicting unpinned clusters as
 * needed. KVT_EBUDGET if it cannot, with a message saying what holds the budget. */
int kvt_mem_reserve_as(kvt_cache *c, int use, uint64_t bytes);
void kvt_mem_release_as(kvt_cache *c, int use, uint64_t bytes);
/* ... for transient buffers (KVT_USE_BUFFERS) */
static inline int kvt_mem_reserve(kvt_cache *c, uint64_t bytes) { return kvt_mem_reserve_as(c, KVT_USE_BUFFERS, bytes); }
static inline void kvt_mem_release(kvt_cache *c, uint64_t bytes) { kvt_mem_release_as(c, KVT_USE_BUFFERS, bytes); }
/* Restarts the peaks from the current values. */
void kvt_mem_reset_peaks(kvt_cache *c);

/* A new entry with room for n records (reserved and allocated), pinned, at the MRU end, or
 * NULL when the budget cannot hold it without evicting pinned entries. */
kvt_cache_ent *kvt_cache_admit(kvt_cache *c, void *owner, uint32_t cluster, uint32_t n, size_t esz);
/* Makes room for `extra` more records; on failure drops nothing and returns KVT_EBUDGET. */
int kvt_cache_grow(kvt_cache *c, kvt_cache_ent *e, uint32_t extra);
void kvt_cache_touch(kvt_cache *c, kvt_cache_ent *e);
/* Marks an entry as just updated (appended to, or made by a split). */
void kvt_cache_updated(kvt_cache *c, kvt_cache_ent *e);
/* Removes and frees an entry (no on_evict call). */
void kvt_cache_drop(kvt_cache *c, kvt_cache_ent *e);
/* Drops every entry owned by `owner`. */
void kvt_cache_drop_owner(kvt_cache *c, void *owner);

#endif
