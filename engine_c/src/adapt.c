/*
 * adapt.c — migration-free cluster adaptation (docs/design.md §2.1): the adaptive policy's
 * split rule, flagging, and the split itself (2-means over records already in DRAM).
 *
 * The split rule. Each cluster keeps its size n and its sum of squared distances to its mean
 * m2 (Welford, add.c), so the rule costs nothing per append. A cluster is flagged when
 *     m2 > tau x init_cluster_size        (the variance rule: squared error against a target)
 * that is, when it holds more squared error than a cluster of the first partition's target
 * size whose keys lie at variance tau from their mean; or, as a safety net only, when
 * n > max_cluster_size (the size cap). A tight cluster grows past the target size before it
 * splits, a loose one splits smaller: the sizes follow the keys rather than a constant.
 * Calibration: tau is derived once per collection from its first partition (k-means at
 * init_cluster_size entries per cluster) as tau_factor x that partition's pooled variance,
 * sum of m2 over sum of n, the variance k-means reached on these keys (default factor 1: no
 * cluster may hold more squared error than the first partition's clusters held on average).
 * Decoding keys drift from the prompt's, so the clusters they join gain squared error faster
 * than entries, and the rule fires before the cap. The rule it replaces, variance m2 / n above
 * 3 x the first partition's median variance, never fired on real keys: a cluster's mean
 * squared distance rises only slowly as it grows, so every split came from the size cap.
 * tau persists with the collection; a tau the caller sets is used as given.
 *
 * When. A flagged cluster splits when a retrieve reads it, from the records that retrieve
 * read (retrieve.c hands them over: its result rows, in the cluster's order), and its
 * children split again from the same buffer while they want it; or when the pending budget
 * overflows (relieve_pending). Not on append because it happens to be cached: that would let
 * the DRAM budget decide which clusters exist.
 *
 * Invariants:
 * 1. A split never reads flash: it runs on the records a retrieve has just read (whatever the
 *    cache keeps of them) or on a cached copy. The one exception is the pending budget's
 *    overflow (relieve_pending), counted as forced loads.
 * 2. Which clusters exist does not depend on the DRAM budget: clusters are split when a
 *    retrieve reads them or the pending budget overflows, never because they happen to be
 *    cached, and a split holds only its own records in DRAM (reserved for the split, released
 *    after), never a cache slot.
 * 3. A split writes the new clusters to fresh heads (copy on write) and only then switches
 *    the directory; the old heads are retired until the next committed checkpoint, because
 *    the committed catalog still names them.
 * 4. Entries that join a flagged cluster wait in its pending buffer, while the pending budget
 *    has room or behind entries already waiting (add.c), and stay retrievable.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "adapt.h"
#include "cluster.h"
#include "common.h"
#include "index.h"
#include "layout.h"
#include "read.h"
#include "store.h"

/* ---- the split rule ----------------------------------------------------------------------- */

enum { FLAG_NONE, FLAG_VARIANCE, FLAG_SIZE }; /* kvt_cluster.flagged: why it wants a split */

static int over_sse(const kvt_coll *c, const kvt_cluster *k) {
    return c->tau > 0 && k->m2 > c->tau * (double)c->p.init_cluster_size;
}

static int wants_split(const kvt_coll *c, const kvt_cluster *k) {
    if (c->p.policy != KVT_POLICY_ADAPTIVE || k->n < 2 || k->n < k->hold + k->hold / 2) return FLAG_NONE;
    if (over_sse(c, k)) return FLAG_VARIANCE;
    return k->n > c->p.max_cluster_size ? FLAG_SIZE : FLAG_NONE;
}

void kvt_maybe_flag(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    int why = k->flagged ? FLAG_NONE : wants_split(c, k);
    if (why) {
        k->ptail = k->pend; /* its tail, if any, now waits for the split (layout.c 2) */
        k->flagged = (uint32_t)why;
        if (!k->ent) c->ctr.deferred_splits++;
    }
}

/* tau from the first partition: tau_factor x its pooled variance (sum m2 / sum n). */
void kvt_derive_tau(kvt_coll *c) {
    if (c->p.policy != KVT_POLICY_ADAPTIVE || c->tau > 0) return;
    double m2 = 0;
    uint64_t n = 0;
    for (uint32_t j = 0; j < c->ncl; j++) {
        m2 += c->cl[j].m2;
        n += c->cl[j].n;
    }
    if (n && m2 > 0) c->tau = c->p.tau_factor * m2 / (double)n;
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
    int rc = kvt_mem_reserve(&s->mem, bytes + extra);
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
        kj->flagged = kj->hold = kj->ptail = 0;
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
    kvt_mem_release(&s->mem, bytes + extra);
    return rc;
}

/* Splits cluster j, whose records in order are `recs` (a buffer the caller owns; the split
 * orders it by child), in two by 2-means. Returns 1 if it split (*cnt0: the records of the
 * child that keeps index j, first in recs; the other child is the last cluster), 0 if the
 * records form no two groups (the cluster then waits to grow by half), or an error. */
static int split_cluster(kvt_coll *c, uint32_t j, uint8_t *recs, int forced, uint32_t *cnt0) {
    kvt_cluster *k = &c->cl[j];
    uint32_t n = k->n;
    size_t esz = c->L.esz;
    uint64_t tmp = (uint64_t)n * 4 + 2ull * c->p.dim * 4 + kvt_kmeans_bytes(n, 2, c->p.dim), perm_bytes = (uint64_t)n * esz;
    int rc = kvt_mem_reserve(&c->st->mem, tmp + perm_bytes);
    if (rc) return rc;
    uint32_t *part = malloc((size_t)n * 4);
    float *cent = malloc(2ull * c->p.dim * 4);
    uint8_t *perm = malloc(perm_bytes + 1);
    if (!part || !cent || !perm) rc = kvt_fail(ENOMEM, "split: out of memory");
    if (!rc)
        rc = kvt_kmeans(c->st->K, c->p.dtype, recs + KVT_REC_HEADER, c->p.dim, esz, NULL, n, 2,
                        c->p.kmeans_iters, c->p.seed + j, cent, part);
    int split = 0;
    uint32_t ones = 0;
    for (uint32_t i = 0; !rc && i < n; i++) ones += part[i];
    if (!rc && (ones == 0 || ones == n)) {
        if (k->flagged) c->tail_total += k->pend - k->ptail; /* what waited is a tail again */
        k->flagged = FLAG_NONE;
        k->ptail = 0;
        k->hold = n;
        c->ctr.unsplittable++;
    } else if (!rc) {
        /* the records by child, each in its order: the buffer then holds both children */
        uint32_t a = 0, b = n - ones;
        for (uint32_t i = 0; i < n; i++) memcpy(perm + (size_t)(part[i] ? b++ : a++) * esz, recs + (size_t)i * esz, esz);
        memcpy(recs, perm, perm_bytes);
        for (uint32_t i = 0; i < n; i++) part[i] = i >= n - ones;
        free(perm);
        perm = NULL;
        kvt_mem_release(&c->st->mem, perm_bytes);
        perm_bytes = 0;
        /* the trigger; a flag read back from a checkpoint lost its reason (stored as 0/1): the
         * rule tells it again, since m2 and n only grow while a cluster is flagged */
        int variance = !forced && k->flagged != FLAG_SIZE && over_sse(c, k), size = !forced && !variance;
        uint32_t first_new;
        rc = kvt_regroup(c, j, recs, part, 2, &first_new);
        if (!rc) {
            c->ctr.splits_pending += (uint64_t)forced;
            c->ctr.splits_variance += (uint64_t)variance;
            c->ctr.splits_size += (uint64_t)size;
            *cnt0 = n - ones;
            split = 1;
        }
    }
    free(part);
    free(cent);
    free(perm);
    kvt_mem_release(&c->st->mem, tmp + perm_bytes);
    return rc ? rc : split;
}

/* Splits cluster j from `recs`, all its records in order in a buffer the caller owns, then
 * its children while they still want it, from the same buffer: a split needs nothing from
 * the cache. A split that fails leaves the cluster flagged (counted: split_skipped when the
 * budget had no room for its scratch, split_errors otherwise), never the caller's operation
 * failed: the entries are safe either way. */
void kvt_split_records(kvt_coll *c, uint32_t j, uint8_t *recs, int forced) {
    struct { uint32_t cl, at; } stack[64];
    uint32_t top = 0;
    stack[top].cl = j;
    stack[top++].at = 0;
    while (top) {
        top--;
        uint32_t s = stack[top].cl, at = stack[top].at, cnt0 = 0;
        if (!c->cl[s].flagged) continue;
        int rc = split_cluster(c, s, recs + (size_t)at * c->L.esz, forced && s == j && at == 0, &cnt0);
        if (rc == KVT_EBUDGET) {
            kvt_clear_error();
            c->ctr.split_skipped++;
            continue;
        }
        if (rc < 0 || rc > 1) {
            c->ctr.split_errors++;
            continue;
        }
        if (rc == 0) continue;
        uint32_t other = c->ncl - 1;
        kvt_maybe_flag(c, s);
        kvt_maybe_flag(c, other);
        if (c->cl[other].flagged && top < 64) {
            stack[top].cl = other;
            stack[top++].at = at + cnt0;
        }
        if (c->cl[s].flagged && top < 64) {
            stack[top].cl = s;
            stack[top++].at = at;
        }
    }
}

/* Loads cluster j (a cached copy pins nothing: the split orders its own) and splits it.
 * Returns whether it split. Counted as a forced load: the one split that may read flash. */
static int force_split(kvt_coll *c, uint32_t j) {
    uint8_t *recs, *own = NULL;
    uint64_t owned, bytes = (uint64_t)c->cl[j].n * c->L.esz;
    kvt_cache_ent *pinned;
    uint32_t ncl0 = c->ncl;
    c->ctr.forced_loads++;
    int rc = kvt_load_records(c, j, &recs, &owned, &pinned, &c->ctr.split_read_bytes);
    if (!rc && pinned) {
        rc = kvt_mem_reserve(&c->st->mem, bytes);
        if (!rc && !(own = malloc(bytes + 1))) {
            kvt_mem_release(&c->st->mem, bytes);
            rc = kvt_fail(ENOMEM, "split: out of memory");
        }
        if (!rc) memcpy(own, recs, bytes);
        kvt_release_records(c, NULL, 0, pinned, 0);
        recs = own;
    }
    if (rc) {
        kvt_clear_error();
        c->ctr.split_errors++;
        return 0;
    }
    kvt_split_records(c, j, recs, 1);
    if (own) {
        free(own);
        kvt_mem_release(&c->st->mem, bytes);
    } else {
        kvt_release_records(c, recs, owned, NULL, 0);
    }
    return c->ncl > ncl0;
}

/* Pending budget overflow: load and split the cluster with the most pending entries until
 * the budget holds. A cluster that cannot split has its pending entries written instead. */
void kvt_relieve_pending(kvt_coll *c) {
    /* every round removes one cluster's pending entries or stops */
    while (c->pending_total - c->tail_total > c->p.pending_budget) {
        uint32_t best = KVT_NONE, most = 0;
        for (uint32_t j = 0; j < c->ncl; j++)
            if (c->cl[j].flagged && c->cl[j].pend - c->cl[j].ptail > most) {
                most = c->cl[j].pend - c->cl[j].ptail;
                best = j;
            }
        if (best == KVT_NONE) break;
        if (force_split(c, best)) continue;
        /* not split: write its pending entries so the budget holds */
        if (kvt_write_pending(c, best)) break; /* could not write: stop rather than loop */
    }
}

/* The size cap's hard edge, for a cluster an add just grew: flagged, no retrieve has read it
 * while it grew past twice max_cluster_size (a collection only added to and searched), so it
 * is loaded and split now, and no cluster outgrows the read the DRAM budget was sized for
 * (budget.c). Slot j keeps a child, which is checked again. */
void kvt_split_oversized(kvt_coll *c, uint32_t j) {
    uint64_t hard = 2 * (uint64_t)c->p.max_cluster_size;
    while (c->cl[j].flagged && c->cl[j].n > hard && force_split(c, j)) {}
}
