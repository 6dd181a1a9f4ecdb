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
 * 4. get reads each cluster of the requested ids once, as search does (the id map names a
 *    record's cluster, not its slot: store.c 2), and finds each record by id; a damaged
 *    record beside a requested one fails nothing. Without clusters (policy none) and in the
 *    token layout it reads each record alone, its slot known.
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

/* The slot of id in its chain where slots are known without reading: policy none keeps one
 * chain in id order, the token layout a member list (ascending ids, store.c 2). */
static uint32_t chain_slot(const kvt_coll *c, const kvt_cluster *k, int64_t id) {
    const uint32_t *mem = kvt_members(k);
    if (!c->ops->clustered || !mem) return (uint32_t)id;
    uint32_t lo = 0, hi = k->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (mem[mid] < (uint64_t)id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void put_row(const kvt_layout *L, const uint8_t *rec, uint64_t i, void *keys_out, void *values_out) {
    memcpy((uint8_t *)keys_out + i * L->key_bytes, kvt_rec_key(rec), L->key_bytes);
    if (values_out) memcpy((uint8_t *)values_out + i * L->value_bytes, kvt_rec_value(L, rec), L->value_bytes);
}

/* get where each record's slot is known (chain_slot): one record read per id. */
static int get_by_slot(kvt_coll *c, int mode, const int64_t *ids, uint64_t n, void *keys_out, void *values_out) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    uint64_t need = L->esz + kvt_file_read_scratch(c->f, 0, L->esz) + KVT_IO_ALIGN;
    int rc = kvt_mem_reserve(&s->mem, need);
    if (rc) return rc;
    uint8_t *buf = malloc(L->esz);
    if (!buf) rc = kvt_fail(ENOMEM, "get: out of memory");
    kvt_io_batch_begin(&s->io);
    for (uint64_t i = 0; i < n && !rc; i++) {
        uint32_t cl = kvt_loc(c, ids[i]);
        kvt_cluster *k = &c->cl[cl];
        uint32_t slot = chain_slot(c, k, ids[i]);
        const uint8_t *rec;
        kvt_cache_ent *e = kvt_cached(c, cl);
        uint32_t slots = k->n - k->pend + k->dead; /* on flash; the pending ones follow */
        if (e && (rec = cached_record(L, k, e, ids[i], slot))) {
            s->cache.hits++;
        } else if (slot >= slots) {
            rec = k->x->pbuf + (size_t)(slot - slots) * L->esz;
        } else {
            s->cache.misses++;
            uint64_t off;
            uint32_t bad = 0;
            rc = kvt_record_offset(c, (uint64_t)ids[i], &off);
            if (!rc)
                rc = mode == KVT_READ_SKIP ? kvt_read_clamped(c, off, L->esz, buf, 1)
                                           : kvt_file_read(c->f, off, L->esz, buf, 1);
            if (!rc) rc = kvt_check_run(c, mode, cl, slot, buf, 1, off, &bad);
            if (rc) break;
            if (bad || !kvt_rec_ok(c, cl, buf, 0)) { /* skip mode: its rows are zeros, its id listed */
                memset((uint8_t *)keys_out + i * L->key_bytes, 0, L->key_bytes);
                if (values_out) memset((uint8_t *)values_out + i * L->value_bytes, 0, L->value_bytes);
                continue;
            }
            rec = buf;
        }
        put_row(L, rec, i, keys_out, values_out);
    }
    kvt_io_batch_end(&s->io);
    free(buf);
    kvt_mem_release(&s->mem, need);
    return rc;
}

/* get from clusters, which keep no slot map (store.c 2): the rows sorted by cluster, then id;
 * each cluster read once, as search reads it, and each row found among its records by id. */
typedef struct get_row {
    int64_t id;
    uint64_t row;
    uint32_t cl;
} get_row;

typedef struct get_ctx {
    const kvt_layout *L;
    const get_row *rows;   /* by (cluster, id) */
    const uint32_t *list;  /* the clusters, ascending */
    const uint64_t *start; /* list[t]'s rows: rows[start[t] .. start[t+1]) */
    uint32_t nlist;
    uint8_t *found;
    void *keys_out, *values_out;
} get_ctx;

static int by_cluster(const void *a, const void *b) {
    const get_row *x = a, *y = b;
    if (x->cl != y->cl) return x->cl < y->cl ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* The first of the n records (ascending ids) whose id is not below id. */
static uint32_t lower_bound(const kvt_layout *L, const uint8_t *recs, uint32_t n, int64_t id) {
    uint32_t a = 0, b = n;
    while (a < b) {
        uint32_t mid = a + (b - a) / 2;
        int64_t x;
        memcpy(&x, recs + (size_t)mid * L->esz, 8);
        if (x < id)
            a = mid + 1;
        else
            b = mid;
    }
    return a;
}

static void get_visit(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    const get_ctx *g = vctx;
    const kvt_layout *L = g->L;
    uint32_t lo = 0, hi = g->nlist;
    while (lo < hi) { /* ci's place in the list */
        uint32_t mid = lo + (hi - lo) / 2;
        if (g->list[mid] < ci)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == g->nlist || g->list[lo] != ci) return;
    for (uint64_t t = g->start[lo]; t < g->start[lo + 1]; t++) {
        const get_row *w = &g->rows[t];
        uint32_t a = lower_bound(L, recs, n, w->id);
        int64_t x = -1;
        if (a < n) memcpy(&x, recs + (size_t)a * L->esz, 8);
        if (x != w->id) continue;
        put_row(L, recs + (size_t)a * L->esz, w->row, g->keys_out, g->values_out);
        g->found[w->row] = 1;
    }
}

static int get_by_cluster(kvt_coll *c, int mode, const int64_t *ids, uint64_t n, void *keys_out, void *values_out) {
    const kvt_layout *L = &c->L;
    uint64_t need = n * (sizeof(get_row) + 13) + 32;
    int rc = kvt_mem_reserve(&c->st->mem, need);
    if (rc) return rc;
    get_row *rows = malloc(n * sizeof(get_row));
    uint64_t *start = malloc(n * 8 + 16);
    uint32_t *list = malloc(n * 4 + 4);
    uint8_t *found = calloc(n + 1, 1);
    get_ctx g = {L, rows, list, start, 0, found, keys_out, values_out};
    if (!rows || !start || !list || !found) rc = kvt_fail(ENOMEM, "get: out of memory");
    if (!rc) {
        for (uint64_t i = 0; i < n; i++) rows[i] = (get_row){ids[i], i, kvt_loc(c, ids[i])};
        qsort(rows, n, sizeof *rows, by_cluster);
        for (uint64_t t = 0; t < n; t++) {
            if (!g.nlist || list[g.nlist - 1] != rows[t].cl) {
                start[g.nlist] = t;
                list[g.nlist++] = rows[t].cl;
            }
        }
        start[g.nlist] = n;
        /* read as skip mode reads (a damaged neighbour of a requested record fails nothing),
         * then only the requested ids no intact record held are listed, and raise fails */
        c->read_mode = KVT_READ_SKIP;
        rc = kvt_visit_clusters_or_pieces(c, list, g.nlist, get_visit, get_visit, &g);
        if (rc == KVT_EBUDGET && c->st->pieces) { /* the last run: a cluster at a time, in pieces if need be */
            kvt_clear_error();
            rc = 0;
            for (uint32_t t = 0; t < g.nlist && !rc; t++)
                rc = kvt_visit_clusters_or_pieces(c, list + t, 1, get_visit, get_visit, &g);
        }
        c->read_mode = mode;
        kvt_unreadable_clear();
    }
    uint64_t missing = 0;
    int64_t first = -1;
    for (uint64_t i = 0; !rc && i < n; i++) {
        if (found[i]) continue;
        if (!missing++) first = ids[i];
        kvt_unreadable_add(c->no, ids[i]);
        memset((uint8_t *)keys_out + i * L->key_bytes, 0, L->key_bytes); /* skip mode: zeros */
        if (values_out) memset((uint8_t *)values_out + i * L->value_bytes, 0, L->value_bytes);
    }
    if (!rc && missing && mode != KVT_READ_SKIP)
        rc =
            kvt_fail(KVT_ECORRUPT, "%s: collection %u: %llu damaged record%s (id %lld%s): checksum or catalog mismatch",
                     kvt_file_path(c->f), c->no, (unsigned long long)missing, missing == 1 ? "" : "s", (long long)first,
                     missing == 1 ? "" : ", ...");
    free(rows);
    free(start);
    free(list);
    free(found);
    kvt_mem_release(&c->st->mem, need);
    return rc;
}

static int get_locked(kvt_coll *c, int mode, const int64_t *ids, uint64_t n, void *keys_out, void *values_out) {
    int rc = 0;
    c->read_mode = mode;
    c->ndmg_cl = 0;
    for (uint64_t i = 0; i < n && !rc; i++)
        if (ids[i] < 0 || (uint64_t)ids[i] >= c->n)
            rc = kvt_fail(KVT_ENOTFOUND, "ids: id %lld is not in the collection (0..%llu)", (long long)ids[i],
                          (unsigned long long)c->n);
    if (!rc && (!c->ops->clustered || token(c)))
        rc = get_by_slot(c, mode, ids, n, keys_out, values_out);
    else if (!rc && n)
        rc = get_by_cluster(c, mode, ids, n, keys_out, values_out);
    c->read_mode = KVT_READ_OWN;
    return rc;
}

/* A get reads whole clusters (get_by_cluster): short of room, it runs again as every call
 * does (RUN_READY: what can give way, then other collections paged out, then in pieces). */
int kvt_coll_get(kvt_coll *c, const int64_t *ids, uint64_t n, void *keys_out, void *values_out) {
    kvt_clear_error();
    int mode = kvt_read_begin();
    int rc;
    RUN_READY(c, get_locked(c, mode, ids, n, keys_out, values_out));
    return rc;
}
