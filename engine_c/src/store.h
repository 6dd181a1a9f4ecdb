/*
 * store.h — the collection layer's structures: the store, its collections and their
 * clusters, which every file of the layer shares and the C tests inspect, with the few
 * inline helpers on them. No functions: each file's are in the header named after it
 * (engine_c/README.md maps them). The public face is kvtier.h; the layer's invariants are
 * store.c's.
 */
#ifndef KVT_STORE_H
#define KVT_STORE_H

#include <pthread.h>
#include <stdint.h>

#include "cache.h"
#include "io.h"
#include "kvtier.h"
#include "mem.h"
#include "policy.h"
#include "pool.h"

/* What few clusters hold at any time, kept beside the cluster rather than in it
 * (kvt_cluster.x; NULL when it holds none of it): its pending buffer (an adaptive split's
 * waiting entries, or the write buffer's tail) and, in the token layout, its member list. */
typedef struct kvt_cside {
    /* the cluster's last `pend` entries (kvt_cluster.pend) wait in pbuf, not yet on flash: for
     * a split if the policy holds the cluster's entries (kvt_held: adaptive, flagged), else for
     * a whole page to fill (the write buffer's tail, layout.c) */
    uint8_t *pbuf;
    uint32_t pcap;
    /* held: the first ptail of its pending entries were its write-buffer tail when it was
     * first held; they wait for the split too, but count as write buffer, not against the
     * pending budget, so the write buffer (sized from the DRAM budget) never decides when the
     * pending budget overflows */
    uint32_t ptail;
    uint64_t wtick; /* the collection's append clock at the cluster's last append */
    uint32_t *mem;  /* token layout: the member ids, ascending (the records' order) */
    uint32_t memcap;
    int use; /* the budget use this record is reserved under (enum kvt_use) */
} kvt_cside;

/* A cluster of a collection, as every cluster of the resident index keeps it: its size,
 * flash segments, squared error, entries pending in DRAM, policy state and the cache
 * policy's memory of it. Everything else is elsewhere: its representative in kvt_coll.cent,
 * its cached copy in the cache's lookup table (kvt_cached), its buffers beside it (x). Its
 * size is part of the resident index every collection reserves per cluster (index.c,
 * budget.c), so it stays small: docs/design.md §2.3. */
typedef struct kvt_cluster {
    kvt_seg *segs; /* in insertion order; the last one takes appends */
    kvt_cside *x;  /* buffers and member list, or NULL */
    uint32_t n;    /* entries */
    uint32_t nseg, segcap;
    uint32_t pend; /* its last pend entries wait in DRAM (x->pbuf), not on flash */
    /* format 3: slots of its segments that hold no live record of it (a split kept this
     * cluster in its parent's segments; the other child's records there are dead). Its
     * segments' slots add up to n - pend + dead; the id map names each live record's slot.
     * (It fills what was padding: the struct stays 48 bytes.) */
    uint32_t dead;
    float m2;             /* sum of squared distances to the mean (Welford) */
    kvt_adapt_cluster ad; /* adaptive (adapt.c): flagged for a split, and why */
    /* the cache policy's memory of the cluster while it is not cached: its heat (float16)
     * and the low 16 bits of the collection's read count when it was last read (cache.h,
     * kvt_cache_owner; heat is zero beyond KVT_HEAT_HORIZON reads, so 16 bits tell it) */
    uint16_t heat, heat_visit;
} kvt_cluster;

/* The pending buffer and member list of a cluster, and its tail's bookkeeping (NULL / 0
 * when it has no side record). */
static inline uint8_t *kvt_pbuf(const kvt_cluster *k) { return k->x ? k->x->pbuf : NULL; }
static inline uint32_t kvt_ptail(const kvt_cluster *k) { return k->x ? k->x->ptail : 0; }
static inline uint32_t *kvt_members(const kvt_cluster *k) { return k->x ? k->x->mem : NULL; }
static inline uint64_t kvt_wtick(const kvt_cluster *k) { return k->x ? k->x->wtick : 0; }

/* A prefetch job: one cluster to read into its (pinned, loading) cache entry. The segments
 * are copied at submission; no operation changes a collection while it has jobs in flight. */
typedef struct kvt_job {
    struct kvt_job *next;
    kvt_coll *c;
    uint32_t cl, nseg; /* cl == KVT_SWAP_JOB: a swap-in of nseg collections' images */
    kvt_cache_ent *e;
    kvt_coll **run;    /* swap-in: the collections, images consecutive from run[0]'s */
    uint8_t *swap_buf; /* swap-in: their images, swap_len bytes reserved */
    uint64_t swap_len;
    /* NULL: read cluster cl into e. Otherwise the job's own work (a swap-in), so that the
     * loader, which runs every job, need not know the layers that submit them. */
    void (*exec)(kvt_store *s, struct kvt_job *j);
    kvt_seg segs[];
} kvt_job;
#define KVT_SWAP_JOB UINT32_MAX

/* A free range of the swap file. */
typedef struct kvt_range {
    uint64_t off, len;
} kvt_range;

#define KVT_LOADERS 4

struct kvt_store {
    pthread_mutex_t mu;     /* serialises every call on the store and its collections */
    pthread_cond_t job_cv;  /* a job was queued, or shutdown */
    pthread_cond_t done_cv; /* a job finished */
    kvt_job *jobs, *jobs_tail;
    pthread_t loaders[KVT_LOADERS];
    int nloaders, shutdown;
    uint64_t prefetch_issued, prefetch_hits, prefetch_errors;
    uint64_t loading_bytes; /* records of prefetches queued or loading (pinned) */
    double io_wait_seconds;
    kvt_io io;
    kvt_mem mem;                 /* the DRAM ledger: the budget and what holds it */
    kvt_cache cache;             /* cached clusters, what gives way in the ledger */
    const struct kvt_kernels *K; /* simd.h */
    char *dir;
    uint64_t merge_gap;    /* bytes: extents of one read batch closer than this are read as one */
    uint64_t write_buffer; /* bytes for the page-aligned write buffers, shared by the collections */
    int tight;             /* a call runs again for want of budget: it buffers no new entries */
    int pieces;            /* ... for the last time: a cluster too large for what is left is read in pieces */
    kvt_coll **colls;
    uint32_t ncolls, collcap;
    /* group virtualization (docs/design.md §2.3): parked collections' images in a volatile swap file */
    kvt_file *swap;
    kvt_range *sfree; /* free ranges of the swap file, sorted by offset, coalesced */
    uint32_t nsfree, sfreecap;
    uint64_t swap_end; /* the file's used size */
    uint64_t swap_outs, swap_ins, swap_demand_ins, swap_write_bytes, swap_read_bytes;
    uint64_t swap_pressure_outs;   /* of swap_outs, made by kvt_page_out (demand paging) */
    uint64_t swap_unchanged_bytes; /* image pages a park found unchanged in the slot, not written */
    uint64_t op_clock;             /* one tick per operation made ready (kvt_ready): collections' recency */
};

struct kvt_coll {
    kvt_store *st;
    uint32_t no;
    kvt_coll_params p;
    kvt_layout L;
    kvt_file *f;
    uint64_t n; /* entries; ids are 0..n-1 */
    kvt_cluster *cl;
    /* clcap * dim representatives (the mean keys) in float16, and their squared norms: half
     * the resident bytes of float32 means, which were most of the index; scoring converts on
     * the fly (simd.h dot_f16_f32) and accumulates in float32 (index.c 3) */
    uint16_t *cent;
    float *cnorm;
    float *m2d;          /* clcap * dim: per-dimension sums of squared distances */
    float *vsum;         /* clcap * value_dim: value sums (estimate.c), or NULL */
    uint32_t ncl, clcap; /* clusters with n == 0 are free slots */
    kvt_pools pools;
    /* id -> its cluster: locw bytes an entry, 2 while the cluster table has at most
     * KVT_LOC_NARROW slots, 4 from the first growth past it (kvt_loc_widen). A record's slot
     * in its cluster is not kept: ids increase along a cluster's slots (store.c 2), so a
     * record is found among the cluster's records by its id, and a slot's id by its rank
     * among the cluster's ids (read.c 2). Read and written through kvt_loc / kvt_loc_put. */
    void *loc;
    uint64_t loccap;
    uint32_t locw;
    uint64_t *mod; /* per id-map chunk: change counter value of its last change */
    uint64_t modcap;
    uint64_t modc, committed_mod; /* change counter; its value at the last committed checkpoint */
    const kvt_policy_ops *ops;    /* its policy (policy.h), and each policy's state: */
    kvt_adapt_coll adapt;         /* ... adaptive (adapt.c) */
    kvt_local_coll local;         /* ... local (local.c) */
    kvt_exact_coll exact;         /* ... none (token.c) */
    uint64_t pending_total;       /* entries in pending buffers, both kinds */
    uint64_t tail_total;          /* ... of them, write-buffer tails (layout.c 2) */
    uint64_t wclock;              /* append clock: one tick per add */
    uint16_t *cofreq;             /* co-location: nco x nco co-retrieval counts, until relayout */
    uint32_t nco, retrieves;
    kvt_coll_stats ctr; /* the event counters of kvt_coll_stats */
    uint32_t inflight;  /* prefetch jobs queued or running */
    uint64_t acct;      /* budget bytes reserved for the structures above (KVT_USE_INDEX) */
    uint64_t acct_pend; /* ... for pending buffers (KVT_USE_PENDING) */
    /* parked: cl, cent, cnorm, m2d, vsum, loc, exact.keys, cofreq and cached clusters live only in the
     * swap image [swap_off, swap_off + swap_len); ncl, n, the pool table and the page hashes stay */
    int parked;
    uint64_t swap_off, swap_len; /* its image in the swap file: where, and its bytes */
    /* its slot there (swap.c), kept while it is resident so that the next park rewrites only
     * the pages that changed: the slot's bytes (0: none yet), a hash per page (index, charged
     * like the pool table), whether they describe what the slot holds, and the image's array
     * capacities, which fix the arrays' offsets in it */
    uint64_t swap_cap, *swap_pgh, swap_pghcap;
    int swap_hashed;
    uint32_t img_cl;
    uint64_t img_n;
    kvt_coll_stats parked_stats; /* its cluster statistics when it was parked */
    uint64_t resident_tick;      /* cache tick when it was last brought in (0: never parked) */
    uint64_t used_at;            /* store->op_clock at its last operation: demand paging's order */
    float use_gap;               /* the usual op_clock gap between its operations (idle detection) */
    kvt_cache_owner cache_state; /* its reads, as the cache policy counts them */
    /* the call in progress (read.c, damaged records): how a damaged record is met (enum
     * kvt_read_mode, coll.h), and the clusters it found damaged, which it must not cache,
     * split or rewrite (past KVT_DMG_SLOTS of them, dmg_all: none is split) */
    int read_mode;
    uint32_t dmg_cl[8], ndmg_cl;
};
#define KVT_DMG_SLOTS 8u

#define KVT_NONE UINT32_MAX

/* The resident index counts sizeof(kvt_cluster) per cluster: a change of it changes every
 * budget figure (kvt_budget_estimate and what a collection reserves). */
_Static_assert(sizeof(kvt_cluster) == 48 || sizeof(void *) != 8, "kvt_cluster changed size");

#define LOCK(s) pthread_mutex_lock(&(s)->mu)

#define UNLOCK(s) pthread_mutex_unlock(&(s)->mu)

/* Token layout (kvt_coll_params.layout): records sit in one log in id order (token.c). */
static inline int token(const kvt_coll *c) { return c->p.layout == KVT_LAYOUT_TOKEN && c->ops->clustered; }

/* Whether cluster k's policy holds its new entries in DRAM for a split (policy.h). */
/* Cluster j's cached copy, or NULL (the cache's lookup table, cache.h: a cluster keeps no
 * pointer to it, which would cost every cluster of the resident index 8 bytes). */
static inline kvt_cache_ent *kvt_cached(const kvt_coll *c, uint32_t j) { return kvt_cache_find(&c->st->cache, c, j); }

static inline int kvt_held(const kvt_coll *c, const kvt_cluster *k) { return c->ops->held && c->ops->held(c, k); }

/* A cluster's two words of policy state, as the directory and the swap image keep them
 * (policy.h; zeros for a policy that keeps none), and back. */
static inline void kvt_policy_cluster_save(const kvt_coll *c, const kvt_cluster *k, uint32_t w[2]) {
    w[0] = w[1] = 0;
    if (c->ops->cluster_save) c->ops->cluster_save(c, k, w);
}
static inline void kvt_policy_cluster_load(kvt_coll *c, kvt_cluster *k, const uint32_t w[2], int reason_kept) {
    if (c->ops->cluster_load) c->ops->cluster_load(c, k, w, reason_kept);
}

/* The token layout's member lists hold 32-bit ids: it takes up to 2^32 - 1 entries. */
#define KVT_TOKEN_MAX_ENTRIES ((uint64_t)UINT32_MAX)

static inline uint64_t token_offset(const kvt_coll *c, uint64_t id) { return KVT_DATA_HEADER + id * c->L.esz; }

/* Token layout: the end of the run of consecutive ids starting at member i0 (one read). */
static inline uint32_t token_run_end(const kvt_cluster *k, uint32_t i0) {
    uint32_t i1 = i0 + 1;
    const uint32_t *mem = kvt_members(k);
    while (i1 < k->n && mem[i1] == mem[i1 - 1] + 1) i1++;
    return i1;
}

/* An add larger than the budget can stage is consumed in chunks; no chunk is smaller than
 * this many entries (or the whole add), so the minimum budget covers staging one. */
#define KVT_ADD_CHUNK_MIN 256u
/* The share of the DRAM budget one add may stage (add.c 4): a batch whose staging needs more
 * is consumed in chunks. A quarter leaves the largest group's index and a read beside it. */
#define KVT_ADD_STAGE_SHARE 0.25

/* The most cluster slots a 2-byte id map names. */
#define KVT_LOC_NARROW 65536u
static inline uint32_t kvt_loc(const kvt_coll *c, uint64_t id) {
    return c->locw == 2 ? ((const uint16_t *)c->loc)[id] : ((const uint32_t *)c->loc)[id];
}
static inline void kvt_loc_put(kvt_coll *c, uint64_t id, uint32_t cl) {
    if (c->locw == 2)
        ((uint16_t *)c->loc)[id] = (uint16_t)cl;
    else
        ((uint32_t *)c->loc)[id] = cl;
}
static inline void set_loc(kvt_coll *c, uint64_t id, uint32_t cl) {
    kvt_loc_put(c, id, cl);
    c->mod[id / KVT_LOC_CHUNK] = ++c->modc;
}

#endif
