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
 *    overwritten before the catalog stops naming it. Each cluster switches to its new place
 *    once it is written whole (its records renumbered, no dead slots left); a failed write
 *    restores that cluster and ends the rewrite, the clusters moved before it staying moved.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

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

/* The chain's pools, made up front and back to back so that a spilling cluster cannot take
 * one (format 3: pool i sized for twice what chain[2i] and chain[2i+1] hold). */
static int chain_pools(kvt_coll *c, const uint32_t *chain, uint32_t m, uint32_t npools, uint32_t *pool_of) {
    const kvt_layout *L = &c->L;
    int rc = kvt_ensure_pools(c, c->pools.n + npools);
    for (uint32_t i = 0; i < npools && !rc; i++) {
        if (c->pools.sized) {
            uint64_t pair = 0;
            for (uint32_t t = 2 * i; t < 2 * i + 2 && t < m; t++) pair += c->cl[chain[t]].n;
            rc = kvt_pools_append(&c->pools, kvt_pool_units(L, 2 * pair < L->pool_cap ? 2 * pair : L->pool_cap),
                                  &pool_of[i]);
        } else {
            rc = kvt_pools_append_fixed(&c->pools, L, &pool_of[i]);
        }
    }
    return rc;
}

/* Cluster j rewritten from the start of head `head` of pool `pool` (copy on write: its old
 * segments are retired once it is written whole, its records renumbered to their slots);
 * on failure it keeps its old place. Adds the bytes written to *written. */
static int move_cluster(kvt_coll *c, uint32_t j, uint32_t pool, uint32_t head, uint8_t *scratch, uint64_t *written) {
    const kvt_layout *L = &c->L;
    uint8_t *recs;
    uint64_t owned;
    kvt_cache_ent *pinned;
    int rc = kvt_load_records(c, j, &recs, &owned, &pinned, &c->ctr.relayout_read_bytes);
    if (rc) return rc;
    seg_save old = kvt_detach_segs(c, j);
    kvt_cluster *kj = &c->cl[j];
    undo_log log = {0}; /* on failure restore_segs gives back every head this cluster holds */
    rc = kvt_ensure_segs(c, kj, 1);
    if (!rc) {
        kvt_pools_own(&c->pools, pool, head);
        kj->segs[0] = (kvt_seg){pool, head, 0};
        kj->nseg = 1;
        rec_src src = {.recs = recs};
        rc = kvt_append_flash(c, j, &src, kj->n - kj->pend, scratch, L->pool_cap, &log);
    }
    if (rc) {
        kvt_restore_segs(c, j, old);
    } else {
        *written += (uint64_t)(kj->n - kj->pend) * L->esz;
        kvt_retire_segs(c, old);
        kj->dead = 0; /* slots are positions now; the id map, which names clusters, is unchanged */
    }
    free(log.u);
    kvt_release_records(c, recs, owned, pinned, 0);
    return rc;
}

/* The one-time rewrite: orders the counted clusters in a chain that follows co-retrieval
 * (from the most fetched, repeatedly the unplaced cluster most often fetched with the last
 * one) and lays the chain across fresh consecutive pools: chain[0] at the front of pool 0,
 * then chain[2i+1] at the back of pool i and chain[2i+2] at the front of pool i+1, so each
 * neighbouring pair of the chain across a pool boundary is contiguous on flash and the pair
 * sharing a pool is one merged read apart. Copy on write, one cluster at a time, so that it
 * needs no more DRAM than the largest cluster. */
int kvt_relayout(kvt_coll *c) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    uint32_t k = c->nco < c->ncl ? c->nco : c->ncl, m = 0, npools = 0;
    uint64_t meta = (uint64_t)k * (4 + 4 + 4) + 16, sbytes = (uint64_t)L->pool_cap * L->esz, written = 0;
    int rc = kvt_mem_reserve(&s->mem, meta);
    if (rc) goto spent;
    uint32_t *chain = malloc((size_t)k * 4 + 4), *placed = calloc(k + 1, 4), *pool_of = calloc(k + 2, 4);
    uint8_t *scratch = NULL;
    if (!chain || !placed || !pool_of) rc = kvt_fail(ENOMEM, "relayout: out of memory");
    if (!rc) m = build_chain(c, k, chain, placed);
    if (!rc && !(rc = kvt_mem_reserve(&s->mem, sbytes)) && !(scratch = malloc(sbytes))) {
        kvt_mem_release(&s->mem, sbytes);
        rc = kvt_fail(ENOMEM, "relayout: out of memory");
    }
    if (!scratch) sbytes = 0;
    if (!rc) {
        npools = m / 2 + 1;
        rc = chain_pools(c, chain, m, npools, pool_of);
        if (rc) npools = 0;
    }
    /* chain[2i] at the front of pool i, chain[2i+1] at its back */
    for (uint32_t done = 0; done < m && !rc; done++)
        rc = move_cluster(c, chain[done], pool_of[done / 2], done % 2, scratch, &written);
    uint32_t lo = UINT32_MAX;
    for (uint32_t i = 0; i < npools; i++) { /* pools of the chain that no cluster took go back */
        const kvt_pools *P = &c->pools;
        if (P->sized && kvt_head_state(P, pool_of[i], 0) == KVT_HEAD_FREE &&
            kvt_head_state(P, pool_of[i], 1) == KVT_HEAD_FREE)
            kvt_pools_unclaim(&c->pools, &(kvt_seg){pool_of[i], 0, 0});
        else if (pool_of[i] < lo)
            lo = pool_of[i];
    }
    if (lo != UINT32_MAX) kvt_pools_push_free(&c->pools, L, lo);
    if (!rc) c->ctr.relayouts++;
    c->ctr.relayout_bytes += written;
    free(scratch);
    kvt_mem_release(&s->mem, sbytes);
    free(chain);
    free(placed);
    free(pool_of);
    kvt_mem_release(&s->mem, meta);
spent: /* the counts are spent either way */
    free(c->cofreq);
    c->cofreq = NULL;
    kvt_mem_release_as(&s->mem, KVT_USE_INDEX, (uint64_t)c->nco * c->nco * sizeof(uint16_t));
    c->acct -= (uint64_t)c->nco * c->nco * sizeof(uint16_t);
    c->retrieves = c->p.colocate_after;
    return rc;
}
