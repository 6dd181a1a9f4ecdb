/*
 * regroup.c — replacing a cluster by groups of its records, copy on write: the adaptive
 * policy's splits (adapt.c, two groups) and the local policy's reclustered windows (local.c,
 * many).
 *
 * Invariants:
 * 1. The groups are written to fresh heads before the directory changes; only then are the
 *    old heads retired (until the next committed checkpoint names them no more, adapt.c 3),
 *    so a failed regroup leaves the cluster as it was.
 * 2. Each group's statistics (mean, m2, value sum) are computed exactly from its records;
 *    its entries' places in the id map follow the group's order.
 * 3. With write buffers, a group's last partial page stays in DRAM as its tail (layout.c 2),
 *    so that its next appends complete that page instead of programming it a second time.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "index.h"
#include "layout.h"
#include "regroup.h"
#include "store.h"

/* One regroup's staging: the records sorted by group, each group's place and size, and the
 * tails kept in DRAM (invariant 3) until the groups are installed. */
typedef struct groups {
    uint32_t nt;
    uint8_t *sorted, **grp;
    uint32_t *cnt, *dst, *wcnt; /* wcnt: records written to flash (cnt without the tail) */
    struct { uint8_t *p; uint64_t cap; kvt_cside *x; } *tails; /* x: its side record, ready */
    float *x;
} groups;

/* The records sorted by group, keeping their order inside each group. */
static int sort_groups(kvt_coll *c, const uint8_t *recs, uint32_t n, const uint32_t *part, groups *G) {
    size_t esz = c->L.esz, off = 0;
    uint32_t nt = G->nt;
    for (uint32_t i = 0; i < n; i++) G->cnt[part[i]]++;
    for (uint32_t t = 0; t < nt; t++) {
        G->grp[t] = G->sorted + off * esz;
        off += G->cnt[t];
    }
    uint32_t *fill = calloc(nt, 4);
    if (!fill) return kvt_fail(ENOMEM, "split: out of memory");
    for (uint32_t i = 0; i < n; i++) memcpy(G->grp[part[i]] + (size_t)fill[part[i]]++ * esz, recs + (size_t)i * esz, esz);
    free(fill);
    return 0;
}

/* The groups' tails, reserved as pending buffers (invariant 3). */
static int reserve_tails(kvt_coll *c, groups *G) {
    uint32_t rpp = c->L.rpp;
    if (!(G->tails = calloc(G->nt, sizeof *G->tails)) || !(G->wcnt = calloc(G->nt, 4)))
        return kvt_fail(ENOMEM, "split: out of memory");
    int rc = 0;
    for (uint32_t t = 0; t < G->nt && !rc; t++) {
        G->wcnt[t] = G->cnt[t];
        if (!(G->cnt[t] % rpp)) continue;
        G->wcnt[t] = G->cnt[t] - G->cnt[t] % rpp;
        rc = kvt_grow_as(c, KVT_USE_PENDING, (void **)&G->tails[t].p, c->L.esz, &G->tails[t].cap,
                         G->cnt[t] - G->wcnt[t]);
        if (!rc) G->tails[t].x = kvt_side_new(c, KVT_USE_PENDING, &rc); /* installing cannot fail */
    }
    return rc;
}

/* Group t becomes cluster dst[t]: its statistics, its tail, its entries' places, and a cached
 * copy when the budget allows (it was just updated: likely read soon). */
static void install_group(kvt_coll *c, groups *G, uint32_t t) {
    static const uint32_t fresh[2] = {0, 0};
    const kvt_layout *L = &c->L;
    uint32_t j = G->dst[t], cnt = G->cnt[t];
    kvt_cluster *kj = &c->cl[j];
    kvt_stats_from_records(c, j, G->grp[t], cnt, G->x);
    kvt_policy_cluster_load(c, kj, fresh, 1);
    if (kj->x) kj->x->ptail = 0;
    if (G->tails && G->tails[t].p) {
        kj->pend = cnt - G->wcnt[t];
        memcpy(G->tails[t].p, G->grp[t] + (size_t)G->wcnt[t] * L->esz, (size_t)kj->pend * L->esz);
        kvt_side_attach(c, kj, G->tails[t].x, G->tails[t].p, (uint32_t)G->tails[t].cap);
        G->tails[t].p = NULL; /* the cluster's now */
        G->tails[t].x = NULL;
        c->pending_total += kj->pend;
        c->tail_total += kj->pend;
    }
    for (uint32_t i = 0; i < cnt; i++) {
        int64_t id;
        memcpy(&id, G->grp[t] + (size_t)i * L->esz, 8);
        set_loc(c, (uint64_t)id, j, i);
        if (token(c)) kj->x->mem[i] = (uint32_t)id;
    }
    kvt_cache_ent *e = kvt_cache_admit(&c->st->cache, c, j, cnt, L->esz);
    if (e) {
        memcpy(e->rec, G->grp[t], (size_t)cnt * L->esz);
        e->n = cnt;
        e->pins--;
        kvt_cache_updated(&c->st->cache, e);
    }
}

/* The groups written (invariant 1), then installed in place of cluster src. */
static int replace(kvt_coll *c, uint32_t src, groups *G, uint32_t ncl0) {
    uint32_t nt = G->nt;
    int rc = 0;
    seg_save old = kvt_detach_segs(c, src);
    if (token(c)) /* the records stay where they are in the log: only member lists change */
        for (uint32_t t = 1; t < nt && !rc; t++) rc = kvt_ensure_mem(c, &c->cl[G->dst[t]], G->cnt[t]);
    else
        rc = kvt_write_fresh(c, G->dst, G->grp, G->tails ? G->wcnt : G->cnt, nt);
    if (!rc) kvt_kill_point("split.written");
    if (rc) {
        kvt_restore_segs(c, src, old);
        c->ncl = ncl0;
        return rc;
    }
    kvt_retire_segs(c, old);
    kvt_cluster *k = &c->cl[src];
    kvt_free_pending(c, k);
    kvt_cache_ent *e = kvt_cached(c, src);
    if (e) kvt_cache_drop(&c->st->cache, e);
    for (uint32_t t = 0; t < nt; t++) install_group(c, G, t);
    c->ctr.splits++;
    for (uint32_t t = 0; t < nt && !token(c); t++)
        c->ctr.split_write_bytes += (uint64_t)(G->tails ? G->wcnt[t] : G->cnt[t]) * c->L.esz;
    return 0;
}

int kvt_regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt,
                uint32_t *first_new) {
    kvt_mem *m = &c->st->mem;
    uint32_t n = c->cl[src].n, ncl0 = c->ncl;
    uint64_t bytes = (uint64_t)n * c->L.esz, extra = (uint64_t)nt * (sizeof(uint8_t *) + 12) + (uint64_t)c->p.dim * 8;
    int rc = kvt_mem_reserve(m, bytes + extra);
    if (rc) return rc;
    groups G = {nt, malloc(bytes + 8), calloc(nt, sizeof(uint8_t *)), calloc(nt, 4), calloc(nt, 4), NULL, NULL,
                malloc((size_t)c->p.dim * 8)}; /* a key and a mean in float32 (kvt_stats_from_records) */
    if (!G.sorted || !G.grp || !G.cnt || !G.dst || !G.x) rc = kvt_fail(ENOMEM, "split: out of memory");
    if (!rc) rc = sort_groups(c, recs, n, part, &G);
    G.dst[0] = src;
    for (uint32_t t = 1; t < nt && !rc; t++) rc = kvt_new_cluster(c, &G.dst[t]);
    if (!rc && buffering(c)) rc = reserve_tails(c, &G);
    if (!rc) rc = replace(c, src, &G, ncl0);
    else c->ncl = ncl0; /* the slots it took are free again */
    if (!rc) *first_new = ncl0;
    for (uint32_t t = 0; G.tails && t < nt; t++) {
        if (G.tails[t].p) kvt_free_as(c, KVT_USE_PENDING, G.tails[t].p, G.tails[t].cap, c->L.esz);
        if (G.tails[t].x) kvt_side_discard(c, G.tails[t].x);
    }
    free(G.tails);
    free(G.wcnt);
    free(G.sorted);
    free(G.grp);
    free(G.cnt);
    free(G.dst);
    free(G.x);
    kvt_mem_release(m, bytes + extra);
    return rc;
}
