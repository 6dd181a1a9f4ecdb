/*
 * pieces.c — reading a cluster larger than the free budget in pieces, for visitors that
 * take any run of a cluster's records (search's scoring), so that a call above the
 * estimated minimum does not fail for want of one whole-cluster buffer (docs/design.md §2.3).
 *
 * Invariants:
 * 1. Every live record of the cluster reaches the visitor exactly once, in slot order, then
 *    its pending records; dead slots (format 3) never do.
 * 2. Every record is checked against the id map before the visitor sees it (read.c 2), in
 *    the call's on_corrupt mode; a piece with a damaged record is named by id as a whole read
 *    would name it.
 * 3. A piece's buffer and its read scratch are reserved against the budget first; nothing of
 *    it is cached.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "read.h"
#include "store.h"

/* Records per piece: a quarter of what the budget leaves, whole layout pages, at least one. */
static uint32_t piece_records(const kvt_coll *c) {
    const kvt_layout *L = &c->L;
    uint32_t page = L->rpp ? L->rpp : 1;
    uint64_t n = kvt_mem_left(&c->st->mem) / 4 / (L->esz + 1) / page * page;
    return n < page ? page : n > L->pool_cap ? L->pool_cap : (uint32_t)n;
}

/* Slots s0..s0+n-1 of segment sg (slot base of the cluster) read into buf, unpacked into slot
 * order and checked; the live ones moved to the front (*live), dead slots counted. */
static int read_piece(kvt_coll *c, uint32_t ci, const kvt_seg *sg, uint32_t base, uint32_t s0, uint32_t n, uint8_t *buf,
                      uint32_t *live, uint32_t *dead) {
    const kvt_layout *L = &c->L;
    const kvt_pool *pl = &c->pools.p[sg->pool];
    uint64_t off = kvt_run_offset(L, pl, sg->head, s0, n), span = kvt_run_span(L, pl, sg->head, s0, n);
    uint64_t scratch = kvt_file_read_scratch(c->f, off, (size_t)span);
    int rc = kvt_mem_reserve(&c->st->mem, scratch);
    if (rc) return rc;
    rc = c->read_mode == KVT_READ_SKIP ? kvt_read_clamped(c, off, (size_t)span, buf, n)
                                       : kvt_file_read(c->f, off, (size_t)span, buf, n);
    kvt_mem_release(&c->st->mem, scratch);
    if (rc) return rc;
    kvt_unpad(L, buf, buf, kvt_run_pos(L, pl, sg->head, s0, n), n);
    if (sg->head == 1) kvt_rec_reverse(L, buf, n);
    uint32_t bad = 0, m = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (kvt_rec_ok(c, ci, buf, i)) continue;
        if (kvt_slot_dead(c, ci, buf, i))
            (*dead)++;
        else
            bad++;
    }
    if (bad && (rc = kvt_damaged_run(c, c->read_mode, ci, base + s0, buf, n, off, NULL))) return rc;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *rec = buf + (size_t)i * L->esz;
        if (!kvt_rec_ok(c, ci, buf, i)) continue; /* record i-1 is still in place (m <= i) */
        if (m != i) memmove(buf + (size_t)m * L->esz, rec, L->esz);
        m++;
    }
    *live = m;
    return 0;
}

/* The pieces of cluster ci's segments, in slot order (invariant 1). */
static int visit_segs(kvt_coll *c, uint32_t ci, uint32_t per, uint8_t *buf, visit_fn fn, void *ctx) {
    kvt_cluster *k = &c->cl[ci];
    uint32_t base = 0, live = 0, dead = 0, left = k->n - k->pend;
    int rc = 0;
    for (uint32_t g = 0; g < k->nseg && !rc; g++) {
        const kvt_seg *sg = &k->segs[g];
        for (uint32_t s0 = 0; s0 < sg->n && !rc; s0 += per) {
            uint32_t n = sg->n - s0 < per ? sg->n - s0 : per, m = 0;
            rc = read_piece(c, ci, sg, base, s0, n, buf, &m, &dead);
            live += m;
            if (!rc && m) fn(ctx, ci, buf, m);
        }
        base += sg->n;
    }
    if (!rc && c->read_mode != KVT_READ_SKIP && (live != left || dead != k->dead))
        rc = kvt_fail(KVT_ECORRUPT,
                      "%s: collection %u: cluster %u holds %u live records and %u dead slots on flash, "
                      "its directory says %u and %u",
                      kvt_file_path(c->f), c->no, ci, live, dead, left, k->dead);
    if (!rc && k->pend) fn(ctx, ci, kvt_pbuf(k), k->pend);
    return rc;
}

int kvt_visit_cluster_pieces(kvt_coll *c, uint32_t ci, visit_fn fn, void *ctx) {
    if (token(c) || kvt_cached(c, ci)) return kvt_visit_cluster(c, ci, fn, ctx); /* pieces of pools only */
    uint32_t per = piece_records(c);
    uint64_t bytes = kvt_span(&c->L, 0, per) + KVT_LAYOUT_PAGE; /* a piece's span, page padding included */
    int rc = kvt_mem_reserve(&c->st->mem, bytes);
    if (rc) return rc;
    uint8_t *buf = malloc(bytes);
    c->st->cache.misses++;
    rc = buf ? visit_segs(c, ci, per, buf, fn, ctx) : kvt_fail(ENOMEM, "read: out of memory");
    free(buf);
    kvt_mem_release(&c->st->mem, bytes);
    return rc;
}
