/*
 * colocate.c — co-location (docs/design.md §2.2): the first colocate_after retrieves of a
 * collection count which clusters they fetch together; then the collection is rewritten once
 * so that clusters often fetched together sit next to each other on flash, and a retrieve
 * becomes a few merged reads (read.c merges extents closer than the merge gap).
 *
 * Invariants:
 * 1. The counts (cofreq, nco x nco) are reserved as index, and spent by the rewrite whether
 *    it succeeds or not: a collection is rewritten at most once per open.
 * 2. The rewrite is copy on write, one cluster at a time (adapt.c 3): committed data is never
 *    overwritten before the catalog stops naming it, and a failed rewrite restores every
 *    cluster it moved.
 */
#include <errno.h>
#include <stdlib.h>

#include "colocate.h"
#include "common.h"
#include "index.h"
#include "layout.h"
#include "read.h"
#include "store.h"

#define KVT_COLOCATE_MAX 1024 /* clusters; past this the dense count matrix costs too much */

/* Counts which clusters one retrieve fetched together (the first colocate_after retrieves). */
void kvt_count_coretrieval(kvt_coll *c, const uint32_t *sel, uint64_t nsel) {
    if (!c->p.colocate_after || token(c) || c->ctr.relayouts || c->retrieves >= c->p.colocate_after) return;
    if (!c->cofreq) {
        c->nco = c->ncl;
        uint64_t bytes = (uint64_t)c->nco * c->nco * sizeof(uint16_t);
        if (c->nco > KVT_COLOCATE_MAX || kvt_mem_reserve_as(&c->st->mem, KVT_USE_INDEX, bytes)) {
            c->retrieves = c->p.colocate_after; /* too many clusters or no room: never */
            return;
        }
        if (!(c->cofreq = calloc((size_t)c->nco * c->nco, sizeof(uint16_t)))) {
            kvt_mem_release_as(&c->st->mem, KVT_USE_INDEX, bytes);
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

/* The co-retrieval chain of the first k clusters: from the most fetched, repeatedly the
 * unplaced cluster most often fetched with the last one (restarting from the most fetched
 * when none was), empty clusters left out. Returns its length. */
static uint32_t build_chain(const kvt_coll *c, uint32_t k, uint32_t *chain, uint32_t *placed) {
    uint32_t m = 0;
    while (m < k) {
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
    return m;
}

/* The one-time rewrite: orders the counted clusters in a chain that follows co-retrieval
 * (from the most fetched, repeatedly the unplaced cluster most often fetched with the last
 * one) and lays the chain across fresh consecutive pools: chain[0] at the front of pool 0,
 * then chain[2i+1] at the back of pool i and chain[2i+2] at the front of pool i+1, so each
 * neighbouring pair of the chain across a pool boundary is contiguous on flash and the pair
 * sharing a pool is one merged read apart. Copy on write, like a split, one cluster at a
 * time so that it needs no more DRAM than the largest cluster. */
int kvt_relayout(kvt_coll *c) {
    kvt_store *s = c->st;
    uint32_t k = c->nco < c->ncl ? c->nco : c->ncl, m = 0, done = 0, sr = c->L.pool_cap;
    uint64_t meta = (uint64_t)k * (4 + 4 + sizeof(seg_save)) + 16, sbytes = 0, written = 0;
    int rc = kvt_mem_reserve(&s->mem, meta);
    if (rc) goto spent;
    uint32_t *chain = malloc((size_t)k * 4 + 4), *placed = calloc(k + 1, 4);
    seg_save *old = calloc(k + 1, sizeof *old);
    uint8_t *scratch = NULL;
    undo_log log = {0};
    if (!chain || !placed || !old) rc = kvt_fail(ENOMEM, "relayout: out of memory");
    if (!rc) m = build_chain(c, k, chain, placed);
    /* the chain's pools, all made up front so that a spilling cluster cannot take one */
    uint32_t pools0 = c->pools.n, npools = m / 2 + 1;
    if (!rc) rc = kvt_ensure_pools(c, pools0 + npools);
    if (!rc && !(rc = kvt_mem_reserve(&s->mem, (uint64_t)sr * c->L.esz))) {
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
        rc = kvt_load_records(c, j, &recs, &owned, &pinned, &c->ctr.relayout_read_bytes);
        if (rc) break;
        old[done] = kvt_detach_segs(c, j);
        rc = kvt_ensure_segs(c, &c->cl[j], 1);
        if (!rc) {
            c->pools.p[pool].owner[head] = (int32_t)j;
            c->cl[j].segs[0] = (kvt_seg){pool, head, 0};
            c->cl[j].nseg = 1;
            log.n = 0; /* on failure restore_segs gives back every head this cluster holds */
            rec_src src = {.recs = recs};
            uint32_t flashed = c->cl[j].n - c->cl[j].pend;
            rc = kvt_append_flash(c, j, &src, flashed, scratch, sr, &log);
            written += (uint64_t)flashed * c->L.esz;
        }
        kvt_release_records(c, recs, owned, pinned, 0);
        if (rc) {
            done++; /* restore this one too */
            break;
        }
    }
    if (rc) {
        for (uint32_t t = 0; t < done; t++) kvt_restore_segs(c, chain[t], old[t]);
    } else {
        for (uint32_t t = 0; t < m; t++) kvt_retire_segs(c, old[t]);
        kvt_pools_push_free(&c->pools, &c->L, pools0);
        c->ctr.relayouts++;
        c->ctr.relayout_bytes += written;
    }
    free(log.u);
    free(scratch);
    kvt_mem_release(&s->mem, sbytes);
    free(chain);
    free(placed);
    free(old);
    kvt_mem_release(&s->mem, meta);
spent: /* the counts are spent either way */
    free(c->cofreq);
    c->cofreq = NULL;
    kvt_mem_release_as(&s->mem, KVT_USE_INDEX, (uint64_t)c->nco * c->nco * sizeof(uint16_t));
    c->acct -= (uint64_t)c->nco * c->nco * sizeof(uint16_t);
    c->retrieves = c->p.colocate_after;
    return rc;
}
