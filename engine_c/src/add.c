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

/* ---- add ---------------------------------------------------------------------------------- */

static int add_locked(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_store *s = c->st;
    const kvt_kernels *K = s->K;
    const kvt_layout *L = &c->L;
    int rc = 0;
    uint32_t *assign = NULL, *order = NULL, *start = NULL, *wnow = NULL;
    uint8_t *scratch = NULL, *topend = NULL;
    float *cent = NULL, *x = NULL;
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

    /* 1. assignment */
    uint32_t k = 0;
    uint64_t kmb = 0;
    int policy = c->p.policy;
    if (policy != KVT_POLICY_NONE && c->ncl == 0) {
        first_batch = 1;
        k = (uint32_t)((n + c->p.init_cluster_size - 1) / c->p.init_cluster_size);
        kmb = kvt_kmeans_bytes(n, k, c->p.dim) + (uint64_t)k * c->p.dim * 4;
    }
    /* scratch for one write: the new entries, with a tail before them (up to a page) */
    uint32_t sr = kvt_scratch_records(c, n + L->rpp);
    uint64_t nk = (uint64_t)(first_batch ? k : c->ncl) + 2;
    transient = n * 8 + kmb + (uint64_t)sr * L->esz + (uint64_t)c->p.dim * 4 + nk * 9;
    rc = kvt_mem_reserve(&s->cache, transient);
    if (rc) {
        transient = 0;
        goto out;
    }
    assign = malloc(n * 4);
    order = malloc(n * 4);
    scratch = malloc((size_t)sr * L->esz);
    x = malloc((size_t)c->p.dim * 4);
    if (!assign || !order || !scratch || !x) {
        rc = kvt_fail(ENOMEM, "add: out of memory");
        goto out;
    }
    if (policy == KVT_POLICY_NONE) {
        /* no clustering: one chain of entries in token order, keys also kept for scoring */
        if (c->ncl == 0 && (rc = kvt_new_cluster(c, &k))) goto out;
        memset(assign, 0, n * 4);
        k = 1;
    } else if (first_batch) {
        cent = malloc((size_t)k * c->p.dim * 4);
        if (!cent) {
            rc = kvt_fail(ENOMEM, "add: out of memory");
            goto out;
        }
        rc = kvt_kmeans(K, c->p.dtype, keys, c->p.dim, L->key_bytes, NULL, n, k, c->p.kmeans_iters, c->p.seed, cent, assign);
        if (rc) goto out;
        /* drop clusters k-means left empty, keeping the order of the rest */
        uint32_t *remap = calloc(k, 4);
        if (!remap) {
            rc = kvt_fail(ENOMEM, "add: out of memory");
            goto out;
        }
        for (uint64_t i = 0; i < n; i++) remap[assign[i]] = 1;
        uint32_t kept = 0;
        for (uint32_t j = 0; j < k; j++) remap[j] = remap[j] ? kept++ : UINT32_MAX;
        for (uint64_t i = 0; i < n; i++) assign[i] = remap[assign[i]];
        free(remap);
        for (uint32_t j = 0; j < kept && !rc; j++) {
            uint32_t slot;
            rc = kvt_new_cluster(c, &slot);
        }
        if (rc) goto fail;
        k = kept;
    } else if (policy == KVT_POLICY_LOCAL) {
        if (c->staging == KVT_NONE && (rc = kvt_new_cluster(c, &c->staging))) goto fail;
        for (uint64_t i = 0; i < n; i++) assign[i] = c->staging;
        k = c->ncl;
    } else {
        k = c->ncl;
        for (uint64_t i = 0; i < n; i++)
            assign[i] = kvt_nearest(K, c->p.dtype, (const uint8_t *)keys + i * L->key_bytes, c->cent,
                                    c->cnorm, c->ncl, c->p.dim);
    }

    /* 2. group by cluster (counting sort keeps id order inside a cluster) */
    start = calloc((size_t)k + 1, 4);
    topend = calloc((size_t)k + 1, 1);
    wnow = calloc((size_t)k + 1, 4);
    if (!start || !topend || !wnow) {
        rc = kvt_fail(ENOMEM, "add: out of memory");
        goto fail;
    }
    for (uint64_t i = 0; i < n; i++) start[assign[i] + 1]++;
    for (uint32_t j = 0; j < k; j++) start[j + 1] += start[j];
    for (uint64_t i = 0; i < n; i++) order[start[assign[i]]++] = (uint32_t)i;
    for (uint32_t j = k; j > 0; j--) start[j] = start[j - 1];
    start[0] = 0;

    /* 3. entries joining a flagged cluster that is on flash wait in DRAM (adaptive); the
     *    others are written now, all of them, or with a write buffer up to the last whole
     *    page, the rest staying in the cluster's tail (wnow[j]: how many of its tail and
     *    then new entries are written). Room is made first, so that nothing can fail after
     *    the writes. A cluster's records are its flash segments followed by its pending
     *    buffer: once it has pending entries, later ones queue behind them. */
    uint64_t new_room = buffering(c) ? kvt_tail_share(c) : 0;
    for (uint32_t j = 0; j < k && !rc; j++) {
        uint32_t m = start[j + 1] - start[j];
        kvt_cluster *cl = &c->cl[j];
        if (m && token(c)) {
            rc = kvt_ensure_mem(c, cl, cl->n + m); /* token layout: nothing waits, records go to the log */
        } else if (m && cl->flagged && (cl->pend || (policy == KVT_POLICY_ADAPTIVE && !cl->ent))) {
            topend[j] = 1;
            rc = kvt_ensure_pbuf(c, cl, cl->pend + m);
        } else if (m) {
            uint64_t total = (uint64_t)cl->pend + m, w = total;
            if (buffering(c)) { /* whole pages, counting the flash part's last page */
                uint64_t f = kvt_tail_fill(c, cl), pages = (f + total) / L->rpp;
                w = pages * L->rpp > f ? pages * L->rpp - f : 0;
                /* a cluster with a tail keeps it (it is hot); new tails of one add take at
                 * most the share, so a large add writes most clusters directly. Older tails
                 * make room afterwards (kvt_trim_tails), least recently appended first. */
                if (!cl->pend && total - w > new_room) w = total;
                else if (!cl->pend) new_room -= total - w;
            }
            wnow[j] = (uint32_t)w;
            if (w < total) {
                topend[j] = 1;
                rc = kvt_ensure_pbuf(c, cl, (uint32_t)(total - w));
            }
        }
        if (m && cl->ent && kvt_cache_grow(&s->cache, cl->ent, m)) {
            kvt_cache_drop(&s->cache, cl->ent);
            cl->ent = NULL;
        }
    }
    if (rc) goto fail;

    /* 4. write every record bound for flash before touching what readers see */
    for (uint32_t j = 0; j < k && !rc && !token(c); j++) {
        kvt_cluster *cl = &c->cl[j];
        rec_src src = {order + start[j], keys, values, (int64_t)n0, NULL, NULL, cl->pbuf,
                       wnow[j] < cl->pend ? wnow[j] : cl->pend};
        if (wnow[j]) rc = kvt_append_flash(c, j, &src, wnow[j], scratch, sr, &log);
    }
    for (uint64_t at = 0; at < n && !rc && token(c);) { /* the log, in id order */
        uint64_t cnt = n - at < sr ? n - at : sr, off = token_offset(c, n0 + at);
        uint64_t P = s->io.dev.page_size > 0 ? (uint64_t)s->io.dev.page_size : KVT_IO_ALIGN;
        for (uint64_t r = at; r < at + cnt; r++)
            kvt_rec_encode(L, scratch + (size_t)(r - at) * L->esz, (int64_t)(n0 + r),
                           (const uint8_t *)keys + (size_t)r * L->key_bytes, (const uint8_t *)values + (size_t)r * L->value_bytes);
        rc = kvt_file_write(c->f, off, scratch, (size_t)cnt * L->esz);
        if (!rc && off % P && n0 + at > 0) c->ctr.partial_page_writes++;
        at += cnt;
    }
    if (rc) {
        kvt_rollback(c, &log);
        goto fail;
    }
    kvt_kill_point("add.written");

    /* 5. metadata: id map, running means and variances, cached copies, pending buffers */
    c->wclock++;
    for (uint32_t j = 0; j < k; j++) {
        uint32_t m = start[j + 1] - start[j];
        if (!m) continue;
        kvt_cluster *cl = &c->cl[j];
        float *mean = c->cent + (size_t)j * c->p.dim;
        /* the tail entries just written leave the tail; so do the new ones written */
        uint32_t from_tail = wnow[j] < cl->pend ? wnow[j] : cl->pend, written_new = wnow[j] - from_tail;
        if (from_tail) {
            memmove(cl->pbuf, cl->pbuf + (size_t)from_tail * L->esz, (size_t)(cl->pend - from_tail) * L->esz);
            cl->pend -= from_tail;
            c->pending_total -= from_tail;
            c->tail_total -= from_tail;
        }
        cl->wtick = c->wclock;
        for (uint32_t t = 0; t < m; t++) {
            uint32_t r = order[start[j] + t];
            const uint8_t *key = (const uint8_t *)keys + (size_t)r * L->key_bytes;
            const uint8_t *val = (const uint8_t *)values + (size_t)r * L->value_bytes;
            if (cl->mem && token(c)) cl->mem[cl->n] = (uint32_t)(n0 + r);
            set_loc(c, n0 + r, j, cl->n);
            if (!first_batch) c->ctr.naive_move_bytes += (uint64_t)cl->n * L->esz;
            kvt_key_to_f32(K, c->p.dtype, key, x, c->p.dim);
            kvt_welford_add(mean, &cl->m2, c->m2d ? c->m2d + (size_t)j * c->p.dim : NULL, cl->n, x, c->p.dim);
            kvt_vsum_add(c, j, val); /* estimate.c: written and pending entries alike */
            cl->n++;
            if (topend[j] && t >= written_new) {
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
        if (!cl->pend && cl->pbuf) kvt_free_pending(c, cl); /* a tail written out whole: its buffer goes */
        kvt_update_norm(c, j);
    }
    if (policy == KVT_POLICY_NONE) memcpy(c->keys + n0 * L->key_bytes, keys, n * L->key_bytes);
    c->n = n0 + n;
    c->ctr.append_bytes += n * L->esz;
    *first_id = (int64_t)n0;

    /* 6. policy upkeep, which never fails the add: its entries are in place either way */
    kvt_mem_release(&s->cache, transient);
    transient = 0;
    if (policy == KVT_POLICY_ADAPTIVE) {
        kvt_derive_tau(c);
        uint32_t nt = 0;
        for (uint32_t j = 0; j < k; j++)
            if (start[j + 1] > start[j]) {
                kvt_maybe_flag(c, j);
                if (c->cl[j].flagged && c->cl[j].ent) order[nt++] = j; /* order is free now */
            }
        kvt_split_in_dram(c, order, nt);
        kvt_relieve_pending(c);
    } else if (policy == KVT_POLICY_LOCAL && c->staging != KVT_NONE && c->cl[c->staging].n >= c->p.local_window) {
        if (kvt_recluster_staging(c)) c->ctr.split_errors++;
    }
    kvt_trim_tails(c);
    goto out;
fail:
    /* pending buffers step 3 made that nothing went into go back to the budget */
    for (uint32_t j = 0; j < c->ncl; j++)
        if (c->cl[j].pbuf && !c->cl[j].pend) kvt_free_pending(c, &c->cl[j]);
    for (uint32_t j = ncl0; j < c->ncl; j++) kvt_drop_segs(c, j);
    c->ncl = ncl0;
    c->staging = staging0;
out:
    free(assign);
    free(order);
    free(start);
    free(topend);
    free(wnow);
    free(cent);
    free(x);
    free(scratch);
    free(log.u);
    kvt_mem_release(&s->cache, transient);
    return rc;
}

int kvt_coll_add(kvt_coll *c, const void *keys, const void *values, uint64_t n, int64_t *first_id) {
    kvt_clear_error();
    if (!keys || (!values && c->p.value_dim) || n == 0) return kvt_fail(KVT_EINVAL, "add: keys/values must be non-empty");
    int rc;
    RUN_READY(c, add_locked(c, keys, values, n, first_id));
    return rc;
}
