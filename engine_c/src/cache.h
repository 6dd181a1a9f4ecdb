/*
 * cache.h — the cluster cache: whole clusters as decoded record arrays in insertion order,
 * charged to the DRAM ledger (mem.h) as KVT_USE_CACHE. The cache is what gives way in the
 * ledger: a reservation that does not fit evicts whole cached clusters, by the replacement
 * policy, until it fits or nothing evictable is left.
 *
 * Replacement policies: LRU; LFU (fewest uses first, LRU among equals, chosen among the 64
 * least recently used unpinned entries, sampled as Redis does); and the cluster-aligned policy
 * of docs/design.md §2.3, which counts time in decoding steps (kvt_cache_step) rather than
 * cache operations, because decoding reads every layer once per step:
 *  - entries updated (appended to, or made by a split) within the last `recent_steps` steps,
 *    unless their owner's latest read skipped them, are kept while they fit in a reserved
 *    share of the budget, newest updates first;
 *  - every entry carries its heat: the number of steps it was read in, decayed by half every
 *    `half_life` steps; the victim is the coolest entry, the most recently used among entries
 *    of about the same heat. Decoding reads the layers in a cycle, so the entry used last is
 *    the one needed last: evicting it keeps a stable part of the cycle cached where LRU
 *    would evict each entry just before its layer comes round again;
 *  - an entry a prefetch loaded stays while its owner has not read since: it is what the
 *    owner's next read is expected to use (as cool and as recent as an entry gets, the rule
 *    above would evict it first).
 */
#ifndef KVT_CACHE_H
#define KVT_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "kvtier.h"
#include "mem.h"

/* The lookup table's first size, in buckets, and its bytes: what a cache of up to that many
 * entries holds beside them. */
#define KVT_CACHE_TABLE_MIN   64u
#define KVT_CACHE_TABLE_BYTES (KVT_CACHE_TABLE_MIN * sizeof(void *))

/* Steps after which an unused entry's heat counts as zero. */
#define KVT_HEAT_HORIZON 64

/* What the cache keeps per owner (a collection): how many times it has read clusters, the
 * clock an entry's heat and idleness are measured on (for a layer of a decoding model, its
 * steps), and the step detection's mark; and when it last read on the cache's clock of all
 * owners' reads (kvt_cache.reads) with the usual gap between its reads (a running mean), so
 * that an owner no longer read (a collection queried before the current one) is told from
 * one whose turn comes round (a layer of a decoding cycle). */
typedef struct kvt_cache_owner {
    uint64_t visits, seen_step;
    uint64_t last_read; /* kvt_cache.reads at its latest read (0: never) */
    float gap;          /* its reads' usual gap, in reads of all owners */
} kvt_cache_owner;

typedef struct kvt_cache_ent {
    struct kvt_cache_ent *prev, *next; /* LRU list, most recent after the sentinel */
    struct kvt_cache_ent *hnext;       /* the lookup table's chain (kvt_cache_find) */
    void *owner;                       /* the collection */
    uint32_t cluster;
    uint32_t n, cap;            /* records held / allocated */
    uint32_t pins;              /* > 0: in use, not evictable */
    uint32_t loading;           /* a loader thread is filling it: rec not ready, n == 0 */
    uint32_t prefetched;        /* loaded by a prefetch and not yet used */
    uint64_t uses, last_use;    /* policy bookkeeping, in cache ticks */
    struct kvt_cache_owner *os; /* the owner's read counter */
    uint64_t use_visit;         /* the owner's read count at the entry's last read */
    uint64_t upd_step;          /* step of the last update + 1 (0: never) */
    float heat;                 /* owner reads it was read in, decayed (as of use_visit) */
    size_t esz;
    uint8_t *rec;
} kvt_cache_ent;

typedef struct kvt_cache {
    kvt_mem *mem; /* the ledger the cache is charged to */
    int policy;   /* enum kvt_cache_policy (kvtier.h) */
    uint64_t tick;
    uint64_t step;        /* decoding steps (kvt_cache_step, or detected) */
    uint64_t reads;       /* owner reads of every owner (kvt_cache_owner_read) */
    int explicit_steps;   /* the caller marks steps: no detection */
    double reserve_share; /* cluster policy: budget share kept for recent updates */
    /* the most bytes cached clusters may hold (the budget unless lowered: tests set 0 to run
     * an engine with no cache at all, where reads go to buffers freed after use) */
    uint64_t cache_cap;
    uint32_t recent_steps;             /* ... updated within this many steps */
    uint32_t half_life;                /* cluster policy: heat halves over this many steps */
    float decay[KVT_HEAT_HORIZON + 1]; /* decay[d] = 2^(-d / half_life) */
    uint64_t cache_bytes, cached, hits, misses, evictions;
    uint64_t prefetch_evicted; /* entries a prefetch loaded, evicted before any read used them */
    kvt_cache_ent lru;         /* sentinel */
    /* the lookup table: entries by (owner, cluster), chained, nbuckets a power of two grown
     * with the entries (its bytes are cache bytes, KVT_USE_CACHE). Owners find their cached
     * clusters here instead of keeping a pointer per cluster in their resident index. */
    kvt_cache_ent **buckets;
    uint64_t nbuckets; /* 0, or KVT_CACHE_TABLE_MIN and up */
    int resizing;      /* a resize is reserving room: evictions meanwhile do not shrink */
    /* Called when an entry is evicted, so the owner can forget it (and keep its heat). */
    void (*on_evict)(void *owner, const struct kvt_cache_ent *e);
    /* An admitted cluster's heat and last read (owner reads) when it was last evicted, if the
     * owner remembers them: returns 1 and sets both, else 0. NULL: no memory. */
    int (*history)(void *owner, uint32_t cluster, float *heat, uint64_t *visit);
    /* The owner's read counter (set by the store; NULL: one shared counter, `step`). */
    kvt_cache_owner *(*owner_state)(void *owner);
} kvt_cache;

/* A cache charged to ledger m, which it registers with as what gives way (mem.h). */
void kvt_cache_init(kvt_cache *c, kvt_mem *m, void (*on_evict)(void *, const kvt_cache_ent *));
/* Frees every entry (without calling on_evict). */
void kvt_cache_destroy(kvt_cache *c);

/* A new entry with room for n records (reserved and allocated), pinned, at the MRU end, or
 * NULL when the budget cannot hold it without evicting pinned entries. */
kvt_cache_ent *kvt_cache_admit(kvt_cache *c, void *owner, uint32_t cluster, uint32_t n, size_t esz);
/* Whether `bytes` more fit in the cache in free budget plus unpinned entries that their
 * owner's last two reads skipped. Read-ahead asks this first: measured on decoding traces at
 * 1 MiB, letting it evict anything more recent made it read 1.65x the bytes of no read-ahead
 * for no fewer bytes read on demand; within this room, 1.3x (free room alone: 1.14x). */
int kvt_cache_spare(const kvt_cache *c, uint64_t bytes);
/* Gives back what an entry holds past its n records (the page padding a read needed). */
void kvt_cache_fit(kvt_cache *c, kvt_cache_ent *e);
/* Makes room for `extra` more records; on failure drops nothing and returns KVT_EBUDGET. */
int kvt_cache_grow(kvt_cache *c, kvt_cache_ent *e, uint32_t extra);
void kvt_cache_touch(kvt_cache *c, kvt_cache_ent *e);
/* Marks an entry as just updated (appended to, or made by a split). */
void kvt_cache_updated(kvt_cache *c, kvt_cache_ent *e);
/* Ends a decoding step; from the first call on, steps are only counted this way. */
void kvt_cache_step(kvt_cache *c);
/* An owner (a collection) is about to read clusters: counts its read. Until the caller marks
 * steps, an owner read twice in one step starts the next step: decoding reads each layer once
 * per step. */
void kvt_cache_owner_read(kvt_cache *c, kvt_cache_owner *o);
/* The entry of owner's cluster, or NULL (loading entries included). */
kvt_cache_ent *kvt_cache_find(const kvt_cache *c, const void *owner, uint32_t cluster);
/* Removes and frees an entry (no on_evict call). */
void kvt_cache_drop(kvt_cache *c, kvt_cache_ent *e);
/* Drops every entry owned by `owner`. */
void kvt_cache_drop_owner(kvt_cache *c, void *owner);

#endif
