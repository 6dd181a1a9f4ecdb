/*
 * adapt.c — migration-free cluster adaptation (docs/design.md §2.1), the adaptive policy
 * behind its hooks of the policy table (policy.h, at the end): the split rule, flagging after
 * an add, which new entries wait in a flagged cluster's pending buffer, and the split itself
 * (2-means over records already in DRAM, written by regroup.c). Its state (kvt_coll.adapt,
 * kvt_cluster.ad) is touched only here.
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
 * 3. A split writes the new clusters to fresh heads (copy on write, regroup.c) and only then
 *    switches the directory; the old heads are retired until the next committed checkpoint,
 *    because the committed catalog still names them.
 * 4. Entries that join a flagged cluster wait in its pending buffer, while the pending budget
 *    has room or behind entries already waiting (plan, below), and stay retrievable. Neither
 *    they nor a split's scratch are given up for want of DRAM while paging other
 *    collections out can make the room (virtualize.h RUN_READY; records_room): only a
 *    call's last run writes them early or skips a split.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "add.h"
#include "cluster.h"
#include "common.h"
#include "index.h"
#include "layout.h"
#include "policy.h"
#include "read.h"
#include "regroup.h"
#include "store.h"

/* ---- the split rule ----------------------------------------------------------------------- */

enum { FLAG_NONE, FLAG_VARIANCE, FLAG_SIZE }; /* kvt_cluster.ad.flagged: why it wants a split */

static int over_sse(const kvt_coll *c, const kvt_cluster *k) {
    return c->adapt.tau > 0 && k->m2 > c->adapt.tau * (double)c->p.init_cluster_size;
}

static int wants_split(const kvt_coll *c, const kvt_cluster *k) {
    uint32_t hold = k->ad.hold;
    if (k->n < 2 || k->n < hold + hold / 2) return FLAG_NONE;
    if (over_sse(c, k)) return FLAG_VARIANCE;
    return k->n > c->p.max_cluster_size ? FLAG_SIZE : FLAG_NONE;
}

static void maybe_flag(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    int why = k->ad.flagged ? FLAG_NONE : wants_split(c, k);
    if (why) {
        kvt_tail_hold(c, k); /* its tail, if any, now waits for the split (layout.c 2) */
        k->ad.flagged = (uint32_t)why;
        if (!kvt_cached(c, j)) c->ctr.deferred_splits++;
    }
}

/* tau from the first partition: tau_factor x its pooled variance (sum m2 / sum n). */
static void derive_tau(kvt_coll *c) {
    if (c->adapt.tau > 0) return;
    double m2 = 0;
    uint64_t n = 0;
    for (uint32_t j = 0; j < c->ncl; j++) {
        m2 += c->cl[j].m2;
        n += c->cl[j].n;
    }
    if (n && m2 > 0) c->adapt.tau = c->p.tau_factor * m2 / (double)n;
}

/* Splits cluster j, whose records in order are `recs` (a buffer the caller owns; the split
 * orders it by child), in two by 2-means. Returns 1 if it split (*at_j, *at_new: where the
 * records of the child that keeps index j and of the other child, the last cluster, start in
 * recs), 0 if the records form no two groups (the cluster then waits to grow by half), or an
 * error. */
static int split_cluster(kvt_coll *c, uint32_t j, uint8_t *recs, int forced, uint32_t *at_j, uint32_t *at_new) {
    kvt_cluster *k = &c->cl[j];
    uint32_t n = k->n;
    size_t esz = c->L.esz;
    uint64_t tmp = (uint64_t)n * 4 + 2ull * c->p.dim * 4 + kvt_kmeans_bytes(n, 2, c->p.dim),
             perm_bytes = (uint64_t)n * esz;
    int rc = kvt_mem_reserve(&c->st->mem, tmp + perm_bytes);
    if (rc) return rc;
    uint32_t *part = malloc((size_t)n * 4);
    float *cent = malloc(2ull * c->p.dim * 4);
    uint8_t *perm = malloc(perm_bytes + 1);
    if (!part || !cent || !perm) rc = kvt_fail(ENOMEM, "split: out of memory");
    if (!rc)
        rc = kvt_kmeans(c->st->K, c->p.dtype, recs + KVT_REC_HEADER, c->p.dim, esz, NULL, n, 2, c->p.kmeans_iters,
                        c->p.seed + j, cent, part);
    if (!rc) kvt_split_labels(c, j, recs, n, part);
    int split = 0;
    uint32_t ones = 0;
    for (uint32_t i = 0; !rc && i < n; i++) ones += part[i];
    if (!rc && (ones == 0 || ones == n)) {
        if (k->ad.flagged) kvt_tail_release(c, k); /* what waited is a tail again */
        k->ad.flagged = FLAG_NONE;
        k->ad.hold = n < (1u << 30) ? n : (1u << 30) - 1;
        c->ctr.unsplittable++;
    } else if (!rc) {
        /* the records by child, each in its order: the buffer then holds both children */
        uint32_t a = 0, b = n - ones;
        for (uint32_t i = 0; i < n; i++)
            memcpy(perm + (size_t)(part[i] ? b++ : a++) * esz, recs + (size_t)i * esz, esz);
        memcpy(recs, perm, perm_bytes);
        for (uint32_t i = 0; i < n; i++) part[i] = i >= n - ones;
        free(perm);
        perm = NULL;
        kvt_mem_release(&c->st->mem, perm_bytes);
        perm_bytes = 0;
        /* the trigger; a flag read back from a checkpoint lost its reason (stored as 0/1): the
         * rule tells it again, since m2 and n only grow while a cluster is flagged */
        int variance = !forced && k->ad.flagged != FLAG_SIZE && over_sse(c, k), size = !forced && !variance;
        uint32_t first_new, kept_by = 0;
        rc = kvt_regroup(c, j, recs, part, 2, &first_new, &kept_by);
        if (!rc) {
            c->ctr.splits_pending += (uint64_t)forced;
            c->ctr.splits_variance += (uint64_t)variance;
            c->ctr.splits_size += (uint64_t)size;
            *at_j = kept_by ? n - ones : 0; /* the child in place (regroup.c 4) may be either */
            *at_new = kept_by ? 0 : n - ones;
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
static void split_records(kvt_coll *c, uint32_t j, uint8_t *recs, int forced) {
    struct {
        uint32_t cl, at;
    } stack[64];
    uint32_t top = 0;
    stack[top].cl = j;
    stack[top++].at = 0;
    while (top) {
        top--;
        uint32_t s = stack[top].cl, at = stack[top].at, at_s = 0, at_new = 0;
        if (!c->cl[s].ad.flagged) continue;
        int rc = split_cluster(c, s, recs + (size_t)at * c->L.esz, forced && s == j && at == 0, &at_s, &at_new);
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
        maybe_flag(c, s);
        maybe_flag(c, other);
        if (c->cl[other].ad.flagged && top < 64) {
            stack[top].cl = other;
            stack[top++].at = at + at_new;
        }
        if (c->cl[s].ad.flagged && top < 64) {
            stack[top].cl = s;
            stack[top++].at = at + at_s;
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
    split_records(c, j, recs, 1);
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
static void relieve_pending(kvt_coll *c) {
    /* every round removes one cluster's pending entries or stops */
    while (c->pending_total - c->tail_total > c->p.pending_budget) {
        uint32_t best = KVT_NONE, most = 0;
        for (uint32_t j = 0; j < c->ncl; j++)
            if (c->cl[j].ad.flagged && c->cl[j].pend - kvt_ptail(&c->cl[j]) > most) {
                most = c->cl[j].pend - kvt_ptail(&c->cl[j]);
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
static void split_oversized(kvt_coll *c, uint32_t j) {
    uint64_t hard = 2 * (uint64_t)c->p.max_cluster_size;
    while (c->cl[j].ad.flagged && c->cl[j].n > hard && force_split(c, j)) {}
}

/* ---- the policy's hooks (policy.h) -------------------------------------------------------- */

/* plan: entries joining a flagged cluster wait in its pending buffer (invariant 4) while the
 * pending budget has room, or behind entries already waiting (a tail kept from before the
 * flag, ptail, does not count): the same whatever is cached, and whatever the DRAM budget.
 * A pending buffer the budget cannot hold fails the add's run (nothing is written yet), so
 * that RUN_READY pages other collections out and runs it again; only its last run, when
 * nothing is left to page out, writes them now (counted: pending_flushes), and then their
 * cluster splits when it is next read. */
static void plan_begin(kvt_coll *c, kvt_add *a) {
    uint64_t waiting = c->pending_total - c->tail_total;
    a->wait_room = c->p.pending_budget > waiting ? c->p.pending_budget - waiting : 0;
}

static int plan(kvt_coll *c, kvt_add *a, uint32_t j, int *rc) {
    kvt_cluster *k = &c->cl[j];
    uint32_t m = a->cnt[j];
    if (!k->ad.flagged) return 0;
    if (!(k->pend > kvt_ptail(k) || m <= a->wait_room)) {
        /* the pending budget is full: written now, after the tail it had (written too, so that
         * this never depends on the write buffer, sized from the DRAM budget); still flagged */
        a->wnow[j] = k->pend + m;
        return 1;
    }
    a->topend[j] = 1;
    a->wait_room -= m < a->wait_room ? m : a->wait_room;
    *rc = kvt_ensure_pbuf(c, k, k->pend + m);
    if (*rc == KVT_EBUDGET && c->st->pieces) { /* the last run: written now, the split waits for a read */
        kvt_clear_error();
        *rc = 0;
        a->topend[j] = 0;
        a->wnow[j] = k->pend + m;
        c->ctr.pending_flushes++;
    }
    return 1;
}

/* after an add: flagged clusters split when a retrieve reads them (invariant 2), cached or
 * not; the pending budget is relieved and the size cap's hard edge kept. */
static void after_add(kvt_coll *c, const kvt_add *a) {
    derive_tau(c);
    for (uint32_t j = 0; j < a->k; j++)
        if (a->cnt[j]) maybe_flag(c, j);
    relieve_pending(c);
    for (uint32_t j = 0; j < a->k; j++)
        if (a->cnt[j]) split_oversized(c, j);
}

static int held(const kvt_coll *c, const kvt_cluster *k) { return k->ad.flagged != FLAG_NONE; }

/* after a read: the flagged clusters just read split from the records read (invariant 1). */
static int wants_records(const kvt_coll *c, uint32_t j) { return c->cl[j].ad.flagged != FLAG_NONE; }

static void records_read(kvt_coll *c, uint32_t j, uint8_t *recs, int rc) {
    if (rc == KVT_EBUDGET)
        c->ctr.split_skipped++; /* no room to hold them: it splits when next read */
    else if (rc)
        c->ctr.split_errors++;
    else
        split_records(c, j, recs, 0);
}

/* records_room: split_records' DRAM beside the records of cluster j — split_cluster's
 * scratch (labels, means, k-means, then the permuted copy) and kvt_regroup's staging, given
 * back, and what a split keeps: the two children's tails, a new cluster's slot, segments and
 * pools (grown exactly when the budget is short, index.c). A split of a child takes less than
 * its parent's. */
static uint64_t records_room(const kvt_coll *c, uint32_t j, uint64_t *scratch) {
    uint64_t n = c->cl[j].n, esz = c->L.esz;
    uint64_t split = n * 4 + 2ull * c->p.dim * 4 + kvt_kmeans_bytes(n, 2, c->p.dim);
    uint64_t stage = n * esz + 2 * (sizeof(uint8_t *) + 12) + (uint64_t)c->p.dim * 8;
    *scratch = split + stage;
    return 2ull * c->L.rpp * esz + 2 * sizeof(kvt_cside) + kvt_cluster_slot_bytes(&c->p) + 2 * sizeof(kvt_seg) +
           2 * KVT_POOL_BYTES;
}

static void after_read(kvt_coll *c) {
    relieve_pending(c);
    kvt_trim_tails(c); /* splits may have left new tails */
}

static void init(kvt_coll *c) { c->adapt.tau = c->p.tau; }

static double tau(const kvt_coll *c) { return c->adapt.tau; }

static void load_dir(kvt_coll *c, double t, uint32_t staging) { c->adapt.tau = t; }

static void cluster_save(const kvt_coll *c, const kvt_cluster *k, uint32_t w[2]) {
    w[0] = k->ad.flagged;
    w[1] = k->ad.hold;
}

/* A flag read back from a checkpoint lost its reason (stored as 0/1): split_cluster tells it
 * again from the rule. */
static void cluster_load(kvt_coll *c, kvt_cluster *k, const uint32_t w[2], int reason_kept) {
    k->ad.flagged = reason_kept ? w[0] : w[0] ? FLAG_VARIANCE : FLAG_NONE;
    k->ad.hold = w[1];
}

/* Clusters split once they hold a first-partition cluster's squared error, so they run from
 * about half that size (just split) back up to it: two thirds of init_cluster_size (measured
 * on SmolLM2's keys: 0.58-0.66 of it at 2.5K and 8K tokens). */
static uint64_t cluster_size(const kvt_coll_params *p) { return (2 * (uint64_t)p->init_cluster_size + 2) / 3; }

static void budget(const kvt_coll_params *p, uint64_t n, const kvt_layout *L, double fetch, uint64_t *keys,
                   uint64_t *read, uint64_t *pending) {
    *pending = (uint64_t)p->pending_budget * L->esz;
}

const kvt_policy_ops kvt_policy_adaptive = {
    .clustered = 1,
    .cluster_size = cluster_size,
    .budget = budget,
    .init = init,
    .tau = tau,
    .load_dir = load_dir,
    .cluster_save = cluster_save,
    .cluster_load = cluster_load,
    .plan_begin = plan_begin,
    .plan = plan,
    .after_add = after_add,
    .held = held,
    .wants_records = wants_records,
    .records_read = records_read,
    .records_room = records_room,
    .after_read = after_read,
};
