/*
 * search.c — approximate top-k search (probe the best clusters, score their entries) and
 * get by id.
 *
 * Invariants:
 * 1. Search and get never change clusters: no split, no relayout.
 * 2. They read in the calling thread's on_corrupt mode (read.c 2): in skip mode a damaged
 *    record is not a candidate of search, and get leaves its rows zero and lists its id.
 * 3. Search scores a cluster too large for what the budget leaves in pieces (pieces.c), so
 *    that no cluster's size makes a search above the estimated minimum fail.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "policy.h"
#include "read.h"
#include "score.h"
#include "store.h"
#include "token.h"
#include "virtualize.h"

/* ---- search ------------------------------------------------------------------------------- */

typedef struct search_ctx {
    kvt_coll *c;
    const float *q;        /* all queries */
    const uint32_t *qlist; /* queries probing the current cluster */
    uint32_t nql, k;
    int64_t *ids; /* nq * k min-heaps */
    float *scores;
    uint32_t *fill;
    float *x; /* key as float32 (l2) */
} search_ctx;

static void heap_push(int64_t *ids, float *sc, uint32_t *fill, uint32_t k, int64_t id, float s) {
    uint32_t n = *fill;
    if (n == k) {
        if (s <= sc[0]) return;
        uint32_t i = 0; /* replace the minimum and sift down */
        for (;;) {
            uint32_t l = 2 * i + 1, r = l + 1, m = i;
            float mv = s;
            if (l < k && sc[l] < mv) {
                m = l;
                mv = sc[l];
            }
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

typedef struct {
    uint32_t cl, q;
} probe;

/* Policy none: one entry scored against every query of the search. */
typedef struct exact_ctx {
    search_ctx *sx;
    uint64_t nq;
} exact_ctx;

static void exact_hit(void *vctx, uint64_t id, const void *key) {
    exact_ctx *e = vctx;
    search_ctx *sx = e->sx;
    kvt_coll *c = sx->c;
    for (uint64_t i = 0; i < e->nq; i++)
        heap_push(sx->ids + i * sx->k, sx->scores + i * sx->k, &sx->fill[i], sx->k, (int64_t)id,
                  entry_score(c, key, sx->q + i * c->p.dim, sx->x));
}

static int by_probe(const void *a, const void *b) {
    const probe *x = a, *y = b;
    if (x->cl != y->cl) return x->cl < y->cl ? -1 : 1;
    return x->q < y->q ? -1 : x->q > y->q;
}

/* A block's probes, sorted by cluster: each cluster read once and scored against the
 * queries that probe it. */
static int visit_probes(kvt_coll *c, probe *pr, uint64_t np, uint32_t *qlist, search_ctx *sx) {
    int rc = 0;
    qsort(pr, np, sizeof *pr, by_probe);
    kvt_io_batch_begin(&c->st->io);
    for (uint64_t a = 0; a < np && !rc;) {
        uint64_t e = a;
        sx->nql = 0;
        while (e < np && pr[e].cl == pr[a].cl) qlist[sx->nql++] = pr[e++].q;
        rc = kvt_visit_cluster(c, pr[a].cl, score_entries, sx);
        if (rc == KVT_EBUDGET) { /* no room for it whole: scoring takes it in pieces */
            kvt_clear_error();
            rc = kvt_visit_cluster_pieces(c, pr[a].cl, score_entries, sx);
        }
        a = e;
    }
    kvt_io_batch_end(&c->st->io);
    return rc;
}

static int search_locked(kvt_coll *c, const float *q, uint64_t nq, uint32_t k, uint32_t nprobe, int64_t *ids_out,
                         float *scores_out) {
    kvt_store *s = c->st;
    int rc = 0;
    uint32_t *fill = NULL, *idx = NULL, *qlist = NULL;
    float *scores = NULL, *x = NULL;
    probe *pr = NULL;
    /* an empty collection (never added to, or every add refused) has no cluster to probe:
     * every row is padded below, as for any row with fewer than k hits */
    int probing = c->ops->clustered && c->ncl > 0 && c->n > 0;
    if (nprobe > c->ncl) nprobe = c->ncl;
    if (nprobe == 0) nprobe = 1;
    /* queries per block: clusters probed by several are read once. A block's probe list takes a
     * quarter of what the budget leaves at most, so that probing every cluster (an exact search)
     * runs at the smallest budget too, a query at a time if it must */
    uint64_t per_query = (uint64_t)nprobe * sizeof(probe) + 4, fit = kvt_mem_left(&s->mem) / 4 / per_query;
    const uint64_t B = fit < 1 ? 1 : fit > 64 ? 64 : fit;
    uint64_t transient = (uint64_t)c->ncl * 8 + B * nprobe * sizeof(probe) + B * 4 + nq * 4 + (uint64_t)c->p.dim * 4;
    rc = kvt_mem_reserve(&s->mem, transient);
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
    if (!c->ops->clustered) { /* exact: every key, in DRAM or scanned from flash */
        exact_ctx ex = {&sx, nq};
        rc = kvt_scan_keys(c, exact_hit, &ex);
    }
    if (c->ops->clustered) kvt_cache_owner_read(&s->cache, &c->cache_state);
    for (uint64_t b0 = 0; b0 < nq && !rc && probing; b0 += B) {
        uint64_t b1 = b0 + B < nq ? b0 + B : nq, np = 0;
        for (uint64_t i = b0; i < b1; i++) {
            kvt_score_clusters(c, q + i * c->p.dim, 1, scores, x);
            kvt_top_by_score(idx, c->ncl, nprobe, scores);
            for (uint32_t j = 0; j < nprobe; j++) pr[np++] = (probe){idx[j], (uint32_t)i};
        }
        rc = visit_probes(c, pr, np, qlist, &sx);
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
    kvt_mem_release(&s->mem, transient);
    return rc;
}

/* Runs a read call in the thread's on_corrupt mode (read.c), and back to the engine's own
 * mode for whatever the collection does next. */
static int search_in_mode(kvt_coll *c, int mode, const float *q, uint64_t nq, uint32_t k, uint32_t nprobe,
                          int64_t *ids_out, float *scores_out) {
    c->read_mode = mode;
    c->ndmg_cl = 0;
    int rc = search_locked(c, q, nq, k, nprobe, ids_out, scores_out);
    c->read_mode = KVT_READ_OWN;
    return rc;
}

int kvt_coll_search(kvt_coll *c, const float *q, uint64_t nq, uint32_t k, uint32_t nprobe, int64_t *ids_out,
                    float *scores_out) {
    kvt_clear_error();
    int mode = kvt_read_begin();
    if (!q || nq == 0 || k == 0) return kvt_fail(KVT_EINVAL, "search: need at least one query and k >= 1");
    int rc;
    RUN_READY(c, search_in_mode(c, mode, q, nq, k, nprobe, ids_out, scores_out));
    return rc;
}

/* ---- get ---------------------------------------------------------------------------------- */

/* Record id (the id map's slot idx) in cluster k's cached copy e, which holds its live
 * records in slot order: at idx when the cluster has no dead slots, else looked for. */
static const uint8_t *cached_record(const kvt_layout *L, const kvt_cluster *k, const kvt_cache_ent *e, int64_t id,
                                    uint32_t idx) {
    if (!k->dead) return idx < e->n ? e->rec + (size_t)idx * L->esz : NULL;
    for (uint32_t i = 0; i < e->n; i++) {
        int64_t x;
        memcpy(&x, e->rec + (size_t)i * L->esz, 8);
        if (x == id) return e->rec + (size_t)i * L->esz;
    }
    return NULL;
}

int kvt_coll_get(kvt_coll *c, const int64_t *ids, uint64_t n, void *keys_out, void *values_out) {
    kvt_clear_error();
    int mode = kvt_read_begin();
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    LOCK(s);
    int rc = kvt_ready(c);
    if (rc) {
        UNLOCK(s);
        return rc;
    }
    c->read_mode = mode;
    for (uint64_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint64_t)ids[i] >= c->n) {
            rc = kvt_fail(KVT_ENOTFOUND, "ids: id %lld is not in the collection (0..%llu)", (long long)ids[i],
                          (unsigned long long)c->n);
            goto out;
        }
    uint64_t need = L->esz + kvt_file_read_scratch(c->f, 0, L->esz) + KVT_IO_ALIGN;
    rc = kvt_mem_reserve(&s->mem, need);
    if (rc) goto out;
    uint8_t *buf = malloc(L->esz);
    if (!buf) rc = kvt_fail(ENOMEM, "get: out of memory");
    kvt_io_batch_begin(&s->io);
    for (uint64_t i = 0; i < n && !rc; i++) {
        kvt_loc lc = c->loc[ids[i]];
        kvt_cluster *k = &c->cl[lc.cl];
        const uint8_t *rec;
        kvt_cache_ent *e = kvt_cached(c, lc.cl);
        uint32_t slots = k->n - k->pend + k->dead; /* on flash; the pending ones follow */
        if (e && (rec = cached_record(L, k, e, ids[i], lc.idx))) {
            s->cache.hits++;
        } else if (lc.idx >= slots) {
            rec = k->x->pbuf + (size_t)(lc.idx - slots) * L->esz;
        } else {
            s->cache.misses++;
            uint64_t off;
            uint32_t bad = 0;
            rc = kvt_record_offset(c, (uint64_t)ids[i], &off);
            if (!rc)
                rc = mode == KVT_READ_SKIP ? kvt_read_clamped(c, off, L->esz, buf, 1)
                                           : kvt_file_read(c->f, off, L->esz, buf, 1);
            if (!rc) rc = kvt_check_run(c, mode, lc.cl, lc.idx, buf, 1, off, &bad);
            if (rc) break;
            if (bad || !kvt_rec_ok(c, lc.cl, lc.idx, buf)) { /* skip mode: its rows are zeros, its id listed */
                memset((uint8_t *)keys_out + i * L->key_bytes, 0, L->key_bytes);
                if (values_out) memset((uint8_t *)values_out + i * L->value_bytes, 0, L->value_bytes);
                continue;
            }
            rec = buf;
        }
        memcpy((uint8_t *)keys_out + i * L->key_bytes, kvt_rec_key(rec), L->key_bytes);
        if (values_out) memcpy((uint8_t *)values_out + i * L->value_bytes, kvt_rec_value(L, rec), L->value_bytes);
    }
    kvt_io_batch_end(&s->io);
    free(buf);
    kvt_mem_release(&s->mem, need);
out:
    c->read_mode = KVT_READ_OWN;
    UNLOCK(s);
    return rc;
}
