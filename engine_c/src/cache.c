/*
 * cache.c — the replacement of whole cached clusters (LRU, LFU and the cluster-aligned
 * policy, cache.h), and what gives way in the DRAM ledger (mem.c).
 *
 * Invariants:
 * 1. Every cached entry's bytes (cap * esz + the entry header) are reserved in the ledger as
 *    KVT_USE_CACHE, so the ledger's use[KVT_USE_CACHE] == cache_bytes.
 * 2. Evicting is the only way the cache gives way: a reservation the ledger cannot fit
 *    evicts one unpinned entry at a time, by the policy, until it fits or none is left.
 * 3. A pinned entry is never evicted; an evicted entry's owner is told through on_evict
 *    before the entry is freed. Eviction frees whole entries: a cached cluster is all of its
 *    records or nothing.
 * 4. The LRU list order is kept under every policy (most recent first); LFU chooses its
 *    victim among the KVT_VICTIM_CANDIDATES least recently used unpinned entries, the
 *    cluster-aligned policy among the KVT_VICTIM_SCAN least recently used, so an eviction
 *    costs a bounded scan whatever the cache holds.
 * 5. Heat, missed reads and update ages are counted on clocks the callers advance: an
 *    owner's reads (kvt_cache_owner_read) and decoding steps (kvt_cache_step); no entry's
 *    standing changes while its owner is not read and no step ends.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "cache.h"
#include "common.h"

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

static int give_way(void *ctx);

void kvt_cache_init(kvt_cache *c, kvt_mem *m, void (*on_evict)(void *, const kvt_cache_ent *)) {
    memset(c, 0, sizeof *c);
    c->mem = m;
    m->give_way = give_way;
    m->give_way_ctx = c;
    c->cache_cap = UINT64_MAX;
    c->lru.next = c->lru.prev = &c->lru;
    c->on_evict = on_evict;
    c->policy = KVT_CACHE_LRU;
    c->reserve_share = 0.25;
    c->recent_steps = 4;
    c->half_life = 8;
    for (int d = 0; d <= KVT_HEAT_HORIZON; d++) c->decay[d] = (float)pow(2.0, -(double)d / c->half_life);
}

static uint64_t visits(const kvt_cache *c, const kvt_cache_ent *e) { return e->os ? e->os->visits : c->step; }

/* reads of e's owner since e was last read */
static uint64_t missed(const kvt_cache *c, const kvt_cache_ent *e) { return visits(c, e) - e->use_visit; }

/* heat of e as of its owner's last read */
static float heat_now(const kvt_cache *c, const kvt_cache_ent *e) {
    uint64_t d = missed(c, e);
    return d > KVT_HEAT_HORIZON ? 0.0f : e->heat * c->decay[d];
}

/* ---- the lookup table ---------------------------------------------------------------------- */

/* the bucket of (owner, cluster) in a table of nb buckets (a power of two) */
static uint64_t bucket_in(uint64_t nb, const void *owner, uint32_t cluster) {
    uint64_t h = (uint64_t)(uintptr_t)owner * 0x9E3779B97F4A7C15ull ^ (uint64_t)cluster * 0xBF58476D1CE4E5B9ull;
    return (h ^ (h >> 29)) & (nb - 1);
}

static uint64_t bucket_of(const kvt_cache *c, const void *owner, uint32_t cluster) {
    return bucket_in(c->nbuckets, owner, cluster);
}

kvt_cache_ent *kvt_cache_find(const kvt_cache *c, const void *owner, uint32_t cluster) {
    if (!c->nbuckets) return NULL;
    for (kvt_cache_ent *e = c->buckets[bucket_of(c, owner, cluster)]; e; e = e->hnext)
        if (e->owner == owner && e->cluster == cluster) return e;
    return NULL;
}

static void unhash(kvt_cache *c, kvt_cache_ent *e) {
    if (!c->nbuckets) return;
    for (kvt_cache_ent **p = &c->buckets[bucket_of(c, e->owner, e->cluster)]; *p; p = &(*p)->hnext)
        if (*p == e) {
            *p = e->hnext;
            return;
        }
}

/* Moves the table to nb buckets (0: none). Growing reserves the difference first and gives
 * up without room (the chains grow longer, which is only slower); shrinking gives it back.
 * The table is cache bytes that no eviction frees, so it follows the entries down too. */
static void resize_table(kvt_cache *c, uint64_t nb) {
    if (c->resizing) return;
    uint64_t old = c->nbuckets * sizeof(kvt_cache_ent *), now = nb * sizeof(kvt_cache_ent *);
    if (now > old) {
        c->resizing = 1; /* the room may come from evictions, which must not resize meanwhile */
        int rc = kvt_mem_reserve_as(c->mem, KVT_USE_CACHE, now - old);
        c->resizing = 0;
        if (rc) {
            kvt_clear_error();
            return;
        }
    }
    kvt_cache_ent **b = nb ? calloc(nb, sizeof(kvt_cache_ent *)) : NULL;
    if (nb && !b) {
        if (now > old) kvt_mem_release_as(c->mem, KVT_USE_CACHE, now - old);
        return;
    }
    for (uint64_t i = 0; b && i < c->nbuckets; i++) /* no table (nb 0) only once no entry is left */
        for (kvt_cache_ent *x = c->buckets[i], *nx; x; x = nx) {
            nx = x->hnext;
            uint64_t h = bucket_in(nb, x->owner, x->cluster);
            x->hnext = b[h];
            b[h] = x;
        }
    free(c->buckets);
    c->buckets = b;
    c->nbuckets = nb;
    if (now < old) kvt_mem_release_as(c->mem, KVT_USE_CACHE, old - now);
    c->cache_bytes = c->cache_bytes + now - old;
}

/* Links e into the table, doubling it first when it holds as many entries as buckets. */
static void hash_in(kvt_cache *c, kvt_cache_ent *e) {
    if (c->cached >= c->nbuckets) {
        e->pins++; /* the room may come from other entries, never from this one */
        resize_table(c, c->nbuckets ? 2 * c->nbuckets : KVT_CACHE_TABLE_MIN);
        e->pins--;
    }
    if (!c->nbuckets) return; /* not even the first table fitted: not cached after all */
    uint64_t h = bucket_of(c, e->owner, e->cluster);
    e->hnext = c->buckets[h];
    c->buckets[h] = e;
}

static void free_ent(kvt_cache *c, kvt_cache_ent *e) {
    unhash(c, e);
    unlink_ent(e);
    uint64_t b = ent_bytes(e);
    kvt_mem_release_as(c->mem, KVT_USE_CACHE, b);
    c->cache_bytes -= b;
    c->cached--;
    free(e->rec);
    free(e);
    if (!c->cached)
        resize_table(c, 0);
    else if (c->nbuckets > KVT_CACHE_TABLE_MIN && c->cached < c->nbuckets / 4)
        resize_table(c, c->nbuckets / 2);
}

void kvt_cache_destroy(kvt_cache *c) {
    while (c->lru.next != &c->lru) free_ent(c, c->lru.next); /* the last one frees the table */
}

/* Candidates a victim is chosen among: the least recently used unpinned entries. Scanning
 * every entry made each eviction O(cached clusters), which under a full budget with
 * thousands of small clusters cost more than the reads it saved; like Redis's sampled
 * policies, LFU and the cluster-aligned policy choose among the oldest few instead. */
#define KVT_VICTIM_CANDIDATES 64

/* Entries the cluster-aligned policy looks at per eviction: all of them up to this many (the
 * least recently used first). Its victim is often a recently used entry, so a sample of the
 * oldest few, as for LFU, would not do; beyond this many the newest are not considered. */
#define KVT_VICTIM_SCAN 2048

/* Heats closer than this count as equal (one read in the last few). */
#define KVT_HEAT_TIE 0.25f

/* Owners read more than this many times their usual gap ago (and more than KVT_IDLE_MIN
 * reads of all owners ago) are idle: their turn is not coming round. */
#define KVT_IDLE_GAPS 3.0f
#define KVT_IDLE_MIN  8

/* Reads of all owners since e's owner last read, when that makes it idle; else 0. Decoding
 * reads every layer once per step, so a layer is never idle while decoding runs; a store whose
 * collections are queried one after another (a vector store queried collection by
 * collection) leaves each one idle once the next takes over, and its clusters should leave
 * before the current collection's. Without this, an owner never read again kept its
 * clusters looking current forever (none "missed" a read of its owner), and the collection
 * being queried evicted its own clusters instead: 14x LRU's bytes at 2 MiB on such a
 * replay. */
static uint64_t idle_reads(const kvt_cache *c, const kvt_cache_ent *e) {
    if (!e->os || !e->os->last_read) return 0;
    uint64_t idle = c->reads - e->os->last_read;
    return idle > KVT_IDLE_MIN && (float)idle > KVT_IDLE_GAPS * e->os->gap ? idle : 0;
}

/* Loaded by a prefetch, and its owner has not read since: its read is still to come. */
static int awaiting(const kvt_cache *c, const kvt_cache_ent *e) { return e->prefetched && missed(c, e) == 0; }

static uint64_t upd_age(const kvt_cache *c, const kvt_cache_ent *e) {
    return e->upd_step ? c->step - (e->upd_step - 1) : UINT64_MAX;
}

/* The cluster-aligned victim (cache.h):
 * 0. entries of idle owners (idle_reads) go first, least recently used first;
 * 1. the reserved share: entries updated within recent_steps steps and not skipped by their
 *    owner's latest read are skipped, the newest updates first, as long as their bytes fit in
 *    reserve_share of the budget (an update no read wants earns nothing: the static policy
 *    appends each token to a cluster that mostly no retrieve takes);
 * 2. entries not read at their owner's latest read go first, those that missed the most of
 *    its reads first, the oldest among the coolest of them (in practice LRU among stale ones);
 * 3. when every candidate was read at its owner's latest read: the coolest, and among about
 *    equally cool ones the most recently used, whose owner comes round again last;
 * entries a prefetch loaded for their owner's next read (awaiting) are skipped in 1-3: they
 * are the newest and coolest of all, so 3 took them first, and a decoding step read them
 * again on demand one layer later (at 2K, a tenth of the KV in DRAM: 314 of 554 prefetched
 * clusters a step). */
static kvt_cache_ent *victim_cluster(kvt_cache *c) {
    uint64_t age_bytes[KVT_HEAT_HORIZON + 1] = {0}; /* bytes of candidates updated a steps ago */
    uint32_t R = c->recent_steps < KVT_HEAT_HORIZON ? c->recent_steps : KVT_HEAT_HORIZON;
    uint64_t protect = (uint64_t)(c->reserve_share * (double)c->mem->budget);
    int seen = 0;
    for (kvt_cache_ent *e = c->lru.prev; e != &c->lru && seen < KVT_VICTIM_SCAN; e = e->prev) {
        if (e->pins) continue;
        seen++;
        if (upd_age(c, e) <= R && missed(c, e) == 0) age_bytes[upd_age(c, e)] += (uint64_t)e->cap * e->esz;
    }
    int64_t kept_age = -1; /* entries updated at most kept_age steps ago are kept */
    for (uint64_t a = 0, sum = 0; a <= R; a++) {
        sum += age_bytes[a];
        if (sum > protect) break;
        kept_age = (int64_t)a;
    }
    /* a candidate's value: heat less 1000 per missed read of its owner, so stale entries
     * sort first by how stale they are, then by heat */
    kvt_cache_ent *best = NULL, *oldest = NULL;
    float vmin = INFINITY;
    seen = 0;
    for (kvt_cache_ent *e = c->lru.prev; e != &c->lru && seen < KVT_VICTIM_SCAN; e = e->prev) {
        if (e->pins) continue;
        seen++;
        if (idle_reads(c, e)) return e; /* scanning from the oldest: LRU among idle owners' */
    }
    for (int pass = 0; pass < 2; pass++) {
        seen = 0;
        for (kvt_cache_ent *e = c->lru.prev; e != &c->lru && seen < KVT_VICTIM_SCAN; e = e->prev) {
            if (e->pins) continue;
            seen++;
            if (!oldest) oldest = e;
            if (kept_age >= 0 && upd_age(c, e) <= (uint64_t)kept_age && missed(c, e) == 0) continue;
            if (awaiting(c, e)) continue;
            uint64_t m = missed(c, e);
            float v = heat_now(c, e) - 1000.0f * (float)(m > KVT_HEAT_HORIZON ? KVT_HEAT_HORIZON : m);
            if (pass == 0 && v < vmin) vmin = v;
            if (pass == 1 && v <= vmin + KVT_HEAT_TIE) {
                best = e;                  /* scanning from the oldest: the last one is the most recently used */
                if (vmin < -500.0f) break; /* stale ones: the oldest */
            }
        }
    }
    return best ? best : oldest; /* only kept entries: the least recently used */
}

/* The entry to evict next under the policy, or NULL if every entry is pinned. */
static kvt_cache_ent *victim(kvt_cache *c) {
    if (c->policy == KVT_CACHE_CLUSTER) return victim_cluster(c);
    kvt_cache_ent *best = NULL;
    int seen = 0;
    for (kvt_cache_ent *e = c->lru.prev; e != &c->lru && seen < KVT_VICTIM_CANDIDATES; e = e->prev) {
        if (e->pins) continue;
        seen++;
        if (c->policy == KVT_CACHE_LRU) return e;
        if (!best || e->uses < best->uses) best = e; /* LFU */
    }
    return best;
}

/* The ledger's call for room (mem.h): evicts the policy's victim, or says nothing is left. */
static int give_way(void *ctx) {
    kvt_cache *c = ctx;
    kvt_cache_ent *e = victim(c);
    if (!e) return 0;
    if (c->on_evict) c->on_evict(e->owner, e);
    c->prefetch_evicted += e->prefetched != 0;
    free_ent(c, e);
    c->evictions++;
    return 1;
}

kvt_cache_ent *kvt_cache_admit(kvt_cache *c, void *owner, uint32_t cluster, uint32_t n, size_t esz) {
    uint64_t need = sizeof(kvt_cache_ent) + (uint64_t)n * esz;
    if (need > c->mem->budget / 2) return NULL; /* one cluster may not flush the whole cache */
    if (c->cache_bytes + need > c->cache_cap) return NULL;
    if (kvt_mem_reserve_as(c->mem, KVT_USE_CACHE, need)) return NULL;
    kvt_cache_ent *e = calloc(1, sizeof *e);
    uint8_t *rec = n ? malloc((size_t)n * esz) : NULL;
    if (!e || (n && !rec)) {
        free(e);
        free(rec);
        kvt_mem_release_as(c->mem, KVT_USE_CACHE, need);
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
    e->os = c->owner_state ? c->owner_state(owner) : NULL;
    e->use_visit = visits(c, e);
    e->heat = 1;
    float h;
    uint64_t v;
    if (c->history && c->history(owner, cluster, &h, &v)) { /* read now, and as hot as it was */
        uint64_t d = e->use_visit - v;
        e->heat += d > KVT_HEAT_HORIZON ? 0.0f : h * c->decay[d];
    }
    push_front(c, e);
    c->cache_bytes += need;
    c->cached++;
    hash_in(c, e);
    if (!c->nbuckets) { /* no room for the lookup table: an entry no one could find */
        free_ent(c, e);
        return NULL;
    }
    return e;
}

int kvt_cache_spare(const kvt_cache *c, uint64_t bytes) {
    uint64_t room = c->mem->budget > c->mem->used ? c->mem->budget - c->mem->used : 0;
    int seen = 0;
    for (const kvt_cache_ent *e = c->lru.prev; e != &c->lru && room < bytes && seen < KVT_VICTIM_SCAN; e = e->prev) {
        if (e->pins) continue;
        seen++;
        if (missed(c, e) > 1) room += ent_bytes(e); /* skipped by its owner's last two reads */
    }
    return room >= bytes;
}

void kvt_cache_fit(kvt_cache *c, kvt_cache_ent *e) {
    if (e->cap <= e->n || !e->n) return;
    uint8_t *rec = realloc(e->rec, (size_t)e->n * e->esz);
    if (!rec) return; /* keeping the larger buffer is correct, only wasteful */
    uint64_t less = (uint64_t)(e->cap - e->n) * e->esz;
    e->rec = rec;
    e->cap = e->n;
    c->cache_bytes -= less;
    kvt_mem_release_as(c->mem, KVT_USE_CACHE, less);
}

int kvt_cache_grow(kvt_cache *c, kvt_cache_ent *e, uint32_t extra) {
    if (e->n + extra <= e->cap) return 0;
    /* a quarter more (at least 8 records): decoding appends one record per step to a few
     * clusters, and doubling left up to half of every grown entry empty, budget spent on
     * nothing that could have held other clusters */
    uint32_t cap = e->cap;
    while (cap < e->n + extra) cap += cap / 4 > 8 ? cap / 4 : 8;
    uint64_t more = (uint64_t)(cap - e->cap) * e->esz;
    e->pins++;
    int rc = kvt_mem_reserve_as(c->mem, KVT_USE_CACHE, more);
    e->pins--;
    if (rc) return rc;
    uint8_t *rec = realloc(e->rec, (size_t)cap * e->esz);
    if (!rec) {
        kvt_mem_release_as(c->mem, KVT_USE_CACHE, more);
        return kvt_fail(KVT_EBUDGET, "cache: cannot grow a cached cluster to %u records", cap);
    }
    e->rec = rec;
    e->cap = cap;
    c->cache_bytes += more;
    return 0;
}

void kvt_cache_touch(kvt_cache *c, kvt_cache_ent *e) {
    if (e->use_visit != visits(c, e)) { /* heat counts the owner's reads, not the entry's */
        e->heat = heat_now(c, e) + 1;
        e->use_visit = visits(c, e);
    }
    e->uses++;
    e->last_use = ++c->tick;
    unlink_ent(e);
    push_front(c, e);
}

void kvt_cache_updated(kvt_cache *c, kvt_cache_ent *e) {
    e->upd_step = c->step + 1;
    e->last_use = ++c->tick;
}

void kvt_cache_step(kvt_cache *c) {
    c->explicit_steps = 1;
    c->step++;
}

void kvt_cache_owner_read(kvt_cache *c, kvt_cache_owner *o) {
    if (!c->explicit_steps && o->seen_step == c->step + 1) c->step++;
    o->seen_step = c->step + 1;
    o->visits++;
    c->reads++;
    if (o->last_read) { /* the usual gap: a running mean that follows a change within a few reads */
        float g = (float)(c->reads - o->last_read);
        o->gap = o->gap > 0 ? o->gap + (g - o->gap) / 4 : g;
    }
    o->last_read = c->reads;
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
