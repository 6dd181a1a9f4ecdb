/*
 * token.c — the no-cluster baseline (policy none): exact top-budget entries by score, each
 * read from flash on its own in token order, as a system without clusters would.
 *
 * Invariants:
 * 1. Every key of a none collection is resident (coll->keys), so scoring is exact.
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

/* File offset of the record of id (which must be on flash). */
int kvt_record_offset(kvt_coll *c, uint64_t id, uint64_t *off) {
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
int kvt_retrieve_tokens(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result *r) {
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
        kvt_order_by_score(idx, (uint32_t)n, scores);
        qsort(idx, m, 4, kvt_by_u32);
        rc = kvt_result_alloc(r, L, m);
    }
    kvt_io_batch_begin(&s->io);
    for (uint64_t i0 = 0; i0 < m && !rc; i0 += TOKEN_BATCH) {
        uint32_t nb = (uint32_t)(m - i0 < TOKEN_BATCH ? m - i0 : TOKEN_BATCH), nr = 0;
        for (uint32_t t = 0; t < nb && !rc; t++) {
            const kvt_loc lc = c->loc[idx[i0 + t]];
            const kvt_cluster *k = &c->cl[lc.cl];
            if (lc.idx >= k->n - k->pend) continue; /* in the write buffer's tail, not on flash yet */
            rc = kvt_record_offset(c, idx[i0 + t], &offs[nr]);
            req[nr] = (kvt_read_req){offs[nr], L->esz, rec + (size_t)nr * L->esz, 1};
            nr++;
        }
        if (!rc) rc = kvt_file_read_batch(c->f, req, nr);
        for (uint32_t t = 0, got = 0; t < nb && !rc; t++) {
            const kvt_loc lc = c->loc[idx[i0 + t]];
            const kvt_cluster *k = &c->cl[lc.cl];
            if (lc.idx >= k->n - k->pend) {
                kvt_put_result(r, L, k->pbuf + (size_t)(lc.idx - (k->n - k->pend)) * L->esz, -1);
                continue;
            }
            rc = kvt_check_run(c, lc.cl, lc.idx, rec + (size_t)got * L->esz, 1, offs[got]);
            if (!rc) kvt_put_result(r, L, rec + (size_t)got * L->esz, -1);
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
