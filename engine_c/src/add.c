/*
 * add.c — appending entries, as a pipeline of named steps: prepare (the chunk, the staging),
 * assign (the first partition, or the policy's assignment: the static policy, the default,
 * sends each entry to its nearest cluster), plan (per cluster: written now, or waiting in its
 * pending buffer), write (every record bound for flash), publish (the metadata readers see),
 * upkeep (the policy's: the adaptive policy flags clusters past its threshold, local
 * reclusters a full window; then the write buffers' tails). The policies' parts are hooks of
 * their table (policy.h).
 *
 * Invariants:
 * 1. An add writes every record before it changes any metadata readers see; if a write
 *    fails, the heads it claimed are given back (the undo log) and nothing is added.
 * 2. Ids are 0..n-1 in insertion order: an add of m entries gives ids n..n+m-1 or none.
 * 3. Welford's update keeps each cluster's mean and m2 exact without rereading (store.c 3).
 * 4. What an add stages in DRAM is bounded whatever its size: the batch is consumed in
 *    chunks whose staging takes at most KVT_ADD_STAGE_SHARE of the budget (never fewer than
 *    KVT_ADD_CHUNK_MIN entries); to make the room the cache gives way, then write-buffer
 *    tails, then other collections are paged out (RUN_READY). The chunks, and so the
 *    clusters, depend on the batch and the budget, not on what else is resident.
 *    Until step 4 the chunks' cluster numbers live in the id map's slots past n, which are
 *    nobody's, so invariants 1 and 2 hold for the whole batch, not per chunk.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "add.h"
#include "cluster.h"
#include "common.h"
#include "estimate.h"
#include "index.h"
#include "layout.h"
#include "policy.h"
#include "simd.h"
#include "store.h"
#include "virtualize.h"

/* ---- add ---------------------------------------------------------------------------------- */

/* The index bytes of one cluster (kvt_ensure_clusters grows these arrays together). */
static uint64_t cluster_bytes(const kvt_coll *c) { return kvt_cluster_slot_bytes(&c->p); }

/* The transient bytes of an add staged in chunks of `ch` entries: each chunk's cluster numbers
 * and row order, the per-cluster plan, write scratch and, for a collection's first batch, the
 * k-means of a chunk's worth of its rows with its centroids, plus the index of the clusters
 * it creates. */
static uint64_t add_transient(const kvt_coll *c, uint64_t ch, int first_batch, uint32_t *k_out) {
    uint32_t k = first_batch ? (uint32_t)((ch + c->p.init_cluster_size - 1) / c->p.init_cluster_size) : c->ncl;
    uint64_t kmb = first_batch ? kvt_kmeans_bytes(ch, k, c->p.dim) + (uint64_t)k * (c->p.dim * 4 + 4) : 0;
    uint64_t newcl = first_batch ? (uint64_t)k * cluster_bytes(c) : 0;
    uint32_t sr = kvt_scratch_records(c, ch + c->L.rpp);
    if (k_out) *k_out = k;
    return ch * 8 + kmb + newcl + (uint64_t)sr * c->L.esz + (uint64_t)c->p.dim * 8 + ((uint64_t)k + 2) * 17;
}

/* An add runs in passes over chunks of at most `ch` entries, so that what it stages is bounded
 * whatever n is: (assign) every entry's cluster, kept in the id map's slot for it
 * (kvt_loc(c, id); ids >= c->n are nobody's yet); (plan) what is written, what waits in a
 * pending buffer, per cluster; (write) the writes, chunk by chunk, each cluster's records in
 * id order after the tail entries written with them; (publish) the metadata, in id order.
 * Nothing readers see changes before publish, and the writes are undone whole if one fails,
 * so a failed add changes nothing. With one chunk it is the one-pass add: same records, same
 * order, same clusters. */

/* prepare: the chunk, its staging reserved and allocated. The chunk is the whole add if its
 * staging takes at most KVT_ADD_STAGE_SHARE of the budget, else halved until it does: decided
 * by the budget and the batch, never by what the cache or other collections hold at the
 * moment, so that a first partition (and every cluster after it) is the same whether or not
 * other collections had to be paged out to make room (RUN_READY). Only the call's last run,
 * with nothing left to page out, stages what is free. Nothing is made that a failure would
 * have to undo. */
static int add_prepare(kvt_coll *c, kvt_add *a) {
    kvt_store *s = c->st;
    if (a->n > UINT32_MAX || a->n0 + a->n > ((uint64_t)1 << 40) || (token(c) && a->n0 + a->n > KVT_TOKEN_MAX_ENTRIES))
        return kvt_fail(KVT_EINVAL, "add: too many entries at once (%llu)", (unsigned long long)a->n);
    int rc = kvt_ensure_ids(c, a->n0 + a->n);
    if (rc) return rc;
    a->first_batch = c->ops->clustered && c->ncl == 0;
    a->avail = s->pieces ? kvt_mem_left(&s->mem) : (uint64_t)((double)s->mem.budget * KVT_ADD_STAGE_SHARE);
    a->avail -= a->avail / 8; /* the index grows during the add too (segments, pool table) */
    uint64_t ch = a->n;
    while (ch > KVT_ADD_CHUNK_MIN && add_transient(c, ch, a->first_batch, NULL) > a->avail) ch = (ch + 1) / 2;
    if (ch < KVT_ADD_CHUNK_MIN) ch = a->n < KVT_ADD_CHUNK_MIN ? a->n : KVT_ADD_CHUNK_MIN;
    a->ch = ch;
    uint64_t transient = add_transient(c, ch, a->first_batch, &a->k);
    if (a->first_batch) transient -= (uint64_t)a->k * cluster_bytes(c); /* reserved as index when made */
    rc = kvt_mem_reserve(&s->mem, transient);
    if (rc) return rc;
    a->transient = transient;
    a->sr = kvt_scratch_records(c, ch + c->L.rpp);
    a->row = malloc(ch * 4);
    a->scratch = malloc((size_t)a->sr * c->L.esz);
    a->x = malloc((size_t)c->p.dim * 8); /* a key, then a mean, in float32 */
    if (!a->row || !a->scratch || !a->x) return kvt_fail(ENOMEM, "add: out of memory");
    return 0;
}

/* assign, a collection's first add: k-means makes the first partition (clusters it left
 * empty dropped, the others in order). It trains on the chunk's worth of rows it can stage:
 * the whole batch when it fits, else every step-th row (step = n / ch, the rows spread over
 * the whole batch; with step 1 its first ch rows, more than half of it); the rows it trained
 * on keep the cluster k-means gave them, the others join their nearest centroid. So a batch
 * larger than its staging is partitioned by a sample of all of it, not by its first rows: a
 * KV cache's first rows are one head's first tokens, and clusters fitted to them fit the
 * rest badly (49K real keys at 10% of their bytes: search recall@10 0.71 from the first
 * rows, 0.94 from the sample). */
static int first_partition(kvt_coll *c, kvt_add *a) {
    const kvt_kernels *K = c->st->K;
    uint32_t k = a->k, d = c->p.dim, kept = 0;
    uint64_t step = a->n / a->ch; /* >= 1: ch <= n */
    int rc = 0;
    uint32_t *assign = malloc(a->ch * 4), *remap = calloc(k, 4);
    float *cent = malloc((size_t)k * d * 4), *cnorm0 = malloc((size_t)k * 4);
    if (!assign || !remap || !cent || !cnorm0) rc = kvt_fail(ENOMEM, "add: out of memory");
    if (!rc) rc = kvt_widen_ids(c, (uint64_t)c->ncl + k); /* the map names them before they are made */
    if (!rc)
        rc = kvt_kmeans(K, c->p.dtype, a->keys, d, c->L.key_bytes * step, NULL, a->ch, k, c->p.kmeans_iters, c->p.seed,
                        cent, assign);
    if (!rc) {
        for (uint32_t j = 0; j < k; j++) cnorm0[j] = K->dot_f32(cent + (size_t)j * d, cent + (size_t)j * d, d);
        for (uint64_t i = 0; i < a->n; i++) {
            uint32_t j = i % step == 0 && i / step < a->ch
                             ? assign[i / step]
                             : kvt_nearest(K, c->p.dtype, kvt_add_key(c, a, i), cent, cnorm0, k, d);
            kvt_loc_put(c, a->n0 + i, j);
            remap[j] = 1;
        }
        for (uint32_t j = 0; j < k; j++) remap[j] = remap[j] ? kept++ : UINT32_MAX;
        for (uint64_t i = 0; i < a->n; i++) kvt_loc_put(c, a->n0 + i, remap[kvt_loc(c, a->n0 + i)]);
        for (uint32_t j = 0; j < kept && !rc; j++) {
            uint32_t slot;
            rc = kvt_new_cluster(c, &slot);
        }
        a->k = kept;
    }
    free(assign);
    free(remap);
    free(cent);
    free(cnorm0);
    return rc;
}

int kvt_add_nearest(kvt_coll *c, kvt_add *a) {
    a->k = c->ncl;
    for (uint64_t i = 0; i < a->n; i++)
        kvt_loc_put(
            c, a->n0 + i,
            kvt_nearest_rep(c->st->K, c->p.dtype, kvt_add_key(c, a, i), c->cent, c->cnorm, c->ncl, c->p.dim, a->x));
    return 0;
}

static int add_assign(kvt_coll *c, kvt_add *a) {
    if (a->first_batch) return first_partition(c, a);
    return c->ops->assign ? c->ops->assign(c, a) : kvt_add_nearest(c, a);
}

/* plan, the default for cluster j: its new entries are written, after its tail; with a write
 * buffer, up to the last whole page (counting the flash part's last page), the rest kept in
 * the cluster's tail. A cluster with a tail keeps it (it is hot); new tails of one add take
 * at most the share, so a large add writes most clusters directly (older tails make room
 * afterwards, trim_tails, least recently appended first). */
static int plan_written(kvt_coll *c, kvt_add *a, uint32_t j) {
    kvt_cluster *cl = &c->cl[j];
    uint64_t total = (uint64_t)cl->pend + a->cnt[j], w = total;
    uint32_t rpp = c->L.rpp;
    if (buffering(c)) {
        uint64_t f = kvt_tail_fill(c, cl), pages = (f + total) / rpp;
        w = pages * rpp > f ? pages * rpp - f : 0;
        if (!cl->pend && total - w > a->new_room)
            w = total;
        else if (!cl->pend)
            a->new_room -= total - w;
    }
    a->wnow[j] = (uint32_t)w;
    if (w >= total) return 0;
    a->topend[j] = 1;
    int rc = kvt_ensure_pbuf(c, cl, (uint32_t)(total - w));
    if (rc == KVT_EBUDGET) { /* no room for a tail: the partial page is written now */
        kvt_clear_error();
        rc = 0;
        a->topend[j] = 0;
        a->wnow[j] = (uint32_t)total;
        c->ctr.pending_flushes++;
    }
    return rc;
}

/* A second run for want of budget (RUN_READY): what joins cluster j is written now, with the
 * tail it had; no tail is kept in DRAM. */
static int written_now(kvt_coll *c, kvt_add *a, uint32_t j) {
    a->wnow[j] = c->cl[j].pend + a->cnt[j];
    return 0;
}

/* plan: per cluster, how many join it (cnt), how many of its tail and then new entries are
 * written (wnow), whether the rest waits in its pending buffer (topend). Room is made first,
 * so that nothing can fail after the writes. A cluster's records are its flash segments
 * followed by its pending buffer: once it has pending entries, later ones queue behind them. */
static int add_plan(kvt_coll *c, kvt_add *a) {
    kvt_store *s = c->st;
    size_t k1 = (size_t)a->k + 1;
    a->start = calloc(k1, 4);
    a->cnt = calloc(k1, 4);
    a->seen = calloc(k1, 4);
    a->topend = calloc(k1, 1);
    a->wnow = calloc(k1, 4);
    if (!a->start || !a->cnt || !a->seen || !a->topend || !a->wnow) return kvt_fail(ENOMEM, "add: out of memory");
    for (uint64_t i = 0; i < a->n; i++) a->cnt[kvt_loc(c, a->n0 + i)]++;
    a->new_room = buffering(c) ? kvt_tail_share(c) : 0;
    if (c->ops->plan_begin) c->ops->plan_begin(c, a);
    int rc = 0;
    for (uint32_t j = 0; j < a->k && !rc; j++) {
        uint32_t m = a->cnt[j];
        kvt_cluster *cl = &c->cl[j];
        if (!m) continue;
        if (token(c))
            rc = kvt_ensure_mem(c, cl, cl->n + m); /* nothing waits: records go to the log */
        else if (!(c->ops->plan &&
                   c->ops->plan(c, a, j, &rc))) /* held for a split: the policy's, whatever the budget */
            rc = s->tight ? written_now(c, a, j) : plan_written(c, a, j);
        kvt_cache_ent *e = kvt_cached(c, j);
        if (e && kvt_cache_grow(&s->cache, e, m)) kvt_cache_drop(&s->cache, e);
    }
    return rc;
}

/* write, one chunk of rows c0..c0+cn-1: its rows grouped by cluster (a counting sort keeps id
 * order inside one), then each cluster's share of what the plan writes now, its tail going
 * with its first write. */
static int write_chunk(kvt_coll *c, kvt_add *a, uint64_t c0, uint64_t cn) {
    uint32_t k = a->k, *start = a->start;
    memset(start, 0, ((size_t)k + 1) * 4);
    for (uint64_t i = 0; i < cn; i++) start[kvt_loc(c, a->n0 + c0 + i) + 1]++;
    for (uint32_t j = 0; j < k; j++) start[j + 1] += start[j];
    for (uint64_t i = 0; i < cn; i++) a->row[start[kvt_loc(c, a->n0 + c0 + i)]++] = (uint32_t)(c0 + i);
    for (uint32_t j = k; j > 0; j--) start[j] = start[j - 1];
    start[0] = 0;
    int rc = 0;
    for (uint32_t j = 0; j < k && !rc; j++) {
        uint32_t m = start[j + 1] - start[j], wnow = a->wnow[j], seen = a->seen[j];
        if (!m || !wnow) continue;
        kvt_cluster *cl = &c->cl[j];
        uint32_t from_tail = wnow < cl->pend ? wnow : cl->pend, new_w = wnow - from_tail;
        uint32_t pre = seen ? 0 : from_tail;
        uint32_t take = seen >= new_w ? 0 : (new_w - seen < m ? new_w - seen : m);
        rec_src src = {a->row + start[j], a->keys, a->values, (int64_t)a->n0, NULL, NULL, kvt_pbuf(cl), pre};
        if (pre + take) rc = kvt_append_flash(c, j, &src, pre + take, a->scratch, a->sr, &a->log);
        a->seen[j] += m;
    }
    return rc;
}

/* write: every record bound for flash, before anything readers see changes; undone whole if
 * a write fails. */
static int add_write(kvt_coll *c, kvt_add *a) {
    int rc = 0;
    if (token(c)) {
        rc = kvt_append_log(c, a->n0, a->keys, a->values, a->n, a->scratch, a->sr);
    } else {
        for (uint64_t c0 = 0; c0 < a->n && !rc; c0 += a->ch)
            rc = write_chunk(c, a, c0, a->n - c0 < a->ch ? a->n - c0 : a->ch);
    }
    if (rc)
        kvt_rollback(c, &a->log);
    else
        kvt_kill_point("add.written");
    return rc;
}

/* publish, one row: the id map, the running mean and variance of its cluster, its value
 * sum, and the record where it waits (the pending buffer) or is cached. */
static void publish_row(kvt_coll *c, kvt_add *a, uint64_t r) {
    const kvt_layout *L = &c->L;
    uint64_t id = a->n0 + r;
    uint32_t j = kvt_loc(c, id), t = a->seen[j]++;
    kvt_cluster *cl = &c->cl[j];
    const uint8_t *key = kvt_add_key(c, a, r), *val = (const uint8_t *)a->values + (size_t)r * L->value_bytes;
    if (kvt_members(cl) && token(c)) cl->x->mem[cl->n] = (uint32_t)id;
    set_loc(c, id, j); /* its slot follows the cluster's others (store.c 2): ids come in order */
    if (!a->first_batch) c->ctr.naive_move_bytes += (uint64_t)cl->n * L->esz;
    kvt_key_to_f32(c->st->K, c->p.dtype, key, a->x, c->p.dim);
    float *mean = a->x + c->p.dim;
    kvt_rep_load(c, j, mean);
    double m2 = cl->m2;
    kvt_welford_add(mean, &m2, c->m2d ? c->m2d + (size_t)j * c->p.dim : NULL, cl->n, a->x, c->p.dim);
    cl->m2 = (float)m2;
    kvt_rep_store(c, j, mean);
    kvt_vsum_add(c, j, val); /* estimate.c: written and pending entries alike */
    cl->n++;
    if (a->topend[j] && t >= a->wnow[j]) kvt_tail_push(c, cl, (int64_t)id, key, val);
    kvt_cache_ent *e = kvt_cached(c, j);
    if (e) {
        kvt_rec_encode(L, e->rec + (size_t)e->n * L->esz, (int64_t)id, key, val);
        e->n++;
        kvt_cache_updated(&c->st->cache, e);
    }
}

/* publish: the metadata, in id order. The tail entries just written leave each cluster's
 * tail; seen[j] then counts the new entries met, and wnow[j] becomes how many new ones were
 * written. */
static void add_publish(kvt_coll *c, kvt_add *a) {
    c->wclock++;
    for (uint32_t j = 0; j < a->k; j++) {
        if (!a->cnt[j]) continue;
        kvt_cluster *cl = &c->cl[j];
        uint32_t from_tail = a->wnow[j] < cl->pend ? a->wnow[j] : cl->pend;
        a->wnow[j] -= from_tail;
        a->seen[j] = 0;
        if (from_tail) kvt_tail_written(c, cl, from_tail);
        if (cl->x) cl->x->wtick = c->wclock;
    }
    for (uint64_t r = 0; r < a->n; r++) publish_row(c, a, r);
    for (uint32_t j = 0; j < a->k; j++) {
        if (!a->cnt[j]) continue;
        kvt_cluster *cl = &c->cl[j];
        if (!cl->pend && kvt_pbuf(cl)) kvt_free_pending(c, cl); /* a tail written out whole: its buffer goes */
        kvt_update_norm(c, j);
    }
    c->n = a->n0 + a->n;
    c->ctr.append_bytes += a->n * c->L.esz;
}

/* A failed add, once assign began: pending buffers the plan made that nothing went into go
 * back to the budget, and the clusters it made are gone. */
static void add_undo(kvt_coll *c, kvt_add *a) {
    for (uint32_t j = 0; j < c->ncl; j++)
        if (kvt_pbuf(&c->cl[j]) && !c->cl[j].pend) kvt_free_pending(c, &c->cl[j]);
    for (uint32_t j = a->ncl0; j < c->ncl; j++) kvt_drop_segs(c, j);
    c->ncl = a->ncl0;
    if (c->ops->undo_add) c->ops->undo_add(c, a);
}

static void add_free(kvt_coll *c, kvt_add *a) {
    free(a->row);
    free(a->start);
    free(a->cnt);
    free(a->seen);
    free(a->topend);
    free(a->wnow);
    free(a->x);
    free(a->scratch);
    free(a->log.u);
    kvt_mem_release(&c->st->mem, a->transient);
}

static int add_locked(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_add a = {.keys = keys, .values = values, .n = n, .n0 = c->n, .ncl0 = c->ncl};
    int rc = add_prepare(c, &a);
    if (!rc) {
        rc = add_assign(c, &a);
        if (!rc) rc = add_plan(c, &a);
        if (!rc) rc = add_write(c, &a);
        if (rc) add_undo(c, &a);
    }
    if (!rc) {
        add_publish(c, &a);
        *first_id = (int64_t)a.n0;
        /* upkeep, which never fails the add: its entries are in place either way */
        kvt_mem_release(&c->st->mem, a.transient);
        a.transient = 0;
        if (c->ops->after_add) c->ops->after_add(c, &a);
        kvt_trim_tails(c);
    }
    add_free(c, &a);
    return rc;
}

int kvt_coll_add(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_clear_error();
    if (!keys || (!values && c->p.value_dim) || n == 0)
        return kvt_fail(KVT_EINVAL, "add: keys/values must be non-empty");
    int rc;
    RUN_READY(c, add_locked(c, keys, values, n, first_id));
    return rc;
}
