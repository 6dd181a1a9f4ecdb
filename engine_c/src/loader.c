/*
 * loader.c — asynchronous I/O: the loader threads and their job queue, prefetching clusters
 * into pinned cache entries ahead of use, and swap-in jobs of parked collections.
 *
 * Invariants:
 * 1. No operation changes a collection while it has jobs in flight: every operation first
 *    waits for them (wait_idle).
 * 2. A loading cache entry is pinned until its job finishes; its bytes count in
 *    loading_bytes.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "loader.h"
#include "read.h"
#include "store.h"

/* ---- prefetch: loader threads ------------------------------------------------------------- */

/* Waits (releasing the store mutex) until no prefetch of collection c is queued or loading:
 * every operation on c starts here, so none sees a cluster half loaded or changes one under
 * a loader. */
void kvt_wait_idle(kvt_coll *c) {
    kvt_store *s = c->st;
    if (!c->inflight) return;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (c->inflight) pthread_cond_wait(&s->done_cv, &s->mu);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    s->io_wait_seconds += (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
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
    uint32_t base = 0;
    /* the cluster's extents (read.c's provider, from the job's copy of the segments), read as
     * one batch. The token layout's member list is read without the mutex: no operation
     * changes a collection with jobs in flight (they all start in kvt_wait_idle). Its scratch
     * was reserved with the job (the cache entry). */
    const kvt_cluster *tk = &c->cl[j->cl];
    size_t cap = token(c) ? tk->n : j->nseg;
    kvt_extent *ex = malloc(cap * sizeof *ex + 1);
    kvt_read_req *req = malloc(cap * sizeof *req + 1);
    if (!ex || !req) rc = kvt_fail(ENOMEM, "prefetch: out of memory");
    uint32_t nreq = rc ? 0 : kvt_cluster_extents(c, tk, j->segs, j->nseg, ex);
    for (uint32_t x = 0; x < nreq; x++)
        req[x] = (kvt_read_req){ex[x].off, (size_t)ex[x].len, j->e->rec + ex[x].boff, ex[x].nrec};
    if (!rc) rc = kvt_file_read_batch(c->f, req, nreq);
    free(ex);
    free(req);
    LOCK(s);
    kvt_cluster *k = &c->cl[j->cl];
    /* the engine's own read: damage fails the job (counted), and the call that needs the
     * cluster reads it again in its own on_corrupt mode */
    if (token(c) && !rc)
        rc = kvt_check_run(c, KVT_READ_OWN, j->cl, 0, j->e->rec, k->n, k->n ? token_offset(c, kvt_members(k)[0]) : 0,
                           NULL);
    if (!token(c) && !rc) rc = kvt_settle_segs(c, KVT_READ_OWN, j->cl, j->segs, j->nseg, j->e->rec, NULL);
    base = k->n - k->pend;
    s->loading_bytes -= (uint64_t)k->n * L->esz;
    if (!rc) {
        if (k->pend) memcpy(j->e->rec + (size_t)base * L->esz, k->x->pbuf, (size_t)k->pend * L->esz);
        j->e->n = k->n;
        j->e->loading = 0;
        j->e->pins--;
        kvt_cache_fit(&s->cache, j->e);
    } else {
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
void kvt_start_loaders(kvt_store *s, int *rc) {
    while (s->nloaders < KVT_LOADERS) {
        if (pthread_create(&s->loaders[s->nloaders], NULL, loader_main, s)) {
            if (!s->nloaders) *rc = kvt_fail(EAGAIN, "cannot start a loader thread (syscall pthread_create)");
            break;
        }
        s->nloaders++;
    }
}
