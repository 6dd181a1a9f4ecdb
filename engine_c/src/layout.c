/*
 * layout.c — the continuity-centric flash layout (docs/design.md §2.2): writing records into
 * dual-head pools (or, in the token layout, to the end of one log in id order) and the
 * page-aligned write buffers (co-location of clusters retrieved together is colocate.c).
 *
 * Invariants:
 * 1. A cluster's records are contiguous runs in its segments; two clusters share a pool,
 *    one growing from the front and one from the back, so an append never moves data. Its
 *    slots run through its segments in order and only ever grow at the last one (a split's
 *    dead slots, format 3, are slots its live records no longer use).
 * 2. pending_total is the sum of every cluster's pend; tail_total the sum over clusters the
 *    policy does not hold (kvt_held), whose pending buffers are write-buffer tails: entries
 *    kept in DRAM until they complete a flash page, plus each held cluster's ptail (the tail
 *    it had when first held). Only entries that joined held clusters count against the
 *    (adaptive) pending budget.
 * 3. Segment moves are copy on write (adapt.c 3): committed data is never overwritten before
 *    the catalog stops naming it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "index.h"
#include "layout.h"
#include "store.h"

/* ---- writing records to flash ------------------------------------------------------------ */

static void src_get(const kvt_coll *c, const rec_src *s, uint32_t j, uint8_t *dst) {
    const kvt_layout *L = &c->L;
    if (s->recs) {
        memcpy(dst, s->recs + (size_t)j * L->esz, L->esz);
        return;
    }
    if (j < s->npre) {
        memcpy(dst, s->pre + (size_t)j * L->esz, L->esz);
        return;
    }
    uint32_t r = s->members[j - s->npre];
    kvt_rec_encode(L, dst, s->first_id + r, s->keys + (size_t)r * L->key_bytes, s->values + (size_t)r * L->value_bytes);
}

/* Reverts the appends of a failed operation, newest first: heads it claimed are unclaimed. */
void kvt_rollback(kvt_coll *c, undo_log *log) {
    while (log->n) {
        undo *u = &log->u[--log->n];
        kvt_cluster *k = &c->cl[u->cl];
        kvt_seg *sg = &k->segs[u->seg];
        sg->n -= u->run;
        c->pools.p[sg->pool].used[sg->head] -= u->run;
        if (u->claimed) {
            kvt_pools_unclaim(&c->pools, sg);
            k->nseg--;
        }
    }
}

/* 1 if writing n records as slots first.. of segment sg (first = its records count) programs a
 * flash page that already holds data: the page where the run meets the head's earlier records
 * (head 0 grows upward, head 1 downward), or one holding the other head's. Flash cannot update
 * a page in place, so each such write costs the device a read-modify-write of that page. In a
 * padded layout a run that starts a layout page meets nothing: its padding is the page's rest. */
static int rewrites_page(const kvt_coll *c, const kvt_seg *sg, const kvt_pool *pl, uint32_t first, uint32_t n) {
    const kvt_layout *L = &c->L;
    uint64_t P = c->st->io.dev.page_size > 0 ? (uint64_t)c->st->io.dev.page_size : KVT_IO_ALIGN;
    uint32_t p0 = kvt_run_pos(L, pl, sg->head, first, n), p1 = p0 + n - 1;
    uint64_t base = kvt_pool_base(pl), off = base + kvt_pos_rel(L, p0), end = base + kvt_pos_rel(L, p1) + L->esz;
    if (L->rpp && p1 % L->rpp == L->rpp - 1) end = kvt_round_up(end, KVT_LAYOUT_PAGE);
    uint64_t lo_page = kvt_round_down(off, P), hi_page = kvt_round_up(end, P);
    if (first && (sg->head == 0 ? off % P : end % P)) return 1;
    uint32_t other = pl->used[!sg->head];
    if (!other) return 0;
    uint64_t olo = kvt_run_offset(L, pl, !sg->head, 0, other), ohi = olo + kvt_run_span(L, pl, !sg->head, 0, other);
    return olo < hi_page && ohi > lo_page;
}

/* Writes n records, back to back in recs in file order, to the positions from p0 of a pool
 * whose position p0 is at file offset off: one write, with the page padding between them. */
static int write_positions(kvt_coll *c, uint64_t off, uint32_t p0, const uint8_t *recs, uint32_t n) {
    const kvt_layout *L = &c->L;
    if (!L->rpp) return kvt_file_write(c->f, off, recs, (size_t)n * L->esz);
    static const uint8_t zeros[KVT_LAYOUT_PAGE];
    kvt_wpart parts[128];
    size_t np = 0, pad = KVT_LAYOUT_PAGE - (size_t)L->rpp * L->esz;
    uint32_t in_page = p0 % L->rpp;
    while (n) {
        uint32_t k = L->rpp - in_page < n ? L->rpp - in_page : n;
        parts[np++] = (kvt_wpart){recs, (size_t)k * L->esz};
        recs += (size_t)k * L->esz;
        n -= k;
        in_page = 0;
        if (n && pad) parts[np++] = (kvt_wpart){zeros, pad};
        if (np >= 126 && n) { /* a long run: flush what is gathered, go on after it */
            size_t len = 0;
            for (size_t i = 0; i < np; i++) len += parts[i].len;
            int rc = kvt_file_writev(c->f, off, parts, np);
            if (rc) return rc;
            off += len;
            np = 0;
        }
    }
    return kvt_file_writev(c->f, off, parts, np);
}

/* Appends m records to cluster ci's flash segments (claiming heads as needed), through the
 * scratch buffer of scratch_recs records. Every append is logged for rollback. */
int kvt_append_flash(kvt_coll *c, uint32_t ci, const rec_src *src, uint32_t m, uint8_t *scratch, uint32_t scratch_recs,
                     undo_log *log) {
    const kvt_layout *L = &c->L;
    uint32_t done = 0;
    while (done < m) {
        kvt_cluster *k = &c->cl[ci];
        int claimed = 0;
        if (log->n == log->cap) {
            size_t nc = log->cap ? log->cap * 2 : 64;
            undo *nl = realloc(log->u, nc * sizeof *nl);
            if (!nl) return kvt_fail(ENOMEM, "append: out of memory");
            log->u = nl;
            log->cap = nc;
        }
        if (k->nseg == 0 || kvt_pool_room(L, &c->pools.p[k->segs[k->nseg - 1].pool]) == 0) {
            int rc = kvt_ensure_segs(c, k, k->nseg + 1);
            if (!rc) rc = kvt_ensure_pools(c, c->pools.n + 1);
            if (rc) return rc;
            kvt_seg sg;
            uint32_t live = 0;
            for (uint32_t g = 0; g < k->nseg; g++) live += k->segs[g].n;
            rc = kvt_pools_claim(&c->pools, L, k->segs, k->nseg, m - done, live, &sg);
            if (rc) return rc;
            k->segs[k->nseg++] = sg;
            claimed = 1;
        }
        kvt_seg *sg = &k->segs[k->nseg - 1];
        kvt_pool *pl = &c->pools.p[sg->pool];
        uint32_t run = m - done, room = kvt_pool_room(L, pl);
        if (run > room) run = room;
        if (!src->mrecs && run > scratch_recs) run = scratch_recs;
        uint64_t off = kvt_run_offset(L, pl, sg->head, sg->n, run);
        uint32_t p0 = kvt_run_pos(L, pl, sg->head, sg->n, run);
        int partial = rewrites_page(c, sg, pl, sg->n, run);
        int rc;
        if (src->mrecs) {
            /* records already in a buffer of ours: written in place (head 1 grows downward,
             * so its run is laid out last-first: reversed around the write), no scratch */
            uint8_t *p = src->mrecs + (size_t)done * L->esz;
            if (sg->head == 1) kvt_rec_reverse(L, p, run);
            rc = write_positions(c, off, p0, p, run);
            if (sg->head == 1) kvt_rec_reverse(L, p, run);
        } else {
            for (uint32_t j = 0; j < run; j++) {
                uint32_t pos = sg->head == 0 ? j : run - 1 - j;
                src_get(c, src, done + j, scratch + (size_t)pos * L->esz);
            }
            rc = write_positions(c, off, p0, scratch, run);
        }
        if (rc) {
            if (claimed) { /* the claim wrote nothing: undo it here, the log has no entry */
                kvt_pools_unclaim(&c->pools, sg);
                k->nseg--;
            }
            return rc;
        }
        sg->n += run;
        pl->used[sg->head] += run;
        c->ctr.partial_page_writes += (uint64_t)partial;
        c->modc++; /* the directory changed: kvt_coll_changed reports it */
        log->u[log->n++] = (undo){ci, k->nseg - 1, run, claimed};
        done += run;
    }
    return 0;
}

/* Scratch for appends: one pool's worth of records at most. */
uint32_t kvt_scratch_records(const kvt_coll *c, uint64_t m) {
    return (uint32_t)(m < c->L.pool_cap ? (m ? m : 1) : c->L.pool_cap);
}

/* The token layout: n new records (ids n0..n0+n-1, encoded from the caller's rows through
 * scratch of sr records) appended to the log, in id order. A write that starts inside a
 * device page already programmed is counted as a partial-page write. */
int kvt_append_log(kvt_coll *c, uint64_t n0, const void *keys, const void *values, uint64_t n, uint8_t *scratch,
                   uint32_t sr) {
    const kvt_layout *L = &c->L;
    const kvt_device *dev = &c->st->io.dev;
    uint64_t P = dev->page_size > 0 ? (uint64_t)dev->page_size : KVT_IO_ALIGN;
    int rc = 0;
    for (uint64_t at = 0; at < n && !rc;) {
        uint64_t cn = n - at < sr ? n - at : sr, off = token_offset(c, n0 + at);
        for (uint64_t r = at; r < at + cn; r++)
            kvt_rec_encode(L, scratch + (size_t)(r - at) * L->esz, (int64_t)(n0 + r),
                           (const uint8_t *)keys + (size_t)r * L->key_bytes,
                           (const uint8_t *)values + (size_t)r * L->value_bytes);
        rc = kvt_file_write(c->f, off, scratch, (size_t)cn * L->esz);
        if (!rc && off % P && n0 + at > 0) c->ctr.partial_page_writes++;
        at += cn;
    }
    return rc;
}

/* Writes whole new clusters: for each t, recs[t] (counts[t] records) become the only data of
 * cluster dst[t], which must own no segments. In a file of pools of one size (format 1/2), two
 * groups (a split's children) go back to back across a pool boundary (kvt_pools_claim_pair):
 * neighbours in key space, a retrieve often takes both, and then reads them as one extent.
 * On failure every head claimed is given back. */
int kvt_write_fresh(kvt_coll *c, const uint32_t *dst, uint8_t *const *recs, const uint32_t *counts, uint32_t nt) {
    undo_log log = {0};
    int rc = 0;
    if (nt == 2 && counts[0] && counts[1] && !c->pools.sized) { /* a split's children: back to back */
        kvt_seg sg[2];
        rc = kvt_ensure_segs(c, &c->cl[dst[0]], 1);
        if (!rc) rc = kvt_ensure_segs(c, &c->cl[dst[1]], 1);
        if (!rc) rc = kvt_ensure_pools(c, c->pools.n + 2);
        if (!rc) rc = kvt_pools_claim_pair(&c->pools, &c->L, counts[0], counts[1], &sg[0], &sg[1]);
        for (uint32_t t = 0; t < 2 && !rc; t++) {
            c->cl[dst[t]].segs[0] = sg[t];
            c->cl[dst[t]].nseg = 1;
        }
    }
    for (uint32_t t = 0; t < nt && !rc; t++) {
        rec_src src = {.mrecs = recs[t]}; /* the caller's buffers: written in place */
        rc = kvt_append_flash(c, dst[t], &src, counts[t], NULL, 0, &log);
    }
    if (rc) {
        kvt_rollback(c, &log);
        for (uint32_t t = 0; t < nt; t++) kvt_drop_segs(c, dst[t]); /* the heads claimed above too */
    }
    free(log.u);
    return rc;
}

/* Moves cluster j's segments aside. */
seg_save kvt_detach_segs(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    seg_save s = {k->segs, k->nseg, k->segcap};
    k->segs = NULL;
    k->nseg = k->segcap = 0;
    return s;
}

void kvt_drop_segs(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    for (uint32_t g = 0; g < k->nseg; g++) kvt_pools_unclaim(&c->pools, &k->segs[g]);
    kvt_free_array(c, k->segs, k->segcap, sizeof(kvt_seg));
    k->segs = NULL;
    k->nseg = k->segcap = 0;
}

void kvt_restore_segs(kvt_coll *c, uint32_t j, seg_save s) {
    kvt_drop_segs(c, j);
    kvt_cluster *k = &c->cl[j];
    k->segs = s.segs;
    k->nseg = s.nseg;
    k->segcap = s.segcap;
}

void kvt_retire_segs(kvt_coll *c, seg_save s) {
    c->modc++;
    for (uint32_t g = 0; g < s.nseg; g++) kvt_pools_retire(&c->pools, &s.segs[g]);
    kvt_free_array(c, s.segs, s.segcap, sizeof(kvt_seg));
}

void kvt_free_pending(kvt_coll *c, kvt_cluster *k) {
    c->pending_total -= k->pend;
    c->tail_total -= kvt_held(c, k) ? kvt_ptail(k) : k->pend;
    k->pend = 0;
    if (!k->x) return;
    k->x->ptail = 0;
    kvt_free_as(c, KVT_USE_PENDING, k->x->pbuf, k->x->pcap, c->L.esz);
    k->x->pbuf = NULL;
    k->x->pcap = 0;
    kvt_side_release(c, k);
}

/* An add's new entry joins cluster k's pending buffer (room was made by its plan): a tail
 * entry, or one waiting for a split when the policy holds the cluster. */
void kvt_tail_push(kvt_coll *c, kvt_cluster *k, int64_t id, const void *key, const void *value) {
    kvt_rec_encode(&c->L, k->x->pbuf + (size_t)k->pend++ * c->L.esz, id, key, value);
    c->pending_total++;
    if (!kvt_held(c, k)) c->tail_total++;
}

/* The first n entries of cluster k's pending buffer were just written (an add wrote them ahead
 * of its new entries): they leave it. A held cluster's first ptail entries are its old tail
 * (invariant 2). */
void kvt_tail_written(kvt_coll *c, kvt_cluster *k, uint32_t n) {
    const size_t esz = c->L.esz;
    memmove(k->x->pbuf, k->x->pbuf + (size_t)n * esz, (size_t)(k->pend - n) * esz);
    k->pend -= n;
    c->pending_total -= n;
    int held = kvt_held(c, k);
    uint32_t tail_part = !held ? n : n < k->x->ptail ? n : k->x->ptail;
    if (held) k->x->ptail -= tail_part;
    c->tail_total -= tail_part;
}

void kvt_tail_hold(kvt_coll *c, kvt_cluster *k) {
    if (k->x) k->x->ptail = k->pend;
}

void kvt_tail_release(kvt_coll *c, kvt_cluster *k) {
    c->tail_total += k->pend - kvt_ptail(k);
    if (k->x) k->x->ptail = 0;
}

/* Writes cluster j's pending buffer to flash, in place (no scratch: a checkpoint or an
 * eviction can proceed when the budget is full), and frees it. On failure nothing changes. */
int kvt_write_pending(kvt_coll *c, uint32_t j) {
    kvt_cluster *k = &c->cl[j];
    if (!k->pend) return 0;
    undo_log log = {0};
    rec_src src = {.mrecs = k->x->pbuf};
    int rc = kvt_append_flash(c, j, &src, k->pend, NULL, 0, &log);
    if (rc)
        kvt_rollback(c, &log);
    else
        kvt_free_pending(c, k);
    free(log.u);
    return rc;
}

/* ---- page-aligned write buffers (docs/design.md §2.2) ----------------------------------------------
 * An unflagged cluster's pending buffer is its tail: the entries appended since its flash part
 * last ended on a page boundary. An add writes whole pages (the tail, then the new entries)
 * and keeps the rest, fewer than a page's worth, in the tail; so a hot cluster programs each
 * flash page once. Each collection holds at most its share of the store's write_buffer in
 * tails; over it, the tails of the clusters appended to least recently are written out as
 * they are (cold clusters write directly). A checkpoint writes every tail. */

/* Records on the last, partly written page of cluster k's flash part, where its next append
 * lands (0 when that is a page start, or a new segment). */
uint32_t kvt_tail_fill(const kvt_coll *c, const kvt_cluster *k) {
    if (!c->L.rpp || !k->nseg) return 0;
    const kvt_seg *sg = &k->segs[k->nseg - 1];
    if (!kvt_pool_room(&c->L, &c->pools.p[sg->pool])) return 0;
    return sg->n % c->L.rpp;
}

/* The collection's share of the write buffer, in records. */
uint64_t kvt_tail_share(const kvt_coll *c) {
    return c->st->write_buffer / (c->st->ncolls ? c->st->ncolls : 1) / c->L.esz;
}

/* Writes out the least recently appended tails until the collection's share holds. */
void kvt_trim_tails(kvt_coll *c) {
    uint64_t share = kvt_tail_share(c);
    while (c->tail_total > share) {
        uint32_t best = KVT_NONE;
        for (uint32_t j = 0; j < c->ncl; j++) {
            const kvt_cluster *k = &c->cl[j];
            if (k->pend && !kvt_held(c, k) && (best == KVT_NONE || kvt_wtick(k) < kvt_wtick(&c->cl[best]))) best = j;
        }
        if (best == KVT_NONE) break;
        if (kvt_write_pending(c, best)) { /* a failed write keeps it buffered, for later */
            c->ctr.write_buffer_errors++;
            break;
        }
        c->ctr.write_buffer_evictions++;
    }
}
