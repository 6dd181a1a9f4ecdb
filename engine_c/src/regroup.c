/*
 * regroup.c — replacing a cluster by groups of its records: the adaptive policy's splits
 * (adapt.c, two groups), the local policy's reclustered windows (local.c, many), and the
 * consolidation of one cluster into one head (format 3).
 *
 * Invariants:
 * 1. What a regroup writes goes to fresh heads before the directory changes; only then are
 *    replaced heads retired (until the next committed checkpoint names them no more, adapt.c
 *    3), so a failed regroup leaves the cluster as it was.
 * 2. Each group of a split has its statistics (mean, m2, value sum) computed exactly from its
 *    records; a consolidated cluster keeps its statistics and policy state, since only its
 *    layout changed. Entries' places in the id map follow the group's order.
 * 3. With write buffers, a group's last partial page stays in DRAM as its tail (layout.c 2),
 *    so that its next appends complete that page instead of programming it a second time.
 * 4. Format 3, two groups of a clustered layout: the group with more records on the parent's
 *    flash or in its tail (those it held before its split was due) keeps the parent's index
 *    and segments (one child in place), provided some of its records are on that flash; the
 *    other group's records there become its dead slots, and only that group is written. A
 *    cluster whose dead slots outnumber its live ones on flash, or that holds more than one
 *    segment, is consolidated when a regroup or a read has its records in DRAM anyway,
 *    within a budget of bytes (KVT_CONSOLIDATE_SHARE of the bytes appended).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "index.h"
#include "layout.h"
#include "regroup.h"
#include "store.h"

/* Consolidation writes at most this share of the bytes appended to the collection (plus one
 * pool's worth, so that the first can happen): the rest of the clusters it would tidy keep
 * their chains and dead slots, read with more requests or bytes. bench.flash's replay of W1 at
 * 2.5K, adaptive: 0.5 costs 2.275 ms of modeled I/O per step and writes 15.8 MiB in splits and
 * consolidations, none (one pool's worth) 2.472 ms and 7.3 MiB; format 2 2.230 ms and 20.7 MiB
 * (docs/design.md §2.2). */
#define KVT_CONSOLIDATE_SHARE 0.5

/* One regroup's staging: the records sorted by group, each group's place and size, and the
 * tails kept in DRAM (invariant 3) until the groups are installed. */
typedef struct groups {
    uint32_t nt;
    uint8_t *sorted, **grp;
    uint32_t *cnt, *dst, *wcnt; /* wcnt: records written to flash (cnt without the tail) */
    struct {
        uint8_t *p;
        uint64_t cap;
        kvt_cside *x;
    } * tails; /* x: its side record, ready */
    float *x;
    /* in place (invariant 4): the group that stays, its records already on flash (the first
     * of its records), and the parent's slots before the regroup */
    uint32_t stay, kept, slots0;
    int in_place;
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
    for (uint32_t i = 0; i < n; i++)
        memcpy(G->grp[part[i]] + (size_t)fill[part[i]]++ * esz, recs + (size_t)i * esz, esz);
    free(fill);
    return 0;
}

/* The id of cluster k's pending record i, or INT64_MAX past them: records of k with smaller
 * ids come before it in k's slots (store.c 2). */
static int64_t pending_id(const kvt_coll *c, const kvt_cluster *k, uint32_t i) {
    int64_t id = INT64_MAX;
    if (i < k->pend) memcpy(&id, kvt_pbuf(k) + (size_t)i * c->L.esz, 8);
    return id;
}

/* Whether record rec (of cluster src) sits in one of src's slots before the one of id lim. */
static int on_flash(const kvt_coll *c, uint32_t src, const uint8_t *rec, int64_t lim) {
    int64_t id;
    memcpy(&id, rec, 8);
    return kvt_loc(c, id) == src && id < lim;
}

/* The records of cluster src on its flash or in its tail, by group of a two-group split:
 * those that were there before the cluster was held for its split. A tail counts as flash
 * because whether a record sits in a tail or was already written depends on the write
 * buffer, which the DRAM budget sizes (adapt.c 2). */
static void early_counts(const kvt_coll *c, uint32_t src, const uint8_t *recs, uint32_t n, const uint32_t *part,
                         uint32_t early[2]) {
    const kvt_cluster *k = &c->cl[src];
    int64_t end = pending_id(c, k, kvt_ptail(k));
    early[0] = early[1] = 0;
    for (uint32_t i = 0; i < n; i++) early[part[i]] += (uint32_t)on_flash(c, src, recs + (size_t)i * c->L.esz, end);
}

void kvt_split_labels(const kvt_coll *c, uint32_t src, const uint8_t *recs, uint32_t n, uint32_t *part) {
    uint32_t early[2];
    early_counts(c, src, recs, n, part, early);
    if (early[1] > early[0])
        for (uint32_t i = 0; i < n; i++) part[i] = 1 - part[i];
}

/* Invariant 4: the group that stays is the one with more records on the parent's flash or
 * in its tail (group 0 on a tie, and after kvt_split_labels group 0 always: the group that
 * keeps the parent's index is then the same whatever the layout, in place or not); every
 * record of it on flash comes first in its group (records come in slot order). */
static void choose_stay(kvt_coll *c, uint32_t src, const uint8_t *recs, uint32_t n, const uint32_t *part, groups *G) {
    kvt_cluster *k = &c->cl[src];
    uint32_t flash[2] = {0, 0}, early[2];
    G->slots0 = k->n - k->pend + k->dead;
    for (uint32_t i = 0; i < n; i++)
        flash[part[i]] += (uint32_t)on_flash(c, src, recs + (size_t)i * c->L.esz, pending_id(c, k, 0));
    early_counts(c, src, recs, n, part, early);
    G->stay = early[1] > early[0];
    G->kept = flash[G->stay];
}

/* The groups' tails, reserved as pending buffers (invariant 3): with write buffers, the group
 * that stays in place keeps as its tail what it had in DRAM, the others their last partial page;
 * without, none (wcnt = cnt). */
static int reserve_tails(kvt_coll *c, groups *G) {
    uint32_t rpp = c->L.rpp;
    if (!(G->tails = calloc(G->nt, sizeof *G->tails)) || !(G->wcnt = calloc(G->nt, 4)))
        return kvt_fail(ENOMEM, "split: out of memory");
    int rc = 0;
    for (uint32_t t = 0; t < G->nt && !rc; t++) {
        uint32_t keep = !buffering(c)                 ? 0
                        : G->in_place && t == G->stay ? G->cnt[t] - G->kept
                        : rpp                         ? G->cnt[t] % rpp
                                                      : 0;
        G->wcnt[t] = G->cnt[t] - keep;
        if (!keep) continue;
        rc = kvt_grow_as(c, KVT_USE_PENDING, (void **)&G->tails[t].p, c->L.esz, &G->tails[t].cap, keep);
        if (!rc) G->tails[t].x = kvt_side_new(c, KVT_USE_PENDING, &rc); /* installing cannot fail */
    }
    return rc;
}

/* What a regroup is: a split or reclustered window (counted as splits), or a consolidation. */
enum { REGROUP_SPLIT, REGROUP_CONSOLIDATE };

/* Group t becomes cluster dst[t]: its statistics (a split's), its tail, its entries' places, and a cached
 * copy when the budget allows (it was just updated: likely read soon; a consolidated cluster
 * keeps the cached copy it had, its records unchanged). The group that stays in place keeps
 * the slots of its records on flash; the rest follow them. */
static void install_group(kvt_coll *c, groups *G, uint32_t t, int why) {
    static const uint32_t fresh[2] = {0, 0};
    const kvt_layout *L = &c->L;
    uint32_t j = G->dst[t], cnt = G->cnt[t], kept = G->in_place && t == G->stay ? G->kept : 0;
    kvt_cluster *kj = &c->cl[j];
    if (why == REGROUP_SPLIT) { /* a consolidation keeps what the cluster was: its statistics as
                                 * the adds left them and its policy state (a flag, a hold), so
                                 * that tidying the layout, which the budget and the write
                                 * buffer decide, never changes which clusters exist (adapt.c 2) */
        kvt_stats_from_records(c, j, G->grp[t], cnt, G->x);
        kvt_policy_cluster_load(c, kj, fresh, 1);
    }
    uint32_t *mem = token(c) ? kvt_members(kj) : NULL; /* a token log's member list (replace made it) */
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
    for (uint32_t i = kept; i < cnt; i++) { /* after the kept ones, in order (store.c 2) */
        int64_t id;
        memcpy(&id, G->grp[t] + (size_t)i * L->esz, 8);
        if (kvt_loc(c, id) != j) set_loc(c, (uint64_t)id, j);
        if (mem) mem[i] = (uint32_t)id;
    }
    kvt_cache_ent *e = why == REGROUP_SPLIT ? kvt_cache_admit(&c->st->cache, c, j, cnt, L->esz) : NULL;
    if (e) {
        memcpy(e->rec, G->grp[t], (size_t)cnt * L->esz);
        e->n = cnt;
        e->pins--;
        kvt_cache_updated(&c->st->cache, e);
    }
}

/* Writes the groups: all of them to fresh heads (src's old segments detached, retired after),
 * or, in place, the groups that move, with what the staying group had in DRAM appended to its
 * segments when no write buffer keeps it. Returns the bytes written through *written. */
static int write_groups(kvt_coll *c, uint32_t src, groups *G, seg_save *old, uint64_t *written) {
    uint32_t nt = G->nt;
    int rc = 0;
    *written = 0;
    if (token(c)) { /* the records stay where they are in the log: only member lists change */
        *old = kvt_detach_segs(c, src);
        for (uint32_t t = 0; t < nt && !rc; t++)
            if (G->dst[t] != src) rc = kvt_ensure_mem(c, &c->cl[G->dst[t]], G->cnt[t]);
        return rc;
    }
    const uint32_t *counts = G->tails ? G->wcnt : G->cnt;
    if (!G->in_place) {
        *old = kvt_detach_segs(c, src);
        rc = kvt_write_fresh(c, G->dst, G->grp, counts, nt);
        for (uint32_t t = 0; t < nt && !rc; t++) *written += counts[t];
        return rc;
    }
    *old = (seg_save){NULL, 0, 0};
    uint32_t move = 1 - G->stay, more = counts[G->stay] - G->kept;
    undo_log log = {0};
    if (more) { /* no tail keeps them: what the staying group had in DRAM follows its slots */
        rec_src s = {.mrecs = G->grp[G->stay] + (size_t)G->kept * c->L.esz};
        rc = kvt_append_flash(c, src, &s, more, NULL, 0, &log);
    }
    if (!rc) rc = kvt_write_fresh(c, &G->dst[move], &G->grp[move], &counts[move], 1);
    if (rc)
        kvt_rollback(c, &log);
    else
        *written = more + counts[move];
    free(log.u);
    return rc;
}

/* The groups written (invariant 1), then installed in place of cluster src. */
static int replace(kvt_coll *c, uint32_t src, groups *G, uint32_t ncl0, int why) {
    uint32_t nt = G->nt;
    seg_save old;
    uint64_t written;
    int rc = write_groups(c, src, G, &old, &written);
    if (!rc) kvt_kill_point("split.written");
    if (rc) {
        if (!G->in_place) kvt_restore_segs(c, src, old);
        c->ncl = ncl0;
        return rc;
    }
    kvt_cluster *k = &c->cl[src];
    if (G->in_place) { /* of the parent's slots, only the kept records are the child's */
        k->dead = G->slots0 - G->kept;
    } else {
        kvt_retire_segs(c, old);
        k->dead = 0;
    }
    kvt_free_pending(c, k);
    kvt_cache_ent *e = why == REGROUP_SPLIT ? kvt_cached(c, src) : NULL;
    if (e) kvt_cache_drop(&c->st->cache, e);
    for (uint32_t t = 0; t < nt; t++) install_group(c, G, t, why);
    c->modc++; /* the directory changed: kvt_coll_changed reports it */
    if (token(c)) written = 0;
    if (why == REGROUP_SPLIT) {
        c->ctr.splits++;
        c->ctr.split_write_bytes += written * c->L.esz;
    } else {
        c->ctr.consolidations++;
        c->ctr.consolidate_bytes += written * c->L.esz;
    }
    return 0;
}

static void groups_free(kvt_coll *c, groups *G) {
    for (uint32_t t = 0; G->tails && t < G->nt; t++) {
        if (G->tails[t].p) kvt_free_as(c, KVT_USE_PENDING, G->tails[t].p, G->tails[t].cap, c->L.esz);
        if (G->tails[t].x) kvt_side_discard(c, G->tails[t].x);
    }
    free(G->tails);
    free(G->wcnt);
    free(G->sorted);
    free(G->grp);
    free(G->cnt);
    free(G->dst);
    free(G->x);
}

/* A regroup of cluster src into nt groups (nt == 1 with why == REGROUP_CONSOLIDATE: the
 * cluster rewritten whole into one head). Its staging *G (charged to the ledger as *held)
 * stays allocated, the groups' records in DRAM for a consolidation after it: regroup_end
 * frees it, whatever the outcome. */
static int regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt, int why,
                   groups *G, uint64_t *held) {
    uint32_t n = c->cl[src].n, ncl0 = c->ncl;
    uint64_t bytes = (uint64_t)n * c->L.esz, extra = (uint64_t)nt * (sizeof(uint8_t *) + 12) + (uint64_t)c->p.dim * 8;
    *G = (groups){0};
    *held = 0;
    int rc = kvt_mem_reserve(&c->st->mem, bytes + extra);
    if (rc) return rc;
    *held = bytes + extra;
    *G = (groups){nt,
                  malloc(bytes + 8),
                  calloc(nt, sizeof(uint8_t *)),
                  calloc(nt, 4),
                  calloc(nt, 4),
                  NULL,
                  NULL,
                  malloc((size_t)c->p.dim * 8),
                  0,
                  0,
                  0,
                  0}; /* x: a key and a mean in float32 (kvt_stats_from_records) */
    if (!G->sorted || !G->grp || !G->cnt || !G->dst || !G->x) rc = kvt_fail(ENOMEM, "split: out of memory");
    G->in_place = why == REGROUP_SPLIT && nt == 2 && c->pools.sized && !token(c) && c->cl[src].nseg;
    if (!rc && G->in_place) choose_stay(c, src, recs, n, part, G);
    /* a group that stays with none of its records on the parent's flash would keep only dead
     * slots: both groups are written fresh instead (group 0 keeps the index) */
    if (G->in_place && !G->kept) {
        G->in_place = 0;
        G->stay = 0;
    }
    if (!rc) rc = sort_groups(c, recs, n, part, G);
    if (!rc) G->dst[G->stay] = src;
    for (uint32_t t = 0; t < nt && !rc; t++)
        if (t != G->stay) rc = kvt_new_cluster(c, &G->dst[t]);
    if (!rc && (buffering(c) || G->in_place)) rc = reserve_tails(c, G);
    if (!rc)
        rc = replace(c, src, G, ncl0, why);
    else
        c->ncl = ncl0; /* the slots it took are free again */
    return rc;
}

static void regroup_end(kvt_coll *c, groups *G, uint64_t held) {
    groups_free(c, G);
    kvt_mem_release(&c->st->mem, held);
}

int kvt_regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt, uint32_t *first_new,
                uint32_t *kept_by) {
    groups G;
    uint64_t held;
    uint32_t ncl0 = c->ncl;
    int rc = regroup(c, src, recs, part, nt, REGROUP_SPLIT, &G, &held);
    /* The group that kept the parent's place, consolidated while its records are in DRAM. One
     * level deep: a consolidation is a regroup of one group, never in place, so it is never
     * followed by another. */
    if (!rc && G.in_place && kvt_wants_consolidation(c, src) && kvt_consolidate(c, src, G.grp[G.stay]))
        kvt_clear_error(); /* it keeps its dead slots: read as they are, tidied another time */
    if (!rc && first_new) *first_new = ncl0;
    if (!rc && kept_by) *kept_by = G.stay;
    regroup_end(c, &G, held);
    return rc;
}

int kvt_wants_consolidation(const kvt_coll *c, uint32_t j) {
    const kvt_cluster *k = &c->cl[j];
    if (!c->pools.sized || token(c) || !k->n || k->n == k->pend) return 0;
    if (k->nseg <= 1 && k->dead <= k->n - k->pend) return 0;
    uint64_t allowance = (uint64_t)(KVT_CONSOLIDATE_SHARE * (double)c->ctr.append_bytes) + c->L.pool_bytes;
    return c->ctr.consolidate_bytes + (uint64_t)k->n * c->L.esz <= allowance;
}

int kvt_consolidate(kvt_coll *c, uint32_t j, const uint8_t *recs) {
    uint32_t zero = 0, *part = c->cl[j].n > 1 ? calloc(c->cl[j].n, 4) : &zero;
    if (!part) return kvt_fail(ENOMEM, "consolidate: out of memory");
    groups G;
    uint64_t held;
    int rc = regroup(c, j, recs, part, 1, REGROUP_CONSOLIDATE, &G, &held);
    regroup_end(c, &G, held);
    if (part != &zero) free(part);
    return rc;
}
