/*
 * store.c — the store: open/close, its statistics, the cache's view of the collections that
 * own cached clusters, and creating a collection (index.c makes one in DRAM).
 *
 * Invariants (of the whole collection layer; the other files refer to them by number):
 * 1. Every public call takes the store mutex for its whole duration; the structures of
 *    store.h are only touched under it.
 * 2. For every id < n, the id map names its cluster c (kvt_loc), and exactly one live record
 *    of cluster c carries that id. Along a cluster's slots (segments in order, slots in
 *    order, then its pending buffer) ids strictly increase, dead slots (format 3) included:
 *    records are appended in id order and every rewrite keeps their order. So the live
 *    record of rank i among the ids the map puts in c is its i-th live record, and a record
 *    is found among its cluster's by its id.
 *    The sum of cl[c].n is n; a cluster with n == 0 owns nothing and is a free slot.
 * 3. cent[c] is the mean of cluster c's keys, cnorm[c] its squared norm (FLT_MAX for free
 *    slots, so nothing joins them), cl[c].m2 the sum of squared distances to the mean.
 * 4. Every byte held for data is reserved against the DRAM budget first (coll->acct for the
 *    long-lived structures, through grow_array/free_array; transient reservations are
 *    released before return).
 * 5. A policy-none collection keeps every key resident (keys) until they no longer fit the
 *    budget; then it drops them (keys_flash) and its scoring reads the key column from flash,
 *    so results are the same either way and the keys are never half resident.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "index.h"
#include "simd.h"
#include "store.h"

static void on_evict(void *owner, const kvt_cache_ent *e) {
    kvt_coll *c = owner;
    kvt_cluster *k = &c->cl[e->cluster];
    k->heat = kvt_float_to_half(e->heat); /* remembered: a cluster read again comes back as hot as it was */
    k->heat_visit = (uint16_t)e->use_visit;
}

static int history(void *owner, uint32_t cluster, float *heat, uint64_t *visit) {
    kvt_coll *c = owner;
    kvt_cluster *k = &c->cl[cluster];
    float h = kvt_half_to_float(k->heat);
    if (h <= 0) return 0;
    *heat = h;
    /* the read count as of now, less the reads since (16 bits of them are kept: heat is zero
     * past KVT_HEAT_HORIZON reads anyway, and a count that wrapped only makes it a little
     * hotter than it is) */
    *visit = c->cache_state.visits - (uint16_t)((uint16_t)c->cache_state.visits - k->heat_visit);
    return 1;
}

static kvt_cache_owner *owner_state(void *owner) { return &((kvt_coll *)owner)->cache_state; }

/* ---- store -------------------------------------------------------------------------------- */

static int cache_policy_known(int policy) {
    size_t n;
    const kvt_name *t = kvt_cache_policy_names(&n);
    for (size_t i = 0; i < n; i++)
        if (t[i].value == policy) return 1;
    return 0;
}

int kvt_store_open(const char *dir, const kvt_store_opts *opts, kvt_store **out) {
    kvt_clear_error();
    if (!dir || !opts || !out) return kvt_fail(KVT_EINVAL, "store_open: NULL argument");
    if (opts->dram_budget < 4096)
        return kvt_fail(KVT_EINVAL, "dram_budget: at least 4096 bytes expected, got %llu",
                        (unsigned long long)opts->dram_budget);
    kvt_store *s = calloc(1, sizeof *s);
    if (!s || !(s->dir = strdup(dir))) {
        free(s);
        return kvt_fail(ENOMEM, "store_open: out of memory");
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->job_cv, NULL);
    pthread_cond_init(&s->done_cv, NULL);
    kvt_io_init(&s->io, &opts->device, opts->direct);
    kvt_mem_init(&s->mem, opts->dram_budget);
    kvt_cache_init(&s->cache, &s->mem, on_evict);
    s->cache.owner_state = owner_state;
    s->cache.history = history;
    s->K = kvt_simd();
    s->merge_gap = opts->merge_gap;
    s->write_buffer = opts->write_buffer;
    if (!cache_policy_known(opts->cache_policy)) {
        char names[128];
        size_t n, at = 0;
        const kvt_name *t = kvt_cache_policy_names(&n);
        for (size_t i = 0; i < n; i++)
            at += (size_t)snprintf(names + at, sizeof names - at, "%s%d (%s)", i ? ", " : "", t[i].value, t[i].name);
        kvt_store_close(s);
        return kvt_fail(KVT_EINVAL, "cache_policy: one of %s expected, got %d", names, opts->cache_policy);
    }
    s->cache.policy = opts->cache_policy;
    *out = s;
    return 0;
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
            kvt_mem_release(&s->mem, j->swap_len);
            free(j->run);
        } else {
            s->loading_bytes -= (uint64_t)j->c->cl[j->cl].n * j->c->L.esz;
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
    for (uint32_t i = 0; i < s->ncolls; i++) kvt_coll_free(s->colls[i]);
    free(s->colls);
    if (s->swap) { /* volatile: nothing in it outlives the store */
        char path[4096];
        kvt_file_close(s->swap);
        if (snprintf(path, sizeof path, "%s/swap.kvs", s->dir) < (int)sizeof path) unlink(path);
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
    o->dram_bytes = s->mem.used;
    o->dram_budget = s->mem.budget;
    o->dram_peak_bytes = s->mem.peak;
    o->dram_index_bytes = s->mem.use[KVT_USE_INDEX];
    o->dram_pending_bytes = s->mem.use[KVT_USE_PENDING];
    o->dram_buffer_bytes = s->mem.use[KVT_USE_BUFFERS];
    o->dram_index_peak = s->mem.use_peak[KVT_USE_INDEX];
    o->dram_cache_peak = s->mem.use_peak[KVT_USE_CACHE];
    o->dram_pending_peak = s->mem.use_peak[KVT_USE_PENDING];
    o->dram_buffer_peak = s->mem.use_peak[KVT_USE_BUFFERS];
    o->dram_fixed_peak = s->mem.fixed_peak;
    o->cache_bytes = s->cache.cache_bytes;
    o->cached_clusters = s->cache.cached;
    o->cache_hits = s->cache.hits;
    o->cache_misses = s->cache.misses;
    o->evictions = s->cache.evictions;
    o->read_ops = io.read_ops;
    o->read_bytes = io.read_bytes;
    o->read_entries = io.read_entries - io.dead_read; /* the live ones */
    o->contiguous_reads = io.read_ops + io.gaps_read;
    o->gap_bytes = io.gap_bytes;
    o->dead_bytes = io.dead_bytes;
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
    o->prefetch_evicted = s->cache.prefetch_evicted;
    o->prefetch_errors = s->prefetch_errors;
    o->prefetch_read_bytes = io.prefetch_read_bytes;
    o->io_wait_seconds = s->io_wait_seconds;
    o->swap_outs = s->swap_outs;
    o->swap_ins = s->swap_ins;
    o->swap_demand_ins = s->swap_demand_ins;
    o->swap_pressure_outs = s->swap_pressure_outs;
    o->swap_write_bytes = s->swap_write_bytes;
    o->swap_unchanged_bytes = s->swap_unchanged_bytes;
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
    uint64_t by_cause = o->prefetch_read_bytes + o->swap_read_bytes + o->split_read_bytes + o->relayout_read_bytes;
    o->retrieve_read_bytes = o->read_bytes - (by_cause < o->read_bytes ? by_cause : o->read_bytes);
    o->io_backend = kvt_io_backend_name(&s->io);
    UNLOCK(s);
    return 0;
}

int kvt_store_reset_io_stats(kvt_store *s) {
    LOCK(s);
    kvt_io_stats_reset(&s->io);
    s->swap_read_bytes = s->swap_write_bytes = s->swap_unchanged_bytes = 0;
    s->swap_ins = s->swap_outs = s->swap_demand_ins = s->swap_pressure_outs = 0;
    s->cache.hits = s->cache.misses = s->cache.evictions = s->cache.prefetch_evicted = 0;
    kvt_mem_reset_peaks(&s->mem);
    UNLOCK(s);
    return 0;
}

int kvt_store_step(kvt_store *s) {
    kvt_clear_error();
    if (!s) return kvt_fail(KVT_EINVAL, "store_step: NULL store");
    LOCK(s);
    kvt_cache_step(&s->cache);
    UNLOCK(s);
    return 0;
}

const char *kvt_store_io_backend(kvt_store *s) { return kvt_io_backend_name(&s->io); }

int kvt_store_inject_fault(kvt_store *s, char op, uint64_t nth, int code) {
    return kvt_io_inject(&s->io, op, nth, code);
}

/* ---- collections ------------------------------------------------------------------------- */

int kvt_coll_create(kvt_store *s, uint32_t no, const kvt_coll_params *p, kvt_coll **out) {
    kvt_clear_error();
    LOCK(s);
    kvt_coll *c;
    int rc = kvt_coll_new(s, no, p, 1, &c);
    if (!rc) {
        uint8_t page[KVT_DATA_HEADER];
        kvt_data_header(&c->L, p, page);
        rc = kvt_file_write(c->f, 0, page, sizeof page);
        /* the new file's directory entry must be durable before a catalog commit names it */
        if (!rc) rc = kvt_dir_sync(s->dir);
        if (rc)
            kvt_coll_forget(s, c);
        else
            *out = c;
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
