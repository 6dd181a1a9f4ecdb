/*
 * cache.c — budget accounting and LRU replacement of whole clusters.
 *
 * Invariants:
 * 1. used <= budget at every return, and peak is the largest value used has had.
 * 2. used counts every reservation not yet released, including the bytes of every cached
 *    entry (cap * esz + the entry header); use[u] counts those made for use u, so the uses
 *    sum to used and use[KVT_USE_CACHE] == cache_bytes.
 * 3. A pinned entry is never evicted; an evicted entry's owner is told through on_evict
 *    before the entry is freed.
 * 4. The LRU list order is kept under every policy (most recent first); LFU and the
 *    cluster-aligned policy choose their victim among the KVT_VICTIM_CANDIDATES least
 *    recently used unpinned entries, so an eviction costs O(1) whatever the cache holds.
 */
#include <stdio.h>
#include <stdlib.h>

#include "common.h"
#include "cache.h"

static void unlink_ent(kvt_cache_ent *e) {
    e->prev->next = e->next;
    e->next->prev = e->prev;
}

static void push_front(kvt_cache *c, kvt_cache_ent *e) {
    e->next = c->lru.next;
    e->prev = &c->lru;
    c->lru.next->prev = e;
    c->lru.next = e;
}

static uint64_t ent_bytes(const kvt_cache_ent *e) { return sizeof *e + (uint64_t)e->cap * e->esz; }

void kvt_cache_init(kvt_cache *c, uint64_t budget, void (*on_evict)(void *, uint32_t)) {
    memset(c, 0, sizeof *c);
    c->budget = budget;
    c->lru.next = c->lru.prev = &c->lru;
    c->on_evict = on_evict;
    c->policy = KVT_CACHE_LRU;
    c->reserve_share = 0.25;
    c->recent_ticks = 64;
}

static void free_ent(kvt_cache *c, kvt_cache_ent *e) {
    unlink_ent(e);
    uint64_t b = ent_bytes(e);
    kvt_mem_release_as(c, KVT_USE_CACHE, b);
    c->cache_bytes -= b;
    c->cached--;
    free(e->rec);
    free(e);
}

void kvt_cache_destroy(kvt_cache *c) {
    while (c->lru.next != &c->lru) free_ent(c, c->lru.next);
}

/* Candidates a victim is chosen among: the least recently used unpinned entries. Scanning
 * every entry made each eviction O(cached clusters), which under a full budget with
 * thousands of small clusters cost more than the reads it saved; like Redis's sampled
 * policies, LFU and the cluster-aligned policy choose among the oldest few instead. */
#define KVT_VICTIM_CANDIDATES 64

/* The entry to evict next under the policy, or NULL if every entry is pinned. */
static kvt_cache_ent *victim(kvt_cache *c) {
    kvt_cache_ent *best = NULL, *oldest = NULL;
    int seen = 0;
    double worst = -1;
    uint64_t protect = (uint64_t)(c->reserve_share * (double)c->budget), prot = 0;
    for (kvt_cache_ent *e = c->lru.prev; e != &c->lru && seen < KVT_VICTIM_CANDIDATES; e = e->prev) {
        if (e->pins) continue;
        seen++;
        if (c->policy == KVT_CACHE_LRU) return e;
        if (!oldest) oldest = e;
        if (c->policy == KVT_CACHE_LFU) {
            if (!best || e->uses < best->uses) best = e;
            continue;
        }
        /* cluster-aligned: recently updated entries are kept while they fit in the reserved
         * share (they sit near the MRU end, so the candidates rarely include them); among
         * the rest the largest idle time x size goes first, so small clusters stay */
        uint64_t bytes = (uint64_t)e->cap * e->esz;
        if (e->updated && c->tick - e->updated <= c->recent_ticks && prot + bytes <= protect) {
            prot += bytes;
            continue;
        }
        double score = (double)(c->tick - e->last_use + 1) * (double)(bytes + 1);
        if (score > worst) {
            worst = score;
            best = e;
        }
    }
    return best ? best : oldest; /* only protected candidates: the oldest of them */
}

static const char *const use_names[KVT_USES] = {"index", "cache", "pending", "buffers"};

static void note_peaks(kvt_cache *c, int use) {
    if (c->used > c->peak) c->peak = c->used;
    if (c->use[use] > c->use_peak[use]) c->use_peak[use] = c->use[use];
    uint64_t fixed = c->used - c->use[KVT_USE_CACHE];
    if (fixed > c->fixed_peak) c->fixed_peak = fixed;
}

int kvt_mem_reserve_as(kvt_cache *c, int use, uint64_t bytes) {
    while (c->used + bytes > c->budget) {
        kvt_cache_ent *e = victim(c);
        if (!e) break;
        if (c->on_evict) c->on_evict(e->owner, e->cluster);
        free_ent(c, e);
        c->evictions++;
    }
    if (c->used + bytes > c->budget) {
        char what[256];
        size_t at = 0;
        for (int u = 0; u < KVT_USES; u++)
            at += (size_t)snprintf(what + at, sizeof what - at, "%s%s %llu", u ? ", " : "", use_names[u],
                                   (unsigned long long)c->use[u]);
        return kvt_fail(KVT_EBUDGET, "DRAM budget of %llu bytes cannot hold %llu more bytes of %s (in use: %s; "
                        "the cached clusters left are pinned by this operation). Raise dram_budget "
                        "(kvtier.estimate tells the minimum), or lower write_buffer, pending_budget or the add batch.",
                        (unsigned long long)c->budget, (unsigned long long)bytes, use_names[use], what);
    }
    c->used += bytes;
    c->use[use] += bytes;
    note_peaks(c, use);
    return 0;
}

void kvt_mem_release_as(kvt_cache *c, int use, uint64_t bytes) {
    c->used -= bytes;
    c->use[use] -= bytes;
}

void kvt_mem_reset_peaks(kvt_cache *c) {
    c->peak = c->used;
    memcpy(c->use_peak, c->use, sizeof c->use);
    c->fixed_peak = c->used - c->use[KVT_USE_CACHE];
}

kvt_cache_ent *kvt_cache_admit(kvt_cache *c, void *owner, uint32_t cluster, uint32_t n, size_t esz) {
    uint64_t need = sizeof(kvt_cache_ent) + (uint64_t)n * esz;
    if (need > c->budget / 2) return NULL; /* one cluster may not flush the whole cache */
    if (kvt_mem_reserve_as(c, KVT_USE_CACHE, need)) return NULL;
    kvt_cache_ent *e = calloc(1, sizeof *e);
    uint8_t *rec = n ? malloc((size_t)n * esz) : NULL;
    if (!e || (n && !rec)) {
        free(e);
        free(rec);
        kvt_mem_release_as(c, KVT_USE_CACHE, need);
        return NULL;
    }
    e->owner = owner;
    e->cluster = cluster;
    e->cap = n;
    e->esz = esz;
    e->rec = rec;
    e->pins = 1;
    e->uses = 1;
    e->last_use = ++c->tick;
    push_front(c, e);
    c->cache_bytes += need;
    c->cached++;
    return e;
}

int kvt_cache_grow(kvt_cache *c, kvt_cache_ent *e, uint32_t extra) {
    if (e->n + extra <= e->cap) return 0;
    uint32_t cap = e->cap ? e->cap : 8;
    while (cap < e->n + extra) cap *= 2;
    uint64_t more = (uint64_t)(cap - e->cap) * e->esz;
    e->pins++;
    int rc = kvt_mem_reserve_as(c, KVT_USE_CACHE, more);
    e->pins--;
    if (rc) return rc;
    uint8_t *rec = realloc(e->rec, (size_t)cap * e->esz);
    if (!rec) {
        kvt_mem_release_as(c, KVT_USE_CACHE, more);
        return kvt_fail(KVT_EBUDGET, "cache: cannot grow a cached cluster to %u records", cap);
    }
    e->rec = rec;
    e->cap = cap;
    c->cache_bytes += more;
    return 0;
}

void kvt_cache_touch(kvt_cache *c, kvt_cache_ent *e) {
    e->uses++;
    e->last_use = ++c->tick;
    unlink_ent(e);
    push_front(c, e);
}

void kvt_cache_updated(kvt_cache *c, kvt_cache_ent *e) {
    e->updated = ++c->tick;
    e->last_use = c->tick;
}

void kvt_cache_drop(kvt_cache *c, kvt_cache_ent *e) { free_ent(c, e); }

void kvt_cache_drop_owner(kvt_cache *c, void *owner) {
    kvt_cache_ent *e = c->lru.next;
    while (e != &c->lru) {
        kvt_cache_ent *next = e->next;
        if (e->owner == owner) free_ent(c, e);
        e = next;
    }
}

uint64_t kvt_grow_step(uint64_t cap, uint64_t need) {
    /* a first allocation is exact: most clusters keep one segment all their life */
    uint64_t nc = cap ? cap : need;
    while (nc < need) nc += (nc > (1u << 17) ? nc / 4 : nc / 2) + 1;
    return nc;
}
