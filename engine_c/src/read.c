/*
 * read.c — reading clusters: where a cluster's records are (its extents, in either layout),
 * merging nearby extents into one request, checking them against the id map, and handing
 * them, cached or freshly read, to a visitor.
 *
 * Invariants:
 * 1. A cached cluster's records equal its records on flash plus its pending buffer, in order.
 * 2. Every record read is checked against the id map (store.c 2) before anyone sees it; a
 *    mismatch is KVT_ECORRUPT, never silent garbage.
 * 3. The read buffers are reserved against the budget before the reads are issued.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "coll.h"

/* ---- reading clusters --------------------------------------------------------------------- */

/* Checks a run of records read from flash against the id map. */
int kvt_check_run(kvt_coll *c, uint32_t ci, uint32_t first_idx, const uint8_t *recs, uint32_t n, uint64_t off) {
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
uint32_t kvt_read_buffer_records(const kvt_coll *c, const kvt_cluster *k) {
    return (uint32_t)((read_buffer_bytes(c, k) + c->L.esz - 1) / c->L.esz);
}

/* A cluster's segments, read as stacked by its extents, become its records in order in the
 * same buffer (padding dropped, head-1 runs put first-first) and are checked. */
static int finish_cluster(kvt_coll *c, uint32_t ci, uint8_t *buf) {
    const kvt_layout *L = &c->L;
    kvt_cluster *k = &c->cl[ci];
    if (token(c)) return k->n - k->pend ? kvt_check_run(c, ci, 0, buf, k->n - k->pend, token_offset(c, k->mem[0])) : 0;
    uint64_t boff = 0;
    uint32_t base = 0;
    int rc = 0;
    for (uint32_t g = 0; g < k->nseg && !rc; g++) {
        const kvt_seg *sg = &k->segs[g];
        if (!sg->n) continue;
        uint8_t *dst = buf + (size_t)base * L->esz;
        kvt_unpad(L, dst, buf + boff, kvt_run_pos(L, sg->head, 0, sg->n), sg->n);
        if (sg->head == 1) kvt_rec_reverse(L, dst, sg->n);
        rc = kvt_check_run(c, ci, base, dst, sg->n, kvt_run_offset(L, sg->pool, sg->head, 0, sg->n));
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
int kvt_visit_clusters(kvt_coll *c, const uint32_t *list, uint32_t nlist, visit_fn fn, void *ctx) {
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
            ent[b] = kvt_cache_admit(&s->cache, c, ci, kvt_read_buffer_records(c, k), L->esz);
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
                    kvt_cache_fit(&s->cache, ent[b]); /* the read's padding is budget */
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

int kvt_visit_cluster(kvt_coll *c, uint32_t ci, visit_fn fn, void *ctx) {
    return kvt_visit_clusters(c, &ci, 1, fn, ctx);
}

typedef struct collect_ctx { uint8_t *dst; size_t esz; } collect_ctx;

static void collect(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    collect_ctx *x = vctx;
    memcpy(x->dst, recs, (size_t)n * x->esz);
    x->dst += (size_t)n * x->esz;
}

/* All records of cluster j in one buffer: the cached copy, pinned (*pinned), or a reserved
 * buffer read from flash (*owned = its bytes; those reads are counted as a split's). */
int kvt_load_records(kvt_coll *c, uint32_t j, uint8_t **recs, uint64_t *owned, kvt_cache_ent **pinned,
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
        rc = kvt_visit_cluster(c, j, collect, &x);
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
void kvt_release_records(kvt_coll *c, uint8_t *recs, uint64_t owned, kvt_cache_ent *pinned, int consumed) {
    if (owned) {
        free(recs);
        kvt_mem_release(&c->st->cache, owned);
    }
    if (pinned && !consumed) pinned->pins--;
}
