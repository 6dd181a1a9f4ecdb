/*
 * prefetch.c — read-ahead (docs/design.md §2.3, async I/O): the clusters a retrieve with the
 * same arguments would read from flash are queued on the loader threads (loader.c), each
 * into a pinned, loading cache entry, and the call returns at once; a later read waits only
 * for what is still loading.
 *
 * Invariants:
 * 1. Prefetch changes no results: it only fills cache entries, with the records a read on
 *    use would have found, and a failed read leaves the cluster to be read on use.
 * 2. Read-ahead uses idle room only: bytes pinned by reads in flight stay under a quarter of
 *    the budget, and a cluster is admitted only where the cache has spare room
 *    (kvt_cache_spare), so prefetch never evicts what the current step still reads.
 * 3. The device model is charged when the reads are queued, as one batch; the loader's
 *    reads are counted, not charged again.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "loader.h"
#include "policy.h"
#include "read.h"
#include "score.h"
#include "store.h"
#include "virtualize.h"

int kvt_coll_prefetch(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, uint64_t *queued) {
    kvt_clear_error();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "prefetch: query_group must hold at least one query");
    kvt_store *s = c->st;
    LOCK(s);
    int rc = kvt_ready_for_hint(c);
    if (rc) {
        UNLOCK(s);
        return rc;
    }
    uint64_t nq_out = 0, ops = 0, bytes = 0;
    selection sel = {0};
    if (!c->ops->clustered || c->parked) goto out; /* no clusters, or no room to bring them in */
    rc = kvt_selection_alloc(c, nq, &sel);
    if (rc == KVT_EBUDGET) { /* read-ahead uses idle room: with none to choose in, it queues nothing */
        kvt_clear_error();
        rc = 0;
        goto out;
    }
    if (rc) goto out;
    uint32_t *idx = sel.idx;
    uint64_t taken, total;
    uint32_t part;
    kvt_select_clusters(c, q, nq, budget, sel.scores, sel.q2, idx, &taken, &total, &part);
    if (!rc) kvt_start_loaders(s, &rc);
    for (uint64_t t = 0; t < taken && !rc; t++) {
        kvt_cluster *k = &c->cl[idx[t]];
        if (kvt_cached(c, idx[t]) || k->n == k->pend) continue; /* cached, or nothing on flash */
        /* reads in flight pin their buffers: past a quarter of the budget, a call needing
         * room could find nothing to evict and fail, so the rest is read on use */
        uint64_t pin = (uint64_t)k->n * c->L.esz;
        if (s->loading_bytes + pin > s->mem.budget / 4) continue;
        /* read-ahead uses idle room only: under a tight budget, evicting clusters the step
         * still reads to make room for a guess costs more reads than it hides */
        uint32_t nrec = kvt_read_buffer_records(c, k);
        if (!kvt_cache_spare(&s->cache, sizeof(kvt_cache_ent) + (uint64_t)nrec * c->L.esz)) continue;
        kvt_job *j = malloc(sizeof *j + (size_t)k->nseg * sizeof(kvt_seg));
        kvt_cache_ent *e = j ? kvt_cache_admit(&s->cache, c, idx[t], nrec, c->L.esz) : NULL;
        if (!e) { /* no room in the budget: that cluster is read on use */
            free(j);
            continue;
        }
        e->loading = 1;
        e->prefetched = 1;
        s->loading_bytes += pin;
        *j = (kvt_job){NULL, c, idx[t], k->nseg, e, NULL, NULL, 0};
        /* token order keeps no segment list (nseg 0, segs NULL): memcpy's pointers must be valid */
        if (k->nseg) memcpy(j->segs, k->segs, (size_t)k->nseg * sizeof(kvt_seg));
        /* the device model is charged here, for the reads the job will make */
        kvt_extent *ex = malloc((size_t)(token(c) ? k->n : k->nseg) * sizeof *ex + 1);
        uint32_t nex = ex ? kvt_cluster_extents(c, k, k->segs, k->nseg, ex) : 0;
        for (uint32_t x = 0; x < nex; x++) {
            ops++;
            bytes += kvt_file_is_direct(c->f) ? kvt_file_read_scratch(c->f, ex[x].off, (size_t)ex[x].len) : ex[x].len;
        }
        free(ex);
        if (s->jobs_tail)
            s->jobs_tail->next = j;
        else
            s->jobs = j;
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
    kvt_selection_free(c, &sel);
    UNLOCK(s);
    if (queued) *queued = nq_out;
    return rc;
}
