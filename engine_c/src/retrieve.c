/*
 * retrieve.c — retrieving whole clusters under an entry budget (the clustered policies;
 * prefetch.c queues the same selection's reads on the loader threads).
 *
 * Invariants:
 * 1. A retrieve returns whole clusters in score order while they fit the budget, then the
 *    best entries of the next-ranked cluster that fit the rest (scored on the keys its read
 *    brought in), so it returns min(budget, entries) entries; its reads of one call are
 *    submitted together.
 * 2. The policy sees the records of the clusters it wants (the adaptive policy: the flagged
 *    ones, to split them, adapt.c 1-2) before the retrieve returns, as they were read,
 *    whatever the cache kept of them; the result is taken before any split changes them.
 * 3. The co-location rewrite, when it is due, runs after the policy's upkeep, and the result
 *    names each entry's cluster as it is after both.
 * 4. The read runs in the calling thread's on_corrupt mode (read.c 2); everything after it
 *    reads for the engine itself. In skip mode a cluster found damaged is handed to no policy
 *    (its rows lack the damaged records), and the rows they left empty are closed up.
 *
 * A retrieve is a pipeline of named steps: select (score every cluster, take them in score
 * order under the budget, estimate the rest), scratch for the cluster taken in part, read
 * (fill the result), hand over (the policy's records, then its upkeep), co-locate, name.
 * A policy without clusters (none) retrieves on its own (policy.h).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "colocate.h"
#include "common.h"
#include "estimate.h"
#include "policy.h"
#include "read.h"
#include "regroup.h"
#include "score.h"
#include "store.h"
#include "virtualize.h"

/* ---- retrieve ----------------------------------------------------------------------------- */

/* Result rows go where their cluster's place in the selection puts them (rows[ci]), so the
 * order does not depend on which clusters came from the cache first. The cluster taken in
 * part (part_cl, when the next-ranked cluster overflows the budget) gives its part_n best
 * entries by score against the query group (the best over the group, as clusters are
 * scored), on the keys its read brought in; when the policy wants its records, they are kept
 * (keep). */
typedef struct fill_ctx {
    kvt_coll *c;
    kvt_result *r;
    const kvt_layout *L;
    const uint64_t *rows;
    const float *q;
    uint64_t nq;
    uint32_t part_cl, part_n;
    float *sc, *x; /* scratch of the partial cluster: a score per entry, a key */
    uint32_t *ord;
    uint8_t *keep; /* its records, when the policy wants them (NULL otherwise) */
    /* a cluster read in pieces (the call's last run, RUN_READY): where its next piece goes,
     * and how many of the partial cluster's rows are filled (then keep is not) */
    uint32_t piece_cl, part_have;
    uint64_t piece_at;
} fill_ctx;

static void fill_result(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    fill_ctx *x = vctx;
    const kvt_layout *L = x->L;
    uint64_t keep = x->r->n;
    x->r->n = x->rows[ci];
    if (ci != x->part_cl) {
        for (uint32_t i = 0; i < n; i++) kvt_put_result(x->r, L, recs + (size_t)i * L->esz, (int32_t)ci);
        x->r->n = keep + n;
        return;
    }
    for (uint32_t i = 0; i < n; i++)
        x->sc[i] = group_entry_score(x->c, kvt_rec_key(recs + (size_t)i * L->esz), x->q, x->nq, x->x);
    uint32_t m = x->part_n < n ? x->part_n : n;
    kvt_top_by_score(x->ord, n, m, x->sc);
    for (uint32_t i = 0; i < m; i++) kvt_put_result(x->r, L, recs + (size_t)x->ord[i] * L->esz, (int32_t)ci);
    if (x->keep) memcpy(x->keep, recs, (size_t)n * L->esz);
    x->r->n = keep + m;
}

/* The partial cluster's best part_n entries so far, in its rows, their scores in sc: a
 * piece's entries replace the worst while they score better (their rows' order is then that
 * of arrival, not of score). */
static void fill_partial_piece(fill_ctx *x, uint32_t ci, const uint8_t *recs, uint32_t n) {
    const kvt_layout *L = x->L;
    uint64_t keep = x->r->n, added = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *rec = recs + (size_t)i * L->esz;
        float s = group_entry_score(x->c, kvt_rec_key(rec), x->q, x->nq, x->x);
        uint32_t slot = x->part_have;
        if (slot < x->part_n) {
            x->part_have++;
            added++;
        } else {
            slot = 0;
            for (uint32_t j = 1; j < x->part_n; j++)
                if (x->sc[j] < x->sc[slot]) slot = j;
            if (!(s > x->sc[slot])) continue;
        }
        x->sc[slot] = s;
        x->r->n = x->rows[ci] + slot;
        kvt_put_result(x->r, L, rec, (int32_t)ci);
    }
    x->r->n = keep + added;
}

/* fill_result for a cluster handed over in pieces, one run of its records at a time. */
static void fill_piece(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    fill_ctx *x = vctx;
    if (ci == x->part_cl) {
        fill_partial_piece(x, ci, recs, n);
        return;
    }
    if (ci != x->piece_cl) {
        x->piece_cl = ci;
        x->piece_at = 0;
    }
    uint64_t keep = x->r->n;
    x->r->n = x->rows[ci] + x->piece_at;
    for (uint32_t i = 0; i < n; i++) kvt_put_result(x->r, x->L, recs + (size_t)i * x->L->esz, (int32_t)ci);
    x->piece_at += n;
    x->r->n = keep + n;
}

/* A clustered retrieve in flight: the selection (idx[0..taken), the last one taken in part
 * when part > 0) and the fill. */
typedef struct retrieval {
    kvt_coll *c;
    kvt_result *r;
    selection sel;
    uint64_t taken, total;
    uint32_t part;
    fill_ctx fx;
    uint64_t part_bytes; /* reserved for the partial cluster's scratch */
    uint64_t room;       /* reserved for the policy's work on the records (room_step) */
} retrieval;

/* select: every cluster scored against the query group, the best taken while they fit the
 * budget (the first that does not fit in part), and, with an estimate, the clusters not
 * taken estimated from the scores before they are spent. The cluster taken in part counts as
 * fetched: its other entries are neither returned nor estimated. */
static int select_step(retrieval *R, const float *q, uint64_t nq, uint64_t budget, const kvt_estimate_opts *est) {
    kvt_coll *c = R->c;
    kvt_result *r = R->r;
    int rc = kvt_selection_alloc(c, nq, &R->sel);
    if (rc) return rc;
    kvt_select_clusters(c, q, nq, budget, R->sel.scores, R->sel.q2, R->sel.idx, &R->taken, &R->total, &R->part);
    r->ncl = R->taken;
    if (est) {
        double scale = est->scale > 0 ? est->scale : 1.0 / sqrt((double)c->p.dim);
        rc = kvt_estimate(c, q, nq, R->sel.scores, R->sel.idx, R->taken, est->clusters, scale, est->variance,
                          r->est_lse, r->est_val, &r->est_ncl, &r->est_n);
    }
    return rc ? rc : kvt_result_alloc(r, &c->L, R->total);
}

/* The partial cluster's scratch: a score and an order slot per entry, a key, and its records
 * when the policy wants them. Not in the call's last run (pieces), whose read takes what is
 * free: the policy's work on them (a split) then waits for a later read, as room_step's does
 * (counted in split_skipped), and the retrieve itself runs. */
static int partial_step(retrieval *R) {
    kvt_coll *c = R->c;
    uint32_t j = R->sel.idx[R->taken - 1];
    kvt_cluster *k = &c->cl[j];
    int keep = c->ops->wants_records && c->ops->wants_records(c, j);
    if (keep && c->st->pieces) {
        keep = 0;
        c->ctr.split_skipped++;
    }
    uint64_t bytes = (uint64_t)k->n * 8 + (uint64_t)c->p.dim * 4 + (keep ? (uint64_t)k->n * c->L.esz : 0);
    int rc = kvt_mem_reserve(&c->st->mem, bytes);
    if (rc) return rc;
    R->part_bytes = bytes;
    R->fx.part_cl = j;
    R->fx.part_n = R->part;
    if (!(R->fx.sc = malloc((size_t)k->n * 4 + 4)) || !(R->fx.ord = malloc((size_t)k->n * 4 + 4)) ||
        !(R->fx.x = malloc((size_t)c->p.dim * 4)) || (keep && !(R->fx.keep = malloc((size_t)k->n * c->L.esz))))
        return kvt_fail(ENOMEM, "retrieve: out of memory");
    return 0;
}

/* room: the DRAM the policy's work on the records it wants will take (policy.h
 * records_room: the largest one's scratch and records, every one's lasting part), reserved
 * before the read, when a failure changes nothing and RUN_READY can page other collections
 * out to make it, and given back as the records are handed over. So a split happens when
 * its cluster is read, whatever the budget. The call's last run (pieces) reserves none, its
 * read taking what is free: a split that then finds no room waits for a later read (adapt.c,
 * split_skipped). */
static int room_step(retrieval *R) {
    kvt_coll *c = R->c;
    if (!c->ops->records_room || c->st->pieces) return 0;
    uint64_t most = 0, lasting = 0;
    for (uint64_t t = 0; t < R->taken; t++) {
        uint32_t j = R->sel.idx[t];
        if (!c->ops->wants_records(c, j)) continue;
        uint64_t s;
        lasting += c->ops->records_room(c, j, &s);
        if (j != R->fx.part_cl) s += (uint64_t)c->cl[j].n * c->L.esz; /* records_of; the partial one's are kept */
        most = s > most ? s : most;
    }
    if (!(most + lasting)) return 0;
    int rc = kvt_mem_reserve(&c->st->mem, most + lasting);
    if (!rc) R->room = most + lasting;
    return rc;
}

/* read: the scores are spent, their buffer holds each taken cluster's first result row; the
 * clusters are read (read.c: batched, merged, from the cache where they are) into the result,
 * and co-retrieval is counted. */
static int read_step(retrieval *R) {
    kvt_coll *c = R->c;
    kvt_store *s = c->st;
    uint64_t at = 0;
    for (uint64_t t = 0; t < R->taken; t++) {
        uint32_t j = R->sel.idx[t];
        R->sel.rows[j] = at;
        at += c->cl[j].n;
    }
    for (uint64_t i = 0; c->read_mode == KVT_READ_SKIP && i < R->total; i++) R->r->ids[i] = -1; /* close_up */
    kvt_io_batch_begin(&s->io);
    kvt_cache_owner_read(&s->cache, &c->cache_state);
    R->fx.piece_cl = KVT_NONE;
    int rc = kvt_visit_clusters_or_pieces(c, R->sel.idx, (uint32_t)R->taken, fill_result, s->pieces ? fill_piece : NULL,
                                          &R->fx);
    if (!rc) kvt_count_coretrieval(c, R->sel.idx, R->taken);
    kvt_io_batch_end(&s->io);
    return rc;
}

/* Cluster j's records, in order, from its rows of the result, into a buffer reserved and
 * allocated for them (the policy may permute it); NULL, with *rc, when there is no room. */
static uint8_t *records_of(retrieval *R, uint32_t j, uint64_t bytes, int *rc) {
    kvt_coll *c = R->c;
    const kvt_layout *L = &c->L;
    const kvt_result *r = R->r;
    *rc = kvt_mem_reserve(&c->st->mem, bytes);
    if (*rc) {
        kvt_clear_error();
        return NULL;
    }
    uint8_t *recs = malloc(bytes + 1);
    if (!recs) {
        *rc = ENOMEM;
        kvt_mem_release(&c->st->mem, bytes);
        return NULL;
    }
    for (uint64_t i = 0, row = R->sel.rows[j]; i < c->cl[j].n; i++, row++)
        kvt_rec_encode(L, recs + (size_t)i * L->esz, r->ids[row], r->keys + row * L->key_bytes,
                       r->values + row * L->value_bytes);
    return recs;
}

/* hand over: the clusters just read are in DRAM, the moment for the policy to take the
 * records it wants (invariant 2): a whole cluster's records are its rows of the result, in
 * order; the cluster taken in part kept its records aside. Nothing is read. */
static void hand_over_step(retrieval *R) {
    kvt_coll *c = R->c;
    const kvt_policy_ops *ops = c->ops;
    if (!ops->records_read) return;
    kvt_selection_release_budget(c, &R->sel); /* room for the policy's work; idx is still read */
    kvt_mem_release(&c->st->mem, R->room);    /* ... which room_step kept for it */
    R->room = 0;
    for (uint64_t t = 0; t < R->taken; t++) {
        uint32_t j = R->sel.idx[t];
        if (!ops->wants_records(c, j) || kvt_cluster_damaged(c, j)) continue; /* invariant 4 */
        if (j == R->fx.part_cl) { /* read in pieces, its records were never all in DRAM at once */
            if (R->fx.keep && !R->fx.part_have) ops->records_read(c, j, R->fx.keep, 0);
            continue;
        }
        uint64_t bytes = (uint64_t)c->cl[j].n * c->L.esz;
        int rc;
        uint8_t *recs = records_of(R, j, bytes, &rc);
        ops->records_read(c, j, recs, rc);
        if (recs) {
            free(recs);
            kvt_mem_release(&c->st->mem, bytes);
        }
    }
    if (ops->after_read) ops->after_read(c);
}

/* Skip mode: the rows damaged records left empty (id -1) closed up, the rest in order. */
static void close_up(kvt_result *r, uint64_t rows) {
    uint64_t m = 0;
    for (uint64_t i = 0; i < rows; i++) {
        if (r->ids[i] < 0) continue;
        if (m != i) {
            r->ids[m] = r->ids[i];
            memcpy(r->keys + m * r->key_bytes, r->keys + i * r->key_bytes, r->key_bytes);
            if (r->value_bytes) memcpy(r->values + m * r->value_bytes, r->values + i * r->value_bytes, r->value_bytes);
        }
        m++;
    }
    r->n = m;
}

/* tidy (format 3): clusters read whole that hold more dead slots than live records on flash,
 * or a chain of segments, are rewritten into one head from their rows of the result while
 * they are in DRAM (regroup.c 4), within the consolidation budget. Those the policy took its
 * records for (split) are left out, their rows no longer what they hold, and so are clusters
 * found damaged (read.c 2). */
static void tidy_step(retrieval *R, const uint32_t *tidy, uint32_t ntidy) {
    kvt_coll *c = R->c;
    for (uint32_t t = 0; t < ntidy; t++) {
        uint32_t j = tidy[t];
        if (!kvt_wants_consolidation(c, j)) continue;
        uint64_t bytes = (uint64_t)c->cl[j].n * c->L.esz;
        int rc;
        uint8_t *recs = records_of(R, j, bytes, &rc);
        if (!recs) continue; /* no room: it stays as it is */
        if (kvt_consolidate(c, j, recs)) kvt_clear_error();
        free(recs);
        kvt_mem_release(&c->st->mem, bytes);
    }
}

/* The clusters read whole that tidy_step may rewrite: chosen before the policy takes records
 * (which may split them). */
static uint32_t tidy_candidates(retrieval *R, uint32_t *tidy) {
    kvt_coll *c = R->c;
    uint32_t m = 0;
    for (uint64_t t = 0; tidy && t < R->taken; t++) {
        uint32_t j = R->sel.idx[t];
        if (j == R->fx.part_cl || kvt_cluster_damaged(c, j) || !kvt_wants_consolidation(c, j)) continue;
        if (c->ops->wants_records && c->ops->wants_records(c, j)) continue;
        tidy[m++] = j;
    }
    return m;
}

static int retrieve_clusters(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, const kvt_estimate_opts *est,
                             kvt_result *r) {
    retrieval R = {.c = c, .r = r};
    R.fx = (fill_ctx){c, r, &c->L, NULL, q, nq, KVT_NONE, 0, NULL, NULL, NULL, NULL};
    int rc = select_step(&R, q, nq, budget, est);
    R.fx.rows = R.sel.rows;
    if (!rc && R.part) rc = partial_step(&R);
    if (!rc) rc = room_step(&R);
    if (!rc) rc = read_step(&R);
    int mode = c->read_mode;
    c->read_mode = KVT_READ_OWN; /* invariant 4: the policy's work and co-location read for the engine */
    uint32_t *tidy = !rc && c->pools.sized ? malloc(R.taken * sizeof *tidy + 1) : NULL, ntidy = 0;
    if (tidy) ntidy = tidy_candidates(&R, tidy);
    if (!rc) hand_over_step(&R);
    if (ntidy) tidy_step(&R, tidy, ntidy);
    free(tidy);
    if (!rc && mode == KVT_READ_SKIP && c->ndmg_cl) close_up(r, R.total);
    if (!rc && kvt_relayout_due(c) && kvt_relayout(c)) c->ctr.split_errors++;
    /* name: the clusters the entries belong to now, after any split or relayout */
    for (uint64_t i = 0; !rc && i < r->n; i++) r->clusters[i] = (int32_t)kvt_loc(c, r->ids[i]);
    free(R.fx.sc);
    free(R.fx.ord);
    free(R.fx.x);
    free(R.fx.keep);
    kvt_mem_release(&c->st->mem, R.part_bytes + R.room);
    kvt_selection_free(c, &R.sel);
    return rc;
}

static int retrieve_locked(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, const kvt_estimate_opts *est,
                           kvt_result **out) {
    int rc = 0;
    kvt_result *r = calloc(1, sizeof *r);
    if (!r) return kvt_fail(ENOMEM, "retrieve: out of memory");
    r->nq = nq;
    r->vdim = c->p.value_dim;
    if (est && (!(r->est_lse = malloc(nq * 4)) || !(r->est_val = calloc(nq * c->p.value_dim + 1, 4))))
        rc = kvt_fail(ENOMEM, "retrieve: out of memory for the estimate");
    for (uint64_t i = 0; !rc && est && i < nq; i++) r->est_lse[i] = -INFINITY;
    if (!rc)
        rc = c->ops->retrieve ? c->ops->retrieve(c, q, nq, budget, r) : retrieve_clusters(c, q, nq, budget, est, r);
    if (!rc && budget) { /* mean fill: returned entries / budget, every policy alike */
        c->ctr.fill_retrieves++;
        c->ctr.fill_sum += (double)r->n / (double)budget;
    }
    if (rc)
        kvt_result_free(r);
    else
        *out = r;
    return rc;
}

/* A retrieve in the thread's on_corrupt mode (read.c); what runs after its read is back in the
 * engine's own mode (invariant 4). */
static int retrieve_in_mode(kvt_coll *c, int mode, const float *q, uint64_t nq, uint64_t budget,
                            const kvt_estimate_opts *est, kvt_result **out) {
    c->read_mode = mode;
    c->ndmg_cl = 0;
    int rc = retrieve_locked(c, q, nq, budget, est, out);
    c->read_mode = KVT_READ_OWN;
    return rc;
}

int kvt_coll_retrieve(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result **out) {
    kvt_clear_error();
    int mode = kvt_read_begin();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "retrieve: query_group must hold at least one query");
    int rc;
    RUN_READY(c, retrieve_in_mode(c, mode, q, nq, budget, NULL, out));
    return rc;
}

int kvt_coll_retrieve_est(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, const kvt_estimate_opts *est,
                          kvt_result **out) {
    kvt_clear_error();
    int mode = kvt_read_begin();
    if (!q || nq == 0) return kvt_fail(KVT_EINVAL, "retrieve: query_group must hold at least one query");
    if (!est) return kvt_fail(KVT_EINVAL, "retrieve: estimate options expected");
    if (!(est->scale >= 0) || !isfinite(est->scale))
        return kvt_fail(KVT_EINVAL, "scale: a finite value > 0 (or 0 for 1/sqrt(dim)) expected");
    int rc;
    RUN_READY(c, retrieve_in_mode(c, mode, q, nq, budget, est, out));
    return rc;
}
