/*
 * adapt.c — migration-free cluster adaptation (docs/design.md §2.1): the adaptive policy's
 * split threshold, flagging, and the split itself (2-means over records already in DRAM).
 *
 * Invariants:
 * 1. A split never reads flash: it runs on a cluster already in DRAM (cached, or read by the
 *    current retrieve). The one exception is the pending budget's overflow
 *    (relieve_pending), counted as forced loads.
 * 2. A split writes the new clusters to fresh heads (copy on write) and only then switches
 *    the directory; the old heads are retired until the next committed checkpoint, because
 *    the committed catalog still names them.
 * 3. Entries that join a flagged cluster wait in its pending buffer and stay retrievable.
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

/* ---- the clustering policies ------------------------------------------------------------- */

static int wants_split(const kvt_coll *c, const kvt_cluster *k) {
    if (c->p.policy != KVT_POLICY_ADAPTIVE || k->n < 2 || k->n < k->hold + k->hold / 2) return 0;
    return k->n > c->p.max_cluster_size || (c->tau > 0 && kvt_variance(k) > c->tau);
}

void kvt_maybe_flag(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    if (!k->flagged && wants_split(c, k)) {
        c->tail_total -= k->pend; /* its tail, if any, now waits for the split */
        k->flagged = 1;
        if (!k->ent) c->ctr.deferred_splits++;
    }
}

/* tau from the partition in force: tau_factor x the median variance of clusters of 2+. */
void kvt_derive_tau(kvt_coll *c) {
    if (c->p.policy != KVT_POLICY_ADAPTIVE || c->tau > 0) return;
    double *v = malloc((size_t)c->ncl * sizeof *v + 8);
    uint32_t m = 0;
    if (!v) return; /* retried after the next add */
    for (uint32_t j = 0; j < c->ncl; j++)
        if (c->cl[j].n >= 2) v[m++] = kvt_variance(&c->cl[j]);
    if (m) {
        /* insertion sort is fine: this runs once per collection, on the first partition */
        for (uint32_t i = 1; i < m; i++)
            for (uint32_t t = i; t > 0 && v[t - 1] > v[t]; t--) {
                double x = v[t];
                v[t] = v[t - 1];
                v[t - 1] = x;
            }
        double med = m % 2 ? v[m / 2] : 0.5 * (v[m / 2 - 1] + v[m / 2]);
        if (med > 0) c->tau = c->p.tau_factor * med;
    }
    free(v);
}

/* Replaces cluster `src` (whose records, in order, are `recs`) by nt clusters: group t gets
 * the records with part[i] == t. Group 0 keeps the index src; the others take new slots.
 * Copy on write: the groups go to fresh heads, then src's old heads are retired. The new
 * clusters are cached when the budget allows (they were just updated: likely read soon).
 * *first_new receives the first new slot. */
int kvt_regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt,
                   uint32_t *first_new) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    uint32_t n = c->cl[src].n, ncl0 = c->ncl;
    uint64_t bytes = (uint64_t)n * L->esz, extra = (uint64_t)nt * (sizeof(uint8_t *) + 12) + (uint64_t)c->p.dim * 4;
    int rc = kvt_mem_reserve(&s->cache, bytes + extra);
    if (rc) return rc;
    uint8_t *sorted = malloc(bytes + 8), **grp = calloc(nt, sizeof *grp);
    uint32_t *cnt = calloc(nt, 4), *dst = calloc(nt, 4), *wcnt = NULL;
    struct { uint8_t *p; uint64_t cap; } *tails = NULL; /* the groups' tails, until installed */
    float *x = malloc((size_t)c->p.dim * 4);
    if (!sorted || !grp || !cnt || !dst || !x) rc = kvt_fail(ENOMEM, "split: out of memory");
    /* group the records, keeping their order inside each group */
    if (!rc) {
        for (uint32_t i = 0; i < n; i++) cnt[part[i]]++;
        size_t off = 0;
        for (uint32_t t = 0; t < nt; t++) {
            grp[t] = sorted + off * L->esz;
            off += cnt[t];
        }
        uint32_t *fill = calloc(nt, 4);
        if (!fill) rc = kvt_fail(ENOMEM, "split: out of memory");
        for (uint32_t i = 0; !rc && i < n; i++) {
            uint32_t t = part[i];
            memcpy(grp[t] + (size_t)fill[t]++ * L->esz, recs + (size_t)i * L->esz, L->esz);
        }
        free(fill);
    }
    dst[0] = src;
    for (uint32_t t = 1; t < nt && !rc; t++) rc = kvt_new_cluster(c, &dst[t]);
    /* with write buffers, a group's last partial page stays in DRAM as its tail, so that the
     * group's next appends complete that page instead of programming it a second time */
    if (!rc && buffering(c) && (!(tails = calloc(nt, sizeof *tails)) || !(wcnt = calloc(nt, 4))))
        rc = kvt_fail(ENOMEM, "split: out of memory");
    for (uint32_t t = 0; tails && t < nt && !rc; t++) {
        wcnt[t] = cnt[t];
        if (!(cnt[t] % L->rpp)) continue;
        wcnt[t] = cnt[t] - cnt[t] % L->rpp;
        rc = kvt_grow_as(c, KVT_USE_PENDING, (void **)&tails[t].p, L->esz, &tails[t].cap, cnt[t] - wcnt[t]);
    }
    seg_save old = kvt_detach_segs(c, src);
    if (token(c)) /* the records stay where they are in the log: only member lists change */
        for (uint32_t t = 1; t < nt && !rc; t++) rc = kvt_ensure_mem(c, &c->cl[dst[t]], cnt[t]);
    else if (!rc)
        rc = kvt_write_fresh(c, dst, grp, tails ? wcnt : cnt, nt);
    if (!rc) kvt_kill_point("split.written");
    if (rc) {
        kvt_restore_segs(c, src, old);
        c->ncl = ncl0;
        goto out;
    }
    kvt_retire_segs(c, old);
    kvt_cluster *k = &c->cl[src];
    kvt_free_pending(c, k);
    if (k->ent) {
        kvt_cache_drop(&s->cache, k->ent);
        k->ent = NULL;
    }
    for (uint32_t t = 0; t < nt; t++) {
        uint32_t j = dst[t];
        kvt_cluster *kj = &c->cl[j];
        kvt_stats_from_records(c, j, grp[t], cnt[t], x);
        kj->flagged = kj->hold = 0;
        if (tails && tails[t].p) {
            kj->pend = cnt[t] - wcnt[t];
            memcpy(tails[t].p, grp[t] + (size_t)wcnt[t] * L->esz, (size_t)kj->pend * L->esz);
            kj->pbuf = tails[t].p;
            kj->pcap = (uint32_t)tails[t].cap;
            tails[t].p = NULL; /* the cluster's now */
            kj->wtick = c->wclock;
            c->pending_total += kj->pend;
            c->tail_total += kj->pend;
        }
        for (uint32_t i = 0; i < cnt[t]; i++) {
            int64_t id;
            memcpy(&id, grp[t] + (size_t)i * L->esz, 8);
            set_loc(c, (uint64_t)id, j, i);
            if (token(c)) kj->mem[i] = (uint32_t)id;
        }
        kvt_cache_ent *e = kvt_cache_admit(&s->cache, c, j, cnt[t], L->esz);
        if (e) {
            memcpy(e->rec, grp[t], (size_t)cnt[t] * L->esz);
            e->n = cnt[t];
            e->pins--;
            kvt_cache_updated(&s->cache, e);
            kj->ent = e;
        }
    }
    c->ctr.splits++;
    for (uint32_t t = 0; t < nt && !token(c); t++) c->ctr.split_write_bytes += (uint64_t)(tails ? wcnt[t] : cnt[t]) * L->esz;
    *first_new = ncl0;
out:
    for (uint32_t t = 0; tails && t < nt; t++)
        if (tails[t].p) kvt_free_as(c, KVT_USE_PENDING, tails[t].p, tails[t].cap, L->esz);
    free(tails);
    free(wcnt);
    free(sorted);
    free(grp);
    free(cnt);
    free(dst);
    free(x);
    kvt_mem_release(&s->cache, bytes + extra);
    return rc;
}

/* Splits cluster j in two by 2-means over its records. Returns 1 if it split, 0 if the
 * records form no two groups (the cluster then waits to grow by half), or an error. */
static int split_cluster(kvt_coll *c, uint32_t j, const uint8_t *recs) {
    kvt_cluster *k = &c->cl[j];
    uint32_t n = k->n;
    /* A split adds a representative and moves data through DRAM; under a budget nearly
     * filled by what cannot be evicted it would starve reads, so it waits (counted). */
    kvt_cache *ch = &c->st->cache;
    uint64_t pinned_bytes = ch->used - ch->cache_bytes;
    uint64_t need = 2ull * n * c->L.esz + (uint64_t)c->p.dim * 16 + sizeof(kvt_cluster) + 256;
    if (pinned_bytes + need > ch->budget - ch->budget / 4) {
        c->ctr.split_skipped++;
        return 0;
    }
    uint64_t tmp = (uint64_t)n * 4 + 2ull * c->p.dim * 4 + kvt_kmeans_bytes(n, 2, c->p.dim);
    int rc = kvt_mem_reserve(&c->st->cache, tmp);
    if (rc) return rc;
    uint32_t *part = malloc((size_t)n * 4);
    float *cent = malloc(2ull * c->p.dim * 4);
    if (!part || !cent) rc = kvt_fail(ENOMEM, "split: out of memory");
    if (!rc)
        rc = kvt_kmeans(c->st->K, c->p.dtype, recs + KVT_REC_HEADER, c->p.dim, c->L.esz, NULL, n, 2,
                        c->p.kmeans_iters, c->p.seed + j, cent, part);
    int split = 0;
    if (!rc) {
        uint32_t ones = 0;
        for (uint32_t i = 0; i < n; i++) ones += part[i];
        if (ones == 0 || ones == n) {
            if (k->flagged) c->tail_total += k->pend; /* what waited is a tail again */
            k->flagged = 0;
            k->hold = n;
            c->ctr.unsplittable++;
        } else {
            uint32_t first_new;
            rc = kvt_regroup(c, j, recs, part, 2, &first_new);
            split = !rc;
        }
    }
    free(part);
    free(cent);
    kvt_mem_release(&c->st->cache, tmp);
    return rc ? rc : split;
}

/* Splits flagged clusters that are in DRAM, starting from `list`, and their children while
 * they still want it. Split failures leave the cluster flagged (counted), never the caller's
 * operation failed: the entries are safe either way. */
void kvt_split_in_dram(kvt_coll *c, const uint32_t *list, uint32_t nlist) {
    uint32_t stack[64], top = 0;
    for (uint32_t i = 0; i < nlist; i++) {
        uint32_t j = list[i];
        if (j < c->ncl && c->cl[j].flagged && c->cl[j].ent && top < 62) stack[top++] = j;
        while (top) {
            uint32_t s = stack[--top];
            kvt_cluster *k = &c->cl[s];
            if (!k->flagged || !k->ent) continue;
            uint32_t before = c->ncl;
            kvt_cache_ent *pinned = k->ent;
            pinned->pins++;
            int rc = split_cluster(c, s, pinned->rec);
            kvt_release_records(c, NULL, 0, pinned, rc == 1);
            if (rc < 0 || rc > 1) {
                c->ctr.split_errors++;
                continue;
            }
            if (rc == 1) {
                kvt_maybe_flag(c, s);
                if (c->ncl > before) kvt_maybe_flag(c, before);
                if (c->cl[s].flagged && top < 62) stack[top++] = s;
                if (c->ncl > before && c->cl[before].flagged && top < 62) stack[top++] = before;
            }
        }
    }
}

/* Pending budget overflow: load and split the cluster with the most pending entries until
 * the budget holds. A cluster that cannot split has its pending entries written instead. */
void kvt_relieve_pending(kvt_coll *c) {
    /* every round removes one cluster's pending entries or stops */
    while (c->pending_total - c->tail_total > c->p.pending_budget) {
        uint32_t best = KVT_NONE, most = 0;
        for (uint32_t j = 0; j < c->ncl; j++)
            if (c->cl[j].flagged && c->cl[j].pend > most) {
                most = c->cl[j].pend;
                best = j;
            }
        if (best == KVT_NONE) break;
        uint8_t *recs;
        uint64_t owned;
        kvt_cache_ent *pinned;
        c->ctr.forced_loads++;
        int rc = kvt_load_records(c, best, &recs, &owned, &pinned, &c->ctr.split_read_bytes);
        if (!rc) {
            rc = split_cluster(c, best, recs);
            kvt_release_records(c, recs, owned, pinned, rc == 1);
        }
        if (rc == 1) {
            uint32_t two[2] = {best, c->ncl - 1};
            kvt_maybe_flag(c, two[0]);
            kvt_maybe_flag(c, two[1]);
            kvt_split_in_dram(c, two, 2);
            continue;
        }
        if (rc < 0 || rc > 1) c->ctr.split_errors++;
        /* not split: write its pending entries so the budget holds */
        if (kvt_write_pending(c, best)) break; /* could not write: stop rather than loop */
    }
}
