/*
 * mem.h — the DRAM ledger: the budget every byte the engine holds for data is reserved
 * against first (representatives, the id map, pool tables, write and read buffers, cached
 * clusters), by what it is for.
 *
 * A reservation that does not fit asks what can give way (the cluster cache, cache.h, which
 * registers itself: it evicts whole cached clusters) until it fits, and fails with
 * KVT_EBUDGET, naming what holds the budget, when nothing is left to give way. The ledger
 * itself holds no data and knows nothing of clusters.
 */
#ifndef KVT_MEM_H
#define KVT_MEM_H

#include <stdint.h>

/* What reserved DRAM is for (kvt_store_stats reports each, and its peak): the resident index
 * (directory, representatives, id map, pool table, token-level keys), cached clusters,
 * pending buffers (entries waiting in DRAM: write-buffer tails and adaptive pending entries),
 * and transient buffers of one operation (add staging, reads, split scratch). */
enum kvt_use { KVT_USE_INDEX = 0, KVT_USE_CACHE = 1, KVT_USE_PENDING = 2, KVT_USE_BUFFERS = 3, KVT_USES = 4 };

typedef struct kvt_mem {
    uint64_t budget, used, peak;
    uint64_t use[KVT_USES], use_peak[KVT_USES]; /* used split by enum kvt_use */
    uint64_t fixed_peak;                        /* the peak of used - use[KVT_USE_CACHE] */
    uint64_t short_by;                          /* bytes the last failed reservation lacked */
    /* What gives way when a reservation does not fit: frees one unit it holds (reserved as
     * KVT_USE_CACHE) and returns 1, or returns 0 when it has nothing left it may free.
     * NULL: nothing gives way. */
    int (*give_way)(void *ctx);
    void *give_way_ctx;
} kvt_mem;

void kvt_mem_init(kvt_mem *m, uint64_t budget);

/* Reserves bytes of the budget for a use (enum kvt_use), making room through give_way as
 * needed. KVT_EBUDGET if it cannot, with a message saying what holds the budget. */
int kvt_mem_reserve_as(kvt_mem *m, int use, uint64_t bytes);
void kvt_mem_release_as(kvt_mem *m, int use, uint64_t bytes);
/* ... for transient buffers (KVT_USE_BUFFERS) */
static inline int kvt_mem_reserve(kvt_mem *m, uint64_t bytes) { return kvt_mem_reserve_as(m, KVT_USE_BUFFERS, bytes); }
static inline void kvt_mem_release(kvt_mem *m, uint64_t bytes) { kvt_mem_release_as(m, KVT_USE_BUFFERS, bytes); }
/* Restarts the peaks from the current values. */
void kvt_mem_reset_peaks(kvt_mem *m);

/* Bytes reserved for everything but the cache (which gives way), and what the budget leaves
 * beside them: the room an operation may plan its buffers in. */
static inline uint64_t kvt_mem_fixed(const kvt_mem *m) { return m->used - m->use[KVT_USE_CACHE]; }
static inline uint64_t kvt_mem_left(const kvt_mem *m) {
    return m->budget > kvt_mem_fixed(m) ? m->budget - kvt_mem_fixed(m) : 0;
}

/* The capacity an array grown by the engine's rule reaches from cap when it must hold need
 * elements (1.5x, 1.25x past 128K elements). kvt_budget_estimate sizes arrays by the same
 * rule. */
uint64_t kvt_grow_step(uint64_t cap, uint64_t need);

#endif
