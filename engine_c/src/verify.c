/*
 * verify.c — checking a collection's data file from end to end: every record the catalog
 * names, read from flash, and the header page.
 *
 * Invariants:
 * 1. Verify reads the file, never the cache, and changes nothing: no cache entry, split,
 *    write or catalog state; the reads are counted as any other.
 * 2. Every record on flash is checked as a read checks it (read.c 2: checksum, and the id the
 *    id map puts there, or an intact record of another cluster in a dead slot); a damaged one is named by the id the id map puts at its place, and a
 *    record past the end of a truncated file is damaged.
 * 3. Its DRAM is one pool's read (the largest extent of the clustered layouts; token-order
 *    runs are read in pieces of that size), reserved against the budget.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "read.h"
#include "store.h"
#include "virtualize.h"

/* Checks records first..first+n-1 of cluster ci, at file offset off (token layout and
 * policy none: laid out back to back; else a segment of pool `pool`, head `head`). */
static int check_extent(kvt_coll *c, uint32_t ci, uint32_t first, uint32_t n, uint64_t off, uint64_t span,
                        const kvt_seg *sg, uint8_t *buf, kvt_verify_t *out) {
    const kvt_layout *L = &c->L;
    uint32_t bad = 0;
    int rc = kvt_read_clamped(c, off, (size_t)span, buf, n);
    if (rc) return rc;
    if (sg) {
        kvt_unpad(L, buf, buf, kvt_run_pos(L, &c->pools.p[sg->pool], sg->head, 0, sg->n), sg->n);
        if (sg->head == 1) kvt_rec_reverse(L, buf, sg->n);
    }
    rc = kvt_check_run(c, KVT_READ_SKIP, ci, first, buf, n, off, &bad);
    out->records += n;
    out->damaged += bad;
    if (off + span > out->named_bytes) out->named_bytes = off + span;
    return rc;
}

static int verify_records(kvt_coll *c, uint8_t *buf, uint64_t cap, kvt_verify_t *out) {
    const kvt_layout *L = &c->L;
    int rc = 0;
    for (uint32_t j = 0; j < c->ncl && !rc; j++) {
        const kvt_cluster *k = &c->cl[j];
        out->in_dram += k->pend;
        if (token(c)) { /* runs of consecutive ids, unpadded, read in pieces of cap bytes */
            for (uint32_t i0 = 0; i0 < k->n - k->pend && !rc;) {
                uint32_t i1 = token_run_end(k, i0);
                if (i1 > k->n - k->pend) i1 = k->n - k->pend;
                uint32_t m = i1 - i0 < cap / L->esz ? i1 - i0 : (uint32_t)(cap / L->esz);
                rc = check_extent(c, j, i0, m, token_offset(c, kvt_members(k)[i0]), (uint64_t)m * L->esz, NULL, buf,
                                  out);
                i0 += m;
            }
            continue;
        }
        uint32_t base = 0;
        for (uint32_t g = 0; g < k->nseg && !rc; g++) {
            const kvt_seg *sg = &k->segs[g];
            const kvt_pool *pl = &c->pools.p[sg->pool];
            if (sg->n)
                rc = check_extent(c, j, base, sg->n, kvt_run_offset(L, pl, sg->head, 0, sg->n),
                                  kvt_run_span(L, pl, sg->head, 0, sg->n), sg, buf, out);
            base += sg->n;
        }
        out->records -= k->dead; /* format 3: dead slots were read, and hold no record of it */
    }
    return rc;
}

int kvt_coll_verify(kvt_coll *c, kvt_verify_t *out) {
    kvt_clear_error();
    kvt_read_begin();
    memset(out, 0, sizeof *out);
    kvt_store *s = c->st;
    LOCK(s);
    int was_parked, peek = kvt_peek_begin(c, &was_parked), rc = peek;
    uint8_t *buf = NULL;
    uint64_t cap = c->L.pool_bytes > KVT_DATA_HEADER ? c->L.pool_bytes : KVT_DATA_HEADER;
    uint64_t need = cap + kvt_file_read_scratch(c->f, 0, (size_t)cap) + KVT_IO_ALIGN;
    if (!rc) rc = kvt_mem_reserve(&s->mem, need);
    int reserved = !rc;
    if (!rc && !(buf = malloc(cap))) rc = kvt_fail(ENOMEM, "verify: out of memory");
    out->file_bytes = kvt_file_size(c->f);
    if (!rc) { /* the header page */
        int fields_ok;
        rc = kvt_read_clamped(c, 0, KVT_DATA_HEADER, buf, 0);
        if (!rc)
            out->header_damaged = kvt_data_header_check(&c->L, &c->p, buf, &fields_ok, &out->header_checksummed) != 0;
    }
    c->ndmg_cl = 0;
    if (!rc) rc = verify_records(c, buf, cap, out);
    c->ndmg_cl = 0;
    if (reserved) kvt_mem_release(&s->mem, need);
    free(buf);
    if (!peek) kvt_peek_end(c, was_parked);
    UNLOCK(s);
    return rc;
}
