/*
 * token.c — the no-cluster baseline (policy none): exact top-budget entries by score, each
 * read from flash on its own in token order, as a system without clusters would; the scan of
 * every key that exact scoring needs, from DRAM or from flash; and the policy's resident keys
 * (kvt_coll.exact), which no other file touches.
 *
 * Invariants:
 * 1. Scoring is exact: every key of a none collection is scored, from its resident copy
 *    (coll->exact.keys) while it fits the budget, else read from flash (store.c 5).
 * 2. A scan from flash reads the key column once, sequentially in file order, one pool-sized
 *    buffer at a time reserved against the budget, within one device batch; every record is
 *    checked against the id map (read.c 2) and the reads are counted in the I/O stats. In
 *    skip mode a damaged record is left out of the scan (and of a retrieve's result).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "add.h"
#include "common.h"
#include "index.h"
#include "policy.h"
#include "read.h"
#include "score.h"
#include "store.h"
#include "token.h"

/* The file offset of slot `slot` of cluster k (on flash), or KVT_ECORRUPT. */
static int slot_offset(kvt_coll *c, const kvt_cluster *k, uint64_t id, uint64_t slot, uint64_t *off) {
    uint32_t g = 0;
    while (g < k->nseg && slot >= k->segs[g].n) slot -= k->segs[g++].n;
    if (g == k->nseg) return kvt_fail(KVT_ECORRUPT, "id %llu maps outside its cluster", (unsigned long long)id);
    *off = kvt_slot_offset(&c->L, &c->pools.p[k->segs[g].pool], k->segs[g].head, (uint32_t)slot);
    return 0;
}

/* File offset of the record of id (which must be on flash). The token layout and policy none
 * (one chain whose slot i holds id i) know it; a cluster keeps no slot map (store.c 2): its
 * live id of rank r sits in slot r plus the dead slots before it, found among slots
 * r..r+dead by the ids they hold, which ascend (one pass over the id map and a few record
 * reads: for the damage tests and tools, not a read path). */
int kvt_record_offset(kvt_coll *c, uint64_t id, uint64_t *off) {
    *off = 0;
    if (token(c)) {
        *off = token_offset(c, id);
        return 0;
    }
    const kvt_cluster *k = &c->cl[kvt_loc(c, id)];
    if (!c->ops->clustered) return slot_offset(c, k, id, id, off);
    uint64_t r = 0;
    for (uint64_t i = 0; i < id; i++) r += kvt_loc(c, i) == kvt_loc(c, id);
    uint64_t lo = r, hi = r + k->dead; /* the slot holding id is in [lo, hi] */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2, at;
        int64_t x;
        int rc = slot_offset(c, k, id, mid, &at);
        if (!rc) rc = kvt_file_read(c->f, at, 8, &x, 0);
        if (rc) return rc;
        if (x < (int64_t)id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return slot_offset(c, k, id, lo, off);
}

/* Policy none: calls fn(ctx, id, key) for every entry. From the resident keys when they fit;
 * else from flash, reading the collection's records segment by segment in file order (one
 * pool at a time, each checked against the catalog) within one device batch: a sequential
 * read of the key column, the honest cost of a system without clusters. */
int kvt_scan_keys(kvt_coll *c, key_fn fn, void *ctx) {
    const kvt_layout *L = &c->L;
    if (c->exact.keys) {
        for (uint64_t i = 0; i < c->n; i++) fn(ctx, i, c->exact.keys + i * L->key_bytes);
        return 0;
    }
    if (!c->ncl) return 0;
    kvt_cluster *k = &c->cl[0]; /* policy none: one chain of entries in token order */
    uint64_t need = L->pool_bytes + kvt_file_read_scratch(c->f, 0, L->pool_bytes) + KVT_IO_ALIGN;
    int rc = kvt_mem_reserve(&c->st->mem, need);
    if (rc) return rc;
    uint8_t *buf = malloc(L->pool_bytes);
    if (!buf) rc = kvt_fail(ENOMEM, "scan: out of memory");
    uint32_t first = 0;
    kvt_io_batch_begin(&c->st->io);
    for (uint32_t g = 0; g < k->nseg && !rc; g++) {
        const kvt_seg *sg = &k->segs[g];
        const kvt_pool *pl = &c->pools.p[sg->pool];
        if (sg->n) {
            uint64_t off = kvt_run_offset(L, pl, sg->head, 0, sg->n);
            size_t span = (size_t)kvt_run_span(L, pl, sg->head, 0, sg->n);
            uint32_t bad = 0;
            rc = c->read_mode == KVT_READ_SKIP ? kvt_read_clamped(c, off, span, buf, sg->n)
                                               : kvt_file_read(c->f, off, span, buf, sg->n);
            if (!rc) {
                kvt_unpad(L, buf, buf, kvt_run_pos(L, pl, sg->head, 0, sg->n), sg->n);
                if (sg->head == 1) kvt_rec_reverse(L, buf, sg->n);
                rc = kvt_check_run(c, c->read_mode, 0, first, buf, sg->n, off, &bad);
            }
            for (uint32_t i = 0; i < sg->n && !rc; i++) /* skip mode: only the intact ones */
                if (!bad || kvt_rec_ok(c, 0, buf, i))
                    fn(ctx, (uint64_t)first + i, kvt_rec_key(buf + (size_t)i * L->esz));
        }
        first += sg->n;
    }
    kvt_io_batch_end(&c->st->io);
    for (uint32_t i = 0; i < k->pend && !rc; i++) /* the write buffer's tail, not on flash yet */
        fn(ctx, (uint64_t)first + i, kvt_rec_key(k->x->pbuf + (size_t)i * L->esz));
    free(buf);
    kvt_mem_release(&c->st->mem, need);
    return rc;
}

/* The best m entries seen so far: a min-heap on (score, then higher id is worse), so that
 * the selection equals sorting every entry by descending score, ties by id, and taking m,
 * in m slots instead of n. */
typedef struct group_score_ctx {
    kvt_coll *c;
    const float *q;
    uint64_t nq, m, fill;
    float *hs;
    uint32_t *hid;
    float *x;
} group_score_ctx;

static int worse(const float *hs, const uint32_t *hid, uint64_t a, uint64_t b) {
    return hs[a] < hs[b] || (hs[a] == hs[b] && hid[a] > hid[b]);
}

/* One entry's score against a query group (its best over the queries), into the heap. */
static void group_score(void *vctx, uint64_t id, const void *key) {
    group_score_ctx *g = vctx;
    float best = group_entry_score(g->c, key, g->q, g->nq, g->x);
    float *hs = g->hs;
    uint32_t *hid = g->hid;
    uint64_t i;
    if (g->fill < g->m) { /* sift up */
        i = g->fill++;
        hs[i] = best;
        hid[i] = (uint32_t)id;
        while (i > 0 && worse(hs, hid, i, (i - 1) / 2)) {
            uint64_t p = (i - 1) / 2;
            float ts = hs[p];
            uint32_t ti = hid[p];
            hs[p] = hs[i], hid[p] = hid[i], hs[i] = ts, hid[i] = ti;
            i = p;
        }
        return;
    }
    /* ids come in ascending order: an equal score never displaces the root */
    if (!g->m || !(best > hs[0])) return;
    hs[0] = best;
    hid[0] = (uint32_t)id;
    for (i = 0;;) { /* sift down */
        uint64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < g->m && worse(hs, hid, l, w)) w = l;
        if (r < g->m && worse(hs, hid, r, w)) w = r;
        if (w == i) break;
        float ts = hs[w];
        uint32_t ti = hid[w];
        hs[w] = hs[i], hid[w] = hid[i], hs[i] = ts, hid[i] = ti;
        i = w;
    }
}

/* Policy none: the exact top-budget entries by score, each read from flash on its own, in
 * token order, as a system without clusters would. */
static int retrieve_tokens(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result *r) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    uint64_t n = c->n, m = budget < n ? budget : n;
    /* reads go in batches (one submission each) of up to 32 records, each read into its own
     * slot with a direct-read window of up to two alignment units; fewer when the budget
     * left beside the index and pending buffers is small */
    uint64_t per = L->esz + 2 * KVT_IO_ALIGN + sizeof(kvt_read_req) + 8;
    uint64_t fit = kvt_mem_left(&s->mem) / 8 / per;
    const uint32_t TOKEN_BATCH = fit < 1 ? 1 : fit > 32 ? 32 : (uint32_t)fit;
    uint64_t tmp = m * 8 + (uint64_t)TOKEN_BATCH * per + (uint64_t)c->p.dim * 4;
    int rc = kvt_mem_reserve(&s->mem, tmp);
    if (rc) return rc;
    float *scores = malloc(m * 4 + 4), *x = malloc((size_t)c->p.dim * 4);
    uint32_t *idx = malloc(m * 4 + 4);
    uint8_t *rec = malloc((size_t)TOKEN_BATCH * L->esz);
    kvt_read_req *req = malloc(TOKEN_BATCH * sizeof *req);
    uint64_t *offs = malloc(TOKEN_BATCH * sizeof *offs);
    if (!req || !offs) rc = kvt_fail(ENOMEM, "retrieve: out of memory");
    if (!scores || !idx || !rec || !x) rc = kvt_fail(ENOMEM, "retrieve: out of memory");
    if (!rc) {
        group_score_ctx g = {c, q, nq, m, 0, scores, idx, x};
        rc = kvt_scan_keys(c, group_score, &g);
        m = g.fill; /* fewer when skip mode left damaged records out of the scan */
    }
    if (!rc) {
        qsort(idx, m, 4, kvt_by_u32); /* read in token order */
        rc = kvt_result_alloc(r, L, m);
    }
    kvt_io_batch_begin(&s->io);
    for (uint64_t i0 = 0; i0 < m && !rc; i0 += TOKEN_BATCH) {
        uint32_t nb = (uint32_t)(m - i0 < TOKEN_BATCH ? m - i0 : TOKEN_BATCH), nr = 0;
        for (uint32_t t = 0; t < nb && !rc; t++) {
            const uint32_t slot = idx[i0 + t]; /* one chain in id order */
            const kvt_cluster *k = &c->cl[kvt_loc(c, slot)];
            if (slot >= k->n - k->pend) continue; /* in the write buffer's tail, not on flash yet */
            rc = kvt_record_offset(c, idx[i0 + t], &offs[nr]);
            req[nr] = (kvt_read_req){offs[nr], L->esz, rec + (size_t)nr * L->esz, 1};
            nr++;
        }
        uint32_t nread = nr;
        if (!rc && c->read_mode == KVT_READ_SKIP) { /* records past a truncated file's end: zeros */
            uint64_t size = kvt_file_size(c->f);
            nread = 0;
            for (uint32_t t = 0; t < nr; t++) {
                if (req[t].off + req[t].len > size)
                    memset(req[t].dst, 0, req[t].len);
                else
                    req[nread++] = req[t];
            }
        }
        if (!rc) rc = kvt_file_read_batch(c->f, req, nread);
        for (uint32_t t = 0, got = 0; t < nb && !rc; t++) {
            const uint32_t slot = idx[i0 + t];
            const kvt_cluster *k = &c->cl[kvt_loc(c, slot)];
            if (slot >= k->n - k->pend) {
                kvt_put_result(r, L, k->x->pbuf + (size_t)(slot - (k->n - k->pend)) * L->esz, -1);
                continue;
            }
            if (got == nr) break; /* cannot happen: the same test chose the reads */
            uint32_t bad = 0;
            rc = kvt_check_run(c, c->read_mode, kvt_loc(c, slot), slot, rec + (size_t)got * L->esz, 1, offs[got], &bad);
            if (!rc && !bad) kvt_put_result(r, L, rec + (size_t)got * L->esz, -1);
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
    kvt_mem_release(&s->mem, tmp);
    return rc;
}

/* ---- the policy's hooks (policy.h) -------------------------------------------------------- */

/* assign: no clustering, one chain of entries in token order (cluster 0). */
static int assign(kvt_coll *c, kvt_add *a) {
    uint32_t first;
    int rc = c->ncl == 0 ? kvt_new_cluster(c, &first) : 0;
    if (rc) return rc;
    for (uint64_t i = 0; i < a->n; i++) kvt_loc_put(c, a->n0 + i, 0);
    a->k = 1;
    return 0;
}

/* after an add: the new keys join the resident copy, when there is one. */
static void after_add(kvt_coll *c, const kvt_add *a) {
    size_t kb = c->L.key_bytes;
    if (c->exact.keys) memcpy(c->exact.keys + a->n0 * kb, a->keys, a->n * kb);
}

/* Gives the resident keys back to the budget: retrieve and search then read the key column
 * from flash (kvt_scan_keys) for as long as the collection stays open (store.c 5). */
static void drop_keys(kvt_coll *c) {
    if (c->exact.keys) kvt_free_array(c, c->exact.keys, c->exact.keyscap, c->L.key_bytes);
    c->exact.keys = NULL;
    c->exact.keyscap = 0;
    c->exact.keys_flash = 1;
}

static int grow_ids(kvt_coll *c, uint64_t need) {
    if (c->exact.keys_flash) return 0;
    int rc = kvt_grow_array(c, (void **)&c->exact.keys, c->L.key_bytes, &c->exact.keyscap, need);
    if (rc == KVT_EBUDGET) { /* the keys do not fit: scanned from flash from now on (store.c 5) */
        kvt_clear_error();
        rc = 0;
        drop_keys(c);
    }
    return rc;
}

static uint64_t trim(kvt_coll *c) {
    if (!c->exact.keys) return 0;
    return kvt_shrink_array(c, (void **)&c->exact.keys, c->L.key_bytes, &c->exact.keyscap, c->n);
}

static int give_way(kvt_coll *c) {
    if (!c->exact.keys) return 0;
    drop_keys(c);
    return 1;
}

/* Parked, or freed: the resident keys go (keys_flash stays as it was). */
static void drop(kvt_coll *c) {
    if (c->exact.keys) kvt_free_array(c, c->exact.keys, c->exact.keyscap, c->L.key_bytes);
    c->exact.keys = NULL;
    c->exact.keyscap = 0;
}

/* The swap image carries the resident keys (n x key_bytes) when there are; brought back, they
 * are read if they fit again (install grew them), else skipped and scanned from flash. */
static void image_put(kvt_coll *c, kvt_put_fn put, void *w) {
    c->exact.keys_in_image = c->exact.keys != NULL;
    if (c->exact.keys) put(w, c->exact.keys, c->n * c->L.key_bytes);
}

static int image_get(kvt_coll *c, kvt_rbuf *r) {
    uint64_t bytes = c->n * c->L.key_bytes;
    int had = c->exact.keys_in_image;
    if (c->exact.keys)
        kvt_rbuf_get(r, c->exact.keys, bytes);
    else if (had && bytes > r->len - r->pos)
        return -1;
    else if (had)
        r->pos += bytes; /* the image's keys, skipped */
    return 0;
}

/* Policy none keeps its keys in DRAM when they fit: read back from the records on reopen. */
typedef struct take_ctx {
    kvt_coll *c;
    uint8_t *keys;
} take_ctx;

static void take_key(void *vctx, uint64_t id, const void *key) {
    take_ctx *kc = vctx;
    memcpy(kc->keys + id * kc->c->L.key_bytes, key, kc->c->L.key_bytes);
}

/* No room to read them with, or damaged records among them (read in skip mode, whatever the
 * caller's on_corrupt): the keys stay on flash, where every scan checks them and meets the
 * damage in its own call's mode. */
static int reopen(kvt_coll *c) {
    if (!c->exact.keys) return 0; /* they did not fit: scanned on use */
    take_ctx kc = {c, c->exact.keys};
    uint64_t damaged0 = c->ctr.damaged_reads;
    c->exact.keys = NULL; /* kvt_scan_keys reads the flash copy into kc.keys */
    c->read_mode = KVT_READ_SKIP;
    int rc = kvt_scan_keys(c, take_key, &kc);
    c->read_mode = KVT_READ_OWN;
    c->exact.keys = kc.keys;
    if (rc == KVT_EBUDGET || (!rc && c->ctr.damaged_reads != damaged0)) {
        kvt_clear_error();
        rc = 0;
        drop_keys(c);
    }
    return rc;
}

static void stats(const kvt_coll *c, kvt_coll_stats *o) { o->keys_on_flash = (uint64_t)c->exact.keys_flash; }

/* Sizes (budget.c): every key resident while they fit, and a retrieve's scratch: the key
 * column scanned from flash a pool at a time (with a direct read's bounce buffer), the top
 * entries of one retrieve and one record's read. */
static void budget(const kvt_coll_params *p, uint64_t n, const kvt_layout *L, double fetch, uint64_t *keys,
                   uint64_t *read, uint64_t *pending) {
    *keys = n * L->key_bytes;
    *read = 2 * L->pool_bytes + 3 * (uint64_t)KVT_IO_ALIGN + (uint64_t)ceil(fetch * (double)n) * 8 + L->esz +
            2 * (uint64_t)KVT_IO_ALIGN + 32 + (uint64_t)p->dim * 4;
}

const kvt_policy_ops kvt_policy_none = {
    .clustered = 0,
    .budget = budget,
    .drop = drop,
    .grow_ids = grow_ids,
    .trim = trim,
    .give_way = give_way,
    .image_put = image_put,
    .image_get = image_get,
    .reopen = reopen,
    .stats = stats,
    .assign = assign,
    .after_add = after_add,
    .retrieve = retrieve_tokens,
};
