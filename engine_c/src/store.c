/*
 * store.c — collections: add, retrieve, search, get, and the exported catalog state.
 *
 * Invariants:
 * 1. Every public call takes the store mutex for its whole duration; the structures below are
 *    only touched under it.
 * 2. For every id < n, loc[id] = (c, i) with i < cl[c].n, and the i-th record of cluster c
 *    (segments in order, slots in order) carries that id. Sum of cl[c].n is n.
 * 3. An add writes every record before it changes any metadata visible to readers; if a write
 *    fails, the pool and segment claims it made are rolled back and nothing is added.
 * 4. cent[c] is the exact running mean of cluster c's keys (Welford), cnorm[c] its squared
 *    norm; cl[c].m2 the running sum of squared distances to it.
 * 5. A cached cluster's records equal the records on flash, in insertion order.
 * 6. Every byte held for data is reserved against the DRAM budget first (coll->acct for the
 *    long-lived structures, transient reservations released before return).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "common.h"
#include "store.h"

#define LOCK(s) pthread_mutex_lock(&(s)->mu)
#define UNLOCK(s) pthread_mutex_unlock(&(s)->mu)

static void on_evict(void *owner, uint32_t cluster) {
    kvt_coll *c = owner;
    c->cl[cluster].ent = NULL;
}

/* ---- store -------------------------------------------------------------------------------- */

int kvt_store_open(const char *dir, const kvt_store_opts *opts, kvt_store **out) {
    kvt_clear_error();
    if (!dir || !opts || !out) return kvt_fail(KVT_EINVAL, "store_open: NULL argument");
    if (opts->dram_budget < 4096) return kvt_fail(KVT_EINVAL, "dram_budget: at least 4096 bytes expected, got %llu", (unsigned long long)opts->dram_budget);
    kvt_store *s = calloc(1, sizeof *s);
    if (!s || !(s->dir = strdup(dir))) {
        free(s);
        return kvt_fail(ENOMEM, "store_open: out of memory");
    }
    pthread_mutex_init(&s->mu, NULL);
    kvt_io_init(&s->io, &opts->device, opts->direct);
    kvt_cache_init(&s->cache, opts->dram_budget, on_evict);
    s->K = kvt_simd();
    *out = s;
    return 0;
}

static void coll_free(kvt_coll *c) {
    if (!c) return;
    kvt_cache_drop_owner(&c->st->cache, c);
    for (uint32_t i = 0; i < c->clcap; i++) free(c->cl[i].segs);
    free(c->cl);
    free(c->cent);
    free(c->cnorm);
    free(c->loc);
    free(c->dirty);
    kvt_pools_free(&c->pools);
    kvt_file_close(c->f);
    kvt_mem_release(&c->st->cache, c->acct);
    free(c);
}

void kvt_store_close(kvt_store *s) {
    if (!s) return;
    for (uint32_t i = 0; i < s->ncolls; i++) coll_free(s->colls[i]);
    free(s->colls);
    kvt_cache_destroy(&s->cache);
    kvt_io_destroy(&s->io);
    pthread_mutex_destroy(&s->mu);
    free(s->dir);
    free(s);
}

int kvt_store_stats_get(kvt_store *s, kvt_store_stats *o) {
    memset(o, 0, sizeof *o);
    LOCK(s);
    kvt_io_stats io;
    kvt_io_stats_get(&s->io, &io);
    o->dram_bytes = s->cache.used;
    o->dram_budget = s->cache.budget;
    o->dram_peak_bytes = s->cache.peak;
    o->cache_bytes = s->cache.cache_bytes;
    o->cached_clusters = s->cache.cached;
    o->cache_hits = s->cache.hits;
    o->cache_misses = s->cache.misses;
    o->evictions = s->cache.evictions;
    o->read_ops = io.read_ops;
    o->read_bytes = io.read_bytes;
    o->read_entries = io.read_entries;
    o->write_ops = io.write_ops;
    o->write_bytes = io.write_bytes;
    o->sync_ops = io.sync_ops;
    o->modeled_io_seconds = io.modeled_seconds;
    memcpy(o->read_size_hist, io.size_hist, sizeof o->read_size_hist);
    o->direct_io = s->ncolls ? kvt_file_is_direct(s->colls[0]->f) : (s->io.direct_mode != KVT_DIRECT_OFF);
    UNLOCK(s);
    return 0;
}

int kvt_store_reset_io_stats(kvt_store *s) {
    LOCK(s);
    kvt_io_stats_reset(&s->io);
    s->cache.hits = s->cache.misses = s->cache.evictions = 0;
    s->cache.peak = s->cache.used;
    UNLOCK(s);
    return 0;
}

int kvt_store_inject_fault(kvt_store *s, char op, uint64_t nth, int code) {
    return kvt_io_inject(&s->io, op, nth, code);
}

/* ---- accounting helpers ------------------------------------------------------------------ */

/* Grows *ptr (elements of `size`) to at least `need` elements, reserving the growth against
 * the budget first. New elements are zeroed. */
static int grow_array(kvt_coll *c, void **ptr, size_t size, uint64_t *cap, uint64_t need) {
    if (need <= *cap) return 0;
    /* 1.5x growth: the id map is the largest structure, and doubling it would spend up to
     * half of it as slack against a tight budget */
    uint64_t nc = *cap ? *cap : 16;
    while (nc < need) nc += nc / 2;
    uint64_t more = (nc - *cap) * size;
    int rc = kvt_mem_reserve(&c->st->cache, more);
    if (rc) return rc;
    void *p = realloc(*ptr, nc * size);
    if (!p) {
        kvt_mem_release(&c->st->cache, more);
        return kvt_fail(ENOMEM, "out of memory growing an array to %llu elements", (unsigned long long)nc);
    }
    memset((char *)p + *cap * size, 0, more);
    *ptr = p;
    *cap = nc;
    c->acct += more;
    return 0;
}

static int ensure_clusters(kvt_coll *c, uint32_t need) {
    if (need <= c->clcap) return 0;
    uint64_t cap = c->clcap, cap2 = c->clcap, cap3 = c->clcap;
    int rc = grow_array(c, (void **)&c->cl, sizeof *c->cl, &cap, need);
    if (!rc) rc = grow_array(c, (void **)&c->cent, (size_t)c->p.dim * sizeof(float), &cap2, need);
    if (!rc) rc = grow_array(c, (void **)&c->cnorm, sizeof(float), &cap3, need);
    if (rc) return rc;
    /* the three grew by the same rule from the same capacity */
    c->clcap = (uint32_t)cap;
    return 0;
}

static int ensure_segs(kvt_coll *c, kvt_cluster *k, uint32_t need) {
    uint64_t cap = k->segcap;
    int rc = grow_array(c, (void **)&k->segs, sizeof *k->segs, &cap, need);
    k->segcap = (uint32_t)cap;
    return rc;
}

static int ensure_pools(kvt_coll *c, uint32_t need) {
    if (need <= c->pools.cap) return 0;
    uint32_t old = c->pools.cap, nc = old ? old : 16;
    while (nc < need) nc *= 2;
    int rc = kvt_mem_reserve(&c->st->cache, (uint64_t)(nc - old) * sizeof(kvt_pool));
    if (rc) return rc;
    rc = kvt_pools_reserve(&c->pools, nc);
    if (rc) {
        kvt_mem_release(&c->st->cache, (uint64_t)(nc - old) * sizeof(kvt_pool));
        return rc;
    }
    c->acct += (uint64_t)(c->pools.cap - old) * sizeof(kvt_pool);
    return 0;
}

static int ensure_ids(kvt_coll *c, uint64_t need) {
    int rc = grow_array(c, (void **)&c->loc, sizeof *c->loc, &c->loccap, need);
    if (!rc) rc = grow_array(c, (void **)&c->dirty, 1, &c->dirtycap, need / KVT_LOC_CHUNK + 1);
    return rc;
}

static void update_norm(kvt_coll *c, uint32_t k) {
    const float *x = c->cent + (size_t)k * c->p.dim;
    c->cnorm[k] = c->st->K->dot_f32(x, x, c->p.dim);
}

/* ---- collections ------------------------------------------------------------------------- */

static int check_params(const kvt_coll_params *p) {
    if (p->dim < 1 || p->dim > 4096) return kvt_fail(KVT_EINVAL, "dim: 1..4096 expected, got %u", p->dim);
    if (p->value_dim > 4096) return kvt_fail(KVT_EINVAL, "value_dim: 0..4096 expected, got %u", p->value_dim);
    if (p->dtype != KVT_F32 && p->dtype != KVT_F16) return kvt_fail(KVT_EINVAL, "dtype: float32 or float16 expected");
    if (p->metric != KVT_METRIC_IP && p->metric != KVT_METRIC_L2) return kvt_fail(KVT_EINVAL, "metric: ip or l2 expected");
    if (p->policy < KVT_POLICY_STATIC || p->policy > KVT_POLICY_NONE) return kvt_fail(KVT_EINVAL, "policy: unknown value %d", p->policy);
    if (p->policy != KVT_POLICY_STATIC) return kvt_fail(KVT_EINVAL, "policy: only static is implemented in this engine version");
    if (p->init_cluster_size < 1 || p->init_cluster_size > (1u << 20)) return kvt_fail(KVT_EINVAL, "init_cluster_size: 1..2^20 expected, got %u", p->init_cluster_size);
    if (p->max_cluster_size < 1 || p->max_cluster_size > (1u << 20)) return kvt_fail(KVT_EINVAL, "max_cluster_size: 1..2^20 expected, got %u", p->max_cluster_size);
    return 0;
}

static int coll_new(kvt_store *s, uint32_t no, const kvt_coll_params *p, int truncate, kvt_coll **out) {
    int rc = check_params(p);
    if (rc) return rc;
    for (uint32_t i = 0; i < s->ncolls; i++)
        if (s->colls[i]->no == no) return kvt_fail(KVT_EINVAL, "collection %u is already open", no);
    kvt_coll *c = calloc(1, sizeof *c);
    if (!c) return kvt_fail(ENOMEM, "out of memory");
    c->st = s;
    c->no = no;
    c->p = *p;
    c->pools.half_free = -1;
    kvt_layout_init(&c->L, p->dim, p->value_dim, p->dtype, p->max_cluster_size);
    char path[4096];
    snprintf(path, sizeof path, "%s/c%u.kvd", s->dir, no);
    rc = kvt_file_open(&s->io, path, truncate, &c->f);
    if (rc) {
        free(c);
        return rc;
    }
    if (s->ncolls == s->collcap) {
        uint32_t cap = s->collcap ? s->collcap * 2 : 8;
        kvt_coll **a = realloc(s->colls, cap * sizeof *a);
        if (!a) {
            coll_free(c);
            return kvt_fail(ENOMEM, "out of memory");
        }
        s->colls = a;
        s->collcap = cap;
    }
    s->colls[s->ncolls++] = c;
    *out = c;
    return 0;
}

static void coll_forget(kvt_store *s, kvt_coll *c) {
    for (uint32_t i = 0; i < s->ncolls; i++)
        if (s->colls[i] == c) {
            s->colls[i] = s->colls[--s->ncolls];
            break;
        }
    coll_free(c);
}

int kvt_coll_create(kvt_store *s, uint32_t no, const kvt_coll_params *p, kvt_coll **out) {
    kvt_clear_error();
    LOCK(s);
    kvt_coll *c;
    int rc = coll_new(s, no, p, 1, &c);
    if (!rc) {
        uint8_t page[KVT_DATA_HEADER];
        kvt_data_header(&c->L, p, page);
        rc = kvt_file_write(c->f, 0, page, sizeof page);
        if (rc) coll_forget(s, c);
        else *out = c;
    }
    UNLOCK(s);
    return rc;
}

uint64_t kvt_coll_count(const kvt_coll *c) { return c->n; }

/* ---- add ---------------------------------------------------------------------------------- */

typedef struct undo { uint32_t cl, seg, run; int claimed; } undo;

static void rollback(kvt_coll *c, undo *log, size_t nlog, uint32_t pools_n, int64_t half_free) {
    while (nlog--) {
        undo *u = &log[nlog];
        kvt_cluster *k = &c->cl[u->cl];
        kvt_seg *sg = &k->segs[u->seg];
        sg->n -= u->run;
        c->pools.p[sg->pool].used[sg->head] -= u->run;
        if (u->claimed) {
            c->pools.p[sg->pool].owner[sg->head] = -1;
            k->nseg--;
        }
    }
    c->pools.n = pools_n;
    c->pools.half_free = half_free;
}

/* Writes members[0..m) of cluster ci (row numbers into keys/values) as records with ids
 * first_id + row, appending to the cluster's segments. */
static int write_members(kvt_coll *c, uint32_t ci, const uint32_t *members, uint32_t m,
                         const uint8_t *keys, const uint8_t *values, int64_t first_id,
                         uint8_t *scratch, uint32_t scratch_recs, undo **log, size_t *nlog, size_t *logcap) {
    const kvt_layout *L = &c->L;
    uint32_t done = 0;
    while (done < m) {
        kvt_cluster *k = &c->cl[ci];
        int claimed = 0;
        if (k->nseg == 0 || kvt_pool_room(L, &c->pools.p[k->segs[k->nseg - 1].pool]) == 0) {
            int rc = ensure_segs(c, k, k->nseg + 1);
            if (!rc) rc = ensure_pools(c, c->pools.n + 1);
            if (rc) return rc;
            kvt_seg sg;
            rc = kvt_pools_claim(&c->pools, L, (int32_t)ci, &sg);
            if (rc) return rc;
            k->segs[k->nseg++] = sg;
            claimed = 1;
        }
        kvt_seg *sg = &k->segs[k->nseg - 1];
        kvt_pool *pl = &c->pools.p[sg->pool];
        uint32_t run = m - done, room = kvt_pool_room(L, pl);
        if (run > room) run = room;
        if (run > scratch_recs) run = scratch_recs;
        for (uint32_t j = 0; j < run; j++) {
            uint32_t r = members[done + j];
            /* head 1 grows downward: its run is laid out last-first in address order */
            uint32_t pos = sg->head == 0 ? j : run - 1 - j;
            kvt_rec_encode(L, scratch + (size_t)pos * L->esz, first_id + r,
                           keys + (size_t)r * L->key_bytes, values + (size_t)r * L->value_bytes);
        }
        if (*nlog == *logcap) {
            size_t nc = *logcap ? *logcap * 2 : 64;
            undo *nl = realloc(*log, nc * sizeof *nl);
            if (!nl) return kvt_fail(ENOMEM, "add: out of memory");
            *log = nl;
            *logcap = nc;
        }
        uint64_t off = kvt_run_offset(L, sg->pool, sg->head, sg->n, run);
        int rc = kvt_file_write(c->f, off, scratch, (size_t)run * L->esz);
        if (rc) {
            if (claimed) { /* the claim wrote nothing: undo it here, the log has no entry */
                pl->owner[sg->head] = -1;
                k->nseg--;
            }
            return rc;
        }
        sg->n += run;
        pl->used[sg->head] += run;
        (*log)[(*nlog)++] = (undo){ci, k->nseg - 1, run, claimed};
        done += run;
    }
    return 0;
}

int kvt_coll_add(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_clear_error();
    if (!keys || (!values && c->p.value_dim) || n == 0) return kvt_fail(KVT_EINVAL, "add: keys/values must be non-empty");
    kvt_store *s = c->st;
    const kvt_kernels *K = s->K;
    const kvt_layout *L = &c->L;
    LOCK(s);
    int rc = 0;
    uint32_t *assign = NULL, *order = NULL, *start = NULL;
    float *cent = NULL, *x = NULL;
    uint8_t *scratch = NULL;
    undo *log = NULL;
    size_t nlog = 0, logcap = 0;
    uint64_t transient = 0, n0 = c->n;
    uint32_t ncl0 = c->ncl, pools_n0 = c->pools.n;
    int64_t half_free0 = c->pools.half_free;
    if (n > UINT32_MAX || n0 + n > ((uint64_t)1 << 40)) {
        rc = kvt_fail(KVT_EINVAL, "add: too many entries at once (%llu)", (unsigned long long)n);
        goto out;
    }
    rc = ensure_ids(c, n0 + n);
    if (rc) goto out;

    /* 1. assignment */
    uint32_t k = 0;
    uint64_t kmb = 0;
    if (c->ncl == 0) {
        k = (uint32_t)((n + c->p.init_cluster_size - 1) / c->p.init_cluster_size);
        if (k < 1) k = 1;
        kmb = kvt_kmeans_bytes(n, k, c->p.dim) + (uint64_t)k * c->p.dim * 4;
    }
    uint32_t scratch_recs = c->L.pool_cap;
    transient = (uint64_t)n * 4 * 2 + kmb + (uint64_t)scratch_recs * L->esz + (uint64_t)c->p.dim * 4 +
                ((c->ncl ? c->ncl : k) + 1) * 4ull;
    rc = kvt_mem_reserve(&s->cache, transient);
    if (rc) {
        transient = 0;
        goto out;
    }
    assign = malloc(n * 4);
    order = malloc(n * 4);
    scratch = malloc((size_t)scratch_recs * L->esz);
    x = malloc((size_t)c->p.dim * 4);
    if (!assign || !order || !scratch || !x) {
        rc = kvt_fail(ENOMEM, "add: out of memory");
        goto out;
    }
    if (c->ncl == 0) {
        cent = malloc((size_t)k * c->p.dim * 4);
        if (!cent) {
            rc = kvt_fail(ENOMEM, "add: out of memory");
            goto out;
        }
        rc = kvt_kmeans(K, c->p.dtype, keys, c->p.dim, NULL, n, k, c->p.kmeans_iters, c->p.seed, cent, assign);
        if (rc) goto out;
        /* drop clusters k-means left empty, keeping the order of the rest */
        uint32_t *remap = calloc(k, 4);
        if (!remap) {
            rc = kvt_fail(ENOMEM, "add: out of memory");
            goto out;
        }
        for (uint64_t i = 0; i < n; i++) remap[assign[i]] = 1;
        uint32_t kept = 0;
        for (uint32_t j = 0; j < k; j++) remap[j] = remap[j] ? kept++ : UINT32_MAX;
        for (uint64_t i = 0; i < n; i++) assign[i] = remap[assign[i]];
        free(remap);
        rc = ensure_clusters(c, kept);
        if (rc) goto out;
        for (uint32_t j = 0; j < kept; j++) { /* keep segment arrays of a rolled-back add */
            kvt_cluster *cl = &c->cl[j];
            cl->n = cl->nseg = 0;
            cl->m2 = 0;
            cl->ent = NULL;
        }
        c->ncl = kept;
        k = kept;
    } else {
        k = c->ncl;
        for (uint64_t i = 0; i < n; i++)
            assign[i] = kvt_nearest(K, c->p.dtype, (const uint8_t *)keys + i * L->key_bytes, c->cent,
                                    c->cnorm, c->ncl, c->p.dim);
    }

    /* 2. group by cluster (counting sort keeps id order inside a cluster) */
    start = calloc((size_t)k + 1, 4);
    if (!start) {
        rc = kvt_fail(ENOMEM, "add: out of memory");
        goto out;
    }
    for (uint64_t i = 0; i < n; i++) start[assign[i] + 1]++;
    for (uint32_t j = 0; j < k; j++) start[j + 1] += start[j];
    for (uint64_t i = 0; i < n; i++) order[start[assign[i]]++] = (uint32_t)i;
    for (uint32_t j = k; j > 0; j--) start[j] = start[j - 1];
    start[0] = 0;

    /* 3. write every record before touching what readers see */
    for (uint32_t j = 0; j < k && !rc; j++) {
        uint32_t m = start[j + 1] - start[j];
        if (m) rc = write_members(c, j, order + start[j], m, keys, values, (int64_t)n0, scratch,
                                  scratch_recs, &log, &nlog, &logcap);
    }
    if (rc) {
        rollback(c, log, nlog, pools_n0, half_free0);
        c->ncl = ncl0;
        goto out;
    }

    /* 4. metadata: id map, running means and variances, cached copies */
    for (uint32_t j = 0; j < k; j++) {
        uint32_t m = start[j + 1] - start[j];
        if (!m) continue;
        kvt_cluster *cl = &c->cl[j];
        float *mean = c->cent + (size_t)j * c->p.dim;
        if (cl->ent && kvt_cache_grow(&s->cache, cl->ent, m)) {
            kvt_cache_drop(&s->cache, cl->ent);
            cl->ent = NULL;
        }
        for (uint32_t t = 0; t < m; t++) {
            uint32_t r = order[start[j] + t];
            const uint8_t *key = (const uint8_t *)keys + (size_t)r * L->key_bytes;
            c->loc[n0 + r] = (kvt_loc){j, cl->n};
            kvt_key_to_f32(K, c->p.dtype, key, x, c->p.dim);
            kvt_welford_add(mean, &cl->m2, cl->n, x, c->p.dim);
            cl->n++;
            if (cl->ent) {
                kvt_rec_encode(L, cl->ent->rec + (size_t)cl->ent->n * L->esz, (int64_t)(n0 + r), key,
                               (const uint8_t *)values + (size_t)r * L->value_bytes);
                cl->ent->n++;
            }
        }
        update_norm(c, j);
    }
    for (uint64_t ch = n0 / KVT_LOC_CHUNK; ch <= (n0 + n - 1) / KVT_LOC_CHUNK; ch++) c->dirty[ch] = 1;
    c->n = n0 + n;
    *first_id = (int64_t)n0;
out:
    free(assign);
    free(order);
    free(start);
    free(cent);
    free(x);
    free(scratch);
    free(log);
    kvt_mem_release(&s->cache, transient);
    UNLOCK(s);
    return rc;
}

/* ---- reading clusters --------------------------------------------------------------------- */

typedef void (*visit_fn)(void *ctx, uint32_t cluster, const uint8_t *recs, uint32_t n);

/* Checks a run of records read from flash against the id map. */
static int check_run(kvt_coll *c, uint32_t ci, uint32_t first_idx, const uint8_t *recs, uint32_t n, uint64_t off) {
    for (uint32_t i = 0; i < n; i++) {
        int64_t id;
        if (kvt_rec_check(&c->L, recs + (size_t)i * c->L.esz, &id) || id < 0 || (uint64_t)id >= c->n ||
            c->loc[id].cl != ci || c->loc[id].idx != first_idx + i)
            return kvt_fail(KVT_ECORRUPT, "%s: record at offset %llu (cluster %u, entry %u) failed its checksum or does not match the catalog",
                            kvt_file_path(c->f), (unsigned long long)(off + (uint64_t)i * c->L.esz), ci, first_idx + i);
    }
    return 0;
}

/* Calls fn on every record of cluster ci, in insertion order, in one or more runs; from the
 * cache when it is there, else from flash (one read per segment), caching it when it fits. */
static int visit_cluster(kvt_coll *c, uint32_t ci, visit_fn fn, void *ctx) {
    kvt_store *s = c->st;
    kvt_cluster *k = &c->cl[ci];
    const kvt_layout *L = &c->L;
    if (k->ent) {
        s->cache.hits++;
        kvt_cache_touch(&s->cache, k->ent);
        fn(ctx, ci, k->ent->rec, k->ent->n);
        return 0;
    }
    s->cache.misses++;
    if (k->n == 0) return 0;
    kvt_cache_ent *e = kvt_cache_admit(&s->cache, c, ci, k->n, L->esz);
    int rc = 0;
    uint32_t base = 0;
    for (uint32_t g = 0; g < k->nseg && !rc; g++) {
        kvt_seg *sg = &k->segs[g];
        if (!sg->n) continue;
        size_t bytes = (size_t)sg->n * L->esz;
        uint64_t off = kvt_run_offset(L, sg->pool, sg->head, 0, sg->n);
        uint8_t *buf = e ? e->rec + (size_t)base * L->esz : NULL;
        uint64_t need = kvt_file_read_scratch(c->f, off, bytes) + (buf ? 0 : bytes);
        rc = kvt_mem_reserve(&s->cache, need);
        if (rc) break;
        if (!buf && !(buf = malloc(bytes))) rc = kvt_fail(ENOMEM, "read: out of memory");
        if (!rc) rc = kvt_file_read(c->f, off, bytes, buf, sg->n);
        if (!rc) {
            if (sg->head == 1) kvt_rec_reverse(L, buf, sg->n);
            rc = check_run(c, ci, base, buf, sg->n, off);
        }
        if (!rc) fn(ctx, ci, buf, sg->n);
        if (!e) free(buf);
        kvt_mem_release(&s->cache, need);
        base += sg->n;
    }
    if (e) {
        if (rc) {
            kvt_cache_drop(&s->cache, e);
        } else {
            e->n = k->n;
            e->pins--;
            k->ent = e;
        }
    }
    return rc;
}

static void score_clusters(kvt_coll *c, const float *q, uint64_t nq, float *scores) {
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim;
    for (uint32_t j = 0; j < c->ncl; j++) {
        const float *r = c->cent + (size_t)j * d;
        float best = -FLT_MAX;
        for (uint64_t i = 0; i < nq; i++) {
            const float *qi = q + i * d;
            float sc = K->dot_f32(qi, r, d);
            if (c->p.metric == KVT_METRIC_L2) sc = 2 * sc - c->cnorm[j] - K->dot_f32(qi, qi, d);
            if (sc > best) best = sc;
        }
        scores[j] = c->cl[j].n ? best : -FLT_MAX;
    }
}

static const float *sort_scores;
static int by_score_desc(const void *a, const void *b) {
    float x = sort_scores[*(const uint32_t *)a], y = sort_scores[*(const uint32_t *)b];
    if (x != y) return x < y ? 1 : -1;
    return *(const uint32_t *)a < *(const uint32_t *)b ? -1 : 1;
}

/* Sorts cluster indices by descending score (ties by index, so the order is total). Runs
 * under the store mutex, which also guards the comparator's static. */
static void order_by_score(uint32_t *idx, uint32_t n, const float *scores) {
    for (uint32_t i = 0; i < n; i++) idx[i] = i;
    sort_scores = scores;
    qsort(idx, n, sizeof *idx, by_score_desc);
}

/* ---- retrieve ----------------------------------------------------------------------------- */

struct kvt_result {
    uint64_t n, ncl;
    size_t key_bytes, value_bytes;
    int64_t *ids;
    uint8_t *keys, *values;
    int32_t *clusters;
};

static void fill_result(void *ctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    kvt_result *r = ((void **)ctx)[0];
    const kvt_layout *L = ((void **)ctx)[1];
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *rec = recs + (size_t)i * L->esz;
        memcpy(&r->ids[r->n], rec, 8);
        memcpy(r->keys + r->n * L->key_bytes, kvt_rec_key(rec), L->key_bytes);
        memcpy(r->values + r->n * L->value_bytes, kvt_rec_value(L, rec), L->value_bytes);
        r->clusters[r->n] = (int32_t)ci;
        r->n++;
    }
}

void kvt_result_free(kvt_result *r) {
    if (!r) return;
    free(r->ids);
    free(r->keys);
    free(r->values);
    free(r->clusters);
    free(r);
}

uint64_t kvt_result_count(const kvt_result *r) { return r->n; }
uint64_t kvt_result_nclusters(const kvt_result *r) { return r->ncl; }

void kvt_result_copy(const kvt_result *r, int64_t *ids, void *keys, void *values, int32_t *clusters) {
    if (ids) memcpy(ids, r->ids, r->n * 8);
    if (keys) memcpy(keys, r->keys, r->n * r->key_bytes);
    if (values) memcpy(values, r->values, r->n * r->value_bytes);
    if (clusters) memcpy(clusters, r->clusters, r->n * 4);
}

int kvt_coll_retrieve(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result **out) {
    kvt_clear_error();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "retrieve: query_group must hold at least one query");
    kvt_store *s = c->st;
    LOCK(s);
    int rc = 0;
    float *scores = NULL;
    uint32_t *idx = NULL;
    kvt_result *r = NULL;
    uint64_t transient = (uint64_t)c->ncl * 8;
    rc = kvt_mem_reserve(&s->cache, transient);
    if (rc) {
        transient = 0;
        goto out;
    }
    scores = malloc((size_t)c->ncl * 4 + 4);
    idx = malloc((size_t)c->ncl * 4 + 4);
    r = calloc(1, sizeof *r);
    if (!scores || !idx || !r) {
        rc = kvt_fail(ENOMEM, "retrieve: out of memory");
        goto out;
    }
    score_clusters(c, q, nq, scores);
    order_by_score(idx, c->ncl, scores);
    /* Whole clusters in score order; one that does not fit the remaining budget is skipped so
     * the budget is filled by the next best that do. */
    uint64_t total = 0, taken = 0;
    for (uint32_t j = 0; j < c->ncl && total < budget; j++) {
        uint32_t n = c->cl[idx[j]].n;
        if (n && total + n <= budget) {
            total += n;
            idx[taken++] = idx[j];
        }
    }
    r->key_bytes = c->L.key_bytes;
    r->value_bytes = c->L.value_bytes;
    r->ncl = taken;
    r->ids = malloc(total * 8 + 8);
    r->keys = malloc(total * c->L.key_bytes + 8);
    r->values = malloc(total * c->L.value_bytes + 8);
    r->clusters = malloc(total * 4 + 4);
    if (!r->ids || !r->keys || !r->values || !r->clusters) {
        rc = kvt_fail(ENOMEM, "retrieve: out of memory for %llu entries", (unsigned long long)total);
        goto out;
    }
    void *ctx[2] = {r, &c->L};
    kvt_io_batch_begin(&s->io);
    for (uint64_t j = 0; j < taken && !rc; j++) rc = visit_cluster(c, idx[j], fill_result, ctx);
    kvt_io_batch_end(&s->io);
out:
    free(scores);
    free(idx);
    kvt_mem_release(&s->cache, transient);
    UNLOCK(s);
    if (rc) kvt_result_free(r);
    else *out = r;
    return rc;
}

/* ---- search ------------------------------------------------------------------------------- */

typedef struct search_ctx {
    kvt_coll *c;
    const float *q;          /* all queries */
    const uint32_t *qlist;   /* queries probing the current cluster */
    uint32_t nql, k;
    int64_t *ids;            /* nq * k min-heaps */
    float *scores;
    uint32_t *fill;
    float *x;                /* key as float32 (l2) */
} search_ctx;

static void heap_push(int64_t *ids, float *sc, uint32_t *fill, uint32_t k, int64_t id, float s) {
    uint32_t n = *fill;
    if (n == k) {
        if (s <= sc[0]) return;
        /* replace the minimum and sift down */
        uint32_t i = 0;
        for (;;) {
            uint32_t l = 2 * i + 1, r = l + 1, m = i;
            float mv = s;
            if (l < k && sc[l] < mv) { m = l; mv = sc[l]; }
            if (r < k && sc[r] < mv) m = r;
            if (m == i) break;
            sc[i] = sc[m];
            ids[i] = ids[m];
            i = m;
        }
        sc[i] = s;
        ids[i] = id;
        return;
    }
    uint32_t i = n;
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (sc[p] <= s) break;
        sc[i] = sc[p];
        ids[i] = ids[p];
        i = p;
    }
    sc[i] = s;
    ids[i] = id;
    *fill = n + 1;
}

static void score_entries(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    (void)ci;
    search_ctx *sx = vctx;
    kvt_coll *c = sx->c;
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *rec = recs + (size_t)i * c->L.esz;
        int64_t id;
        memcpy(&id, rec, 8);
        float knorm = 0;
        if (c->p.metric == KVT_METRIC_L2) {
            kvt_key_to_f32(K, c->p.dtype, kvt_rec_key(rec), sx->x, d);
            knorm = K->dot_f32(sx->x, sx->x, d);
        }
        for (uint32_t t = 0; t < sx->nql; t++) {
            uint32_t qi = sx->qlist[t];
            const float *qv = sx->q + (size_t)qi * d;
            float s = kvt_dot_key(K, c->p.dtype, kvt_rec_key(rec), qv, d);
            if (c->p.metric == KVT_METRIC_L2) s = 2 * s - knorm - K->dot_f32(qv, qv, d);
            heap_push(sx->ids + (size_t)qi * sx->k, sx->scores + (size_t)qi * sx->k, &sx->fill[qi], sx->k, id, s);
        }
    }
}

/* Insertion sort of one query's hits, best first: k is small. */
static void sort_hits(int64_t *ids, float *sc, uint32_t n) {
    for (uint32_t i = 1; i < n; i++) {
        int64_t id = ids[i];
        float v = sc[i];
        uint32_t j = i;
        while (j > 0 && (sc[j - 1] < v || (sc[j - 1] == v && ids[j - 1] > id))) {
            sc[j] = sc[j - 1];
            ids[j] = ids[j - 1];
            j--;
        }
        sc[j] = v;
        ids[j] = id;
    }
}

typedef struct { uint32_t cl, q; } probe;
static int by_probe(const void *a, const void *b) {
    const probe *x = a, *y = b;
    if (x->cl != y->cl) return x->cl < y->cl ? -1 : 1;
    return x->q < y->q ? -1 : x->q > y->q;
}

int kvt_coll_search(kvt_coll *c, const float *q, uint64_t nq, uint32_t k, uint32_t nprobe,
                    int64_t *ids_out, float *scores_out) {
    kvt_clear_error();
    if (!q || nq == 0 || k == 0) return kvt_fail(KVT_EINVAL, "search: need at least one query and k >= 1");
    kvt_store *s = c->st;
    LOCK(s);
    int rc = 0;
    uint32_t *fill = NULL, *idx = NULL, *qlist = NULL;
    float *scores = NULL, *x = NULL;
    probe *pr = NULL;
    if (nprobe > c->ncl) nprobe = c->ncl;
    if (nprobe == 0) nprobe = 1;
    const uint64_t B = 64; /* queries per block: clusters probed by several are read once */
    uint64_t transient = (uint64_t)c->ncl * 8 + B * nprobe * sizeof(probe) + B * 4 + nq * 4 + c->p.dim * 4;
    rc = kvt_mem_reserve(&s->cache, transient);
    if (rc) {
        transient = 0;
        goto out;
    }
    fill = calloc(nq, 4);
    scores = malloc((size_t)c->ncl * 4 + 4);
    idx = malloc((size_t)c->ncl * 4 + 4);
    pr = malloc(B * nprobe * sizeof *pr);
    qlist = malloc(B * 4);
    x = malloc((size_t)c->p.dim * 4);
    if (!fill || !scores || !idx || !pr || !qlist || !x) {
        rc = kvt_fail(ENOMEM, "search: out of memory");
        goto out;
    }
    search_ctx sx = {c, q, qlist, 0, k, ids_out, scores_out, fill, x};
    for (uint64_t b0 = 0; b0 < nq && !rc; b0 += B) {
        uint64_t b1 = b0 + B < nq ? b0 + B : nq, np = 0;
        for (uint64_t i = b0; i < b1; i++) {
            score_clusters(c, q + i * c->p.dim, 1, scores);
            order_by_score(idx, c->ncl, scores);
            for (uint32_t j = 0; j < nprobe; j++) pr[np++] = (probe){idx[j], (uint32_t)i};
        }
        qsort(pr, np, sizeof *pr, by_probe);
        kvt_io_batch_begin(&s->io);
        for (uint64_t a = 0; a < np && !rc;) {
            uint64_t e = a;
            sx.nql = 0;
            while (e < np && pr[e].cl == pr[a].cl) qlist[sx.nql++] = pr[e++].q;
            rc = visit_cluster(c, pr[a].cl, score_entries, &sx);
            a = e;
        }
        kvt_io_batch_end(&s->io);
    }
    if (!rc) {
        /* heaps to rows sorted by descending score (ties by id), padded */
        for (uint64_t i = 0; i < nq; i++) {
            int64_t *hid = ids_out + i * k;
            float *hs = scores_out + i * k;
            sort_hits(hid, hs, fill[i]);
            for (uint32_t j = fill[i]; j < k; j++) {
                hid[j] = -1;
                hs[j] = -INFINITY;
            }
        }
    }
out:
    free(fill);
    free(scores);
    free(idx);
    free(pr);
    free(qlist);
    free(x);
    kvt_mem_release(&s->cache, transient);
    UNLOCK(s);
    return rc;
}

/* ---- get ---------------------------------------------------------------------------------- */

int kvt_coll_get(kvt_coll *c, const int64_t *ids, uint64_t n, void *keys_out, void *values_out) {
    kvt_clear_error();
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    LOCK(s);
    int rc = 0;
    for (uint64_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint64_t)ids[i] >= c->n) {
            rc = kvt_fail(KVT_ENOTFOUND, "ids: id %lld is not in the collection (0..%llu)", (long long)ids[i],
                          (unsigned long long)c->n);
            goto out;
        }
    uint64_t need = L->esz + kvt_file_read_scratch(c->f, 0, L->esz) + KVT_IO_ALIGN;
    rc = kvt_mem_reserve(&s->cache, need);
    if (rc) goto out;
    uint8_t *buf = malloc(L->esz);
    if (!buf) rc = kvt_fail(ENOMEM, "get: out of memory");
    kvt_io_batch_begin(&s->io);
    for (uint64_t i = 0; i < n && !rc; i++) {
        kvt_loc lc = c->loc[ids[i]];
        kvt_cluster *k = &c->cl[lc.cl];
        const uint8_t *rec;
        if (k->ent && lc.idx < k->ent->n) {
            s->cache.hits++;
            rec = k->ent->rec + (size_t)lc.idx * L->esz;
        } else {
            uint32_t slot = lc.idx, g = 0;
            while (g < k->nseg && slot >= k->segs[g].n) slot -= k->segs[g++].n;
            if (g == k->nseg) {
                rc = kvt_fail(KVT_ECORRUPT, "get: id %lld maps outside its cluster", (long long)ids[i]);
                break;
            }
            uint64_t off = kvt_slot_offset(L, k->segs[g].pool, k->segs[g].head, slot);
            rc = kvt_file_read(c->f, off, L->esz, buf, 1);
            if (!rc) rc = check_run(c, lc.cl, lc.idx, buf, 1, off);
            if (rc) break;
            rec = buf;
        }
        memcpy((uint8_t *)keys_out + i * L->key_bytes, kvt_rec_key(rec), L->key_bytes);
        if (values_out) memcpy((uint8_t *)values_out + i * L->value_bytes, kvt_rec_value(L, rec), L->value_bytes);
    }
    kvt_io_batch_end(&s->io);
    free(buf);
    kvt_mem_release(&s->cache, need);
out:
    UNLOCK(s);
    return rc;
}

/* ---- stats -------------------------------------------------------------------------------- */

int kvt_coll_stats_get(kvt_coll *c, kvt_coll_stats *o) {
    memset(o, 0, sizeof *o);
    LOCK(c->st);
    o->entries = c->n;
    o->pools = c->pools.n;
    o->data_file_bytes = kvt_pool_base(&c->L, c->pools.n);
    double var = 0;
    uint64_t nonempty = 0;
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        if (k->ent) o->cached_clusters++;
        if (!k->n) continue;
        nonempty++;
        var += k->m2 / k->n;
        if (k->n > o->max_cluster_size) o->max_cluster_size = k->n;
    }
    o->clusters = nonempty;
    o->mean_cluster_size = nonempty ? (double)c->n / (double)nonempty : 0;
    o->mean_variance = nonempty ? var / (double)nonempty : 0;
    UNLOCK(c->st);
    return 0;
}

int kvt_coll_cluster_sizes(kvt_coll *c, uint32_t *sizes, uint64_t cap, uint64_t *n_clusters) {
    LOCK(c->st);
    uint64_t m = 0;
    for (uint32_t j = 0; j < c->ncl; j++) {
        if (!c->cl[j].n) continue;
        if (m < cap) sizes[m] = c->cl[j].n;
        m++;
    }
    *n_clusters = m;
    UNLOCK(c->st);
    return 0;
}

/* ---- durability: sync, export, reopen ----------------------------------------------------- */

int kvt_coll_sync(kvt_coll *c) {
    kvt_clear_error();
    LOCK(c->st);
    int rc = kvt_file_sync(c->f);
    UNLOCK(c->st);
    return rc;
}

#define DIR_MAGIC "KVTDIR01"
#define LOC_MAGIC "KVTLOC01"

int kvt_coll_export_dir(kvt_coll *c, void **blob, size_t *len) {
    kvt_clear_error();
    LOCK(c->st);
    kvt_wbuf w = {0};
    kvt_wbuf_put(&w, DIR_MAGIC, 8);
    kvt_wbuf_u32(&w, KVT_FORMAT_VERSION);
    kvt_wbuf_u32(&w, c->p.dim);
    kvt_wbuf_u32(&w, c->p.value_dim);
    kvt_wbuf_u32(&w, (uint32_t)c->p.dtype);
    kvt_wbuf_u32(&w, (uint32_t)c->p.metric);
    kvt_wbuf_u32(&w, (uint32_t)c->p.policy);
    kvt_wbuf_u32(&w, c->L.esz);
    kvt_wbuf_u64(&w, c->L.pool_bytes);
    kvt_wbuf_u64(&w, c->n);
    kvt_wbuf_u32(&w, c->ncl);
    kvt_wbuf_u32(&w, c->pools.n);
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        kvt_wbuf_u32(&w, k->n);
        kvt_wbuf_u32(&w, k->nseg);
        kvt_wbuf_f64(&w, k->m2);
        for (uint32_t g = 0; g < k->nseg; g++) {
            kvt_wbuf_u32(&w, k->segs[g].pool);
            kvt_wbuf_u32(&w, k->segs[g].head);
            kvt_wbuf_u32(&w, k->segs[g].n);
        }
        kvt_wbuf_put(&w, c->cent + (size_t)j * c->p.dim, (size_t)c->p.dim * 4);
    }
    uint32_t crc = kvt_crc32c(0, w.p, w.len);
    kvt_wbuf_u32(&w, crc);
    UNLOCK(c->st);
    if (w.oom) {
        free(w.p);
        return kvt_fail(ENOMEM, "export: out of memory");
    }
    *blob = w.p;
    *len = w.len;
    return 0;
}

int kvt_coll_dirty_chunks(kvt_coll *c, uint64_t **idx, size_t *n) {
    LOCK(c->st);
    uint64_t nch = c->n ? (c->n - 1) / KVT_LOC_CHUNK + 1 : 0, m = 0;
    uint64_t *a = malloc(nch * 8 + 8);
    if (!a) {
        UNLOCK(c->st);
        return kvt_fail(ENOMEM, "export: out of memory");
    }
    for (uint64_t i = 0; i < nch; i++)
        if (c->dirty[i]) a[m++] = i;
    UNLOCK(c->st);
    *idx = a;
    *n = m;
    return 0;
}

int kvt_coll_export_chunk(kvt_coll *c, uint64_t chunk, void **blob, size_t *len) {
    kvt_clear_error();
    LOCK(c->st);
    uint64_t lo = chunk * KVT_LOC_CHUNK;
    if (lo >= c->n) {
        UNLOCK(c->st);
        return kvt_fail(KVT_EINVAL, "export_chunk: chunk %llu is past the end", (unsigned long long)chunk);
    }
    uint32_t cnt = (uint32_t)(c->n - lo < KVT_LOC_CHUNK ? c->n - lo : KVT_LOC_CHUNK);
    kvt_wbuf w = {0};
    kvt_wbuf_put(&w, LOC_MAGIC, 8);
    kvt_wbuf_u64(&w, chunk);
    kvt_wbuf_u32(&w, cnt);
    kvt_wbuf_put(&w, c->loc + lo, (size_t)cnt * sizeof(kvt_loc));
    uint32_t crc = kvt_crc32c(0, w.p, w.len);
    kvt_wbuf_u32(&w, crc);
    UNLOCK(c->st);
    if (w.oom) {
        free(w.p);
        return kvt_fail(ENOMEM, "export: out of memory");
    }
    *blob = w.p;
    *len = w.len;
    return 0;
}

int kvt_coll_committed(kvt_coll *c) {
    LOCK(c->st);
    memset(c->dirty, 0, c->dirtycap);
    UNLOCK(c->st);
    return 0;
}

static int blob_crc_ok(const void *blob, size_t len) {
    if (len < 12) return 0;
    uint32_t crc;
    memcpy(&crc, (const uint8_t *)blob + len - 4, 4);
    return crc == kvt_crc32c(0, blob, len - 4);
}

static int load_dir(kvt_coll *c, const void *blob, size_t len) {
    const char *what = "cluster directory";
    if (!blob_crc_ok(blob, len) || memcmp(blob, DIR_MAGIC, 8) != 0)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u fails its checksum", what, c->no);
    kvt_rbuf r = {blob, len - 4, 8, 0};
    uint32_t ver = kvt_rbuf_u32(&r);
    if (ver != KVT_FORMAT_VERSION)
        return kvt_fail(KVT_EFORMAT, "catalog: %s has format version %u, this engine reads %u", what, ver, KVT_FORMAT_VERSION);
    uint32_t dim = kvt_rbuf_u32(&r), vdim = kvt_rbuf_u32(&r), dtype = kvt_rbuf_u32(&r),
             metric = kvt_rbuf_u32(&r), policy = kvt_rbuf_u32(&r), esz = kvt_rbuf_u32(&r);
    uint64_t pool_bytes = kvt_rbuf_u64(&r), n = kvt_rbuf_u64(&r);
    uint32_t ncl = kvt_rbuf_u32(&r), npools = kvt_rbuf_u32(&r);
    if (r.bad || dim != c->p.dim || vdim != c->p.value_dim || dtype != (uint32_t)c->p.dtype ||
        metric != (uint32_t)c->p.metric || policy != (uint32_t)c->p.policy || esz != c->L.esz ||
        pool_bytes != c->L.pool_bytes)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u does not match its parameters", what, c->no);
    if (ncl > len / 16 || npools > (1u << 30))
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u has impossible counts", what, c->no);
    int rc = ensure_clusters(c, ncl);
    if (!rc) rc = ensure_pools(c, npools);
    if (!rc) rc = ensure_ids(c, n);
    if (rc) return rc;
    c->pools.n = npools;
    for (uint32_t p = 0; p < npools; p++) c->pools.p[p] = (kvt_pool){{-1, -1}, {0, 0}};
    uint64_t total = 0;
    for (uint32_t j = 0; j < ncl && !r.bad; j++) {
        kvt_cluster *k = &c->cl[j];
        uint32_t kn = kvt_rbuf_u32(&r), nseg = kvt_rbuf_u32(&r);
        k->m2 = kvt_rbuf_f64(&r);
        if (r.bad || nseg > (len - r.pos) / 12) {
            r.bad = 1;
            break;
        }
        rc = ensure_segs(c, k, nseg);
        if (rc) return rc;
        uint32_t sum = 0;
        for (uint32_t g = 0; g < nseg; g++) {
            kvt_seg sg = {kvt_rbuf_u32(&r), kvt_rbuf_u32(&r), kvt_rbuf_u32(&r)};
            if (sg.pool >= npools || sg.head > 1 || c->pools.p[sg.pool].owner[sg.head] >= 0) {
                r.bad = 1;
                break;
            }
            kvt_pool *pl = &c->pools.p[sg.pool];
            pl->owner[sg.head] = (int32_t)j;
            pl->used[sg.head] = sg.n;
            if (pl->used[0] + pl->used[1] > c->L.pool_cap) {
                r.bad = 1;
                break;
            }
            k->segs[g] = sg;
            sum += sg.n;
        }
        k->nseg = nseg;
        k->n = kn;
        if (sum != kn) r.bad = 1;
        total += kn;
        kvt_rbuf_get(&r, c->cent + (size_t)j * dim, (size_t)dim * 4);
        update_norm(c, j);
    }
    c->ncl = ncl;
    if (r.bad || total != n || r.pos != r.len)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u is inconsistent", what, c->no);
    c->n = n;
    /* the last pool's back head is the natural next partner */
    if (npools && c->pools.p[npools - 1].owner[1] < 0 && kvt_pool_room(&c->L, &c->pools.p[npools - 1]))
        c->pools.half_free = npools - 1;
    return 0;
}

static int load_chunk(kvt_coll *c, uint64_t chunk, const void *blob, size_t len, uint32_t *counts) {
    if (!blob_crc_ok(blob, len) || memcmp(blob, LOC_MAGIC, 8) != 0)
        return kvt_fail(KVT_ECORRUPT, "catalog: id map chunk %llu of collection %u fails its checksum", (unsigned long long)chunk, c->no);
    kvt_rbuf r = {blob, len - 4, 8, 0};
    uint64_t ch = kvt_rbuf_u64(&r);
    uint32_t cnt = kvt_rbuf_u32(&r);
    uint64_t lo = chunk * KVT_LOC_CHUNK;
    uint64_t want = c->n - lo < KVT_LOC_CHUNK ? c->n - lo : KVT_LOC_CHUNK;
    if (r.bad || ch != chunk || cnt != want || r.len - r.pos != (size_t)cnt * sizeof(kvt_loc))
        return kvt_fail(KVT_ECORRUPT, "catalog: id map chunk %llu of collection %u is inconsistent", (unsigned long long)chunk, c->no);
    memcpy(c->loc + lo, (const uint8_t *)blob + r.pos, (size_t)cnt * sizeof(kvt_loc));
    for (uint32_t i = 0; i < cnt; i++) {
        kvt_loc l = c->loc[lo + i];
        if (l.cl >= c->ncl || l.idx >= c->cl[l.cl].n)
            return kvt_fail(KVT_ECORRUPT, "catalog: id %llu of collection %u maps outside the directory", (unsigned long long)(lo + i), c->no);
        counts[l.cl]++;
    }
    return 0;
}

int kvt_coll_open(kvt_store *s, uint32_t no, const kvt_coll_params *p, const void *dir_blob,
                  size_t dir_len, const void *const *chunks, const size_t *chunk_lens, size_t n_chunks,
                  kvt_coll **out) {
    kvt_clear_error();
    LOCK(s);
    kvt_coll *c;
    uint32_t *counts = NULL;
    int rc = coll_new(s, no, p, 0, &c);
    if (rc) goto done;
    uint8_t page[KVT_DATA_HEADER];
    rc = kvt_file_read(c->f, 0, sizeof page, page, 0);
    if (!rc) {
        rc = kvt_data_header_check(&c->L, p, page);
        if (rc) kvt_fail(rc, "%s: data file header is %s", kvt_file_path(c->f), rc == KVT_EFORMAT ? "of another format version" : "damaged or does not match the catalog");
    }
    if (!rc) rc = load_dir(c, dir_blob, dir_len);
    uint64_t want = c->n ? (c->n - 1) / KVT_LOC_CHUNK + 1 : 0;
    if (!rc && n_chunks != want)
        rc = kvt_fail(KVT_ECORRUPT, "catalog: collection %u has %zu id map chunks, %llu expected", no, n_chunks, (unsigned long long)want);
    if (!rc && !(counts = calloc((size_t)c->ncl + 1, 4))) rc = kvt_fail(ENOMEM, "open: out of memory");
    for (size_t i = 0; i < n_chunks && !rc; i++) rc = load_chunk(c, i, chunks[i], chunk_lens[i], counts);
    for (uint32_t j = 0; j < c->ncl && !rc; j++)
        if (counts[j] != c->cl[j].n)
            rc = kvt_fail(KVT_ECORRUPT, "catalog: cluster %u of collection %u has %u entries but the id map names %u", j, no, c->cl[j].n, counts[j]);
    if (rc) coll_forget(s, c);
    else *out = c;
done:
    free(counts);
    UNLOCK(s);
    return rc;
}
