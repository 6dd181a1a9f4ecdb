/*
 * nprobe.c — choosing search's probe count from the collection itself: the fewest clusters a
 * search must read for its top-k to reach a target recall, measured exactly on sample queries.
 *
 * Invariants:
 * 1. The measure is exact and needs one pass over the collection: every entry is scored against
 *    every sample query (the true top-k, as search scores entries), and each true neighbour's
 *    cluster is ranked among all clusters as search ranks them for that query (the same
 *    representative scores, ties by cluster number). With that cluster at rank r, a search
 *    probing more than r clusters finds the neighbour; recall at nprobe p is the share of
 *    neighbours with r < p.
 * 2. It changes no cluster and nothing stored (reads go through the cache like any read).
 * 3. Its DRAM (a heap per query, a score per cluster, the ranks) is reserved against the budget,
 *    and it reads clusters in batches as search does, a cluster too large for what the budget
 *    leaves in pieces (pieces.c): it runs at any budget that search runs at.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "read.h"
#include "score.h"
#include "store.h"
#include "virtualize.h"

typedef struct tune_ctx {
    kvt_coll *c;
    const float *q;
    uint64_t nq;
    uint32_t k;
    float *hs;     /* nq * k min-heaps of scores */
    uint32_t *hcl; /* ... the cluster of each */
    uint32_t *fill;
    float *x;
} tune_ctx;

static void push(float *hs, uint32_t *hcl, uint32_t *fill, uint32_t k, float s, uint32_t cl) {
    uint32_t i = *fill;
    if (i == k) {
        if (s <= hs[0]) return;
        for (i = 0;;) { /* replace the minimum, sift down */
            uint32_t l = 2 * i + 1, r = l + 1, m = i;
            float mv = s;
            if (l < k && hs[l] < mv) m = l, mv = hs[l];
            if (r < k && hs[r] < mv) m = r;
            if (m == i) break;
            hs[i] = hs[m], hcl[i] = hcl[m];
            i = m;
        }
    } else {
        for ((*fill)++; i > 0 && hs[(i - 1) / 2] > s; i = (i - 1) / 2)
            hs[i] = hs[(i - 1) / 2], hcl[i] = hcl[(i - 1) / 2];
    }
    hs[i] = s, hcl[i] = cl;
}

static void score_all(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    tune_ctx *t = vctx;
    kvt_coll *c = t->c;
    for (uint32_t e = 0; e < n; e++) {
        const void *key = kvt_rec_key(recs + (size_t)e * c->L.esz);
        for (uint64_t i = 0; i < t->nq; i++)
            push(t->hs + i * t->k, t->hcl + i * t->k, &t->fill[i], t->k, entry_score(c, key, t->q + i * c->p.dim, t->x),
                 ci);
    }
}

static int by_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int tune_locked(kvt_coll *c, const float *q, uint64_t nq, uint32_t k, double target, uint32_t *nprobe,
                       double *recall) {
    kvt_store *s = c->st;
    uint32_t *list = NULL, *fill = NULL, *hcl = NULL, *ranks = NULL;
    float *hs = NULL, *scores = NULL, *x = NULL;
    uint64_t nh = nq * k;
    uint64_t need = nh * 12 + nq * 4 + (uint64_t)c->ncl * 8 + (uint64_t)c->p.dim * 4 + 64;
    int rc = kvt_mem_reserve(&s->mem, need);
    if (rc) return rc;
    hs = malloc(nh * 4 + 4), hcl = malloc(nh * 4 + 4), ranks = malloc(nh * 4 + 4), fill = calloc(nq + 1, 4);
    scores = malloc((size_t)c->ncl * 4 + 4), list = malloc((size_t)c->ncl * 4 + 4), x = malloc((size_t)c->p.dim * 4);
    if (!hs || !hcl || !ranks || !fill || !scores || !list || !x) rc = kvt_fail(ENOMEM, "nprobe: out of memory");
    uint32_t m = 0;
    for (uint32_t j = 0; !rc && j < c->ncl; j++)
        if (c->cl[j].n) list[m++] = j;
    if (!rc) { /* 1: the true top-k of every query, in one pass, the clusters read as search
                * reads them (so that it needs no more DRAM than a search) */
        tune_ctx t = {c, q, nq, k, hs, hcl, fill, x};
        kvt_cache_owner_read(&s->cache, &c->cache_state);
        kvt_io_batch_begin(&s->io);
        rc = kvt_visit_clusters_or_pieces(c, list, m, score_all, score_all, &t);
        kvt_io_batch_end(&s->io);
    }
    uint64_t nr = 0;
    for (uint64_t i = 0; !rc && i < nq; i++) { /* 2: each neighbour's cluster, ranked as search ranks it */
        kvt_score_clusters(c, q + i * c->p.dim, 1, scores, x);
        for (uint32_t h = 0; h < fill[i]; h++) {
            uint32_t cl = hcl[i * k + h], r = 0;
            float sc = scores[cl];
            for (uint32_t j = 0; j < c->ncl; j++) r += scores[j] > sc || (scores[j] == sc && j < cl);
            ranks[nr++] = r;
        }
    }
    if (!rc) { /* 3: the fewest probes that find a target share of the neighbours */
        qsort(ranks, nr, 4, by_u32);
        uint64_t want = (uint64_t)ceil(target * (double)nr);
        if (want > nr) want = nr;
        *nprobe = want ? ranks[want - 1] + 1 : 1;
        uint64_t found = 0;
        while (found < nr && ranks[found] < *nprobe) found++;
        *recall = nr ? (double)found / (double)nr : 1.0;
    }
    free(hs), free(hcl), free(ranks), free(fill), free(scores), free(list), free(x);
    kvt_mem_release(&s->mem, need);
    return rc;
}

int kvt_coll_tune_nprobe(kvt_coll *c, const float *queries, uint64_t nq, uint32_t k, double target, uint32_t *nprobe,
                         double *recall) {
    kvt_clear_error();
    if (!queries || nq == 0 || k == 0) return kvt_fail(KVT_EINVAL, "tune_nprobe: need at least one query and k >= 1");
    if (!(target > 0 && target <= 1)) return kvt_fail(KVT_EINVAL, "target: a recall in (0, 1] expected");
    *nprobe = 1;
    *recall = 1.0;
    if (!c->ops->clustered) return 0; /* exact (policy none): nothing to probe */
    int rc;
    RUN_READY(c, tune_locked(c, queries, nq, k, target, nprobe, recall));
    return rc;
}
