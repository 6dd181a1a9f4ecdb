/*
 * store.c — collections: add, retrieve, search, get, the clustering policies, checkpoints.
 *
 * Invariants:
 * 1. Every public call takes the store mutex for its whole duration; the structures below are
 *    only touched under it.
 * 2. For every id < n, loc[id] = (c, i) with i < cl[c].n, and the i-th record of cluster c
 *    (segments in order, slots in order, then its pending buffer) carries that id. The sum of
 *    cl[c].n is n; a cluster with n == 0 owns nothing and is a free slot.
 * 3. An add writes every record before it changes any metadata readers see; if a write fails,
 *    the heads it claimed are given back and nothing is added. A split or a recluster writes
 *    the new clusters to fresh heads (copy on write) and only then switches the directory;
 *    the old heads are retired until the next committed checkpoint, because the committed
 *    catalog still names them.
 * 4. cent[c] is the mean of cluster c's keys, cnorm[c] its squared norm (FLT_MAX for free
 *    slots, so nothing joins them), cl[c].m2 the sum of squared distances to the mean.
 * 5. A cached cluster's records equal its records on flash plus its pending buffer, in order.
 * 6. Every byte held for data is reserved against the DRAM budget first (coll->acct for the
 *    long-lived structures; transient reservations are released before return).
 * 7. A split never reads flash: it runs on a cluster already in DRAM (cached, or read by this
 *    retrieve). The one exception is the pending budget's overflow, counted as forced loads.
 * 8. pending_total is the sum of every cluster's pend; tail_total the sum over unflagged
 *    clusters, whose pending buffers are write-buffer tails (DESIGN 2.2): entries kept in
 *    DRAM until they complete a flash page. Only flagged clusters' entries count against the
 *    pending budget.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "estimate.h"
#include "store.h"

#define LOCK(s) pthread_mutex_lock(&(s)->mu)
#define UNLOCK(s) pthread_mutex_unlock(&(s)->mu)

static void wait_idle(kvt_coll *c);
static int ready(kvt_coll *c);
static int install_image(kvt_coll *c, const uint8_t *img, uint64_t len);
static void cluster_stats(kvt_coll *c, kvt_coll_stats *o);
static int peek_begin(kvt_coll *c, int *was_parked);
static void peek_end(kvt_coll *c, int was_parked);

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
    pthread_cond_init(&s->job_cv, NULL);
    pthread_cond_init(&s->done_cv, NULL);
    kvt_io_init(&s->io, &opts->device, opts->direct);
    kvt_cache_init(&s->cache, opts->dram_budget, on_evict);
    s->K = kvt_simd();
    s->merge_gap = opts->merge_gap;
    s->write_buffer = opts->write_buffer;
    if (opts->cache_policy < KVT_CACHE_LRU || opts->cache_policy > KVT_CACHE_CLUSTER) {
        kvt_store_close(s);
        return kvt_fail(KVT_EINVAL, "cache_policy: 0 (lru), 1 (lfu) or 2 (cluster) expected, got %d", opts->cache_policy);
    }
    s->cache.policy = opts->cache_policy;
    *out = s;
    return 0;
}

static void coll_free(kvt_coll *c) {
    if (!c) return;
    kvt_cache_drop_owner(&c->st->cache, c);
    for (uint32_t i = 0; i < c->clcap; i++) {
        free(c->cl[i].segs);
        free(c->cl[i].pbuf);
        free(c->cl[i].mem);
    }
    free(c->cl);
    free(c->cent);
    free(c->cnorm);
    free(c->m2d);
    free(c->vsum);
    free(c->cofreq);
    free(c->loc);
    free(c->mod);
    free(c->keys);
    kvt_pools_free(&c->pools);
    kvt_file_close(c->f);
    kvt_mem_release(&c->st->cache, c->acct);
    free(c);
}

void kvt_store_close(kvt_store *s) {
    if (!s) return;
    /* stop the loaders: queued jobs are dropped, running ones finish */
    LOCK(s);
    s->shutdown = 1;
    for (kvt_job *j = s->jobs, *next; j; j = next) {
        next = j->next;
        if (j->cl == KVT_SWAP_JOB) {
            for (uint32_t t = 0; t < j->nseg; t++) j->run[t]->inflight--;
            s->loading_bytes -= j->swap_len;
            free(j->swap_buf);
            kvt_mem_release(&s->cache, j->swap_len);
            free(j->run);
        } else {
            s->loading_bytes -= (uint64_t)j->c->cl[j->cl].n * j->c->L.esz;
            j->c->cl[j->cl].ent = NULL;
            kvt_cache_drop(&s->cache, j->e);
            j->c->inflight--;
        }
        free(j);
    }
    s->jobs = s->jobs_tail = NULL;
    pthread_cond_broadcast(&s->job_cv);
    UNLOCK(s);
    for (int i = 0; i < s->nloaders; i++) pthread_join(s->loaders[i], NULL);
    pthread_cond_destroy(&s->job_cv);
    pthread_cond_destroy(&s->done_cv);
    for (uint32_t i = 0; i < s->ncolls; i++) coll_free(s->colls[i]);
    free(s->colls);
    if (s->swap) { /* volatile: nothing in it outlives the store */
        char path[4096];
        snprintf(path, sizeof path, "%s/swap.kvs", s->dir);
        kvt_file_close(s->swap);
        unlink(path);
    }
    free(s->sfree);
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
    memcpy(o->read_size_seconds, io.size_seconds, sizeof o->read_size_seconds);
    memcpy(o->read_size_bytes, io.size_bytes, sizeof o->read_size_bytes);
    o->read_seconds = io.read_seconds;
    o->direct_io = s->ncolls ? kvt_file_is_direct(s->colls[0]->f) : (s->io.direct_mode != KVT_DIRECT_OFF);
    o->prefetch_issued = s->prefetch_issued;
    o->prefetch_hits = s->prefetch_hits;
    o->prefetch_errors = s->prefetch_errors;
    o->prefetch_read_bytes = io.prefetch_read_bytes;
    o->io_wait_seconds = s->io_wait_seconds;
    o->swap_outs = s->swap_outs;
    o->swap_ins = s->swap_ins;
    o->swap_demand_ins = s->swap_demand_ins;
    o->swap_write_bytes = s->swap_write_bytes;
    o->swap_read_bytes = s->swap_read_bytes;
    o->swap_file_bytes = s->swap_end;
    for (uint32_t i = 0; i < s->ncolls; i++) {
        kvt_coll *c = s->colls[i];
        o->parked_collections += c->parked;
        o->split_read_bytes += c->ctr.split_read_bytes;
        o->relayout_read_bytes += c->ctr.relayout_read_bytes;
        o->partial_page_writes += c->ctr.partial_page_writes;
        o->write_buffer_entries += c->tail_total;
        o->write_buffer_evictions += c->ctr.write_buffer_evictions;
        o->write_buffer_errors += c->ctr.write_buffer_errors;
    }
    UNLOCK(s);
    return 0;
}

int kvt_store_reset_io_stats(kvt_store *s) {
    LOCK(s);
    kvt_io_stats_reset(&s->io);
    s->swap_read_bytes = s->swap_write_bytes = 0;
    s->swap_ins = s->swap_outs = s->swap_demand_ins = 0;
    s->cache.hits = s->cache.misses = s->cache.evictions = 0;
    s->cache.peak = s->cache.used;
    UNLOCK(s);
    return 0;
}

const char *kvt_store_io_backend(kvt_store *s) { return kvt_io_backend_name(&s->io); }

int kvt_store_inject_fault(kvt_store *s, char op, uint64_t nth, int code) {
    return kvt_io_inject(&s->io, op, nth, code);
}

/* ---- accounting helpers ------------------------------------------------------------------ */

/* Grows *ptr (elements of `size`) to at least `need` elements, reserving the growth against
 * the budget first. New elements are zeroed. */
static int grow_array(kvt_coll *c, void **ptr, size_t size, uint64_t *cap, uint64_t need) {
    if (need <= *cap) return 0;
    /* 1.5x growth, 1.25x past 128K elements: the id map is the largest structure, and doubling
     * it would spend up to half of it as slack against a tight budget. The step depends on the
     * element count only, so arrays grown in step (the per-cluster ones) keep equal capacities
     * whatever their element sizes. */
    uint64_t nc = *cap ? *cap : (need < 4 ? 4 : need);
    while (nc < need) nc += (nc > (1u << 17) ? nc / 4 : nc / 2) + 1; /* big ones: 1.25x */
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

/* Frees an array grown by grow_array and returns its bytes to the budget. */
static void free_array(kvt_coll *c, void *p, uint64_t cap, size_t size) {
    free(p);
    kvt_mem_release(&c->st->cache, cap * size);
    c->acct -= cap * size;
}

static int ensure_clusters(kvt_coll *c, uint32_t need) {
    if (need <= c->clcap) return 0;
    uint64_t cap = c->clcap, cap2 = c->clcap, cap3 = c->clcap, cap4 = c->clcap, cap5 = c->clcap;
    int rc = grow_array(c, (void **)&c->cl, sizeof *c->cl, &cap, need);
    if (!rc) rc = grow_array(c, (void **)&c->cent, (size_t)c->p.dim * sizeof(float), &cap2, need);
    if (!rc) rc = grow_array(c, (void **)&c->cnorm, sizeof(float), &cap3, need);
    /* per-dimension variances only serve the Gaussian score: kept only when it is on */
    if (!rc && c->p.score_temp > 0) rc = grow_array(c, (void **)&c->m2d, (size_t)c->p.dim * sizeof(float), &cap4, need);
    /* estimate.c: value sums beside the representatives */
    if (!rc && kvt_vsum_kept(c)) rc = grow_array(c, (void **)&c->vsum, (size_t)c->p.value_dim * sizeof(float), &cap5, need);
    if (rc) return rc;
    for (uint64_t j = c->clcap; j < cap; j++) c->cnorm[j] = FLT_MAX;
    c->clcap = (uint32_t)cap; /* all grew by the same rule (it counts elements) from the same capacity */
    return 0;
}

static int ensure_segs(kvt_coll *c, kvt_cluster *k, uint32_t need) {
    uint64_t cap = k->segcap;
    int rc = grow_array(c, (void **)&k->segs, sizeof *k->segs, &cap, need);
    k->segcap = (uint32_t)cap;
    return rc;
}

/* Token layout (kvt_coll_params.layout): records sit in one log in id order. */
static inline int token(const kvt_coll *c) {
    return c->p.layout == KVT_LAYOUT_TOKEN && c->p.policy != KVT_POLICY_NONE;
}
/* The token layout's member lists hold 32-bit ids: it takes up to 2^32 - 1 entries. */
#define KVT_TOKEN_MAX_ENTRIES ((uint64_t)UINT32_MAX)
static inline uint64_t token_offset(const kvt_coll *c, uint64_t id) {
    return KVT_DATA_HEADER + id * c->L.esz;
}

/* Token layout: the end of the run of consecutive ids starting at member i0 (one read). */
static inline uint32_t token_run_end(const kvt_cluster *k, uint32_t i0) {
    uint32_t i1 = i0 + 1;
    while (i1 < k->n && k->mem[i1] == k->mem[i1 - 1] + 1) i1++;
    return i1;
}

static int ensure_mem(kvt_coll *c, kvt_cluster *k, uint32_t need) {
    uint64_t cap = k->memcap;
    int rc = grow_array(c, (void **)&k->mem, sizeof *k->mem, &cap, need);
    k->memcap = (uint32_t)cap;
    return rc;
}

/* Token layout: every cluster's member list from the id map (after a load); KVT_ECORRUPT if
 * the map does not name each (cluster, index) once, in ascending id order. */
static int rebuild_members(kvt_coll *c) {
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        int rc = ensure_mem(c, k, k->n);
        if (rc) return rc;
        for (uint32_t i = 0; i < k->n; i++) k->mem[i] = UINT32_MAX;
    }
    for (uint64_t id = 0; id < c->n; id++) c->cl[c->loc[id].cl].mem[c->loc[id].idx] = (uint32_t)id;
    for (uint32_t j = 0; j < c->ncl; j++)
        for (uint32_t i = 0; i < c->cl[j].n; i++)
            if (c->cl[j].mem[i] == UINT32_MAX || (i && c->cl[j].mem[i] <= c->cl[j].mem[i - 1]))
                return kvt_fail(KVT_ECORRUPT, "catalog: cluster %u of collection %u has an inconsistent member list", j, c->no);
    return 0;
}

static int ensure_pbuf(kvt_coll *c, kvt_cluster *k, uint32_t need) {
    uint64_t cap = k->pcap;
    int rc = grow_array(c, (void **)&k->pbuf, c->L.esz, &cap, need);
    k->pcap = (uint32_t)cap;
    return rc;
}

static int ensure_pools(kvt_coll *c, uint32_t need) {
    if (need <= c->pools.cap) return 0;
    uint32_t old = c->pools.cap, nc = old ? old : 16;
    while (nc < need) nc *= 2;
    uint64_t more = (uint64_t)(nc - old) * KVT_POOL_BYTES;
    int rc = kvt_mem_reserve(&c->st->cache, more);
    if (rc) return rc;
    rc = kvt_pools_reserve(&c->pools, nc);
    if (rc) {
        kvt_mem_release(&c->st->cache, more);
        return rc;
    }
    c->acct += more;
    return 0;
}

static int ensure_ids(kvt_coll *c, uint64_t need) {
    int rc = grow_array(c, (void **)&c->loc, sizeof *c->loc, &c->loccap, need);
    if (!rc) rc = grow_array(c, (void **)&c->mod, sizeof *c->mod, &c->modcap, need / KVT_LOC_CHUNK + 1);
    if (!rc && c->p.policy == KVT_POLICY_NONE) rc = grow_array(c, (void **)&c->keys, c->L.key_bytes, &c->keyscap, need);
    return rc;
}

static inline void set_loc(kvt_coll *c, uint64_t id, uint32_t cl, uint32_t idx) {
    c->loc[id] = (kvt_loc){cl, idx};
    c->mod[id / KVT_LOC_CHUNK] = ++c->modc;
}

static void update_norm(kvt_coll *c, uint32_t k) {
    const float *x = c->cent + (size_t)k * c->p.dim;
    c->cnorm[k] = c->cl[k].n ? c->st->K->dot_f32(x, x, c->p.dim) : FLT_MAX;
}

/* A free cluster slot (n == 0, owning nothing), growing the table if needed. */
static int new_cluster(kvt_coll *c, uint32_t *out) {
    int rc = ensure_clusters(c, c->ncl + 1);
    if (rc) return rc;
    uint32_t j = c->ncl++;
    kvt_cluster *k = &c->cl[j];
    k->n = k->nseg = k->pend = k->flagged = k->hold = 0;
    k->m2 = 0;
    k->ent = NULL;
    c->cnorm[j] = FLT_MAX;
    if (c->m2d) memset(c->m2d + (size_t)j * c->p.dim, 0, (size_t)c->p.dim * 4);
    kvt_vsum_clear(c, j);
    *out = j;
    return 0;
}

/* Exact mean and squared-distance sum of n records' keys. */
static void stats_from_records(kvt_coll *c, uint32_t j, const uint8_t *recs, uint32_t n, float *x) {
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim;
    float *mean = c->cent + (size_t)j * d, *m2d = c->m2d ? c->m2d + (size_t)j * d : NULL;
    double m2 = 0;
    memset(mean, 0, (size_t)d * 4);
    if (m2d) memset(m2d, 0, (size_t)d * 4);
    for (uint32_t i = 0; i < n; i++) {
        kvt_key_to_f32(K, c->p.dtype, kvt_rec_key(recs + (size_t)i * c->L.esz), x, d);
        kvt_welford_add(mean, &m2, m2d, i, x, d);
    }
    kvt_vsum_from_records(c, j, recs, n); /* estimate.c: exact again after a split */
    c->cl[j].m2 = m2;
    c->cl[j].n = n;
    update_norm(c, j);
}

static double variance(const kvt_cluster *k) { return k->n ? k->m2 / k->n : 0; }

/* ---- collections ------------------------------------------------------------------------- */

static int check_params(const kvt_coll_params *p) {
    if (p->dim < 1 || p->dim > 4096) return kvt_fail(KVT_EINVAL, "dim: 1..4096 expected, got %u", p->dim);
    if (p->value_dim > 4096) return kvt_fail(KVT_EINVAL, "value_dim: 0..4096 expected, got %u", p->value_dim);
    if (p->dtype != KVT_F32 && p->dtype != KVT_F16) return kvt_fail(KVT_EINVAL, "dtype: float32 or float16 expected");
    if (p->metric != KVT_METRIC_IP && p->metric != KVT_METRIC_L2) return kvt_fail(KVT_EINVAL, "metric: ip or l2 expected");
    if (p->policy < KVT_POLICY_STATIC || p->policy > KVT_POLICY_NONE) return kvt_fail(KVT_EINVAL, "policy: unknown value %d", p->policy);
    if (p->init_cluster_size < 1 || p->init_cluster_size > (1u << 20)) return kvt_fail(KVT_EINVAL, "init_cluster_size: 1..2^20 expected, got %u", p->init_cluster_size);
    if (p->max_cluster_size < 2 || p->max_cluster_size > (1u << 20)) return kvt_fail(KVT_EINVAL, "max_cluster_size: 2..2^20 expected, got %u", p->max_cluster_size);
    if (!(p->tau >= 0) || !isfinite(p->tau)) return kvt_fail(KVT_EINVAL, "tau: a finite value >= 0 expected (0 derives it)");
    if (!(p->tau_factor > 0) || !isfinite(p->tau_factor)) return kvt_fail(KVT_EINVAL, "tau_factor: a finite value > 0 expected");
    if (!(p->score_temp >= 0) || !isfinite(p->score_temp)) return kvt_fail(KVT_EINVAL, "score_temp: a finite value >= 0 expected");
    if (p->layout != KVT_LAYOUT_CLUSTERED && p->layout != KVT_LAYOUT_TOKEN)
        return kvt_fail(KVT_EINVAL, "layout: 0 (clustered) or 1 (token) expected, got %d", p->layout);
    if (p->policy == KVT_POLICY_LOCAL && (p->local_window < 2 || p->local_cluster_size < 1 || p->local_cluster_size > p->local_window))
        return kvt_fail(KVT_EINVAL, "local_window / local_cluster_size: 1 <= local_cluster_size <= local_window and local_window >= 2 expected");
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
    c->tau = p->tau;
    c->staging = KVT_NONE;
    kvt_layout_init(&c->L, p->dim, p->value_dim, p->dtype, p->max_cluster_size, KVT_FORMAT_VERSION,
                    p->layout != KVT_LAYOUT_TOKEN || p->policy == KVT_POLICY_NONE);
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
        /* the new file's directory entry must be durable before a catalog commit names it */
        if (!rc) rc = kvt_dir_sync(s->dir);
        if (rc) coll_forget(s, c);
        else *out = c;
    }
    UNLOCK(s);
    return rc;
}

uint64_t kvt_coll_count(const kvt_coll *c) {
    /* under the mutex (invariant 1): an add in another thread changes n */
    kvt_store *s = c->st;
    LOCK(s);
    uint64_t n = c->n;
    UNLOCK(s);
    return n;
}

/* ---- writing records to flash ------------------------------------------------------------ */

/* Where the records of an append come from: encoded on the fly from the caller's key and
 * value rows (add), or copied from records already in memory (split, pending flush). */
typedef struct rec_src {
    const uint32_t *members;    /* row numbers, encode mode */
    const uint8_t *keys, *values;
    int64_t first_id;
    const uint8_t *recs;        /* copy mode when not NULL */
    uint8_t *mrecs;             /* in-place mode: records in a buffer the writer may permute */
    const uint8_t *pre;         /* encode mode: npre records that come first (a pending buffer) */
    uint32_t npre;
} rec_src;

static void src_get(const kvt_coll *c, const rec_src *s, uint32_t j, uint8_t *dst) {
    const kvt_layout *L = &c->L;
    if (s->recs) {
        memcpy(dst, s->recs + (size_t)j * L->esz, L->esz);
        return;
    }
    if (j < s->npre) {
        memcpy(dst, s->pre + (size_t)j * L->esz, L->esz);
        return;
    }
    uint32_t r = s->members[j - s->npre];
    kvt_rec_encode(L, dst, s->first_id + r, s->keys + (size_t)r * L->key_bytes,
                   s->values + (size_t)r * L->value_bytes);
}

typedef struct undo { uint32_t cl, seg, run; int claimed; } undo;
typedef struct undo_log { undo *u; size_t n, cap; } undo_log;

/* Reverts the appends of a failed operation, newest first: heads it claimed are unclaimed. */
static void rollback(kvt_coll *c, undo_log *log) {
    while (log->n) {
        undo *u = &log->u[--log->n];
        kvt_cluster *k = &c->cl[u->cl];
        kvt_seg *sg = &k->segs[u->seg];
        sg->n -= u->run;
        c->pools.p[sg->pool].used[sg->head] -= u->run;
        if (u->claimed) {
            kvt_pools_unclaim(&c->pools, sg);
            k->nseg--;
        }
    }
}

/* 1 if writing n records as slots first.. of segment sg (first = its records count) programs a
 * flash page that already holds data: the page where the run meets the head's earlier records
 * (head 0 grows upward, head 1 downward), or one holding the other head's. Flash cannot update
 * a page in place, so each such write costs the device a read-modify-write of that page. In a
 * padded layout a run that starts a layout page meets nothing: its padding is the page's rest. */
static int rewrites_page(const kvt_coll *c, const kvt_seg *sg, const kvt_pool *pl, uint32_t first, uint32_t n) {
    const kvt_layout *L = &c->L;
    uint64_t P = c->st->io.dev.page_size > 0 ? (uint64_t)c->st->io.dev.page_size : KVT_IO_ALIGN;
    uint32_t p0 = kvt_run_pos(L, sg->head, first, n), p1 = p0 + n - 1;
    uint64_t base = kvt_pool_base(L, sg->pool), off = base + kvt_pos_rel(L, p0), end = base + kvt_pos_rel(L, p1) + L->esz;
    if (L->rpp && p1 % L->rpp == L->rpp - 1) end = kvt_round_up(end, KVT_LAYOUT_PAGE);
    uint64_t lo_page = kvt_round_down(off, P), hi_page = kvt_round_up(end, P);
    if (first && (sg->head == 0 ? off % P : end % P)) return 1;
    uint32_t other = pl->used[!sg->head];
    if (!other) return 0;
    uint64_t olo = kvt_run_offset(L, sg->pool, !sg->head, 0, other), ohi = olo + kvt_run_span(L, !sg->head, 0, other);
    return olo < hi_page && ohi > lo_page;
}

/* Writes n records, back to back in recs in file order, to the positions from p0 of a pool
 * whose position p0 is at file offset off: one write, with the page padding between them. */
static int write_positions(kvt_coll *c, uint64_t off, uint32_t p0, const uint8_t *recs, uint32_t n) {
    const kvt_layout *L = &c->L;
    if (!L->rpp) return kvt_file_write(c->f, off, recs, (size_t)n * L->esz);
    static const uint8_t zeros[KVT_LAYOUT_PAGE];
    kvt_wpart parts[128];
    size_t np = 0, pad = KVT_LAYOUT_PAGE - (size_t)L->rpp * L->esz;
    uint32_t in_page = p0 % L->rpp;
    while (n) {
        uint32_t k = L->rpp - in_page < n ? L->rpp - in_page : n;
        parts[np++] = (kvt_wpart){recs, (size_t)k * L->esz};
        recs += (size_t)k * L->esz;
        n -= k;
        in_page = 0;
        if (n && pad) parts[np++] = (kvt_wpart){zeros, pad};
        if (np >= 126 && n) { /* a long run: flush what is gathered, go on after it */
            size_t len = 0;
            for (size_t i = 0; i < np; i++) len += parts[i].len;
            int rc = kvt_file_writev(c->f, off, parts, np);
            if (rc) return rc;
            off += len;
            np = 0;
        }
    }
    return kvt_file_writev(c->f, off, parts, np);
}

/* Appends m records to cluster ci's flash segments (claiming heads as needed), through the
 * scratch buffer of scratch_recs records. Every append is logged for rollback. */
static int append_flash(kvt_coll *c, uint32_t ci, const rec_src *src, uint32_t m, uint8_t *scratch,
                        uint32_t scratch_recs, undo_log *log) {
    const kvt_layout *L = &c->L;
    uint32_t done = 0;
    while (done < m) {
        kvt_cluster *k = &c->cl[ci];
        int claimed = 0;
        if (log->n == log->cap) {
            size_t nc = log->cap ? log->cap * 2 : 64;
            undo *nl = realloc(log->u, nc * sizeof *nl);
            if (!nl) return kvt_fail(ENOMEM, "append: out of memory");
            log->u = nl;
            log->cap = nc;
        }
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
        if (!src->mrecs && run > scratch_recs) run = scratch_recs;
        uint64_t off = kvt_run_offset(L, sg->pool, sg->head, sg->n, run);
        uint32_t p0 = kvt_run_pos(L, sg->head, sg->n, run);
        int partial = rewrites_page(c, sg, pl, sg->n, run);
        int rc;
        if (src->mrecs) {
            /* records already in a buffer of ours: written in place (head 1 grows downward,
             * so its run is laid out last-first: reversed around the write), no scratch */
            uint8_t *p = src->mrecs + (size_t)done * L->esz;
            if (sg->head == 1) kvt_rec_reverse(L, p, run);
            rc = write_positions(c, off, p0, p, run);
            if (sg->head == 1) kvt_rec_reverse(L, p, run);
        } else {
            for (uint32_t j = 0; j < run; j++) {
                uint32_t pos = sg->head == 0 ? j : run - 1 - j;
                src_get(c, src, done + j, scratch + (size_t)pos * L->esz);
            }
            rc = write_positions(c, off, p0, scratch, run);
        }
        if (rc) {
            if (claimed) { /* the claim wrote nothing: undo it here, the log has no entry */
                kvt_pools_unclaim(&c->pools, sg);
                k->nseg--;
            }
            return rc;
        }
        sg->n += run;
        pl->used[sg->head] += run;
        c->ctr.partial_page_writes += (uint64_t)partial;
        c->modc++; /* the directory changed: kvt_coll_changed reports it */
        log->u[log->n++] = (undo){ci, k->nseg - 1, run, claimed};
        done += run;
    }
    return 0;
}

/* Scratch for appends: one pool's worth of records at most. */
static uint32_t scratch_records(const kvt_coll *c, uint64_t m) {
    return (uint32_t)(m < c->L.pool_cap ? (m ? m : 1) : c->L.pool_cap);
}

/* Writes whole new clusters: for each t, recs[t] (counts[t] records) become the only data of
 * cluster dst[t], which must own no segments. On failure every head claimed is given back. */
static int write_fresh(kvt_coll *c, const uint32_t *dst, uint8_t *const *recs, const uint32_t *counts,
                       uint32_t nt) {
    undo_log log = {0};
    int rc = 0;
    for (uint32_t t = 0; t < nt && !rc; t++) {
        rec_src src = {.mrecs = recs[t]}; /* the caller's buffers: written in place */
        rc = append_flash(c, dst[t], &src, counts[t], NULL, 0, &log);
    }
    if (rc) rollback(c, &log);
    free(log.u);
    return rc;
}

/* Moves cluster j's segments aside (to be retired or restored). */
typedef struct seg_save { kvt_seg *segs; uint32_t nseg, segcap; } seg_save;
static seg_save detach_segs(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    seg_save s = {k->segs, k->nseg, k->segcap};
    k->segs = NULL;
    k->nseg = k->segcap = 0;
    return s;
}
static void drop_segs(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    for (uint32_t g = 0; g < k->nseg; g++) kvt_pools_unclaim(&c->pools, &k->segs[g]);
    free_array(c, k->segs, k->segcap, sizeof(kvt_seg));
    k->segs = NULL;
    k->nseg = k->segcap = 0;
}
static void restore_segs(kvt_coll *c, uint32_t j, seg_save s) {
    drop_segs(c, j);
    kvt_cluster *k = &c->cl[j];
    k->segs = s.segs;
    k->nseg = s.nseg;
    k->segcap = s.segcap;
}
static void retire_segs(kvt_coll *c, seg_save s) {
    c->modc++;
    for (uint32_t g = 0; g < s.nseg; g++) kvt_pools_retire(&c->pools, &s.segs[g]);
    free_array(c, s.segs, s.segcap, sizeof(kvt_seg));
}

static void free_pending(kvt_coll *c, kvt_cluster *k) {
    c->pending_total -= k->pend;
    if (!k->flagged) c->tail_total -= k->pend;
    free_array(c, k->pbuf, k->pcap, c->L.esz);
    k->pbuf = NULL;
    k->pend = k->pcap = 0;
}

/* Writes cluster j's pending buffer to flash, in place (no scratch: a checkpoint or an
 * eviction can proceed when the budget is full), and frees it. On failure nothing changes. */
static int write_pending(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    if (!k->pend) return 0;
    undo_log log = {0};
    rec_src src = {.mrecs = k->pbuf};
    int rc = append_flash(c, j, &src, k->pend, NULL, 0, &log);
    if (rc) rollback(c, &log);
    else free_pending(c, k);
    free(log.u);
    return rc;
}

/* ---- page-aligned write buffers (DESIGN 2.2) ----------------------------------------------
 * An unflagged cluster's pending buffer is its tail: the entries appended since its flash part
 * last ended on a page boundary. An add writes whole pages (the tail, then the new entries)
 * and keeps the rest, fewer than a page's worth, in the tail; so a hot cluster programs each
 * flash page once. Each collection holds at most its share of the store's write_buffer in
 * tails; over it, the tails of the clusters appended to least recently are written out as
 * they are (cold clusters write directly). A checkpoint writes every tail. */

static inline int buffering(const kvt_coll *c) {
    return c->st->write_buffer && c->L.rpp && !token(c);
}

/* Records on the last, partly written page of cluster k's flash part, where its next append
 * lands (0 when that is a page start, or a new segment). */
static uint32_t tail_fill(const kvt_coll *c, const kvt_cluster *k) {
    if (!c->L.rpp || !k->nseg) return 0;
    const kvt_seg *sg = &k->segs[k->nseg - 1];
    if (!kvt_pool_room(&c->L, &c->pools.p[sg->pool])) return 0;
    return sg->n % c->L.rpp;
}

/* The collection's share of the write buffer, in records. */
static uint64_t tail_share(const kvt_coll *c) {
    return c->st->write_buffer / (c->st->ncolls ? c->st->ncolls : 1) / c->L.esz;
}

/* Writes out the least recently appended tails until the collection's share holds. */
static void trim_tails(kvt_coll *c) {
    uint64_t share = tail_share(c);
    while (c->tail_total > share) {
        uint32_t best = KVT_NONE;
        for (uint32_t j = 0; j < c->ncl; j++) {
            const kvt_cluster *k = &c->cl[j];
            if (k->pend && !k->flagged && (best == KVT_NONE || k->wtick < c->cl[best].wtick)) best = j;
        }
        if (best == KVT_NONE) break;
        if (write_pending(c, best)) { /* a failed write keeps it buffered, for later */
            c->ctr.write_buffer_errors++;
            break;
        }
        c->ctr.write_buffer_evictions++;
    }
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

/* One extent of a cluster to read: a segment (or a run of the token log), its bytes on flash
 * (len, page padding included), and where they land in the cluster's buffer: at byte boff,
 * the extents of a cluster stacked in segment order, to be packed to record `base` after. */
typedef struct extent {
    uint64_t off, len, boff;
    uint32_t nrec, base, slot;
} extent;

/* Bytes a buffer needs to read cluster k into: its segments' spans stacked, then its pending
 * records. */
static uint64_t read_buffer_bytes(const kvt_coll *c, const kvt_cluster *k) {
    uint64_t b = (uint64_t)(k->n - k->pend) * c->L.esz;
    if (!token(c))
        for (uint32_t g = 0; g < k->nseg; g++) b += kvt_run_span(&c->L, k->segs[g].head, 0, k->segs[g].n) - (uint64_t)k->segs[g].n * c->L.esz;
    return b + (uint64_t)k->pend * c->L.esz;
}
/* ... as a record count, for a cache entry */
static uint32_t read_buffer_records(const kvt_coll *c, const kvt_cluster *k) {
    return (uint32_t)((read_buffer_bytes(c, k) + c->L.esz - 1) / c->L.esz);
}

/* A cluster's segments, read as stacked by its extents, become its records in order in the
 * same buffer (padding dropped, head-1 runs put first-first) and are checked. */
static int finish_cluster(kvt_coll *c, uint32_t ci, uint8_t *buf) {
    const kvt_layout *L = &c->L;
    kvt_cluster *k = &c->cl[ci];
    if (token(c)) return k->n - k->pend ? check_run(c, ci, 0, buf, k->n - k->pend, token_offset(c, k->mem[0])) : 0;
    uint64_t boff = 0;
    uint32_t base = 0;
    int rc = 0;
    for (uint32_t g = 0; g < k->nseg && !rc; g++) {
        const kvt_seg *sg = &k->segs[g];
        if (!sg->n) continue;
        uint8_t *dst = buf + (size_t)base * L->esz;
        kvt_unpad(L, dst, buf + boff, kvt_run_pos(L, sg->head, 0, sg->n), sg->n);
        if (sg->head == 1) kvt_rec_reverse(L, dst, sg->n);
        rc = check_run(c, ci, base, dst, sg->n, kvt_run_offset(L, sg->pool, sg->head, 0, sg->n));
        boff += kvt_run_span(L, sg->head, 0, sg->n);
        base += sg->n;
    }
    return rc;
}

/* A merged read: extents a..e-1 (sorted by offset), and its buffer when it merges several. */
typedef struct run_plan { uint32_t a, e; uint8_t *run; } run_plan;

static int by_offset(const void *a, const void *b) {
    uint64_t x = ((const extent *)a)->off, y = ((const extent *)b)->off;
    return x < y ? -1 : x > y;
}

/* Copies extents a..e-1 out of `run` (a merged read starting at ex[a].off) to where they land
 * in their clusters' buffers. */
static void place_run(const extent *ex, uint32_t a, uint32_t e, const uint8_t *run, uint8_t *const *buf) {
    for (uint32_t t = a; t < e; t++) memcpy(buf[ex[t].slot] + ex[t].boff, run + (ex[t].off - ex[a].off), ex[t].len);
}

/* Reads extents a..e-1 (sorted by offset, gaps within the merge gap) as one request into
 * their clusters' buffers; its buffer is reserved for the call. */
static int read_run(kvt_coll *c, const extent *ex, uint32_t a, uint32_t e, uint8_t *const *buf) {
    kvt_store *s = c->st;
    uint64_t entries = 0;
    for (uint32_t t = a; t < e; t++) entries += ex[t].nrec;
    size_t len = (size_t)(ex[e - 1].off + ex[e - 1].len - ex[a].off);
    /* one extent is read straight into its cluster's buffer; several through a run buffer.
     * Either way a direct read's bounce buffer is reserved too. */
    int single = e == a + 1;
    uint64_t need = (single ? 0 : len) + kvt_file_read_scratch(c->f, ex[a].off, len);
    int rc = kvt_mem_reserve(&s->cache, need);
    if (rc) return rc;
    uint8_t *run = single ? buf[ex[a].slot] + ex[a].boff : malloc(len);
    if (!run) rc = kvt_fail(ENOMEM, "read: out of memory");
    if (!rc) rc = kvt_file_read(c->f, ex[a].off, len, run, entries);
    if (!rc && !single) place_run(ex, a, e, run, buf);
    if (!single) free(run);
    kvt_mem_release(&s->cache, need);
    return rc;
}

/* Calls fn(ctx, cluster, records, n) once per listed cluster with all its records in order:
 * from the cache, or from flash plus its pending buffer. Clusters are read in batches of
 * bounded bytes; within a batch their extents are sorted by offset and neighbours closer
 * than the store's merge gap become one read, so co-located clusters cost one I/O. A cluster
 * read from flash is cached when the budget allows. */
static int visit_clusters(kvt_coll *c, const uint32_t *list, uint32_t nlist, visit_fn fn, void *ctx) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    uint64_t max_batch = s->cache.budget / 4 > L->pool_bytes ? s->cache.budget / 4 : L->pool_bytes;
    int rc = 0;
    for (uint32_t i = 0; i < nlist && !rc;) {
        /* the batch: consecutive list entries up to max_batch bytes of misses */
        uint32_t end = i, nseg = 0;
        uint64_t bytes = 0;
        while (end < nlist) {
            kvt_cluster *k = &c->cl[list[end]];
            uint64_t b = k->ent ? 0 : read_buffer_bytes(c, k);
            if (end > i && bytes + b > max_batch) break;
            bytes += b;
            nseg += token(c) ? k->n : k->nseg; /* all: admitting one miss may evict a hit of this batch */
            end++;
        }
        uint32_t nb = end - i;
        uint64_t meta = (uint64_t)nb * (sizeof(uint8_t *) + sizeof(kvt_cache_ent *) + 8) +
                        (uint64_t)nseg * (sizeof(extent) + sizeof(run_plan) + sizeof(kvt_read_req));
        rc = kvt_mem_reserve(&s->cache, meta);
        if (rc) break;
        uint8_t **buf = calloc(nb, sizeof *buf);
        kvt_cache_ent **ent = calloc(nb, sizeof *ent);
        uint64_t *owned = calloc(nb, sizeof *owned);
        extent *ex = malloc((size_t)nseg * sizeof *ex + 1);
        run_plan *plan = malloc((size_t)nseg * sizeof *plan + 1);
        kvt_read_req *req = malloc((size_t)nseg * sizeof *req + 1);
        uint32_t nex = 0;
        if (!buf || !ent || !owned || !ex || !plan || !req) rc = kvt_fail(ENOMEM, "read: out of memory");
        /* hits go straight through; misses get a buffer (their cache entry if it fits) */
        for (uint32_t b = 0; b < nb && !rc; b++) {
            uint32_t ci = list[i + b];
            kvt_cluster *k = &c->cl[ci];
            if (k->ent) {
                s->cache.hits++;
                if (k->ent->prefetched) {
                    s->prefetch_hits++;
                    k->ent->prefetched = 0;
                }
                kvt_cache_touch(&s->cache, k->ent);
                fn(ctx, ci, k->ent->rec, k->ent->n);
                continue;
            }
            s->cache.misses++;
            if (!k->n) continue;
            ent[b] = kvt_cache_admit(&s->cache, c, ci, read_buffer_records(c, k), L->esz);
            if (ent[b]) {
                buf[b] = ent[b]->rec;
            } else {
                owned[b] = read_buffer_bytes(c, k);
                rc = kvt_mem_reserve(&s->cache, owned[b]);
                if (rc) {
                    owned[b] = 0;
                    break;
                }
                if (!(buf[b] = malloc(owned[b]))) rc = kvt_fail(ENOMEM, "read: out of memory");
            }
            uint32_t base = 0;
            uint64_t boff = 0;
            for (uint32_t g = 0; g < k->nseg; g++) {
                kvt_seg *sg = &k->segs[g];
                uint64_t len = kvt_run_span(L, sg->head, 0, sg->n);
                if (sg->n) ex[nex++] = (extent){kvt_run_offset(L, sg->pool, sg->head, 0, sg->n), len, boff, sg->n, base, b};
                base += sg->n;
                boff += len;
            }
            for (uint32_t i0 = 0; token(c) && i0 < k->n;) { /* runs of consecutive ids in the log */
                uint32_t i1 = token_run_end(k, i0);
                ex[nex++] = (extent){token_offset(c, k->mem[i0]), (uint64_t)(i1 - i0) * L->esz,
                                     (uint64_t)i0 * L->esz, i1 - i0, i0, b};
                i0 = i1;
            }
        }
        qsort(ex, nex, sizeof *ex, by_offset);
        /* merged reads: runs of extents whose gaps are all within the merge gap. When the
         * budget holds all of them at once they are issued together (one io_uring submission
         * where the kernel allows it: the device overlaps them); a run of one extent is read
         * straight into its cluster's buffer. Otherwise they are read one run at a time. */
        uint32_t nrun = 0;
        uint64_t all = 0;
        for (uint32_t a = 0; a < nex && !rc;) {
            uint32_t e = a + 1;
            uint64_t run_end = ex[a].off + ex[a].len, entries = ex[a].nrec;
            while (e < nex && ex[e].off >= run_end && ex[e].off - run_end <= s->merge_gap &&
                   ex[e].off + ex[e].len - ex[a].off <= max_batch) {
                run_end = ex[e].off + ex[e].len;
                entries += ex[e].nrec;
                e++;
            }
            size_t len = (size_t)(run_end - ex[a].off);
            plan[nrun] = (run_plan){a, e, NULL};
            req[nrun++] = (kvt_read_req){ex[a].off, len, NULL, entries};
            all += (e > a + 1 ? len : 0) + kvt_file_read_scratch(c->f, ex[a].off, len);
            a = e;
        }
        if (!rc && nrun > 1 && kvt_mem_reserve(&s->cache, all) == 0) { /* all at once */
            for (uint32_t r = 0; r < nrun && !rc; r++) {
                extent *x = &ex[plan[r].a];
                if (plan[r].e == plan[r].a + 1) {
                    req[r].dst = buf[x->slot] + x->boff;
                } else if (!(req[r].dst = plan[r].run = malloc(req[r].len))) {
                    rc = kvt_fail(ENOMEM, "read: out of memory");
                }
            }
            if (!rc) rc = kvt_file_read_batch(c->f, req, nrun);
            for (uint32_t r = 0; r < nrun; r++) {
                if (!rc && plan[r].run) place_run(ex, plan[r].a, plan[r].e, plan[r].run, buf);
                free(plan[r].run);
            }
            kvt_mem_release(&s->cache, all);
            nex = 0; /* done: skip the one-at-a-time loop */
        }
        for (uint32_t r = 0; r < nrun && nex && !rc; r++) {
            rc = read_run(c, ex, plan[r].a, plan[r].e, buf);
            if (rc == KVT_EBUDGET && plan[r].e > plan[r].a + 1) { /* no room to merge: one at a time */
                rc = 0;
                for (uint32_t t = plan[r].a; t < plan[r].e && !rc; t++) rc = read_run(c, ex, t, t + 1, buf);
            }
        }
        /* pending entries complete each cluster; then hand it over and cache or free it */
        for (uint32_t b = 0; b < nb; b++) {
            if (!buf[b]) continue;
            uint32_t ci = list[i + b];
            kvt_cluster *k = &c->cl[ci];
            if (!rc) rc = finish_cluster(c, ci, buf[b]);
            if (!rc && k->pend)
                memcpy(buf[b] + (size_t)(k->n - k->pend) * L->esz, k->pbuf, (size_t)k->pend * L->esz);
            if (!rc) fn(ctx, ci, buf[b], k->n);
            if (ent[b]) {
                if (rc) {
                    kvt_cache_drop(&s->cache, ent[b]);
                } else {
                    ent[b]->n = k->n;
                    ent[b]->pins--;
                    k->ent = ent[b];
                }
            } else if (owned[b]) {
                free(buf[b]);
                kvt_mem_release(&s->cache, owned[b]);
            }
        }
        free(buf);
        free(ent);
        free(owned);
        free(ex);
        free(plan);
        free(req);
        kvt_mem_release(&s->cache, meta);
        i = end;
    }
    return rc;
}

static int visit_cluster(kvt_coll *c, uint32_t ci, visit_fn fn, void *ctx) {
    return visit_clusters(c, &ci, 1, fn, ctx);
}

typedef struct collect_ctx { uint8_t *dst; size_t esz; } collect_ctx;
static void collect(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    collect_ctx *x = vctx;
    memcpy(x->dst, recs, (size_t)n * x->esz);
    x->dst += (size_t)n * x->esz;
}

/* All records of cluster j in one buffer: the cached copy, pinned (*pinned), or a reserved
 * buffer read from flash (*owned = its bytes; those reads are counted as a split's). */
static int load_records(kvt_coll *c, uint32_t j, uint8_t **recs, uint64_t *owned, kvt_cache_ent **pinned,
                        uint64_t *read_bytes) {
    kvt_cluster *k = &c->cl[j];
    *owned = 0;
    *pinned = NULL;
    if (!k->ent) {
        uint64_t bytes = (uint64_t)k->n * c->L.esz;
        int rc = kvt_mem_reserve(&c->st->cache, bytes);
        if (rc) return rc;
        uint8_t *buf = malloc(bytes ? bytes : 1);
        if (!buf) {
            kvt_mem_release(&c->st->cache, bytes);
            return kvt_fail(ENOMEM, "split: out of memory");
        }
        kvt_io_stats before, after;
        kvt_io_stats_get(&c->st->io, &before);
        collect_ctx x = {buf, c->L.esz};
        rc = visit_cluster(c, j, collect, &x);
        kvt_io_stats_get(&c->st->io, &after);
        *read_bytes += after.read_bytes - before.read_bytes;
        if (rc || k->ent) { /* failed, or the visit cached it after all: use that copy */
            free(buf);
            kvt_mem_release(&c->st->cache, bytes);
            if (rc) return rc;
        } else {
            *recs = buf;
            *owned = bytes;
            return 0;
        }
    }
    k->ent->pins++;
    *pinned = k->ent;
    *recs = k->ent->rec;
    return 0;
}

/* Undoes load_records. `consumed`: a regroup replaced the cluster, which freed the pinned
 * cache entry along with the old cluster. */
static void release_records(kvt_coll *c, uint8_t *recs, uint64_t owned, kvt_cache_ent *pinned, int consumed) {
    if (owned) {
        free(recs);
        kvt_mem_release(&c->st->cache, owned);
    }
    if (pinned && !consumed) pinned->pins--;
}

/* ---- the clustering policies ------------------------------------------------------------- */

static int wants_split(const kvt_coll *c, const kvt_cluster *k) {
    if (c->p.policy != KVT_POLICY_ADAPTIVE || k->n < 2 || k->n < k->hold + k->hold / 2) return 0;
    return k->n > c->p.max_cluster_size || (c->tau > 0 && variance(k) > c->tau);
}

static void maybe_flag(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    if (!k->flagged && wants_split(c, k)) {
        c->tail_total -= k->pend; /* its tail, if any, now waits for the split */
        k->flagged = 1;
        if (!k->ent) c->ctr.deferred_splits++;
    }
}

/* tau from the partition in force: tau_factor x the median variance of clusters of 2+. */
static void derive_tau(kvt_coll *c) {
    if (c->p.policy != KVT_POLICY_ADAPTIVE || c->tau > 0) return;
    double *v = malloc((size_t)c->ncl * sizeof *v + 8);
    uint32_t m = 0;
    if (!v) return; /* retried after the next add */
    for (uint32_t j = 0; j < c->ncl; j++)
        if (c->cl[j].n >= 2) v[m++] = variance(&c->cl[j]);
    if (m) {
        /* insertion sort is fine: this runs once per collection, on the first partition */
        for (uint32_t i = 1; i < m; i++)
            for (uint32_t t = i; t > 0 && v[t - 1] > v[t]; t--) {
                double x = v[t];
                v[t] = v[t - 1];
                v[t - 1] = x;
            }
        double med = m % 2 ? v[m / 2] : 0.5 * (v[m / 2 - 1] + v[m / 2]);
        if (med > 0) c->tau = c->p.tau_factor * med;
    }
    free(v);
}

/* Replaces cluster `src` (whose records, in order, are `recs`) by nt clusters: group t gets
 * the records with part[i] == t. Group 0 keeps the index src; the others take new slots.
 * Copy on write: the groups go to fresh heads, then src's old heads are retired. The new
 * clusters are cached when the budget allows (they were just updated: likely read soon).
 * *first_new receives the first new slot. */
static int regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt,
                   uint32_t *first_new) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    uint32_t n = c->cl[src].n, ncl0 = c->ncl;
    uint64_t bytes = (uint64_t)n * L->esz, extra = (uint64_t)nt * (sizeof(uint8_t *) + 12) + (uint64_t)c->p.dim * 4;
    int rc = kvt_mem_reserve(&s->cache, bytes + extra);
    if (rc) return rc;
    uint8_t *sorted = malloc(bytes + 8), **grp = calloc(nt, sizeof *grp);
    uint32_t *cnt = calloc(nt, 4), *dst = calloc(nt, 4), *wcnt = NULL;
    struct { uint8_t *p; uint64_t cap; } *tails = NULL; /* the groups' tails, until installed */
    float *x = malloc((size_t)c->p.dim * 4);
    if (!sorted || !grp || !cnt || !dst || !x) rc = kvt_fail(ENOMEM, "split: out of memory");
    /* group the records, keeping their order inside each group */
    if (!rc) {
        for (uint32_t i = 0; i < n; i++) cnt[part[i]]++;
        size_t off = 0;
        for (uint32_t t = 0; t < nt; t++) {
            grp[t] = sorted + off * L->esz;
            off += cnt[t];
        }
        uint32_t *fill = calloc(nt, 4);
        if (!fill) rc = kvt_fail(ENOMEM, "split: out of memory");
        for (uint32_t i = 0; !rc && i < n; i++) {
            uint32_t t = part[i];
            memcpy(grp[t] + (size_t)fill[t]++ * L->esz, recs + (size_t)i * L->esz, L->esz);
        }
        free(fill);
    }
    dst[0] = src;
    for (uint32_t t = 1; t < nt && !rc; t++) rc = new_cluster(c, &dst[t]);
    /* with write buffers, a group's last partial page stays in DRAM as its tail, so that the
     * group's next appends complete that page instead of programming it a second time */
    if (!rc && buffering(c) && (!(tails = calloc(nt, sizeof *tails)) || !(wcnt = calloc(nt, 4))))
        rc = kvt_fail(ENOMEM, "split: out of memory");
    for (uint32_t t = 0; tails && t < nt && !rc; t++) {
        wcnt[t] = cnt[t];
        if (!(cnt[t] % L->rpp)) continue;
        wcnt[t] = cnt[t] - cnt[t] % L->rpp;
        rc = grow_array(c, (void **)&tails[t].p, L->esz, &tails[t].cap, cnt[t] - wcnt[t]);
    }
    seg_save old = detach_segs(c, src);
    if (token(c)) /* the records stay where they are in the log: only member lists change */
        for (uint32_t t = 1; t < nt && !rc; t++) rc = ensure_mem(c, &c->cl[dst[t]], cnt[t]);
    else if (!rc)
        rc = write_fresh(c, dst, grp, tails ? wcnt : cnt, nt);
    if (!rc) kvt_kill_point("split.written");
    if (rc) {
        restore_segs(c, src, old);
        c->ncl = ncl0;
        goto out;
    }
    retire_segs(c, old);
    kvt_cluster *k = &c->cl[src];
    free_pending(c, k);
    if (k->ent) {
        kvt_cache_drop(&s->cache, k->ent);
        k->ent = NULL;
    }
    for (uint32_t t = 0; t < nt; t++) {
        uint32_t j = dst[t];
        kvt_cluster *kj = &c->cl[j];
        stats_from_records(c, j, grp[t], cnt[t], x);
        kj->flagged = kj->hold = 0;
        if (tails && tails[t].p) {
            kj->pend = cnt[t] - wcnt[t];
            memcpy(tails[t].p, grp[t] + (size_t)wcnt[t] * L->esz, (size_t)kj->pend * L->esz);
            kj->pbuf = tails[t].p;
            kj->pcap = (uint32_t)tails[t].cap;
            tails[t].p = NULL; /* the cluster's now */
            kj->wtick = c->wclock;
            c->pending_total += kj->pend;
            c->tail_total += kj->pend;
        }
        for (uint32_t i = 0; i < cnt[t]; i++) {
            int64_t id;
            memcpy(&id, grp[t] + (size_t)i * L->esz, 8);
            set_loc(c, (uint64_t)id, j, i);
            if (token(c)) kj->mem[i] = (uint32_t)id;
        }
        kvt_cache_ent *e = kvt_cache_admit(&s->cache, c, j, cnt[t], L->esz);
        if (e) {
            memcpy(e->rec, grp[t], (size_t)cnt[t] * L->esz);
            e->n = cnt[t];
            e->pins--;
            kvt_cache_updated(&s->cache, e);
            kj->ent = e;
        }
    }
    c->ctr.splits++;
    for (uint32_t t = 0; t < nt && !token(c); t++) c->ctr.split_write_bytes += (uint64_t)(tails ? wcnt[t] : cnt[t]) * L->esz;
    *first_new = ncl0;
out:
    for (uint32_t t = 0; tails && t < nt; t++)
        if (tails[t].p) free_array(c, tails[t].p, tails[t].cap, L->esz);
    free(tails);
    free(wcnt);
    free(sorted);
    free(grp);
    free(cnt);
    free(dst);
    free(x);
    kvt_mem_release(&s->cache, bytes + extra);
    return rc;
}

/* Splits cluster j in two by 2-means over its records. Returns 1 if it split, 0 if the
 * records form no two groups (the cluster then waits to grow by half), or an error. */
static int split_cluster(kvt_coll *c, uint32_t j, const uint8_t *recs) {
    kvt_cluster *k = &c->cl[j];
    uint32_t n = k->n;
    /* A split adds a representative and moves data through DRAM; under a budget nearly
     * filled by what cannot be evicted it would starve reads, so it waits (counted). */
    kvt_cache *ch = &c->st->cache;
    uint64_t pinned_bytes = ch->used - ch->cache_bytes;
    uint64_t need = 2ull * n * c->L.esz + (uint64_t)c->p.dim * 16 + sizeof(kvt_cluster) + 256;
    if (pinned_bytes + need > ch->budget - ch->budget / 4) {
        c->ctr.split_skipped++;
        return 0;
    }
    uint64_t tmp = (uint64_t)n * 4 + 2ull * c->p.dim * 4 + kvt_kmeans_bytes(n, 2, c->p.dim);
    int rc = kvt_mem_reserve(&c->st->cache, tmp);
    if (rc) return rc;
    uint32_t *part = malloc((size_t)n * 4);
    float *cent = malloc(2ull * c->p.dim * 4);
    if (!part || !cent) rc = kvt_fail(ENOMEM, "split: out of memory");
    if (!rc)
        rc = kvt_kmeans(c->st->K, c->p.dtype, recs + KVT_REC_HEADER, c->p.dim, c->L.esz, NULL, n, 2,
                        c->p.kmeans_iters, c->p.seed + j, cent, part);
    int split = 0;
    if (!rc) {
        uint32_t ones = 0;
        for (uint32_t i = 0; i < n; i++) ones += part[i];
        if (ones == 0 || ones == n) {
            if (k->flagged) c->tail_total += k->pend; /* what waited is a tail again */
            k->flagged = 0;
            k->hold = n;
            c->ctr.unsplittable++;
        } else {
            uint32_t first_new;
            rc = regroup(c, j, recs, part, 2, &first_new);
            split = !rc;
        }
    }
    free(part);
    free(cent);
    kvt_mem_release(&c->st->cache, tmp);
    return rc ? rc : split;
}

/* Splits flagged clusters that are in DRAM, starting from `list`, and their children while
 * they still want it. Split failures leave the cluster flagged (counted), never the caller's
 * operation failed: the entries are safe either way. */
static void split_in_dram(kvt_coll *c, const uint32_t *list, uint32_t nlist) {
    uint32_t stack[64], top = 0;
    for (uint32_t i = 0; i < nlist; i++) {
        uint32_t j = list[i];
        if (j < c->ncl && c->cl[j].flagged && c->cl[j].ent && top < 62) stack[top++] = j;
        while (top) {
            uint32_t s = stack[--top];
            kvt_cluster *k = &c->cl[s];
            if (!k->flagged || !k->ent) continue;
            uint32_t before = c->ncl;
            kvt_cache_ent *pinned = k->ent;
            pinned->pins++;
            int rc = split_cluster(c, s, pinned->rec);
            release_records(c, NULL, 0, pinned, rc == 1);
            if (rc < 0 || rc > 1) {
                c->ctr.split_errors++;
                continue;
            }
            if (rc == 1) {
                maybe_flag(c, s);
                if (c->ncl > before) maybe_flag(c, before);
                if (c->cl[s].flagged && top < 62) stack[top++] = s;
                if (c->ncl > before && c->cl[before].flagged && top < 62) stack[top++] = before;
            }
        }
    }
}

/* Pending budget overflow: load and split the cluster with the most pending entries until
 * the budget holds. A cluster that cannot split has its pending entries written instead. */
static void relieve_pending(kvt_coll *c) {
    /* every round removes one cluster's pending entries or stops */
    while (c->pending_total - c->tail_total > c->p.pending_budget) {
        uint32_t best = KVT_NONE, most = 0;
        for (uint32_t j = 0; j < c->ncl; j++)
            if (c->cl[j].flagged && c->cl[j].pend > most) {
                most = c->cl[j].pend;
                best = j;
            }
        if (best == KVT_NONE) break;
        uint8_t *recs;
        uint64_t owned;
        kvt_cache_ent *pinned;
        c->ctr.forced_loads++;
        int rc = load_records(c, best, &recs, &owned, &pinned, &c->ctr.split_read_bytes);
        if (!rc) {
            rc = split_cluster(c, best, recs);
            release_records(c, recs, owned, pinned, rc == 1);
        }
        if (rc == 1) {
            uint32_t two[2] = {best, c->ncl - 1};
            maybe_flag(c, two[0]);
            maybe_flag(c, two[1]);
            split_in_dram(c, two, 2);
            continue;
        }
        if (rc < 0 || rc > 1) c->ctr.split_errors++;
        /* not split: write its pending entries so the budget holds */
        if (write_pending(c, best)) break; /* could not write: stop rather than loop */
    }
}

/* Local policy: the staging cluster reached its window: cluster its entries on their own. */
static int recluster_staging(kvt_coll *c) {
    uint32_t s = c->staging, n = c->cl[s].n;
    uint32_t k = (n + c->p.local_cluster_size - 1) / c->p.local_cluster_size;
    uint8_t *recs;
    uint64_t owned;
    kvt_cache_ent *pinned;
    int rc = load_records(c, s, &recs, &owned, &pinned, &c->ctr.split_read_bytes);
    if (rc) return rc;
    uint64_t tmp = (uint64_t)n * 4 + (uint64_t)k * (c->p.dim * 4 + 4) + kvt_kmeans_bytes(n, k, c->p.dim);
    rc = kvt_mem_reserve(&c->st->cache, tmp);
    if (rc) {
        release_records(c, recs, owned, pinned, 0);
        return rc;
    }
    uint32_t *part = malloc((size_t)n * 4), *map = calloc(k, 4), used = 0;
    float *cent = malloc((size_t)k * c->p.dim * 4);
    if (!part || !cent || !map) rc = kvt_fail(ENOMEM, "recluster: out of memory");
    if (!rc)
        rc = kvt_kmeans(c->st->K, c->p.dtype, recs + KVT_REC_HEADER, c->p.dim, c->L.esz, NULL, n, k,
                        c->p.kmeans_iters, c->p.seed + c->ctr.splits, cent, part);
    if (!rc) {
        /* renumber the parts that got points, so that every new cluster is non-empty */
        for (uint32_t i = 0; i < n; i++) map[part[i]] = 1;
        for (uint32_t t = 0; t < k; t++) map[t] = map[t] ? used++ : 0;
        for (uint32_t i = 0; i < n; i++) part[i] = map[part[i]];
        uint32_t first_new;
        rc = regroup(c, s, recs, part, used, &first_new);
        if (!rc) c->staging = KVT_NONE;
    }
    release_records(c, recs, owned, pinned, rc == 0);
    free(part);
    free(map);
    free(cent);
    kvt_mem_release(&c->st->cache, tmp);
    return rc;
}

/* ---- add ---------------------------------------------------------------------------------- */

/* Runs `call` (an int expression using c) on collection c under the store mutex, once c is
 * ready. A call that failed for want of budget while reads were in flight (their buffers are
 * pinned until they land) waits for them and runs once more: a failed add, retrieve or
 * search changes nothing a second run depends on. Sets rc. */
#define RUN_READY(c, call)                                                                   \
    do {                                                                                     \
        LOCK((c)->st);                                                                       \
        rc = ready(c);                                                                       \
        if (!rc) rc = (call);                                                                \
        if (rc == KVT_EBUDGET && (c)->st->loading_bytes) {                                   \
            while ((c)->st->loading_bytes) pthread_cond_wait(&(c)->st->done_cv, &(c)->st->mu); \
            kvt_clear_error();                                                               \
            rc = ready(c);                                                                   \
            if (!rc) rc = (call);                                                            \
        }                                                                                    \
        UNLOCK((c)->st);                                                                     \
    } while (0)

static int add_locked(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_store *s = c->st;
    const kvt_kernels *K = s->K;
    const kvt_layout *L = &c->L;
    int rc = 0;
    uint32_t *assign = NULL, *order = NULL, *start = NULL, *wnow = NULL;
    uint8_t *scratch = NULL, *topend = NULL;
    float *cent = NULL, *x = NULL;
    undo_log log = {0};
    uint64_t transient = 0, n0 = c->n;
    uint32_t ncl0 = c->ncl, staging0 = c->staging;
    int first_batch = 0;
    if (n > UINT32_MAX || n0 + n > ((uint64_t)1 << 40) || (token(c) && n0 + n > KVT_TOKEN_MAX_ENTRIES)) {
        rc = kvt_fail(KVT_EINVAL, "add: too many entries at once (%llu)", (unsigned long long)n);
        goto out;
    }
    rc = ensure_ids(c, n0 + n);
    if (rc) goto out;

    /* 1. assignment */
    uint32_t k = 0;
    uint64_t kmb = 0;
    int policy = c->p.policy;
    if (policy != KVT_POLICY_NONE && c->ncl == 0) {
        first_batch = 1;
        k = (uint32_t)((n + c->p.init_cluster_size - 1) / c->p.init_cluster_size);
        kmb = kvt_kmeans_bytes(n, k, c->p.dim) + (uint64_t)k * c->p.dim * 4;
    }
    /* scratch for one write: the new entries, with a tail before them (up to a page) */
    uint32_t sr = scratch_records(c, n + L->rpp);
    uint64_t nk = (uint64_t)(first_batch ? k : c->ncl) + 2;
    transient = n * 8 + kmb + (uint64_t)sr * L->esz + (uint64_t)c->p.dim * 4 + nk * 9;
    rc = kvt_mem_reserve(&s->cache, transient);
    if (rc) {
        transient = 0;
        goto out;
    }
    assign = malloc(n * 4);
    order = malloc(n * 4);
    scratch = malloc((size_t)sr * L->esz);
    x = malloc((size_t)c->p.dim * 4);
    if (!assign || !order || !scratch || !x) {
        rc = kvt_fail(ENOMEM, "add: out of memory");
        goto out;
    }
    if (policy == KVT_POLICY_NONE) {
        /* no clustering: one chain of entries in token order, keys also kept for scoring */
        if (c->ncl == 0 && (rc = new_cluster(c, &k))) goto out;
        memset(assign, 0, n * 4);
        k = 1;
    } else if (first_batch) {
        cent = malloc((size_t)k * c->p.dim * 4);
        if (!cent) {
            rc = kvt_fail(ENOMEM, "add: out of memory");
            goto out;
        }
        rc = kvt_kmeans(K, c->p.dtype, keys, c->p.dim, L->key_bytes, NULL, n, k, c->p.kmeans_iters, c->p.seed, cent, assign);
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
        for (uint32_t j = 0; j < kept && !rc; j++) {
            uint32_t slot;
            rc = new_cluster(c, &slot);
        }
        if (rc) goto fail;
        k = kept;
    } else if (policy == KVT_POLICY_LOCAL) {
        if (c->staging == KVT_NONE && (rc = new_cluster(c, &c->staging))) goto fail;
        for (uint64_t i = 0; i < n; i++) assign[i] = c->staging;
        k = c->ncl;
    } else {
        k = c->ncl;
        for (uint64_t i = 0; i < n; i++)
            assign[i] = kvt_nearest(K, c->p.dtype, (const uint8_t *)keys + i * L->key_bytes, c->cent,
                                    c->cnorm, c->ncl, c->p.dim);
    }

    /* 2. group by cluster (counting sort keeps id order inside a cluster) */
    start = calloc((size_t)k + 1, 4);
    topend = calloc((size_t)k + 1, 1);
    wnow = calloc((size_t)k + 1, 4);
    if (!start || !topend || !wnow) {
        rc = kvt_fail(ENOMEM, "add: out of memory");
        goto fail;
    }
    for (uint64_t i = 0; i < n; i++) start[assign[i] + 1]++;
    for (uint32_t j = 0; j < k; j++) start[j + 1] += start[j];
    for (uint64_t i = 0; i < n; i++) order[start[assign[i]]++] = (uint32_t)i;
    for (uint32_t j = k; j > 0; j--) start[j] = start[j - 1];
    start[0] = 0;

    /* 3. entries joining a flagged cluster that is on flash wait in DRAM (adaptive); the
     *    others are written now, all of them, or with a write buffer up to the last whole
     *    page, the rest staying in the cluster's tail (wnow[j]: how many of its tail and
     *    then new entries are written). Room is made first, so that nothing can fail after
     *    the writes. A cluster's records are its flash segments followed by its pending
     *    buffer: once it has pending entries, later ones queue behind them. */
    uint64_t new_room = buffering(c) ? tail_share(c) : 0;
    for (uint32_t j = 0; j < k && !rc; j++) {
        uint32_t m = start[j + 1] - start[j];
        kvt_cluster *cl = &c->cl[j];
        if (m && token(c)) {
            rc = ensure_mem(c, cl, cl->n + m); /* token layout: nothing waits, records go to the log */
        } else if (m && cl->flagged && (cl->pend || (policy == KVT_POLICY_ADAPTIVE && !cl->ent))) {
            topend[j] = 1;
            rc = ensure_pbuf(c, cl, cl->pend + m);
        } else if (m) {
            uint64_t total = (uint64_t)cl->pend + m, w = total;
            if (buffering(c)) { /* whole pages, counting the flash part's last page */
                uint64_t f = tail_fill(c, cl), pages = (f + total) / L->rpp;
                w = pages * L->rpp > f ? pages * L->rpp - f : 0;
                /* a cluster with a tail keeps it (it is hot); new tails of one add take at
                 * most the share, so a large add writes most clusters directly. Older tails
                 * make room afterwards (trim_tails), least recently appended first. */
                if (!cl->pend && total - w > new_room) w = total;
                else if (!cl->pend) new_room -= total - w;
            }
            wnow[j] = (uint32_t)w;
            if (w < total) {
                topend[j] = 1;
                rc = ensure_pbuf(c, cl, (uint32_t)(total - w));
            }
        }
        if (m && cl->ent && kvt_cache_grow(&s->cache, cl->ent, m)) {
            kvt_cache_drop(&s->cache, cl->ent);
            cl->ent = NULL;
        }
    }
    if (rc) goto fail;

    /* 4. write every record bound for flash before touching what readers see */
    for (uint32_t j = 0; j < k && !rc && !token(c); j++) {
        kvt_cluster *cl = &c->cl[j];
        rec_src src = {order + start[j], keys, values, (int64_t)n0, NULL, NULL, cl->pbuf,
                       wnow[j] < cl->pend ? wnow[j] : cl->pend};
        if (wnow[j]) rc = append_flash(c, j, &src, wnow[j], scratch, sr, &log);
    }
    for (uint64_t at = 0; at < n && !rc && token(c);) { /* the log, in id order */
        uint64_t cnt = n - at < sr ? n - at : sr, off = token_offset(c, n0 + at);
        uint64_t P = s->io.dev.page_size > 0 ? (uint64_t)s->io.dev.page_size : KVT_IO_ALIGN;
        for (uint64_t r = at; r < at + cnt; r++)
            kvt_rec_encode(L, scratch + (size_t)(r - at) * L->esz, (int64_t)(n0 + r),
                           (const uint8_t *)keys + (size_t)r * L->key_bytes, (const uint8_t *)values + (size_t)r * L->value_bytes);
        rc = kvt_file_write(c->f, off, scratch, (size_t)cnt * L->esz);
        if (!rc && off % P && n0 + at > 0) c->ctr.partial_page_writes++;
        at += cnt;
    }
    if (rc) {
        rollback(c, &log);
        goto fail;
    }
    kvt_kill_point("add.written");

    /* 5. metadata: id map, running means and variances, cached copies, pending buffers */
    c->wclock++;
    for (uint32_t j = 0; j < k; j++) {
        uint32_t m = start[j + 1] - start[j];
        if (!m) continue;
        kvt_cluster *cl = &c->cl[j];
        float *mean = c->cent + (size_t)j * c->p.dim;
        /* the tail entries just written leave the tail; so do the new ones written */
        uint32_t from_tail = wnow[j] < cl->pend ? wnow[j] : cl->pend, written_new = wnow[j] - from_tail;
        if (from_tail) {
            memmove(cl->pbuf, cl->pbuf + (size_t)from_tail * L->esz, (size_t)(cl->pend - from_tail) * L->esz);
            cl->pend -= from_tail;
            c->pending_total -= from_tail;
            c->tail_total -= from_tail;
        }
        cl->wtick = c->wclock;
        for (uint32_t t = 0; t < m; t++) {
            uint32_t r = order[start[j] + t];
            const uint8_t *key = (const uint8_t *)keys + (size_t)r * L->key_bytes;
            const uint8_t *val = (const uint8_t *)values + (size_t)r * L->value_bytes;
            if (cl->mem && token(c)) cl->mem[cl->n] = (uint32_t)(n0 + r);
            set_loc(c, n0 + r, j, cl->n);
            if (!first_batch) c->ctr.naive_move_bytes += (uint64_t)cl->n * L->esz;
            kvt_key_to_f32(K, c->p.dtype, key, x, c->p.dim);
            kvt_welford_add(mean, &cl->m2, c->m2d ? c->m2d + (size_t)j * c->p.dim : NULL, cl->n, x, c->p.dim);
            kvt_vsum_add(c, j, val); /* estimate.c: written and pending entries alike */
            cl->n++;
            if (topend[j] && t >= written_new) {
                kvt_rec_encode(L, cl->pbuf + (size_t)cl->pend++ * L->esz, (int64_t)(n0 + r), key, val);
                c->pending_total++;
                if (!cl->flagged) c->tail_total++;
            }
            if (cl->ent) {
                kvt_rec_encode(L, cl->ent->rec + (size_t)cl->ent->n * L->esz, (int64_t)(n0 + r), key, val);
                cl->ent->n++;
                kvt_cache_updated(&s->cache, cl->ent);
            }
        }
        if (!cl->pend && cl->pbuf) free_pending(c, cl); /* a tail written out whole: its buffer goes */
        update_norm(c, j);
    }
    if (policy == KVT_POLICY_NONE) memcpy(c->keys + n0 * L->key_bytes, keys, n * L->key_bytes);
    c->n = n0 + n;
    c->ctr.append_bytes += n * L->esz;
    *first_id = (int64_t)n0;

    /* 6. policy upkeep, which never fails the add: its entries are in place either way */
    kvt_mem_release(&s->cache, transient);
    transient = 0;
    if (policy == KVT_POLICY_ADAPTIVE) {
        derive_tau(c);
        uint32_t nt = 0;
        for (uint32_t j = 0; j < k; j++)
            if (start[j + 1] > start[j]) {
                maybe_flag(c, j);
                if (c->cl[j].flagged && c->cl[j].ent) order[nt++] = j; /* order is free now */
            }
        split_in_dram(c, order, nt);
        relieve_pending(c);
    } else if (policy == KVT_POLICY_LOCAL && c->staging != KVT_NONE && c->cl[c->staging].n >= c->p.local_window) {
        if (recluster_staging(c)) c->ctr.split_errors++;
    }
    trim_tails(c);
    goto out;
fail:
    /* pending buffers step 3 made that nothing went into go back to the budget */
    for (uint32_t j = 0; j < c->ncl; j++)
        if (c->cl[j].pbuf && !c->cl[j].pend) free_pending(c, &c->cl[j]);
    for (uint32_t j = ncl0; j < c->ncl; j++) drop_segs(c, j);
    c->ncl = ncl0;
    c->staging = staging0;
out:
    free(assign);
    free(order);
    free(start);
    free(topend);
    free(wnow);
    free(cent);
    free(x);
    free(scratch);
    free(log.u);
    kvt_mem_release(&s->cache, transient);
    return rc;
}

int kvt_coll_add(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_clear_error();
    if (!keys || (!values && c->p.value_dim) || n == 0) return kvt_fail(KVT_EINVAL, "add: keys/values must be non-empty");
    int rc;
    RUN_READY(c, add_locked(c, keys, values, n, first_id));
    return rc;
}

/* ---- scoring ------------------------------------------------------------------------------ */

/* Each cluster's score against a query group: the best over the group (GQA). q2 is scratch
 * for nq * dim floats (the squared queries, when score_temp > 0). */
static void score_clusters(kvt_coll *c, const float *q, uint64_t nq, float *scores, float *q2) {
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim;
    float half_t = (float)(0.5 * c->p.score_temp);
    if (half_t > 0)
        for (uint64_t i = 0; i < nq * d; i++) q2[i] = q[i] * q[i];
    for (uint32_t j = 0; j < c->ncl; j++) {
        const float *r = c->cent + (size_t)j * d;
        float best = -FLT_MAX, inv_n = c->cl[j].n ? 1.0f / (float)c->cl[j].n : 0;
        for (uint64_t i = 0; i < nq; i++) {
            const float *qi = q + i * d;
            float sc = K->dot_f32(qi, r, d);
            if (c->p.metric == KVT_METRIC_L2) sc = 2 * sc - c->cnorm[j] - K->dot_f32(qi, qi, d);
            if (half_t > 0) sc += half_t * inv_n * K->dot_f32(q2 + i * d, c->m2d + (size_t)j * d, d);
            if (sc > best) best = sc;
        }
        scores[j] = c->cl[j].n ? best : -FLT_MAX;
    }
}

/* Score of one stored key against a query, by the collection's metric. */
static inline float entry_score(kvt_coll *c, const void *key, const float *qv, float *x) {
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim;
    if (c->p.metric == KVT_METRIC_L2) {
        kvt_key_to_f32(K, c->p.dtype, key, x, d);
        return 2 * K->dot_f32(x, qv, d) - K->dot_f32(x, x, d) - K->dot_f32(qv, qv, d);
    }
    return kvt_dot_key(K, c->p.dtype, key, qv, d);
}

static const float *sort_scores;
static int by_score_desc(const void *a, const void *b) {
    float x = sort_scores[*(const uint32_t *)a], y = sort_scores[*(const uint32_t *)b];
    if (x != y) return x < y ? 1 : -1;
    return *(const uint32_t *)a < *(const uint32_t *)b ? -1 : 1;
}

/* Sorts indices by descending score (ties by index, so the order is total). Runs under the
 * store mutex, which also guards the comparator's static. */
static void order_by_score(uint32_t *idx, uint32_t n, const float *scores) {
    for (uint32_t i = 0; i < n; i++) idx[i] = i;
    sort_scores = scores;
    qsort(idx, n, sizeof *idx, by_score_desc);
}

/* Puts the m best indices (descending score, ties by index) first, in order, without
 * sorting the rest: a quickselect partition, then a sort of the m. A search probes a few
 * of thousands of clusters per query, where a full sort would dominate its time. */
static inline int better(const float *sc, uint32_t a, uint32_t b) {
    return sc[a] > sc[b] || (sc[a] == sc[b] && a < b);
}
static void top_by_score(uint32_t *idx, uint32_t n, uint32_t m, const float *scores) {
    for (uint32_t i = 0; i < n; i++) idx[i] = i;
    if (m >= n) {
        order_by_score(idx, n, scores);
        return;
    }
    uint32_t lo = 0, hi = n; /* the m-th best lies in [lo, hi) */
    while (hi - lo > 1) {
        uint32_t a = idx[lo], b = idx[lo + (hi - lo) / 2], c3 = idx[hi - 1], pivot;
        /* median of three */
        if (better(scores, a, b)) { uint32_t t = a; a = b; b = t; }
        if (better(scores, b, c3)) { uint32_t t = b; b = c3; c3 = t; }
        if (better(scores, a, b)) { uint32_t t = a; a = b; b = t; }
        pivot = b;
        uint32_t i = lo, j = hi;
        for (uint32_t k = lo; k < j;) {
            if (better(scores, idx[k], pivot)) {
                uint32_t t = idx[k]; idx[k] = idx[i]; idx[i] = t;
                i++, k++;
            } else if (better(scores, pivot, idx[k])) {
                j--;
                uint32_t t = idx[k]; idx[k] = idx[j]; idx[j] = t;
            } else {
                k++;
            }
        }
        /* [lo,i) better than pivot, [i,j) equal to it (just the pivot: ties break by index), [j,hi) worse */
        if (m <= i) hi = i;
        else if (m <= j) break;
        else lo = j;
    }
    sort_scores = scores;
    qsort(idx, m, sizeof *idx, by_score_desc);
}

static int by_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* ---- co-location ---------------------------------------------------------------------------- */

#define KVT_COLOCATE_MAX 1024 /* clusters; past this the dense count matrix costs too much */

/* Counts which clusters one retrieve fetched together (the first colocate_after retrieves). */
static void count_coretrieval(kvt_coll *c, const uint32_t *sel, uint64_t nsel) {
    if (!c->p.colocate_after || token(c) || c->ctr.relayouts || c->retrieves >= c->p.colocate_after) return;
    if (!c->cofreq) {
        c->nco = c->ncl;
        uint64_t bytes = (uint64_t)c->nco * c->nco * sizeof(uint16_t);
        if (c->nco > KVT_COLOCATE_MAX || kvt_mem_reserve(&c->st->cache, bytes)) {
            c->retrieves = c->p.colocate_after; /* too many clusters or no room: never */
            return;
        }
        if (!(c->cofreq = calloc((size_t)c->nco * c->nco, sizeof(uint16_t)))) {
            kvt_mem_release(&c->st->cache, bytes);
            c->retrieves = c->p.colocate_after;
            return;
        }
        c->acct += bytes;
    }
    c->retrieves++;
    for (uint64_t a = 0; a < nsel; a++)
        for (uint64_t b = 0; b < nsel; b++)
            if (sel[a] < c->nco && sel[b] < c->nco && c->cofreq[(size_t)sel[a] * c->nco + sel[b]] < UINT16_MAX)
                c->cofreq[(size_t)sel[a] * c->nco + sel[b]]++;
}

/* The one-time rewrite: orders the counted clusters in a chain that follows co-retrieval
 * (from the most fetched, repeatedly the unplaced cluster most often fetched with the last
 * one) and lays the chain across fresh consecutive pools: chain[0] at the front of pool 0,
 * then chain[2i+1] at the back of pool i and chain[2i+2] at the front of pool i+1, so each
 * neighbouring pair of the chain across a pool boundary is contiguous on flash and the pair
 * sharing a pool is one merged read apart. Copy on write, like a split, one cluster at a
 * time so that it needs no more DRAM than the largest cluster. */
static int relayout(kvt_coll *c) {
    kvt_store *s = c->st;
    uint32_t k = c->nco < c->ncl ? c->nco : c->ncl, m = 0, done = 0, sr = c->L.pool_cap;
    uint64_t meta = (uint64_t)k * (4 + 4 + sizeof(seg_save)) + 16, sbytes = 0, written = 0;
    int rc = kvt_mem_reserve(&s->cache, meta);
    if (rc) goto spent;
    uint32_t *chain = malloc((size_t)k * 4 + 4), *placed = calloc(k + 1, 4);
    seg_save *old = calloc(k + 1, sizeof *old);
    uint8_t *scratch = NULL;
    undo_log log = {0};
    if (!chain || !placed || !old) rc = kvt_fail(ENOMEM, "relayout: out of memory");
    while (!rc && m < k) {
        uint32_t best = KVT_NONE;
        uint64_t bs = 0;
        if (m) {
            const uint16_t *row = c->cofreq + (size_t)chain[m - 1] * c->nco;
            for (uint32_t j = 0; j < k; j++)
                if (!placed[j] && c->cl[j].n && row[j] > bs) bs = row[j], best = j;
        }
        if (best == KVT_NONE) /* start, or restart, from the most fetched */
            for (uint32_t j = 0; j < k; j++) {
                uint64_t f = (uint64_t)c->cofreq[(size_t)j * c->nco + j] + 1;
                if (!placed[j] && c->cl[j].n && f > bs) bs = f, best = j;
            }
        if (best == KVT_NONE) break; /* the rest are empty */
        placed[best] = 1;
        chain[m++] = best;
    }
    /* the chain's pools, all made up front so that a spilling cluster cannot take one */
    uint32_t pools0 = c->pools.n, npools = m / 2 + 1;
    if (!rc) rc = ensure_pools(c, pools0 + npools);
    if (!rc && !(rc = kvt_mem_reserve(&s->cache, (uint64_t)sr * c->L.esz))) {
        sbytes = (uint64_t)sr * c->L.esz;
        if (!(scratch = malloc(sbytes))) rc = kvt_fail(ENOMEM, "relayout: out of memory");
    }
    if (!rc)
        for (; c->pools.n < pools0 + npools; c->pools.n++)
            c->pools.p[c->pools.n] = (kvt_pool){{KVT_HEAD_FREE, KVT_HEAD_FREE}, {0, 0}};
    for (; done < m && !rc; done++) {
        uint32_t j = chain[done], pool = pools0 + done / 2, head = done % 2;
        uint8_t *recs;
        uint64_t owned;
        kvt_cache_ent *pinned;
        rc = load_records(c, j, &recs, &owned, &pinned, &c->ctr.relayout_read_bytes);
        if (rc) break;
        old[done] = detach_segs(c, j);
        rc = ensure_segs(c, &c->cl[j], 1);
        if (!rc) {
            c->pools.p[pool].owner[head] = (int32_t)j;
            c->cl[j].segs[0] = (kvt_seg){pool, head, 0};
            c->cl[j].nseg = 1;
            log.n = 0; /* on failure restore_segs gives back every head this cluster holds */
            rec_src src = {.recs = recs};
            uint32_t flashed = c->cl[j].n - c->cl[j].pend;
            rc = append_flash(c, j, &src, flashed, scratch, sr, &log);
            written += (uint64_t)flashed * c->L.esz;
        }
        release_records(c, recs, owned, pinned, 0);
        if (rc) {
            done++; /* restore this one too */
            break;
        }
    }
    if (rc) {
        for (uint32_t t = 0; t < done; t++) restore_segs(c, chain[t], old[t]);
    } else {
        for (uint32_t t = 0; t < m; t++) retire_segs(c, old[t]);
        kvt_pools_push_free(&c->pools, &c->L, pools0);
        c->ctr.relayouts++;
        c->ctr.relayout_bytes += written;
    }
    free(log.u);
    free(scratch);
    kvt_mem_release(&s->cache, sbytes);
    free(chain);
    free(placed);
    free(old);
    kvt_mem_release(&s->cache, meta);
spent: /* the counts are spent either way */
    free(c->cofreq);
    c->cofreq = NULL;
    kvt_mem_release(&s->cache, (uint64_t)c->nco * c->nco * sizeof(uint16_t));
    c->acct -= (uint64_t)c->nco * c->nco * sizeof(uint16_t);
    c->retrieves = c->p.colocate_after;
    return rc;
}

/* ---- retrieve ----------------------------------------------------------------------------- */

struct kvt_result {
    uint64_t n, ncl;
    size_t key_bytes, value_bytes;
    int64_t *ids;
    uint8_t *keys, *values;
    int32_t *clusters;
    /* estimate.c: per query row, with kvt_coll_retrieve_est */
    uint64_t nq, vdim, est_ncl, est_n;
    float *est_lse, *est_val;
};

static void put_result(kvt_result *r, const kvt_layout *L, const uint8_t *rec, int32_t ci) {
    memcpy(&r->ids[r->n], rec, 8);
    memcpy(r->keys + r->n * L->key_bytes, kvt_rec_key(rec), L->key_bytes);
    memcpy(r->values + r->n * L->value_bytes, kvt_rec_value(L, rec), L->value_bytes);
    r->clusters[r->n] = ci;
    r->n++;
}

/* Result rows go where their cluster's place in the selection puts them (pos[ci]), so the
 * order does not depend on which clusters came from the cache first. */
typedef struct fill_ctx { kvt_result *r; const kvt_layout *L; const uint64_t *pos; } fill_ctx;
static void fill_result(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    fill_ctx *x = vctx;
    uint64_t keep = x->r->n;
    x->r->n = x->pos[ci];
    for (uint32_t i = 0; i < n; i++) put_result(x->r, x->L, recs + (size_t)i * x->L->esz, (int32_t)ci);
    x->r->n = keep + n;
}

void kvt_result_free(kvt_result *r) {
    if (!r) return;
    free(r->ids);
    free(r->keys);
    free(r->values);
    free(r->clusters);
    free(r->est_lse);
    free(r->est_val);
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

void kvt_result_estimate(const kvt_result *r, float *lse, float *values, uint64_t *clusters, uint64_t *entries) {
    for (uint64_t i = 0; lse && i < r->nq; i++) lse[i] = r->est_lse ? r->est_lse[i] : -INFINITY;
    if (values && r->est_val) memcpy(values, r->est_val, r->nq * r->vdim * 4);
    else if (values) memset(values, 0, r->nq * r->vdim * 4);
    if (clusters) *clusters = r->est_ncl;
    if (entries) *entries = r->est_n;
}

static int result_alloc(kvt_result *r, const kvt_layout *L, uint64_t total) {
    r->key_bytes = L->key_bytes;
    r->value_bytes = L->value_bytes;
    r->ids = malloc(total * 8 + 8);
    r->keys = malloc(total * L->key_bytes + 8);
    r->values = malloc(total * L->value_bytes + 8);
    r->clusters = malloc(total * 4 + 4);
    if (!r->ids || !r->keys || !r->values || !r->clusters)
        return kvt_fail(ENOMEM, "retrieve: out of memory for %llu entries", (unsigned long long)total);
    return 0;
}

/* File offset of the record of id (which must be on flash). */
static int record_offset(kvt_coll *c, uint64_t id, uint64_t *off) {
    if (token(c)) {
        *off = token_offset(c, id);
        return 0;
    }
    kvt_loc lc = c->loc[id];
    kvt_cluster *k = &c->cl[lc.cl];
    uint32_t slot = lc.idx, g = 0;
    while (g < k->nseg && slot >= k->segs[g].n) slot -= k->segs[g++].n;
    if (g == k->nseg) return kvt_fail(KVT_ECORRUPT, "id %llu maps outside its cluster", (unsigned long long)id);
    *off = kvt_slot_offset(&c->L, k->segs[g].pool, k->segs[g].head, slot);
    return 0;
}

/* Policy none: the exact top-budget entries by score, each read from flash on its own, in
 * token order, as a system without clusters would. */
static int retrieve_tokens(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result *r) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    uint64_t n = c->n, m = budget < n ? budget : n;
    /* reads go in batches (one submission each) of up to 32 records, each read into its own
     * slot with a direct-read window of up to two alignment units; fewer under a small budget */
    uint64_t per = L->esz + 2 * KVT_IO_ALIGN + sizeof(kvt_read_req) + 8, fit = s->cache.budget / 8 / per;
    const uint32_t TOKEN_BATCH = fit < 1 ? 1 : fit > 32 ? 32 : (uint32_t)fit;
    uint64_t tmp = n * 8 + (uint64_t)TOKEN_BATCH * per + (uint64_t)c->p.dim * 4;
    int rc = kvt_mem_reserve(&s->cache, tmp);
    if (rc) return rc;
    float *scores = malloc(n * 4 + 4), *x = malloc((size_t)c->p.dim * 4);
    uint32_t *idx = malloc(n * 4 + 4);
    uint8_t *rec = malloc((size_t)TOKEN_BATCH * L->esz);
    kvt_read_req *req = malloc(TOKEN_BATCH * sizeof *req);
    uint64_t *offs = malloc(TOKEN_BATCH * sizeof *offs);
    if (!req || !offs) rc = kvt_fail(ENOMEM, "retrieve: out of memory");
    if (!scores || !idx || !rec || !x) rc = kvt_fail(ENOMEM, "retrieve: out of memory");
    if (!rc) {
        for (uint64_t i = 0; i < n; i++) {
            float best = -FLT_MAX;
            for (uint64_t t = 0; t < nq; t++) {
                float sc = entry_score(c, c->keys + i * L->key_bytes, q + t * c->p.dim, x);
                if (sc > best) best = sc;
            }
            scores[i] = best;
        }
        order_by_score(idx, (uint32_t)n, scores);
        qsort(idx, m, 4, by_u32);
        rc = result_alloc(r, L, m);
    }
    kvt_io_batch_begin(&s->io);
    for (uint64_t i0 = 0; i0 < m && !rc; i0 += TOKEN_BATCH) {
        uint32_t nb = (uint32_t)(m - i0 < TOKEN_BATCH ? m - i0 : TOKEN_BATCH), nr = 0;
        for (uint32_t t = 0; t < nb && !rc; t++) {
            const kvt_loc lc = c->loc[idx[i0 + t]];
            const kvt_cluster *k = &c->cl[lc.cl];
            if (lc.idx >= k->n - k->pend) continue; /* in the write buffer's tail, not on flash yet */
            rc = record_offset(c, idx[i0 + t], &offs[nr]);
            req[nr] = (kvt_read_req){offs[nr], L->esz, rec + (size_t)nr * L->esz, 1};
            nr++;
        }
        if (!rc) rc = kvt_file_read_batch(c->f, req, nr);
        for (uint32_t t = 0, got = 0; t < nb && !rc; t++) {
            const kvt_loc lc = c->loc[idx[i0 + t]];
            const kvt_cluster *k = &c->cl[lc.cl];
            if (lc.idx >= k->n - k->pend) {
                put_result(r, L, k->pbuf + (size_t)(lc.idx - (k->n - k->pend)) * L->esz, -1);
                continue;
            }
            rc = check_run(c, lc.cl, lc.idx, rec + (size_t)got * L->esz, 1, offs[got]);
            if (!rc) put_result(r, L, rec + (size_t)got * L->esz, -1);
            got++;
        }
    }
    kvt_io_batch_end(&s->io);
    free(scores);
    free(idx);
    free(rec);
    free(req);
    free(offs);
    free(x);
    kvt_mem_release(&s->cache, tmp);
    return rc;
}

/* Scratch of one cluster selection (scores, squared queries, order), reserved against the
 * budget. scores has 8 bytes per cluster: retrieve reuses it for result row positions. */
typedef struct selection { float *scores, *q2; uint32_t *idx; uint64_t reserved; } selection;

static int selection_alloc(kvt_coll *c, uint64_t nq, selection *sel) {
    uint64_t bytes = (uint64_t)c->ncl * 12 + 12 + nq * c->p.dim * 4;
    int rc = kvt_mem_reserve(&c->st->cache, bytes);
    if (rc) return rc;
    sel->reserved = bytes;
    sel->scores = malloc((size_t)c->ncl * 8 + 8);
    sel->idx = malloc((size_t)c->ncl * 4 + 4);
    sel->q2 = malloc(nq * c->p.dim * 4);
    if (!sel->scores || !sel->idx || !sel->q2) return kvt_fail(ENOMEM, "out of memory selecting clusters");
    return 0;
}

static void selection_release_budget(kvt_coll *c, selection *sel) {
    kvt_mem_release(&c->st->cache, sel->reserved);
    sel->reserved = 0;
}

static void selection_free(kvt_coll *c, selection *sel) {
    free(sel->scores);
    free(sel->idx);
    free(sel->q2);
    selection_release_budget(c, sel);
}

/* Whole clusters in score order; one that does not fit the remaining budget is skipped so
 * the budget is filled by the next best that do. Only the best few need ordering: twice the
 * clusters the budget holds at the mean size, and all of them if that falls short. */
static void select_clusters(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, float *scores,
                            float *q2, uint32_t *idx, uint64_t *taken_out, uint64_t *total_out) {
    score_clusters(c, q, nq, scores, q2);
    uint64_t total = 0, taken = 0;
    uint64_t mean = c->ncl ? c->n / c->ncl + 1 : 1, guess = 2 * (budget / mean) + 16;
    uint32_t m = guess < c->ncl ? (uint32_t)guess : c->ncl;
    for (int pass = 0; pass < 2; pass++) {
        top_by_score(idx, c->ncl, m, scores);
        total = taken = 0;
        for (uint32_t j = 0; j < m && total < budget; j++) {
            uint32_t n = c->cl[idx[j]].n;
            if (n && total + n <= budget) {
                total += n;
                idx[taken++] = idx[j];
            }
        }
        if (total >= budget || m == c->ncl) break;
        m = c->ncl;
    }
    *taken_out = taken;
    *total_out = total;
}

/* ---- prefetch: loader threads ------------------------------------------------------------- */

/* Waits (releasing the store mutex) until no prefetch of collection c is queued or loading:
 * every operation on c starts here, so none sees a cluster half loaded or changes one under
 * a loader. */
static void wait_idle(kvt_coll *c) {
    kvt_store *s = c->st;
    if (!c->inflight) return;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (c->inflight) pthread_cond_wait(&s->done_cv, &s->mu);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    s->io_wait_seconds += (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
}

/* A swap-in: one read of consecutive images, then each installed under the mutex. A failed
 * read or install leaves the collection parked (counted): its next operation reads it again
 * and reports the error. The read was charged when the swap-in was queued, and is no
 * prefetch. */
static void run_swap_job(kvt_store *s, kvt_job *j) {
    kvt_io_thread_uncharged(KVT_READS_UNCHARGED);
    int rc = kvt_file_read(s->swap, j->run[0]->swap_off, j->swap_len, j->swap_buf, 0);
    kvt_io_thread_uncharged(KVT_READS_PREFETCH);
    LOCK(s);
    if (!rc) s->swap_read_bytes += j->swap_len;
    s->loading_bytes -= j->swap_len;
    uint64_t at = 0;
    for (uint32_t t = 0; t < j->nseg; t++) {
        kvt_coll *c = j->run[t];
        uint64_t l = c->swap_len;
        if (rc || install_image(c, j->swap_buf + at, l)) s->prefetch_errors++;
        at += l;
        c->inflight--;
    }
    free(j->swap_buf);
    kvt_mem_release(&s->cache, j->swap_len);
    pthread_cond_broadcast(&s->done_cv);
    UNLOCK(s);
    free(j->run);
    free(j);
}

/* Runs one job without the store mutex for the reads, with it to check and publish. */
static void run_job(kvt_store *s, kvt_job *j) {
    if (j->exec) {
        j->exec(s, j);
        return;
    }
    kvt_coll *c = j->c;
    const kvt_layout *L = &c->L;
    int rc = 0;
    uint32_t base = 0, nreq = 0;
    /* the cluster's extents, read as one batch. The token layout's member list is read
     * without the mutex: no operation changes a collection with jobs in flight (they all
     * start in wait_idle). Its scratch was reserved with the job (the cache entry). */
    const kvt_cluster *tk = &c->cl[j->cl];
    size_t cap = token(c) ? tk->n : j->nseg;
    kvt_read_req *req = malloc(cap * sizeof *req + 1);
    if (!req) rc = kvt_fail(ENOMEM, "prefetch: out of memory");
    uint64_t boff = 0; /* segments land stacked, then are packed (see finish_cluster) */
    for (uint32_t g = 0; g < j->nseg && !rc; g++) {
        kvt_seg *sg = &j->segs[g];
        uint64_t len = kvt_run_span(L, sg->head, 0, sg->n);
        if (sg->n)
            req[nreq++] = (kvt_read_req){kvt_run_offset(L, sg->pool, sg->head, 0, sg->n), (size_t)len,
                                         j->e->rec + boff, sg->n};
        boff += len;
    }
    for (uint32_t i0 = 0; token(c) && !rc && i0 < tk->n;) {
        uint32_t i1 = token_run_end(tk, i0);
        req[nreq++] = (kvt_read_req){token_offset(c, tk->mem[i0]), (size_t)(i1 - i0) * L->esz,
                                     j->e->rec + (size_t)i0 * L->esz, i1 - i0};
        i0 = i1;
    }
    if (!rc) rc = kvt_file_read_batch(c->f, req, nreq);
    free(req);
    base = 0;
    boff = 0;
    for (uint32_t g = 0; g < j->nseg && !rc; g++) {
        kvt_seg *sg = &j->segs[g];
        kvt_unpad(L, j->e->rec + (size_t)base * L->esz, j->e->rec + boff, kvt_run_pos(L, sg->head, 0, sg->n), sg->n);
        if (sg->head == 1) kvt_rec_reverse(L, j->e->rec + (size_t)base * L->esz, sg->n);
        base += sg->n;
        boff += kvt_run_span(L, sg->head, 0, sg->n);
    }
    LOCK(s);
    kvt_cluster *k = &c->cl[j->cl];
    if (token(c) && !rc) rc = check_run(c, j->cl, 0, j->e->rec, k->n, k->n ? token_offset(c, k->mem[0]) : 0);
    base = 0;
    for (uint32_t g = 0; g < j->nseg && !rc; g++) {
        kvt_seg *sg = &j->segs[g];
        rc = check_run(c, j->cl, base, j->e->rec + (size_t)base * L->esz, sg->n,
                       kvt_run_offset(L, sg->pool, sg->head, 0, sg->n ? sg->n : 1));
        base += sg->n;
    }
    s->loading_bytes -= (uint64_t)k->n * L->esz;
    if (!rc) {
        if (k->pend) memcpy(j->e->rec + (size_t)base * L->esz, k->pbuf, (size_t)k->pend * L->esz);
        j->e->n = k->n;
        j->e->loading = 0;
        j->e->pins--;
    } else {
        k->ent = NULL;
        kvt_cache_drop(&s->cache, j->e);
        s->prefetch_errors++;
    }
    c->inflight--;
    pthread_cond_broadcast(&s->done_cv);
    UNLOCK(s);
    free(j);
}

static void *loader_main(void *arg) {
    kvt_store *s = arg;
    kvt_io_thread_uncharged(KVT_READS_PREFETCH);
    LOCK(s);
    for (;;) {
        while (!s->jobs && !s->shutdown) pthread_cond_wait(&s->job_cv, &s->mu);
        kvt_job *j = s->jobs;
        if (!j) break; /* shut down, queue empty */
        s->jobs = j->next;
        if (!s->jobs) s->jobs_tail = NULL;
        UNLOCK(s);
        run_job(s, j);
        LOCK(s);
    }
    UNLOCK(s);
    return NULL;
}

/* Starts the loader threads on first use; *rc is set only if none can start. */
static void start_loaders(kvt_store *s, int *rc) {
    while (s->nloaders < KVT_LOADERS) {
        if (pthread_create(&s->loaders[s->nloaders], NULL, loader_main, s)) {
            if (!s->nloaders) *rc = kvt_fail(EAGAIN, "cannot start a loader thread (syscall pthread_create)");
            break;
        }
        s->nloaders++;
    }
}

int kvt_coll_prefetch(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, uint64_t *queued) {
    kvt_clear_error();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "prefetch: query_group must hold at least one query");
    kvt_store *s = c->st;
    LOCK(s);
    int rc = ready(c);
    if (rc) {
        UNLOCK(s);
        return rc;
    }
    uint64_t nq_out = 0, ops = 0, bytes = 0;
    selection sel = {0};
    if (c->p.policy == KVT_POLICY_NONE) goto out; /* nothing to prefetch: no clusters */
    rc = selection_alloc(c, nq, &sel);
    if (rc) goto out;
    uint32_t *idx = sel.idx;
    uint64_t taken, total;
    select_clusters(c, q, nq, budget, sel.scores, sel.q2, idx, &taken, &total);
    if (!rc) start_loaders(s, &rc);
    for (uint64_t t = 0; t < taken && !rc; t++) {
        kvt_cluster *k = &c->cl[idx[t]];
        if (k->ent || k->n == k->pend) continue; /* cached, or nothing on flash */
        /* reads in flight pin their buffers: past a quarter of the budget, a call needing
         * room could find nothing to evict and fail, so the rest is read on use */
        uint64_t pin = (uint64_t)k->n * c->L.esz;
        if (s->loading_bytes + pin > s->cache.budget / 4) continue;
        kvt_job *j = malloc(sizeof *j + (size_t)k->nseg * sizeof(kvt_seg));
        kvt_cache_ent *e = j ? kvt_cache_admit(&s->cache, c, idx[t], read_buffer_records(c, k), c->L.esz) : NULL;
        if (!e) { /* no room in the budget: that cluster is read on use */
            free(j);
            continue;
        }
        e->loading = 1;
        e->prefetched = 1;
        s->loading_bytes += pin;
        k->ent = e;
        *j = (kvt_job){NULL, c, idx[t], k->nseg, e, NULL, NULL, 0};
        memcpy(j->segs, k->segs, (size_t)k->nseg * sizeof(kvt_seg));
        for (uint32_t i0 = 0; token(c) && i0 < k->n;) {
            uint32_t i1 = token_run_end(k, i0);
            ops++;
            size_t len = (size_t)(i1 - i0) * c->L.esz;
            bytes += kvt_file_is_direct(c->f) ? kvt_file_read_scratch(c->f, token_offset(c, k->mem[i0]), len) : len;
            i0 = i1;
        }
        for (uint32_t g = 0; g < k->nseg; g++)
            if (k->segs[g].n) {
                ops++;
                uint64_t span = kvt_run_span(&c->L, k->segs[g].head, 0, k->segs[g].n);
                bytes += kvt_file_read_scratch(c->f, kvt_run_offset(&c->L, k->segs[g].pool, k->segs[g].head, 0, k->segs[g].n),
                                               (size_t)span);
                if (!kvt_file_is_direct(c->f)) bytes += span;
            }
        if (s->jobs_tail) s->jobs_tail->next = j;
        else s->jobs = j;
        s->jobs_tail = j;
        c->inflight++;
        nq_out++;
    }
    if (nq_out) {
        s->prefetch_issued += nq_out;
        kvt_io_charge(&s->io, ops, bytes);
        pthread_cond_broadcast(&s->job_cv);
    }
out:
    selection_free(c, &sel);
    UNLOCK(s);
    if (queued) *queued = nq_out;
    return rc;
}

static int retrieve_locked(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget,
                           const kvt_estimate_opts *est, kvt_result **out) {
    kvt_store *s = c->st;
    int rc = 0;
    selection sel = {0};
    kvt_result *r = calloc(1, sizeof *r);
    if (!r) {
        rc = kvt_fail(ENOMEM, "retrieve: out of memory");
        goto out;
    }
    r->nq = nq;
    r->vdim = c->p.value_dim;
    if (est && (!(r->est_lse = malloc(nq * 4)) || !(r->est_val = calloc(nq * c->p.value_dim + 1, 4)))) {
        rc = kvt_fail(ENOMEM, "retrieve: out of memory for the estimate");
        goto out;
    }
    for (uint64_t i = 0; est && i < nq; i++) r->est_lse[i] = -INFINITY;
    if (c->p.policy == KVT_POLICY_NONE) {
        rc = retrieve_tokens(c, q, nq, budget, r);
        goto out;
    }
    rc = selection_alloc(c, nq, &sel);
    if (rc) goto out;
    uint32_t *idx = sel.idx;
    uint64_t total = 0, taken = 0;
    select_clusters(c, q, nq, budget, sel.scores, sel.q2, idx, &taken, &total);
    r->ncl = taken;
    if (est) { /* estimate.c: from the scores, before they are spent below */
        double scale = est->scale > 0 ? est->scale : 1.0 / sqrt((double)c->p.dim);
        rc = kvt_estimate(c, q, nq, sel.scores, idx, taken, est->clusters, scale, est->variance, r->est_lse, r->est_val,
                          &r->est_ncl, &r->est_n);
    }
    rc = result_alloc(r, &c->L, total);
    if (!rc) { /* the scores are spent: their buffer holds each cluster's first result row */
        uint64_t *pos = (uint64_t *)sel.scores, at = 0;
        for (uint64_t t = 0; t < taken; t++) {
            pos[idx[t]] = at;
            at += c->cl[idx[t]].n;
        }
    }
    fill_ctx fx = {r, &c->L, (const uint64_t *)sel.scores};
    kvt_io_batch_begin(&s->io);
    if (!rc) rc = visit_clusters(c, idx, (uint32_t)taken, fill_result, &fx);
    if (!rc) count_coretrieval(c, idx, taken);
    kvt_io_batch_end(&s->io);
    /* the clusters just read are in DRAM: the moment to split the flagged ones */
    if (!rc && c->p.policy == KVT_POLICY_ADAPTIVE) {
        selection_release_budget(c, &sel); /* room for the splits; idx is still read */
        split_in_dram(c, idx, (uint32_t)taken);
        relieve_pending(c);
        trim_tails(c); /* splits may have left new tails */
    }
    if (!rc && c->cofreq && c->retrieves >= c->p.colocate_after && relayout(c)) c->ctr.split_errors++;
    /* report the clusters the entries belong to now, after any split */
    for (uint64_t i = 0; !rc && i < r->n; i++) r->clusters[i] = (int32_t)c->loc[r->ids[i]].cl;
out:
    selection_free(c, &sel);
    if (rc) kvt_result_free(r);
    else *out = r;
    return rc;
}

int kvt_coll_retrieve(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result **out) {
    kvt_clear_error();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "retrieve: query_group must hold at least one query");
    int rc;
    RUN_READY(c, retrieve_locked(c, q, nq, budget, NULL, out));
    return rc;
}

int kvt_coll_retrieve_est(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget,
                          const kvt_estimate_opts *est, kvt_result **out) {
    kvt_clear_error();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "retrieve: query_group must hold at least one query");
    if (!est) return kvt_fail(KVT_EINVAL, "retrieve: estimate options expected");
    if (!(est->scale >= 0) || !isfinite(est->scale)) return kvt_fail(KVT_EINVAL, "scale: a finite value > 0 (or 0 for 1/sqrt(dim)) expected");
    int rc;
    RUN_READY(c, retrieve_locked(c, q, nq, budget, est, out));
    return rc;
}

/* ---- group virtualization: parking collections in the swap file --------------------------- */

/* A parked collection's image: everything it holds in DRAM except the pool table and its
 * counters, written as one contiguous range of the store's swap file "swap.kvs". The file
 * is volatile (recreated at the first park of each run): a parked collection's durable
 * state is its data file and catalog as ever, so a crash while parked loses nothing a
 * checkpoint had made durable.
 *
 *   "KVTSWAP1" u32 ncl, u32 nco, u64 n, u32 ncached, u32 has_m2d
 *   per cluster: u32 n, nseg, pend, flagged, hold; f64 m2; nseg x (u32 pool, head, n);
 *                pend records (its pending buffer)
 *   ncl x dim f32 representatives [, ncl x dim f32 per-dimension m2]
 *   [, ncl x value_dim f32 value sums (estimate.c)]
 *   n x kvt_loc id map [, n x key keys (policy none)] [, nco x nco u16 co-retrieval counts]
 *   ncached x (u32 cluster, u32 n, n records)     the cached clusters, most recent last
 *   u32 CRC-32C of all the above, then zeros to the I/O alignment
 */
#define SWAP_MAGIC "KVTSWAP1"
/* The writer's staging buffer: up to 256 KiB, less under a small budget (a multiple of the
 * I/O alignment, so the image's zero tail always fits in it). */
static uint64_t swap_stage(const kvt_store *s) {
    uint64_t b = kvt_round_down(s->cache.budget / 16, KVT_IO_ALIGN);
    return b < KVT_IO_ALIGN ? KVT_IO_ALIGN : b > (256u << 10) ? (256u << 10) : b;
}

/* Streams an image to the swap file through a staging buffer; with f == NULL it only
 * counts, so the same code sizes the range before writing it. */
typedef struct swap_writer {
    kvt_file *f;
    uint64_t off, total;
    uint8_t *buf;
    size_t len, cap;
    uint32_t crc;
    int rc;
} swap_writer;

static void sw_flush(swap_writer *w) {
    if (!w->len || w->rc) return;
    if (w->f) w->rc = kvt_file_write(w->f, w->off, w->buf, w->len);
    w->off += w->len;
    w->len = 0;
}

static void sw_put(swap_writer *w, const void *p, size_t n) {
    w->total += n;
    if (!w->f || !n) return; /* p may be NULL when n is 0 (an empty table) */
    w->crc = kvt_crc32c(w->crc, p, n);
    const uint8_t *src = p;
    while (n && !w->rc) {
        size_t take = w->cap - w->len < n ? w->cap - w->len : n;
        memcpy(w->buf + w->len, src, take);
        w->len += take;
        src += take;
        n -= take;
        if (w->len == w->cap) sw_flush(w);
    }
}
static void sw_u32(swap_writer *w, uint32_t v) { sw_put(w, &v, 4); }

static void write_image(kvt_coll *c, swap_writer *w, int keep_cache) {
    const kvt_layout *L = &c->L;
    /* the working set: clusters used (read, appended to, split) since the collection was
     * last brought in. The rest are clean copies of the data file, read again from it if
     * ever needed; carrying them would rewrite and reread the whole cache at every park. */
    uint32_t ncached = 0;
    for (uint32_t j = 0; j < c->ncl && keep_cache; j++)
        ncached += c->cl[j].ent != NULL && c->cl[j].ent->last_use > c->resident_tick;
    sw_put(w, SWAP_MAGIC, 8);
    sw_u32(w, c->ncl);
    sw_u32(w, c->cofreq ? c->nco : 0);
    sw_put(w, &c->n, 8);
    sw_u32(w, ncached);
    sw_u32(w, c->m2d != NULL);
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        uint32_t f[5] = {k->n, k->nseg, k->pend, k->flagged, k->hold};
        sw_put(w, f, sizeof f);
        sw_put(w, &k->m2, 8);
        for (uint32_t g = 0; g < k->nseg; g++) {
            uint32_t sg[3] = {k->segs[g].pool, k->segs[g].head, k->segs[g].n};
            sw_put(w, sg, sizeof sg);
        }
        sw_put(w, k->pbuf, (size_t)k->pend * L->esz);
    }
    sw_put(w, c->cent, (size_t)c->ncl * c->p.dim * 4);
    if (c->m2d) sw_put(w, c->m2d, (size_t)c->ncl * c->p.dim * 4);
    if (c->vsum) sw_put(w, c->vsum, (size_t)c->ncl * c->p.value_dim * 4);
    sw_put(w, c->loc, c->n * sizeof(kvt_loc));
    if (c->keys) sw_put(w, c->keys, c->n * L->key_bytes);
    if (c->cofreq) sw_put(w, c->cofreq, (size_t)c->nco * c->nco * 2);
    /* cached clusters oldest first, so that re-admitting them in order restores recency */
    for (kvt_cache_ent *e = c->st->cache.lru.prev; e != &c->st->cache.lru; e = e->prev) {
        if (!keep_cache || e->owner != c || e->last_use <= c->resident_tick) continue;
        sw_u32(w, e->cluster);
        sw_u32(w, e->n);
        sw_put(w, e->rec, (size_t)e->n * L->esz);
    }
    uint32_t crc = w->crc;
    sw_u32(w, crc);
}

/* The swap file's free ranges: first fit, coalesced on free. */
static void swap_alloc(kvt_store *s, uint64_t len, uint64_t *off) {
    for (uint32_t i = 0; i < s->nsfree; i++)
        if (s->sfree[i].len >= len) {
            *off = s->sfree[i].off;
            s->sfree[i].off += len;
            s->sfree[i].len -= len;
            if (!s->sfree[i].len) memmove(&s->sfree[i], &s->sfree[i + 1], (s->nsfree - i - 1) * sizeof *s->sfree), s->nsfree--;
            return;
        }
    *off = s->swap_end;
    s->swap_end += len;
}

static void swap_free(kvt_store *s, uint64_t off, uint64_t len) {
    if (!len) return;
    if (off + len == s->swap_end) {
        s->swap_end = off;
        /* the range before may now end the file too */
        while (s->nsfree && s->sfree[s->nsfree - 1].off + s->sfree[s->nsfree - 1].len == s->swap_end)
            s->swap_end = s->sfree[--s->nsfree].off;
        return;
    }
    if (s->nsfree == s->sfreecap) {
        uint32_t cap = s->sfreecap ? s->sfreecap * 2 : 16;
        kvt_range *r = realloc(s->sfree, cap * sizeof *r);
        if (!r) return; /* the range leaks until the file is recreated: harmless */
        s->sfree = r;
        s->sfreecap = cap;
    }
    uint32_t i = 0;
    while (i < s->nsfree && s->sfree[i].off < off) i++;
    memmove(&s->sfree[i + 1], &s->sfree[i], (s->nsfree - i) * sizeof *s->sfree);
    s->sfree[i] = (kvt_range){off, len};
    s->nsfree++;
    if (i + 1 < s->nsfree && s->sfree[i].off + s->sfree[i].len == s->sfree[i + 1].off) {
        s->sfree[i].len += s->sfree[i + 1].len;
        memmove(&s->sfree[i + 1], &s->sfree[i + 2], (s->nsfree - i - 2) * sizeof *s->sfree);
        s->nsfree--;
    }
    if (i > 0 && s->sfree[i - 1].off + s->sfree[i - 1].len == s->sfree[i].off) {
        s->sfree[i - 1].len += s->sfree[i].len;
        memmove(&s->sfree[i], &s->sfree[i + 1], (s->nsfree - i - 1) * sizeof *s->sfree);
        s->nsfree--;
    }
}

static int swap_open(kvt_store *s) {
    if (s->swap) return 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/swap.kvs", s->dir);
    return kvt_file_open(&s->io, path, 1, &s->swap);
}

/* Frees what a resident collection holds in DRAM besides the pool table (park, or a failed
 * install). Cached clusters are dropped. */
static void drop_resident(kvt_coll *c) {
    kvt_cache_drop_owner(&c->st->cache, c);
    for (uint32_t j = 0; j < c->clcap; j++) {
        kvt_cluster *k = &c->cl[j];
        if (k->segs) free_array(c, k->segs, k->segcap, sizeof(kvt_seg));
        if (k->pbuf) free_array(c, k->pbuf, k->pcap, c->L.esz);
        if (k->mem) free_array(c, k->mem, k->memcap, sizeof *k->mem);
    }
    free_array(c, c->cl, c->clcap, sizeof *c->cl);
    free_array(c, c->cent, c->clcap, (size_t)c->p.dim * 4);
    free_array(c, c->cnorm, c->clcap, 4);
    if (c->m2d) free_array(c, c->m2d, c->clcap, (size_t)c->p.dim * 4);
    if (c->vsum) free_array(c, c->vsum, c->clcap, (size_t)c->p.value_dim * 4);
    free_array(c, c->loc, c->loccap, sizeof *c->loc);
    if (c->keys) free_array(c, c->keys, c->keyscap, c->L.key_bytes);
    if (c->cofreq) free_array(c, c->cofreq, (uint64_t)c->nco * c->nco, 2);
    c->cl = NULL;
    c->cent = c->cnorm = c->m2d = c->vsum = NULL;
    c->loc = NULL;
    c->keys = NULL;
    c->cofreq = NULL;
    c->clcap = 0;
    c->loccap = c->keyscap = 0;
}

/* Writes c's image to a fresh range of the swap file and frees what it holds in DRAM.
 * On a write error c stays resident and unchanged. */
static int park_one(kvt_coll *c, int keep_cache) {
    kvt_store *s = c->st;
    if (c->parked) return 0;
    int rc = swap_open(s);
    if (rc) return rc;
    /* the staging buffer: the image's size up to swap_stage. Reserving it may evict some of
     * c's cached clusters, so the image is sized again after */
    swap_writer count = {0};
    write_image(c, &count, keep_cache);
    uint64_t sb = kvt_round_up(count.total, KVT_IO_ALIGN), len, off;
    if (sb > swap_stage(s)) sb = swap_stage(s);
    if ((rc = kvt_mem_reserve(&s->cache, sb))) return rc;
    uint8_t *stage = malloc(sb);
    if (!stage) {
        kvt_mem_release(&s->cache, sb);
        return kvt_fail(ENOMEM, "park: out of memory");
    }
    count = (swap_writer){0};
    write_image(c, &count, keep_cache);
    len = kvt_round_up(count.total, KVT_IO_ALIGN);
    swap_alloc(s, len, &off);
    swap_writer w = {s->swap, off, 0, stage, 0, (size_t)sb, 0, 0};
    write_image(c, &w, keep_cache);
    if (!w.rc && w.len) { /* zero the tail to the alignment: a direct read covers it */
        size_t pad = (size_t)(kvt_round_up(w.off + w.len, KVT_IO_ALIGN) - (w.off + w.len));
        memset(w.buf + w.len, 0, pad);
        w.len += pad;
        sw_flush(&w);
    }
    free(stage);
    kvt_mem_release(&s->cache, sb);
    if (w.rc) {
        swap_free(s, off, len);
        return w.rc;
    }
    uint32_t ncl = c->ncl;
    cluster_stats(c, &c->parked_stats);
    drop_resident(c);
    c->ncl = ncl;
    c->parked = 1;
    c->swap_off = off;
    c->swap_len = len;
    s->swap_outs++;
    s->swap_write_bytes += len;
    return 0;
}

/* Rebuilds c from its image (len bytes at img). On failure c stays parked, holding nothing. */
static int install_image(kvt_coll *c, const uint8_t *img, uint64_t len) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    uint32_t dim = c->p.dim;
    kvt_rbuf r = {img, (size_t)len, 8, 0};
    uint32_t ncl = kvt_rbuf_u32(&r), nco = kvt_rbuf_u32(&r);
    uint64_t n = kvt_rbuf_u64(&r);
    uint32_t ncached = kvt_rbuf_u32(&r), has_m2d = kvt_rbuf_u32(&r);
    if (memcmp(img, SWAP_MAGIC, 8) != 0 || r.bad || ncl != c->ncl || n != c->n || has_m2d != (c->p.score_temp > 0))
        return kvt_fail(KVT_ECORRUPT, "swap: the image of collection %u at offset %llu is damaged", c->no,
                        (unsigned long long)c->swap_off);
    c->ncl = 0; /* ensure_clusters grows from zero */
    int rc = ensure_clusters(c, ncl);
    if (!rc) rc = ensure_ids(c, n);
    if (!rc && nco) {
        uint64_t cap = 0;
        rc = grow_array(c, (void **)&c->cofreq, 2, &cap, (uint64_t)nco * nco);
    }
    c->ncl = ncl;
    c->nco = nco ? nco : c->nco;
    for (uint32_t j = 0; j < ncl && !rc && !r.bad; j++) {
        kvt_cluster *k = &c->cl[j];
        memset(k, 0, sizeof *k);
        uint32_t f[5];
        kvt_rbuf_get(&r, f, sizeof f);
        kvt_rbuf_get(&r, &k->m2, 8);
        k->n = f[0];
        k->flagged = f[3];
        k->hold = f[4];
        if (r.bad || f[1] > (r.len - r.pos) / 12 || (uint64_t)f[2] * L->esz > r.len - r.pos) {
            r.bad = 1;
            break;
        }
        if (f[1] && (rc = ensure_segs(c, k, f[1]))) break;
        for (uint32_t g = 0; g < f[1]; g++) {
            uint32_t sg[3];
            kvt_rbuf_get(&r, sg, sizeof sg);
            k->segs[g] = (kvt_seg){sg[0], sg[1], sg[2]};
        }
        k->nseg = f[1];
        if (f[2]) {
            if ((rc = ensure_pbuf(c, k, f[2]))) break;
            kvt_rbuf_get(&r, k->pbuf, (size_t)f[2] * L->esz);
            k->pend = f[2];
        }
    }
    if (!rc) {
        kvt_rbuf_get(&r, c->cent, (size_t)ncl * dim * 4);
        if (c->m2d) kvt_rbuf_get(&r, c->m2d, (size_t)ncl * dim * 4);
        if (c->vsum) kvt_rbuf_get(&r, c->vsum, (size_t)ncl * c->p.value_dim * 4);
        kvt_rbuf_get(&r, c->loc, n * sizeof(kvt_loc));
        if (c->keys) kvt_rbuf_get(&r, c->keys, n * L->key_bytes);
        if (nco) kvt_rbuf_get(&r, c->cofreq, (size_t)nco * nco * 2);
        for (uint32_t j = 0; j < ncl; j++) update_norm(c, j);
        if (!r.bad && token(c)) rc = rebuild_members(c);
    }
    /* cached clusters: re-admitted while the budget has room for them without evicting
     * (what is not admitted is read from the data file on use, as after an eviction) */
    for (uint32_t t = 0; t < ncached && !rc && !r.bad; t++) {
        uint32_t cl = kvt_rbuf_u32(&r), cn = kvt_rbuf_u32(&r);
        if (r.bad || cl >= ncl || cn != c->cl[cl].n || (uint64_t)cn * L->esz > r.len - r.pos) {
            r.bad = 1;
            break;
        }
        const uint8_t *recs = r.p + r.pos;
        r.pos += (size_t)cn * L->esz;
        uint64_t need = (uint64_t)cn * L->esz + sizeof(kvt_cache_ent);
        if (s->cache.used + need > s->cache.budget) continue;
        kvt_cache_ent *e = kvt_cache_admit(&s->cache, c, cl, cn, L->esz);
        if (!e) continue;
        memcpy(e->rec, recs, (size_t)cn * L->esz);
        e->n = cn;
        e->pins--;
        c->cl[cl].ent = e;
    }
    if (!rc && (r.bad || r.len - r.pos < 4)) rc = kvt_fail(KVT_ECORRUPT, "swap: the image of collection %u is inconsistent", c->no);
    if (!rc) {
        uint32_t crc;
        memcpy(&crc, r.p + r.pos, 4);
        if (crc != kvt_crc32c(0, img, r.pos)) rc = kvt_fail(KVT_ECORRUPT, "swap: the image of collection %u fails its checksum", c->no);
    }
    if (rc) {
        drop_resident(c);
        c->ncl = ncl;
        return rc;
    }
    swap_free(s, c->swap_off, c->swap_len);
    c->resident_tick = s->cache.tick;
    c->parked = 0;
    c->swap_off = c->swap_len = 0;
    s->swap_ins++;
    return 0;
}

/* Reads and installs one parked collection now (an operation needs it). */
static int unpark_now(kvt_coll *c, int demand) {
    kvt_store *s = c->st;
    if (!c->parked) return 0;
    uint64_t len = c->swap_len; /* an install clears c->swap_len */
    int rc = kvt_mem_reserve(&s->cache, len);
    if (rc) return rc;
    uint8_t *img = malloc(len);
    if (!img) rc = kvt_fail(ENOMEM, "unpark: out of memory");
    if (!rc) rc = kvt_file_read(s->swap, c->swap_off, len, img, 0);
    if (!rc) s->swap_read_bytes += len;
    if (!rc) rc = install_image(c, img, len);
    if (!rc && demand) s->swap_demand_ins++;
    free(img);
    kvt_mem_release(&s->cache, len);
    return rc;
}

/* Every operation on a collection starts here: no loader busy with it, and it is resident. */
static int ready(kvt_coll *c) {
    wait_idle(c);
    return c->parked ? unpark_now(c, 1) : 0;
}

static int check_group(kvt_store *s, kvt_coll *const *colls, size_t n) {
    if (!colls && n) return kvt_fail(KVT_EINVAL, "collections: NULL list");
    for (size_t i = 0; i < n; i++) {
        if (!colls[i] || colls[i]->st != s) return kvt_fail(KVT_EINVAL, "collections: entry %zu is not a collection of this store", i);
        for (size_t t = 0; t < i; t++)
            if (colls[t] == colls[i]) return kvt_fail(KVT_EINVAL, "collections: entry %zu repeats entry %zu", i, t);
    }
    return 0;
}

int kvt_store_park(kvt_store *s, kvt_coll *const *colls, size_t n, int keep_cache) {
    kvt_clear_error();
    LOCK(s);
    int rc = check_group(s, colls, n);
    /* the group's images go to consecutive ranges when the file has no hole for them, so an
     * unpark of the whole group is one sequential read */
    for (size_t i = 0; i < n && !rc; i++) {
        wait_idle(colls[i]);
        rc = park_one(colls[i], keep_cache);
    }
    UNLOCK(s);
    return rc;
}

/* Operations that only look (stats, checkpoints) leave a parked collection parked: it is
 * brought in for the call and written back after. */
static int peek_begin(kvt_coll *c, int *was_parked) {
    wait_idle(c);
    *was_parked = c->parked;
    return c->parked ? unpark_now(c, 0) : 0;
}

static void peek_end(kvt_coll *c, int was_parked) {
    if (was_parked && !c->parked) park_one(c, 1); /* on failure it stays resident: nothing is lost */
}

/* Group swap-ins: the parked collections sorted by image offset; images that touch form one
 * read. */
static int by_swap_off(const void *a, const void *b) {
    uint64_t x = (*(kvt_coll *const *)a)->swap_off, y = (*(kvt_coll *const *)b)->swap_off;
    return x < y ? -1 : x > y;
}

int kvt_store_unpark(kvt_store *s, kvt_coll *const *colls, size_t n, int async) {
    kvt_clear_error();
    LOCK(s);
    int rc = check_group(s, colls, n);
    kvt_coll **v = NULL;
    size_t m = 0;
    if (!rc && n && !(v = malloc(n * sizeof *v))) rc = kvt_fail(ENOMEM, "unpark: out of memory");
    for (size_t i = 0; i < n && !rc; i++) {
        if (!async) wait_idle(colls[i]);
        if (colls[i]->parked && !colls[i]->inflight) v[m++] = colls[i];
    }
    if (!rc && m) qsort(v, m, sizeof *v, by_swap_off);
    if (async && !rc && m) start_loaders(s, &rc);
    uint64_t ops = 0, bytes = 0;
    for (size_t a = 0; a < m && !rc;) {
        size_t e = a + 1;
        uint64_t len = v[a]->swap_len;
        while (e < m && v[e]->swap_off == v[a]->swap_off + len) len += v[e++]->swap_len;
        if (kvt_mem_reserve(&s->cache, len) != 0) { /* no room for the whole run: one at a time */
            e = a + 1;
            len = v[a]->swap_len;
            if ((rc = kvt_mem_reserve(&s->cache, len))) break;
        }
        uint8_t *img = malloc(len);
        if (!img) {
            kvt_mem_release(&s->cache, len);
            rc = kvt_fail(ENOMEM, "unpark: out of memory");
            break;
        }
        if (async) {
            kvt_job *j = malloc(sizeof *j);
            if (!j) {
                free(img);
                kvt_mem_release(&s->cache, len);
                rc = kvt_fail(ENOMEM, "unpark: out of memory");
                break;
            }
            *j = (kvt_job){NULL, v[a], KVT_SWAP_JOB, (uint32_t)(e - a), NULL, NULL, img, len, run_swap_job};
            if (!(j->run = malloc((e - a) * sizeof(kvt_coll *)))) {
                free(j);
                free(img);
                kvt_mem_release(&s->cache, len);
                rc = kvt_fail(ENOMEM, "unpark: out of memory");
                break;
            }
            memcpy(j->run, &v[a], (e - a) * sizeof(kvt_coll *));
            for (size_t t = a; t < e; t++) v[t]->inflight++;
            s->loading_bytes += len;
            if (s->jobs_tail) s->jobs_tail->next = j;
            else s->jobs = j;
            s->jobs_tail = j;
            ops++;
            bytes += len;
        } else {
            kvt_io_batch_begin(&s->io);
            rc = kvt_file_read(s->swap, v[a]->swap_off, len, img, 0);
            kvt_io_batch_end(&s->io);
            if (!rc) s->swap_read_bytes += len;
            uint64_t at = 0;
            for (size_t t = a; t < e && !rc; t++) {
                uint64_t l = v[t]->swap_len;
                rc = install_image(v[t], img + at, l);
                at += l;
            }
            free(img);
            kvt_mem_release(&s->cache, len);
        }
        a = e;
    }
    if (async && ops) {
        kvt_io_charge(&s->io, ops, bytes);
        pthread_cond_broadcast(&s->job_cv);
    }
    free(v);
    UNLOCK(s);
    return rc;
}

int kvt_coll_is_parked(kvt_coll *c) {
    LOCK(c->st);
    int p = c->parked;
    UNLOCK(c->st);
    return p;
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
        uint32_t i = 0; /* replace the minimum and sift down */
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
    search_ctx *sx = vctx;
    kvt_coll *c = sx->c;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *rec = recs + (size_t)i * c->L.esz;
        int64_t id;
        memcpy(&id, rec, 8);
        for (uint32_t t = 0; t < sx->nql; t++) {
            uint32_t qi = sx->qlist[t];
            float s = entry_score(c, kvt_rec_key(rec), sx->q + (size_t)qi * c->p.dim, sx->x);
            heap_push(sx->ids + (size_t)qi * sx->k, sx->scores + (size_t)qi * sx->k, &sx->fill[qi], sx->k, id, s);
        }
    }
}

/* Insertion sort of one query's hits, best first (ties by id): k is small. */
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

static int search_locked(kvt_coll *c, const float *q, uint64_t nq, uint32_t k, uint32_t nprobe,
                         int64_t *ids_out, float *scores_out) {
    kvt_store *s = c->st;
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
    if (c->p.policy == KVT_POLICY_NONE) {
        /* exact: every key is in DRAM */
        for (uint64_t i = 0; i < nq; i++)
            for (uint64_t e = 0; e < c->n; e++)
                heap_push(ids_out + i * k, scores_out + i * k, &fill[i], k, (int64_t)e,
                          entry_score(c, c->keys + e * c->L.key_bytes, q + i * c->p.dim, x));
    }
    for (uint64_t b0 = 0; b0 < nq && !rc && c->p.policy != KVT_POLICY_NONE; b0 += B) {
        uint64_t b1 = b0 + B < nq ? b0 + B : nq, np = 0;
        for (uint64_t i = b0; i < b1; i++) {
            score_clusters(c, q + i * c->p.dim, 1, scores, x);
            top_by_score(idx, c->ncl, nprobe, scores);
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
    return rc;
}

int kvt_coll_search(kvt_coll *c, const float *q, uint64_t nq, uint32_t k, uint32_t nprobe,
                    int64_t *ids_out, float *scores_out) {
    kvt_clear_error();
    if (!q || nq == 0 || k == 0) return kvt_fail(KVT_EINVAL, "search: need at least one query and k >= 1");
    int rc;
    RUN_READY(c, search_locked(c, q, nq, k, nprobe, ids_out, scores_out));
    return rc;
}

/* ---- get ---------------------------------------------------------------------------------- */

int kvt_coll_get(kvt_coll *c, const int64_t *ids, uint64_t n, void *keys_out, void *values_out) {
    kvt_clear_error();
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    LOCK(s);
    int rc = ready(c);
    if (rc) {
        UNLOCK(s);
        return rc;
    }
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
        } else if (lc.idx >= k->n - k->pend) {
            rec = k->pbuf + (size_t)(lc.idx - (k->n - k->pend)) * L->esz;
        } else {
            s->cache.misses++;
            uint64_t off;
            rc = record_offset(c, (uint64_t)ids[i], &off);
            if (!rc) rc = kvt_file_read(c->f, off, L->esz, buf, 1);
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

/* The fields of kvt_coll_stats that come from the cluster table. */
static void cluster_stats(kvt_coll *c, kvt_coll_stats *o) {
    o->cached_clusters = o->flagged_clusters = 0;
    o->max_cluster_size = 0;
    double var = 0;
    uint64_t nonempty = 0;
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        if (k->ent) o->cached_clusters++;
        if (k->flagged) o->flagged_clusters++;
        if (!k->n) continue;
        nonempty++;
        var += variance(k);
        if (k->n > o->max_cluster_size) o->max_cluster_size = k->n;
    }
    o->clusters = nonempty;
    o->mean_cluster_size = nonempty ? (double)c->n / (double)nonempty : 0;
    o->mean_variance = nonempty ? var / (double)nonempty : 0;
}

int kvt_coll_stats_get(kvt_coll *c, kvt_coll_stats *o) {
    LOCK(c->st);
    kvt_coll_stats parked = c->parked_stats;
    *o = c->ctr;
    o->entries = c->n;
    o->pools = c->pools.n;
    o->data_file_bytes = token(c) ? token_offset(c, c->n) : kvt_pool_base(&c->L, c->pools.n);
    o->tau = c->tau;
    o->pending_entries = c->pending_total - c->tail_total;
    o->write_buffer_entries = c->tail_total;
    o->parked = (uint64_t)c->parked;
    if (c->parked) { /* as it was when parked: nothing changes a parked collection */
        o->clusters = parked.clusters;
        o->mean_cluster_size = parked.mean_cluster_size;
        o->mean_variance = parked.mean_variance;
        o->max_cluster_size = parked.max_cluster_size;
        o->flagged_clusters = parked.flagged_clusters;
        o->cached_clusters = 0;
    } else {
        cluster_stats(c, o);
    }
    UNLOCK(c->st);
    return 0;
}

int kvt_coll_cluster_sizes(kvt_coll *c, uint32_t *sizes, uint64_t cap, uint64_t *n_clusters) {
    kvt_clear_error();
    LOCK(c->st);
    int was_parked, rc = peek_begin(c, &was_parked);
    uint64_t m = 0;
    for (uint32_t j = 0; j < c->ncl && !rc; j++) {
        if (!c->cl[j].n) continue;
        if (m < cap) sizes[m] = c->cl[j].n;
        m++;
    }
    *n_clusters = m;
    if (!rc) peek_end(c, was_parked);
    UNLOCK(c->st);
    return rc;
}

/* estimate.c: every cluster slot's size and value sum, by cluster number (introspection) */
int kvt_coll_value_sums(kvt_coll *c, uint32_t *sizes, float *sums, uint64_t cap, uint64_t *n_clusters) {
    kvt_clear_error();
    LOCK(c->st);
    int was_parked, rc = peek_begin(c, &was_parked);
    uint32_t vd = c->p.value_dim;
    for (uint32_t j = 0; j < c->ncl && j < cap && !rc; j++) {
        if (sizes) sizes[j] = c->cl[j].n;
        if (sums && c->vsum) memcpy(sums + (size_t)j * vd, c->vsum + (size_t)j * vd, (size_t)vd * 4);
    }
    *n_clusters = rc ? 0 : c->ncl;
    if (!rc) peek_end(c, was_parked);
    UNLOCK(c->st);
    if (!rc && !kvt_vsum_kept(c)) rc = kvt_fail(KVT_EINVAL, "value_sums: this collection keeps none (policy none or value_dim 0)");
    return rc;
}

/* ---- durability: checkpoints and reopen --------------------------------------------------- */

#define DIR_MAGIC "KVTDIR01"
/* estimate.c: the same with each cluster's value sum after its representative. A KVTDIR01
 * blob of a collection opened with value sums on (exported without them, or before they
 * existed) is read and its sums recomputed from the stored values on open. */
#define DIR_MAGIC_VSUM "KVTDIR02"
#define LOC_MAGIC "KVTLOC01"

struct kvt_checkpoint {
    void *dir;
    size_t dirlen, nch;
    uint64_t *idx;
    void **blob;
    size_t *len;
    uint64_t mod_at;
    uint32_t retired_at;
};

void kvt_checkpoint_free(kvt_checkpoint *cp) {
    if (!cp) return;
    free(cp->dir);
    for (size_t i = 0; i < cp->nch; i++) free(cp->blob[i]);
    free(cp->blob);
    free(cp->idx);
    free(cp->len);
    free(cp);
}

const void *kvt_checkpoint_dir(const kvt_checkpoint *cp, size_t *len) {
    *len = cp->dirlen;
    return cp->dir;
}
size_t kvt_checkpoint_nchunks(const kvt_checkpoint *cp) { return cp->nch; }
const void *kvt_checkpoint_chunk(const kvt_checkpoint *cp, size_t i, uint64_t *chunk, size_t *len) {
    *chunk = cp->idx[i];
    *len = cp->len[i];
    return cp->blob[i];
}

static int export_dir(kvt_coll *c, void **blob, size_t *len) {
    kvt_wbuf w = {0};
    kvt_wbuf_put(&w, c->vsum ? DIR_MAGIC_VSUM : DIR_MAGIC, 8);
    kvt_wbuf_u32(&w, c->L.format); /* a format-1 file keeps format-1 catalogs: old engines read both */
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
    kvt_wbuf_f64(&w, c->tau);
    kvt_wbuf_u32(&w, c->staging);
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        kvt_wbuf_u32(&w, k->n);
        kvt_wbuf_u32(&w, k->nseg);
        kvt_wbuf_f64(&w, k->m2);
        kvt_wbuf_u32(&w, k->flagged);
        kvt_wbuf_u32(&w, k->hold);
        for (uint32_t g = 0; g < k->nseg; g++) {
            kvt_wbuf_u32(&w, k->segs[g].pool);
            kvt_wbuf_u32(&w, k->segs[g].head);
            kvt_wbuf_u32(&w, k->segs[g].n);
        }
        kvt_wbuf_put(&w, c->cent + (size_t)j * c->p.dim, (size_t)c->p.dim * 4);
        if (c->m2d) kvt_wbuf_put(&w, c->m2d + (size_t)j * c->p.dim, (size_t)c->p.dim * 4);
        if (c->vsum) kvt_wbuf_put(&w, c->vsum + (size_t)j * c->p.value_dim, (size_t)c->p.value_dim * 4);
    }
    uint32_t crc = kvt_crc32c(0, w.p, w.len);
    kvt_wbuf_u32(&w, crc);
    if (w.oom) {
        free(w.p);
        return kvt_fail(ENOMEM, "export: out of memory");
    }
    *blob = w.p;
    *len = w.len;
    return 0;
}

static int export_chunk(kvt_coll *c, uint64_t chunk, void **blob, size_t *len) {
    uint64_t lo = chunk * KVT_LOC_CHUNK;
    uint32_t cnt = (uint32_t)(c->n - lo < KVT_LOC_CHUNK ? c->n - lo : KVT_LOC_CHUNK);
    kvt_wbuf w = {0};
    kvt_wbuf_put(&w, LOC_MAGIC, 8);
    kvt_wbuf_u64(&w, chunk);
    kvt_wbuf_u32(&w, cnt);
    kvt_wbuf_put(&w, c->loc + lo, (size_t)cnt * sizeof(kvt_loc));
    uint32_t crc = kvt_crc32c(0, w.p, w.len);
    kvt_wbuf_u32(&w, crc);
    if (w.oom) {
        free(w.p);
        return kvt_fail(ENOMEM, "export: out of memory");
    }
    *blob = w.p;
    *len = w.len;
    return 0;
}

/* Writes every cluster's pending entries to flash (they then stop being pending). */
static int write_all_pending(kvt_coll *c) {
    int rc = 0;
    for (uint32_t j = 0; j < c->ncl && !rc; j++) rc = write_pending(c, j);
    return rc;
}

int kvt_coll_checkpoint(kvt_coll *c, kvt_checkpoint **out) {
    kvt_clear_error();
    LOCK(c->st);
    int was_parked = 0;
    kvt_checkpoint *cp = calloc(1, sizeof *cp);
    int rc = cp ? 0 : kvt_fail(ENOMEM, "checkpoint: out of memory");
    if (!rc) rc = peek_begin(c, &was_parked);
    if (!rc) rc = write_all_pending(c);
    if (!rc) kvt_kill_point("checkpoint.pending_written");
    if (!rc) rc = kvt_file_sync(c->f);
    if (!rc) kvt_kill_point("checkpoint.synced");
    if (!rc) rc = export_dir(c, &cp->dir, &cp->dirlen);
    uint64_t nch = c->n ? (c->n - 1) / KVT_LOC_CHUNK + 1 : 0;
    if (!rc) {
        cp->idx = malloc(nch * 8 + 8);
        cp->blob = calloc(nch + 1, sizeof *cp->blob);
        cp->len = malloc(nch * sizeof *cp->len + 8);
        if (!cp->idx || !cp->blob || !cp->len) rc = kvt_fail(ENOMEM, "checkpoint: out of memory");
    }
    for (uint64_t ch = 0; ch < nch && !rc; ch++) {
        if (c->mod[ch] <= c->committed_mod) continue;
        cp->idx[cp->nch] = ch;
        rc = export_chunk(c, ch, &cp->blob[cp->nch], &cp->len[cp->nch]);
        if (!rc) cp->nch++;
    }
    if (cp) {
        cp->mod_at = c->modc;
        cp->retired_at = c->pools.nretired;
    }
    if (cp && !c->parked) peek_end(c, was_parked);
    UNLOCK(c->st);
    if (rc) kvt_checkpoint_free(cp);
    else *out = cp;
    return rc;
}

int kvt_coll_changed(kvt_coll *c) {
    LOCK(c->st);
    int changed = c->modc != c->committed_mod;
    UNLOCK(c->st);
    return changed;
}

int kvt_coll_committed(kvt_coll *c, const kvt_checkpoint *cp) {
    LOCK(c->st);
    if (cp->mod_at > c->committed_mod) c->committed_mod = cp->mod_at;
    kvt_pools_committed(&c->pools, cp->retired_at);
    UNLOCK(c->st);
    return 0;
}

static int blob_crc_ok(const void *blob, size_t len) {
    if (len < 12) return 0;
    uint32_t crc;
    memcpy(&crc, (const uint8_t *)blob + len - 4, 4);
    return crc == kvt_crc32c(0, blob, len - 4);
}

static int load_dir(kvt_coll *c, const void *blob, size_t len, int *sums_missing) {
    const char *what = "cluster directory";
    int with_sums = blob_crc_ok(blob, len) && memcmp(blob, DIR_MAGIC_VSUM, 8) == 0;
    if (!blob_crc_ok(blob, len) || (!with_sums && memcmp(blob, DIR_MAGIC, 8) != 0))
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u fails its checksum", what, c->no);
    if (with_sums && !kvt_vsum_kept(c))
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u carries value sums its parameters do not keep", what, c->no);
    *sums_missing = kvt_vsum_kept(c) && !with_sums;
    kvt_rbuf r = {blob, len - 4, 8, 0};
    uint32_t ver = kvt_rbuf_u32(&r);
    if (ver < 1 || ver > KVT_FORMAT_VERSION)
        return kvt_fail(KVT_EFORMAT, "catalog: %s has format version %u, this engine reads 1 to %u", what, ver, KVT_FORMAT_VERSION);
    if (ver != c->L.format)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u has format %u but its data file format %u", what, c->no, ver, c->L.format);
    uint32_t dim = kvt_rbuf_u32(&r), vdim = kvt_rbuf_u32(&r), dtype = kvt_rbuf_u32(&r),
             metric = kvt_rbuf_u32(&r), policy = kvt_rbuf_u32(&r), esz = kvt_rbuf_u32(&r);
    uint64_t pool_bytes = kvt_rbuf_u64(&r), n = kvt_rbuf_u64(&r);
    uint32_t ncl = kvt_rbuf_u32(&r), npools = kvt_rbuf_u32(&r);
    double tau = kvt_rbuf_f64(&r);
    uint32_t staging = kvt_rbuf_u32(&r);
    if (r.bad || dim != c->p.dim || vdim != c->p.value_dim || dtype != (uint32_t)c->p.dtype ||
        metric != (uint32_t)c->p.metric || policy != (uint32_t)c->p.policy || esz != c->L.esz ||
        pool_bytes != c->L.pool_bytes)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u does not match its parameters", what, c->no);
    if (ncl > len / 16 || npools > (1u << 30) || (staging != KVT_NONE && staging >= ncl) || !(tau >= 0))
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u has impossible counts", what, c->no);
    int rc = ensure_clusters(c, ncl);
    if (!rc) rc = ensure_pools(c, npools);
    if (!rc) rc = ensure_ids(c, n);
    if (rc) return rc;
    c->tau = tau;
    c->staging = staging;
    c->pools.n = npools;
    for (uint32_t p = 0; p < npools; p++) c->pools.p[p] = (kvt_pool){{KVT_HEAD_FREE, KVT_HEAD_FREE}, {0, 0}};
    uint64_t total = 0;
    for (uint32_t j = 0; j < ncl && !r.bad; j++) {
        kvt_cluster *k = &c->cl[j];
        uint32_t kn = kvt_rbuf_u32(&r), nseg = kvt_rbuf_u32(&r);
        k->m2 = kvt_rbuf_f64(&r);
        k->flagged = kvt_rbuf_u32(&r) ? 1 : 0;
        k->hold = kvt_rbuf_u32(&r);
        if (r.bad || nseg > (len - r.pos) / 12) {
            r.bad = 1;
            break;
        }
        rc = ensure_segs(c, k, nseg);
        if (rc) return rc;
        uint32_t sum = 0;
        for (uint32_t g = 0; g < nseg; g++) {
            kvt_seg sg = {kvt_rbuf_u32(&r), kvt_rbuf_u32(&r), kvt_rbuf_u32(&r)};
            if (sg.pool >= npools || sg.head > 1 || c->pools.p[sg.pool].owner[sg.head] != KVT_HEAD_FREE) {
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
        if (token(c) ? nseg != 0 : sum != kn) r.bad = 1;
        total += kn;
        kvt_rbuf_get(&r, c->cent + (size_t)j * dim, (size_t)dim * 4);
        if (c->m2d) kvt_rbuf_get(&r, c->m2d + (size_t)j * dim, (size_t)dim * 4);
        if (with_sums) kvt_rbuf_get(&r, c->vsum + (size_t)j * vdim, (size_t)vdim * 4);
        c->ncl = j + 1;
        update_norm(c, j);
    }
    c->ncl = ncl;
    if (r.bad || total != n || r.pos != r.len)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u is inconsistent", what, c->no);
    c->n = n;
    kvt_pools_rebuild(&c->pools, &c->L);
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

typedef struct keys_ctx { kvt_coll *c; } keys_ctx;

/* estimate.c: a directory exported before value sums existed; they are summed from the
 * stored values (the sums start at zero). */
static void take_vsum(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    kvt_coll *c = ((keys_ctx *)vctx)->c;
    for (uint32_t i = 0; i < n; i++) kvt_vsum_add(c, ci, kvt_rec_value(&c->L, recs + (size_t)i * c->L.esz));
}

/* Policy none keeps every key in DRAM: read them back from the records. */
static void take_keys(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    kvt_coll *c = ((keys_ctx *)vctx)->c;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *rec = recs + (size_t)i * c->L.esz;
        int64_t id;
        memcpy(&id, rec, 8);
        memcpy(c->keys + (uint64_t)id * c->L.key_bytes, kvt_rec_key(rec), c->L.key_bytes);
    }
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
    uint32_t version = rc ? 0 : kvt_data_header_version(page);
    if (version >= 1 && version < KVT_FORMAT_VERSION) /* an older file: read in its own geometry */
        kvt_layout_init(&c->L, p->dim, p->value_dim, p->dtype, p->max_cluster_size, version,
                        p->layout != KVT_LAYOUT_TOKEN || p->policy == KVT_POLICY_NONE);
    if (!rc) {
        rc = kvt_data_header_check(&c->L, p, page);
        if (rc) kvt_fail(rc, "%s: data file header is %s", kvt_file_path(c->f), rc == KVT_EFORMAT ? "of another format version" : "damaged or does not match the catalog");
    }
    int sums_missing = 0;
    if (!rc) rc = load_dir(c, dir_blob, dir_len, &sums_missing);
    uint64_t want = c->n ? (c->n - 1) / KVT_LOC_CHUNK + 1 : 0;
    if (!rc && n_chunks != want)
        rc = kvt_fail(KVT_ECORRUPT, "catalog: collection %u has %zu id map chunks, %llu expected", no, n_chunks, (unsigned long long)want);
    if (!rc && !(counts = calloc((size_t)c->ncl + 1, 4))) rc = kvt_fail(ENOMEM, "open: out of memory");
    for (size_t i = 0; i < n_chunks && !rc; i++) rc = load_chunk(c, i, chunks[i], chunk_lens[i], counts);
    for (uint32_t j = 0; j < c->ncl && !rc; j++)
        if (counts[j] != c->cl[j].n)
            rc = kvt_fail(KVT_ECORRUPT, "catalog: cluster %u of collection %u has %u entries but the id map names %u", j, no, c->cl[j].n, counts[j]);
    if (!rc && token(c)) rc = rebuild_members(c);
    if (!rc && (p->policy == KVT_POLICY_NONE || sums_missing)) {
        keys_ctx kc = {c};
        for (uint32_t j = 0; j < c->ncl && !rc; j++) rc = visit_cluster(c, j, sums_missing ? take_vsum : take_keys, &kc);
        kvt_cache_drop_owner(&s->cache, c);
        for (uint32_t j = 0; j < c->ncl; j++) c->cl[j].ent = NULL;
    }
    if (!rc) c->committed_mod = c->modc;
    if (rc) coll_forget(s, c);
    else *out = c;
done:
    free(counts);
    UNLOCK(s);
    return rc;
}
