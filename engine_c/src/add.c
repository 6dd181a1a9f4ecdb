/*
 * add.c — appending entries: each joins its nearest cluster (the static policy is exactly
 * this, with no split), or the local policy's staging cluster; the adaptive policy then flags
 * clusters whose variance or size passed the threshold (adapt.c).
 *
 * Invariants:
 * 1. An add writes every record before it changes any metadata readers see; if a write
 *    fails, the heads it claimed are given back (the undo log) and nothing is added.
 * 2. Ids are 0..n-1 in insertion order: an add of m entries gives ids n..n+m-1 or none.
 * 3. Welford's update keeps each cluster's mean and m2 exact without rereading (store.c 3).
 * 4. What an add stages in DRAM is bounded whatever its size: the batch is consumed in
 *    chunks of at most what the budget leaves after the index and pending buffers (never
 *    fewer than KVT_ADD_CHUNK_MIN entries); the cache gives way first, then pending
 *    buffers (entries that would wait for a split or a page are written now instead).
 *    Until step 4 the chunks' cluster numbers live in the id map's slots past n, which are
 *    nobody's, so invariants 1 and 2 hold for the whole batch, not per chunk.
 */
#include <errno.h>
#include <float.h>
#include <stdlib.h>
#include <string.h>

#include "adapt.h"
#include "cluster.h"
#include "common.h"
#include "estimate.h"
#include "index.h"
#include "layout.h"
#include "local.h"
#include "simd.h"
#include "store.h"
#include "virtualize.h"

/* ---- add ---------------------------------------------------------------------------------- */

/* The index bytes of one cluster (kvt_ensure_clusters grows these arrays together). */
static uint64_t cluster_bytes(const kvt_coll *c) {
    return sizeof(kvt_cluster) + (uint64_t)c->p.dim * 4 * (1 + (c->p.score_temp > 0)) + 4 +
           (kvt_vsum_kept(c) ? (uint64_t)c->p.value_dim * 4 : 0);
}

/* Local policy: the most entries the staging cluster may hold so that its recluster (the
 * records read, their k-means, the new clusters written) fits in three quarters of `room`
 * bytes (the index grows meanwhile); at least a window. */
static uint64_t staging_cap(const kvt_coll *c, uint64_t room) {
    uint64_t lo = c->p.local_window, hi = (uint64_t)1 << 32;
    room = room / 4 * 3;
    for (;;) {
        uint64_t s = lo + (hi - lo) / 2;
        if (s == lo) return lo;
        uint32_t k = (uint32_t)((s + c->p.local_cluster_size - 1) / c->p.local_cluster_size);
        /* a read of the staging holds its records up to three times at once: the cache
         * entry it fills, the read buffer and a direct read's bounce buffer */
        uint64_t need = s * (3 * (uint64_t)c->L.esz + 4) + (uint64_t)k * (c->p.dim * 4 + 4) +
                        kvt_kmeans_bytes(s, k, c->p.dim) + 2 * (uint64_t)c->L.pool_bytes;
        if (need <= room) lo = s;
        else hi = s;
    }
}

/* The transient bytes of an add staged in chunks of `ch` entries: each chunk's cluster numbers
 * and row order, the per-cluster plan, write scratch and, for a collection's first batch, the
 * k-means of its first chunk with its centroids, plus the index of the clusters it creates. */
static uint64_t add_transient(const kvt_coll *c, uint64_t ch, int first_batch, uint32_t *k_out) {
    uint32_t k = first_batch ? (uint32_t)((ch + c->p.init_cluster_size - 1) / c->p.init_cluster_size) : c->ncl;
    uint64_t kmb = first_batch ? kvt_kmeans_bytes(ch, k, c->p.dim) + (uint64_t)k * (c->p.dim * 4 + 4) : 0;
    uint64_t newcl = first_batch ? (uint64_t)k * cluster_bytes(c) : 0;
    uint32_t sr = kvt_scratch_records(c, ch + c->L.rpp);
    if (k_out) *k_out = k;
    return ch * 8 + kmb + newcl + (uint64_t)sr * c->L.esz + (uint64_t)c->p.dim * 4 + ((uint64_t)k + 2) * 17;
}

/* An add runs in passes over chunks of at most `ch` entries, so that what it stages is bounded
 * whatever n is: (1) every entry's cluster, kept in the id map's slot for it (c->loc[id].cl;
 * ids >= c->n are nobody's yet); (2) the room plan per cluster (what is written, what waits in
 * a pending buffer); (3) the writes, chunk by chunk, each cluster's records in id order after
 * the tail entries written with them; (4) the metadata, in id order. Nothing readers see
 * changes before (4), and (3) is undone whole if a write fails, so a failed add changes
 * nothing. With one chunk it is the one-pass add: same records, same order, same clusters. */
static int add_locked(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_store *s = c->st;
    const kvt_kernels *K = s->K;
    const kvt_layout *L = &c->L;
    int rc = 0;
    uint32_t *assign = NULL, *order = NULL, *start = NULL, *wnow = NULL, *cnt = NULL, *seen = NULL;
    uint8_t *scratch = NULL, *topend = NULL;
    float *cent = NULL, *cnorm0 = NULL, *x = NULL;
    undo_log log = {0};
    uint64_t transient = 0, n0 = c->n;
    uint32_t ncl0 = c->ncl, staging0 = c->staging;
    int first_batch = 0;
    if (n > UINT32_MAX || n0 + n > ((uint64_t)1 << 40) || (token(c) && n0 + n > KVT_TOKEN_MAX_ENTRIES)) {
        rc = kvt_fail(KVT_EINVAL, "add: too many entries at once (%llu)", (unsigned long long)n);
        goto out;
    }
    rc = kvt_ensure_ids(c, n0 + n);
    if (rc) goto out;

    /* the chunk: the whole add if its staging fits in what the index and pending buffers
     * leave of the budget (the cache gives way), else halved until it does */
    uint32_t k = 0;
    int policy = c->p.policy;
    if (policy != KVT_POLICY_NONE && c->ncl == 0) first_batch = 1;
    uint64_t avail = kvt_mem_left(&s->mem);
    avail -= avail / 8; /* the index grows during the add too (segments, pool table) */
    uint64_t ch = n;
    while (ch > KVT_ADD_CHUNK_MIN && add_transient(c, ch, first_batch, NULL) > avail) ch = (ch + 1) / 2;
    if (ch < KVT_ADD_CHUNK_MIN) ch = n < KVT_ADD_CHUNK_MIN ? n : KVT_ADD_CHUNK_MIN;
    transient = add_transient(c, ch, first_batch, &k);
    if (first_batch) transient -= (uint64_t)k * cluster_bytes(c); /* reserved as index when made */
    rc = kvt_mem_reserve(&s->mem, transient);
    if (rc) {
        transient = 0;
        goto out;
    }
    uint32_t sr = kvt_scratch_records(c, ch + L->rpp);
    assign = malloc(ch * 4);
    order = malloc(ch * 4);
    scratch = malloc((size_t)sr * L->esz);
    x = malloc((size_t)c->p.dim * 4);
    if (!assign || !order || !scratch || !x) {
        rc = kvt_fail(ENOMEM, "add: out of memory");
        goto out;
    }

    /* 1. assignment (into the id map's slots) */
    if (policy == KVT_POLICY_NONE) {
        /* no clustering: one chain of entries in token order, keys also kept for scoring */
        if (c->ncl == 0 && (rc = kvt_new_cluster(c, &k))) goto out;
        for (uint64_t i = 0; i < n; i++) c->loc[n0 + i].cl = 0;
        k = 1;
    } else if (first_batch) {
        /* the first chunk makes the first partition; the rest join its nearest centroid */
        cent = malloc((size_t)k * c->p.dim * 4);
        cnorm0 = malloc((size_t)k * 4);
        if (!cent || !cnorm0) {
            rc = kvt_fail(ENOMEM, "add: out of memory");
            goto out;
        }
        rc = kvt_kmeans(K, c->p.dtype, keys, c->p.dim, L->key_bytes, NULL, ch, k, c->p.kmeans_iters, c->p.seed, cent, assign);
        if (rc) goto out;
        /* drop clusters k-means left empty, keeping the order of the rest */
        uint32_t *remap = calloc(k, 4);
        if (!remap) {
            rc = kvt_fail(ENOMEM, "add: out of memory");
            goto out;
        }
        for (uint64_t i = 0; i < ch; i++) remap[assign[i]] = 1;
        uint32_t kept = 0;
        for (uint32_t j = 0; j < k; j++) {
            if (!remap[j]) {
                remap[j] = UINT32_MAX;
                continue;
            }
            if (kept != j) memcpy(cent + (size_t)kept * c->p.dim, cent + (size_t)j * c->p.dim, (size_t)c->p.dim * 4);
            remap[j] = kept++;
        }
        for (uint64_t i = 0; i < ch; i++) c->loc[n0 + i].cl = remap[assign[i]];
        free(remap);
        for (uint32_t j = 0; j < kept; j++) {
            const float *cj = cent + (size_t)j * c->p.dim;
            cnorm0[j] = K->dot_f32(cj, cj, c->p.dim);
        }
        for (uint64_t i = ch; i < n; i++)
            c->loc[n0 + i].cl = kvt_nearest(K, c->p.dtype, (const uint8_t *)keys + i * L->key_bytes, cent, cnorm0,
                                            kept, c->p.dim);
        for (uint32_t j = 0; j < kept && !rc; j++) {
            uint32_t slot;
            rc = kvt_new_cluster(c, &slot);
        }
        if (rc) goto fail;
        k = kept;
    } else if (policy == KVT_POLICY_LOCAL) {
        if (c->staging == KVT_NONE && (rc = kvt_new_cluster(c, &c->staging))) goto fail;
        /* the newest entries gather in the staging cluster, as many as its recluster can hold
         * in DRAM; older ones of a batch too large for that join their nearest cluster (the
         * staging left out), as the static policy would, rather than a staging cluster too
         * large ever to be reclustered */
        uint32_t st = c->staging;
        uint64_t cap = staging_cap(c, avail), have = c->cl[st].n;
        uint64_t direct = have + n > cap && c->ncl > 1 ? (have < cap ? have + n - cap : n) : 0;
        float keep = c->cnorm[st];
        c->cnorm[st] = FLT_MAX; /* nothing joins it here */
        for (uint64_t i = 0; i < direct; i++)
            c->loc[n0 + i].cl = kvt_nearest(K, c->p.dtype, (const uint8_t *)keys + i * L->key_bytes, c->cent,
                                            c->cnorm, c->ncl, c->p.dim);
        c->cnorm[st] = keep;
        for (uint64_t i = direct; i < n; i++) c->loc[n0 + i].cl = st;
        k = c->ncl;
    } else {
        k = c->ncl;
        for (uint64_t i = 0; i < n; i++)
            c->loc[n0 + i].cl = kvt_nearest(K, c->p.dtype, (const uint8_t *)keys + i * L->key_bytes, c->cent,
                                            c->cnorm, c->ncl, c->p.dim);
    }

    /* 2. per cluster: how many join it (cnt), how many of its tail and then new entries are
     *    written (wnow), whether the rest waits in its pending buffer (topend). Entries
     *    joining a flagged cluster that is on flash wait in DRAM (adaptive); the others are
     *    written, all of them, or with a write buffer up to the last whole page, the rest
     *    staying in the cluster's tail. Room is made first, so that nothing can fail after the
     *    writes. A cluster's records are its flash segments followed by its pending buffer:
     *    once it has pending entries, later ones queue behind them. */
    start = calloc((size_t)k + 1, 4);
    cnt = calloc((size_t)k + 1, 4);
    seen = calloc((size_t)k + 1, 4);
    topend = calloc((size_t)k + 1, 1);
    wnow = calloc((size_t)k + 1, 4);
    if (!start || !cnt || !seen || !topend || !wnow) {
        rc = kvt_fail(ENOMEM, "add: out of memory");
        goto fail;
    }
    for (uint64_t i = 0; i < n; i++) cnt[c->loc[n0 + i].cl]++;
    uint64_t new_room = buffering(c) ? kvt_tail_share(c) : 0, waiting = c->pending_total - c->tail_total;
    /* entries joining flagged clusters wait while the pending budget has room, or behind
     * entries already waiting (a tail kept from before the flag, ptail, does not count): the
     * same whatever is cached */
    uint64_t room = c->p.pending_budget > waiting ? c->p.pending_budget - waiting : 0;
    /* entries waiting for a split take at most a quarter of what the index and the buffers
     * leave of the budget (the cache gives way to them): under a tight budget the rest is
     * written now and its cluster splits when it is next read */
    uint64_t pend_room = kvt_mem_left(&s->mem) / 4;
    for (uint32_t j = 0; j < k && !rc; j++) {
        uint32_t m = cnt[j];
        kvt_cluster *cl = &c->cl[j];
        if (m && token(c)) {
            rc = kvt_ensure_mem(c, cl, cl->n + m); /* token layout: nothing waits, records go to the log */
        } else if (m && s->tight) { /* a second run for want of budget: everything is written now */
            wnow[j] = cl->pend + m;
        } else if (m && cl->flagged && (cl->pend > cl->ptail || m <= room)) { /* cached or not */
            topend[j] = 1;
            room -= m < room ? m : room;
            uint64_t more = (uint64_t)m * L->esz;
            rc = more <= pend_room ? kvt_ensure_pbuf(c, cl, cl->pend + m) : KVT_EBUDGET;
            if (!rc) pend_room -= more;
            if (rc == KVT_EBUDGET) { /* no room to wait in: written now, the split waits for a read */
                kvt_clear_error();
                rc = 0;
                topend[j] = 0;
                wnow[j] = cl->pend + m;
                c->ctr.pending_flushes++;
            }
        } else if (m && cl->flagged) {
            /* no room left in the pending budget: written now, after the tail it had (written
             * too, so that this never depends on the write buffer, sized from the DRAM
             * budget); the cluster stays flagged */
            wnow[j] = cl->pend + m;
        } else if (m) {
            uint64_t total = (uint64_t)cl->pend + m, w = total;
            if (buffering(c)) { /* whole pages, counting the flash part's last page */
                uint64_t f = kvt_tail_fill(c, cl), pages = (f + total) / L->rpp;
                w = pages * L->rpp > f ? pages * L->rpp - f : 0;
                /* a cluster with a tail keeps it (it is hot); new tails of one add take at
                 * most the share, so a large add writes most clusters directly. Older tails
                 * make room afterwards (trim_tails), least recently appended first. */
                if (!cl->pend && total - w > new_room) w = total;
                else if (!cl->pend) new_room -= total - w;
            }
            wnow[j] = (uint32_t)w;
            if (w < total) {
                topend[j] = 1;
                rc = kvt_ensure_pbuf(c, cl, (uint32_t)(total - w));
                if (rc == KVT_EBUDGET) { /* no room for a tail: the partial page is written now */
                    kvt_clear_error();
                    rc = 0;
                    topend[j] = 0;
                    wnow[j] = (uint32_t)total;
                    c->ctr.pending_flushes++;
                }
            }
        }
        if (m && cl->ent && kvt_cache_grow(&s->cache, cl->ent, m)) {
            kvt_cache_drop(&s->cache, cl->ent);
            cl->ent = NULL;
        }
    }
    if (rc) goto fail;

    /* 3. write every record bound for flash, chunk by chunk, before touching what readers see */
    for (uint64_t c0 = 0; c0 < n && !rc && !token(c); c0 += ch) {
        uint64_t cn = n - c0 < ch ? n - c0 : ch;
        /* the chunk's rows grouped by cluster (a counting sort keeps id order inside one) */
        memset(start, 0, ((size_t)k + 1) * 4);
        for (uint64_t i = 0; i < cn; i++) start[c->loc[n0 + c0 + i].cl + 1]++;
        for (uint32_t j = 0; j < k; j++) start[j + 1] += start[j];
        for (uint64_t i = 0; i < cn; i++) order[start[c->loc[n0 + c0 + i].cl]++] = (uint32_t)(c0 + i);
        for (uint32_t j = k; j > 0; j--) start[j] = start[j - 1];
        start[0] = 0;
        for (uint32_t j = 0; j < k && !rc; j++) {
            uint32_t m = start[j + 1] - start[j];
            if (!m || !wnow[j]) continue;
            kvt_cluster *cl = &c->cl[j];
            uint32_t from_tail = wnow[j] < cl->pend ? wnow[j] : cl->pend, new_w = wnow[j] - from_tail;
            uint32_t pre = seen[j] ? 0 : from_tail; /* the tail goes with the cluster's first write */
            uint32_t take = seen[j] >= new_w ? 0 : (new_w - seen[j] < m ? new_w - seen[j] : m);
            rec_src src = {order + start[j], keys, values, (int64_t)n0, NULL, NULL, cl->pbuf, pre};
            if (pre + take) rc = kvt_append_flash(c, j, &src, pre + take, scratch, sr, &log);
            seen[j] += m;
        }
    }
    for (uint64_t at = 0; at < n && !rc && token(c);) { /* the log, in id order */
        uint64_t cn = n - at < sr ? n - at : sr, off = token_offset(c, n0 + at);
        uint64_t P = s->io.dev.page_size > 0 ? (uint64_t)s->io.dev.page_size : KVT_IO_ALIGN;
        for (uint64_t r = at; r < at + cn; r++)
            kvt_rec_encode(L, scratch + (size_t)(r - at) * L->esz, (int64_t)(n0 + r),
                           (const uint8_t *)keys + (size_t)r * L->key_bytes, (const uint8_t *)values + (size_t)r * L->value_bytes);
        rc = kvt_file_write(c->f, off, scratch, (size_t)cn * L->esz);
        if (!rc && off % P && n0 + at > 0) c->ctr.partial_page_writes++;
        at += cn;
    }
    if (rc) {
        kvt_rollback(c, &log);
        goto fail;
    }
    kvt_kill_point("add.written");

    /* 4. metadata: id map, running means and variances, cached copies, pending buffers */
    c->wclock++;
    for (uint32_t j = 0; j < k; j++) {
        if (!cnt[j]) continue;
        kvt_cluster *cl = &c->cl[j];
        /* the tail entries just written leave the tail; seen[j] counts from here on the new
         * entries met, and wnow[j] becomes how many new ones were written */
        uint32_t from_tail = wnow[j] < cl->pend ? wnow[j] : cl->pend;
        wnow[j] -= from_tail;
        seen[j] = 0;
        if (from_tail) {
            memmove(cl->pbuf, cl->pbuf + (size_t)from_tail * L->esz, (size_t)(cl->pend - from_tail) * L->esz);
            cl->pend -= from_tail;
            c->pending_total -= from_tail;
            /* a flagged cluster's first ptail entries are its old tail (layout.c 2) */
            uint32_t tail_part = !cl->flagged ? from_tail : from_tail < cl->ptail ? from_tail : cl->ptail;
            if (cl->flagged) cl->ptail -= tail_part;
            c->tail_total -= tail_part;
        }
        cl->wtick = c->wclock;
    }
    for (uint64_t r = 0; r < n; r++) {
        uint32_t j = c->loc[n0 + r].cl, t = seen[j]++;
        kvt_cluster *cl = &c->cl[j];
        float *mean = c->cent + (size_t)j * c->p.dim;
        const uint8_t *key = (const uint8_t *)keys + (size_t)r * L->key_bytes;
        const uint8_t *val = (const uint8_t *)values + (size_t)r * L->value_bytes;
        if (cl->mem && token(c)) cl->mem[cl->n] = (uint32_t)(n0 + r);
        set_loc(c, n0 + r, j, cl->n);
        if (!first_batch) c->ctr.naive_move_bytes += (uint64_t)cl->n * L->esz;
        kvt_key_to_f32(K, c->p.dtype, key, x, c->p.dim);
        kvt_welford_add(mean, &cl->m2, c->m2d ? c->m2d + (size_t)j * c->p.dim : NULL, cl->n, x, c->p.dim);
        kvt_vsum_add(c, j, val); /* estimate.c: written and pending entries alike */
        cl->n++;
        if (topend[j] && t >= wnow[j]) {
            kvt_rec_encode(L, cl->pbuf + (size_t)cl->pend++ * L->esz, (int64_t)(n0 + r), key, val);
            c->pending_total++;
            if (!cl->flagged) c->tail_total++;
        }
        if (cl->ent) {
            kvt_rec_encode(L, cl->ent->rec + (size_t)cl->ent->n * L->esz, (int64_t)(n0 + r), key, val);
            cl->ent->n++;
            kvt_cache_updated(&s->cache, cl->ent);
        }
    }
    for (uint32_t j = 0; j < k; j++) {
        if (!cnt[j]) continue;
        kvt_cluster *cl = &c->cl[j];
        if (!cl->pend && cl->pbuf) kvt_free_pending(c, cl); /* a tail written out whole: its buffer goes */
        kvt_update_norm(c, j);
    }
    if (policy == KVT_POLICY_NONE && c->keys) memcpy(c->keys + n0 * L->key_bytes, keys, n * L->key_bytes);
    c->n = n0 + n;
    c->ctr.append_bytes += n * L->esz;
    *first_id = (int64_t)n0;

    /* 5. policy upkeep, which never fails the add: its entries are in place either way */
    kvt_mem_release(&s->mem, transient);
    transient = 0;
    if (policy == KVT_POLICY_ADAPTIVE) {
        /* flagged clusters split when a retrieve reads them (adapt.c 2), cached or not */
        kvt_derive_tau(c);
        for (uint32_t j = 0; j < k; j++)
            if (cnt[j]) kvt_maybe_flag(c, j);
        kvt_relieve_pending(c);
        for (uint32_t j = 0; j < k; j++)
            if (cnt[j]) kvt_split_oversized(c, j);
    } else if (policy == KVT_POLICY_LOCAL && c->staging != KVT_NONE && c->cl[c->staging].n >= c->p.local_window) {
        if (kvt_recluster_staging(c)) c->ctr.split_errors++;
    }
    kvt_trim_tails(c);
    goto out;
fail:
    /* pending buffers step 2 made that nothing went into go back to the budget */
    for (uint32_t j = 0; j < c->ncl; j++)
        if (c->cl[j].pbuf && !c->cl[j].pend) kvt_free_pending(c, &c->cl[j]);
    for (uint32_t j = ncl0; j < c->ncl; j++) kvt_drop_segs(c, j);
    c->ncl = ncl0;
    c->staging = staging0;
out:
    free(assign);
    free(order);
    free(start);
    free(cnt);
    free(seen);
    free(topend);
    free(wnow);
    free(cent);
    free(cnorm0);
    free(x);
    free(scratch);
    free(log.u);
    kvt_mem_release(&s->mem, transient);
    return rc;
}

int kvt_coll_add(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_clear_error();
    if (!keys || (!values && c->p.value_dim) || n == 0) return kvt_fail(KVT_EINVAL, "add: keys/values must be non-empty");
    int rc;
    RUN_READY(c, add_locked(c, keys, values, n, first_id));
    return rc;
}
