/*
 * pool.c — record encoding and pool allocation.
 *
 * Invariants:
 * 1. A record's bytes depend only on (id, key, value) and the layout; its CRC covers them all.
 * 2. For every pool, used[0] + used[1] <= its capacity, and a head with used > 0 has an owner.
 * 3. Pools are whole I/O-alignment units (pool_bytes, or format 3's KVT_POOL_UNIT), so pools
 *    never share an aligned page and direct reads of one pool never touch bytes another writer
 *    is appending.
 * 4. Appends only write slots past a head's used count: data already written never moves.
 * 5. In a padded layout (rpp > 0) no record crosses a KVT_LAYOUT_PAGE boundary, pool_cap is a
 *    whole number of pages of rpp records; padding inside one write is written as zeros, and
 *    no reader ever takes padding for a record.
 * 6. A head is reused only when no catalog that may commit names it: a head released after a
 *    checkpoint named it waits, retired, for a later commit; one claimed since the last
 *    checkpoint was captured (fresh) is free at once.
 * 7. Format 3: the units of live pools and the free runs never overlap and together cover
 *    units 0..end-1; runs are sorted and coalesced, and none ends at `end` (the file's used
 *    extent shrinks instead). A pool gives its units back only when both heads are free, so
 *    units a committed catalog names (a retired head's) are never reused before the commit.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "io.h"
#include "pool.h"

void kvt_layout_init(kvt_layout *L, uint32_t dim, uint32_t value_dim, int dtype, uint32_t max_cluster, uint32_t format,
                     int padded) {
    L->dim = dim;
    L->value_dim = value_dim;
    L->elsize = dtype == KVT_F16 ? 2 : 4;
    L->key_bytes = dim * L->elsize;
    L->value_bytes = value_dim * L->elsize;
    L->esz = (uint32_t)kvt_round_up(KVT_REC_HEADER + L->key_bytes + L->value_bytes, 8);
    L->format = format;
    L->log = !padded;
    /* padding pays when it wastes little: at most an eighth of each page */
    L->rpp = format >= 2 && padded && L->esz <= KVT_LAYOUT_PAGE && (KVT_LAYOUT_PAGE % L->esz) * 8 <= KVT_LAYOUT_PAGE
                 ? KVT_LAYOUT_PAGE / L->esz
                 : 0;
    if (L->rpp) {
        uint64_t pages = ((uint64_t)2 * max_cluster + L->rpp - 1) / L->rpp;
        L->pool_bytes = kvt_round_up(pages * KVT_LAYOUT_PAGE, KVT_IO_ALIGN);
        L->pool_cap = (uint32_t)(L->pool_bytes / KVT_LAYOUT_PAGE * L->rpp);
    } else {
        L->pool_bytes = kvt_round_up((uint64_t)2 * max_cluster * L->esz, KVT_IO_ALIGN);
        L->pool_cap = (uint32_t)(L->pool_bytes / L->esz);
    }
}

void kvt_unpad(const kvt_layout *L, uint8_t *dst, const uint8_t *src, uint32_t pos, uint32_t n) {
    if (!L->rpp) {
        if (dst != src && n) memmove(dst, src, (size_t)n * L->esz);
        return;
    }
    /* page by page, front to back: with dst <= src no chunk overwrites one not yet moved */
    uint32_t in_page = pos % L->rpp;
    while (n) {
        uint32_t k = L->rpp - in_page < n ? L->rpp - in_page : n;
        if (dst != src) memmove(dst, src, (size_t)k * L->esz);
        dst += (size_t)k * L->esz;
        src += (size_t)(L->rpp - in_page) * L->esz + (KVT_LAYOUT_PAGE - (size_t)L->rpp * L->esz);
        n -= k;
        in_page = 0;
    }
}

static uint32_t rec_crc(const kvt_layout *L, const uint8_t *rec) {
    uint32_t c = kvt_crc32c(0, rec, 8);
    return kvt_crc32c(c, rec + KVT_REC_HEADER, L->key_bytes + L->value_bytes);
}

void kvt_rec_encode(const kvt_layout *L, uint8_t *dst, int64_t id, const void *key, const void *value) {
    memcpy(dst, &id, 8);
    memcpy(dst + KVT_REC_HEADER, key, L->key_bytes);
    if (L->value_bytes) memcpy(dst + KVT_REC_HEADER + L->key_bytes, value, L->value_bytes);
    size_t used = KVT_REC_HEADER + L->key_bytes + L->value_bytes;
    memset(dst + used, 0, L->esz - used);
    uint32_t crc = rec_crc(L, dst), size = L->esz;
    memcpy(dst + 8, &crc, 4);
    memcpy(dst + 12, &size, 4);
}

int kvt_rec_check(const kvt_layout *L, const uint8_t *rec, int64_t *id) {
    uint32_t crc, size;
    memcpy(id, rec, 8);
    memcpy(&crc, rec + 8, 4);
    memcpy(&size, rec + 12, 4);
    if (size != L->esz || crc != rec_crc(L, rec)) return KVT_ECORRUPT;
    return 0;
}

void kvt_rec_reverse(const kvt_layout *L, uint8_t *recs, uint32_t n) {
    uint8_t tmp[KVT_REC_HEADER + 2 * 4096 * 4 + 8];
    for (uint32_t i = 0, j = n ? n - 1 : 0; i < j; i++, j--) {
        uint8_t *a = recs + (size_t)i * L->esz, *b = recs + (size_t)j * L->esz;
        memcpy(tmp, a, L->esz);
        memcpy(a, b, L->esz);
        memcpy(b, tmp, L->esz);
    }
}

/* The header page's trailer: a tag and the CRC-32C of every byte of the page before it, so
 * that damage anywhere in the page is found (the fields' own CRC covers only the fields). Files
 * written before the trailer existed have zeros there and everywhere past their fields. */
#define HEADER_TAG     "KVTHPAGE"
#define HEADER_TRAILER 12u

void kvt_data_header(const kvt_layout *L, const kvt_coll_params *p, uint8_t page[KVT_DATA_HEADER]) {
    memset(page, 0, KVT_DATA_HEADER);
    kvt_wbuf w = {0};
    kvt_wbuf_put(&w, KVT_DATA_MAGIC, 8);
    kvt_wbuf_u32(&w, L->format);
    kvt_wbuf_u32(&w, L->dim);
    kvt_wbuf_u32(&w, L->value_dim);
    kvt_wbuf_u32(&w, (uint32_t)p->dtype);
    kvt_wbuf_u32(&w, L->esz);
    kvt_wbuf_u64(&w, L->pool_bytes);
    /* only a non-default layout is recorded, so the headers of clustered files (all files of
     * format 1 before layouts existed) stay byte for byte what they were */
    if (L->log) kvt_wbuf_u32(&w, (uint32_t)p->layout);
    if (L->format >= 2) kvt_wbuf_u32(&w, L->rpp);
    uint32_t crc = kvt_crc32c(0, w.p, w.len);
    kvt_wbuf_u32(&w, crc);
    if (!w.oom) memcpy(page, w.p, w.len);
    free(w.p);
    uint8_t *t = page + KVT_DATA_HEADER - HEADER_TRAILER;
    memcpy(t, HEADER_TAG, 8); // NOLINT(bugprone-not-null-terminated-result): 8 bytes of tag, no string
    crc = kvt_crc32c(0, page, KVT_DATA_HEADER - 4);
    memcpy(t + 8, &crc, 4);
}

uint32_t kvt_data_header_version(const uint8_t page[KVT_DATA_HEADER]) {
    uint32_t version;
    if (memcmp(page, KVT_DATA_MAGIC, 8) != 0) return 0;
    memcpy(&version, page + 8, 4);
    return version;
}

/* The page past the fields (the first 64 bytes, compared with what they should be): its
 * trailer's checksum, or for an older file, zeros up to the end. */
static int header_page_ok(const uint8_t page[KVT_DATA_HEADER], int *checksummed) {
    const uint8_t *t = page + KVT_DATA_HEADER - HEADER_TRAILER;
    *checksummed = memcmp(t, HEADER_TAG, 8) == 0;
    if (*checksummed) {
        uint32_t crc;
        memcpy(&crc, t + 8, 4);
        return crc == kvt_crc32c(0, page, KVT_DATA_HEADER - 4);
    }
    for (size_t i = 64; i < KVT_DATA_HEADER; i++)
        if (page[i]) return 0;
    return 1;
}

int kvt_data_header_check(const kvt_layout *L, const kvt_coll_params *p, const uint8_t page[KVT_DATA_HEADER],
                          int *fields_ok, int *checksummed) {
    uint8_t want[KVT_DATA_HEADER];
    *fields_ok = *checksummed = 0;
    if (memcmp(page, KVT_DATA_MAGIC, 8) != 0) return KVT_ECORRUPT;
    uint32_t version;
    memcpy(&version, page + 8, 4);
    if (version != L->format) return version >= 1 && version <= KVT_FORMAT_VERSION ? KVT_ECORRUPT : KVT_EFORMAT;
    kvt_data_header(L, p, want);
    *fields_ok = memcmp(page, want, 64) == 0;
    int page_ok = header_page_ok(page, checksummed);
    return *fields_ok && page_ok ? 0 : KVT_ECORRUPT;
}

int kvt_pools_reserve(kvt_pools *P, uint32_t need) {
    if (need <= P->cap) return 0;
    uint32_t cap = P->cap ? P->cap : 16;
    while (cap < need) cap *= 2;
    kvt_pool *p = realloc(P->p, (size_t)cap * sizeof *p);
    if (p) P->p = p;
    /* each pool appears at most twice in avail (pushed per freed head) and has two heads */
    uint32_t *a = p ? realloc(P->avail, (size_t)cap * 2 * sizeof *a) : NULL;
    if (a) P->avail = a;
    uint32_t *r = a ? realloc(P->retired, (size_t)cap * 2 * sizeof *r) : NULL;
    if (r) P->retired = r;
    uint8_t *f = r ? realloc(P->fresh, cap) : NULL;
    if (f) {
        P->fresh = f;
        memset(f + P->cap, 0, cap - P->cap);
    }
    /* free runs lie between pools: at most one more than the pools */
    kvt_run *u = f ? realloc(P->runs, ((size_t)cap + 1) * sizeof *u) : NULL;
    if (u) P->runs = u;
    if (!p || !a || !r || !f || !u) return kvt_fail(ENOMEM, "pool table: out of memory");
    P->cap = cap;
    return 0;
}

uint32_t kvt_pool_units(const kvt_layout *L, uint64_t records) {
    uint64_t bytes = L->rpp ? (records + L->rpp - 1) / L->rpp * KVT_LAYOUT_PAGE : records * L->esz;
    uint64_t units = (bytes + KVT_POOL_UNIT - 1) / KVT_POOL_UNIT;
    return units ? (uint32_t)units : 1;
}

void kvt_pools_fixed(kvt_pools *P, const kvt_layout *L, uint32_t n0) {
    uint32_t units = (uint32_t)(L->pool_bytes / KVT_POOL_UNIT);
    for (uint32_t i = n0; i < P->n; i++) {
        P->p[i].base = i * units;
        P->p[i].units = units;
    }
}

/* Format 3: units for a new pool, from the first free run that holds them, else the file's
 * end (invariant 7). */
static uint32_t take_units(kvt_pools *P, uint32_t units) {
    for (uint32_t i = 0; i < P->nruns; i++) {
        kvt_run *r = &P->runs[i];
        if (r->units < units) continue;
        uint32_t base = r->base;
        r->base += units;
        r->units -= units;
        if (!r->units) memmove(r, r + 1, (size_t)(--P->nruns - i) * sizeof *r);
        return base;
    }
    uint32_t base = P->end;
    P->end += units;
    if (P->end > P->peak) P->peak = P->end;
    return base;
}

static void give_units(kvt_pools *P, uint32_t base, uint32_t units) {
    if (base + units == P->end) { /* the end shrinks, and so does a run it then reaches */
        P->end = base;
        if (P->nruns && P->runs[P->nruns - 1].base + P->runs[P->nruns - 1].units == P->end)
            P->end = P->runs[--P->nruns].base;
        return;
    }
    uint32_t i = 0;
    while (i < P->nruns && P->runs[i].base < base) i++;
    int left = i > 0 && P->runs[i - 1].base + P->runs[i - 1].units == base;
    int right = i < P->nruns && base + units == P->runs[i].base;
    if (left && right) {
        P->runs[i - 1].units += units + P->runs[i].units;
        memmove(&P->runs[i], &P->runs[i + 1], (size_t)(--P->nruns - i) * sizeof *P->runs);
    } else if (left) {
        P->runs[i - 1].units += units;
    } else if (right) {
        P->runs[i].base = base;
        P->runs[i].units += units;
    } else {
        memmove(&P->runs[i + 1], &P->runs[i], (size_t)(P->nruns - i) * sizeof *P->runs);
        P->runs[i] = (kvt_run){base, units};
        P->nruns++;
    }
}

/* A table slot for a new pool: a given-back one, else the next. */
static int new_slot(kvt_pools *P, uint32_t *idx) {
    if (P->nspare) { /* given-back slots are chained through their base field */
        *idx = P->spare_head;
        P->spare_head = P->p[*idx].base;
        P->nspare--;
    } else if (P->n < P->cap)
        *idx = P->n++;
    else
        return kvt_fail(KVT_EINVAL, "pool table full (reserve first)");
    return 0;
}

int kvt_pools_append(kvt_pools *P, uint32_t units, uint32_t *pool) {
    uint32_t idx = 0;
    int rc = new_slot(P, &idx);
    if (rc) return rc;
    uint32_t base = P->end;
    P->end += units;
    if (P->end > P->peak) P->peak = P->end;
    P->p[idx] = (kvt_pool){{KVT_HEAD_FREE, KVT_HEAD_FREE}, {0, 0}, base, units};
    P->fresh[idx] = 0;
    *pool = idx;
    return 0;
}

static void push_avail(kvt_pools *P, uint32_t pool) {
    /* dedupe the common case; stale or repeated entries are filtered when popped */
    if (P->navail && P->avail[P->navail - 1] == pool) return;
    if (P->navail < 2 * P->cap) P->avail[P->navail++] = pool;
}

int kvt_pools_claim(kvt_pools *P, const kvt_layout *L, int32_t owner, uint32_t need, uint32_t live, kvt_seg *seg) {
    /* Look at the most recently freed pools; drop stale entries, skip pools whose only free
     * head would pair a cluster with itself (another cluster can still use them), and
     * (format 3) pools too small for what the claim writes and a quarter more: a pool made
     * for one cluster keeps half its size free, which a smaller partner (a split's moved
     * child) fills instead of a pool of its own (docs/design.md §2.2). */
    uint32_t want = P->sized ? (need ? need : 1) : 1, pair_want = P->sized ? want + want / 4 : 1;
    for (uint32_t i = P->navail, looked = 0; i-- > 0 && looked < 32; looked++) {
        uint32_t idx = P->avail[i];
        if (idx >= P->n) { /* stale: the table was cut since */
            P->avail[i] = P->avail[--P->navail];
            continue;
        }
        kvt_pool *p = &P->p[idx];
        int h0 = p->owner[0] == KVT_HEAD_FREE, h1 = p->owner[1] == KVT_HEAD_FREE;
        if (!p->units || (!h0 && !h1) || kvt_pool_room(L, p) == 0) {
            P->avail[i] = P->avail[--P->navail];
            continue;
        }
        int head = h0 && p->owner[1] != owner ? 0 : h1 && p->owner[0] != owner ? 1 : -1;
        if (head < 0 || kvt_pool_room(L, p) < pair_want) continue;
        p->owner[head] = owner;
        P->fresh[idx] |= (uint8_t)(1u << head);
        if (p->owner[1 - head] != KVT_HEAD_FREE) P->avail[i] = P->avail[--P->navail];
        *seg = (kvt_seg){idx, (uint32_t)head, 0};
        return 0;
    }
    uint32_t idx = 0;
    int rc = new_slot(P, &idx);
    if (rc) return rc;
    if (P->sized) { /* room for half as much again: to grow into, or for a smaller partner */
        uint64_t most = (uint64_t)L->pool_cap * 2 / 3, size = live < most ? live : most;
        if (size < want) size = want;
        uint64_t room = size + size / 2;
        uint32_t units = kvt_pool_units(L, room < L->pool_cap ? room : L->pool_cap);
        P->p[idx] = (kvt_pool){{owner, KVT_HEAD_FREE}, {0, 0}, take_units(P, units), units};
    } else {
        P->p[idx] = (kvt_pool){{owner, KVT_HEAD_FREE}, {0, 0}, 0, 0};
        kvt_pools_fixed(P, L, idx);
    }
    P->fresh[idx] = 1;
    push_avail(P, idx);
    *seg = (kvt_seg){idx, 0, 0};
    return 0;
}

int kvt_pools_claim_pair(kvt_pools *P, const kvt_layout *L, int32_t own0, uint32_t n0, int32_t own1, uint32_t n1,
                         kvt_seg *s0, kvt_seg *s1) {
    uint32_t a = UINT32_MAX;
    for (uint32_t i = P->navail, looked = 0; i-- > 0 && looked < 32 && a == UINT32_MAX; looked++) {
        uint32_t x = P->avail[i];
        if (x + 1 >= P->n) continue;
        const kvt_pool *p = &P->p[x], *q = &P->p[x + 1];
        /* never pair a cluster with itself in a pool: its two heads would meet */
        if (p->owner[1] == KVT_HEAD_FREE && q->owner[0] == KVT_HEAD_FREE && p->owner[0] != own0 &&
            q->owner[1] != own1 && kvt_pool_room(L, p) >= n0 && kvt_pool_room(L, q) >= n1)
            a = x;
    }
    if (a == UINT32_MAX) {
        if (P->n + 2 > P->cap) return kvt_fail(KVT_EINVAL, "pool table full (reserve first)");
        a = P->n;
        P->n += 2;
        P->p[a] = (kvt_pool){{KVT_HEAD_FREE, KVT_HEAD_FREE}, {0, 0}, 0, 0};
        P->p[a + 1] = (kvt_pool){{KVT_HEAD_FREE, KVT_HEAD_FREE}, {0, 0}, 0, 0};
        kvt_pools_fixed(P, L, a);
        P->fresh[a] = P->fresh[a + 1] = 0;
        push_avail(P, a); /* their other heads are free for anyone */
        push_avail(P, a + 1);
    }
    P->p[a].owner[1] = own0;
    P->p[a + 1].owner[0] = own1;
    P->fresh[a] |= 2;
    P->fresh[a + 1] |= 1;
    *s0 = (kvt_seg){a, 1, 0};
    *s1 = (kvt_seg){a + 1, 0, 0};
    return 0;
}

/* Format 3: a pool whose heads are both free gives its units and its table slot back. */
static void release_pool(kvt_pools *P, uint32_t idx) {
    kvt_pool *p = &P->p[idx];
    give_units(P, p->base, p->units);
    *p = (kvt_pool){{KVT_HEAD_FREE, KVT_HEAD_FREE}, {0, 0}, 0, 0};
    P->fresh[idx] = 0;
    p->base = P->spare_head;
    P->spare_head = idx;
    P->nspare++;
}

void kvt_pools_unclaim(kvt_pools *P, const kvt_seg *seg) {
    kvt_pool *p = &P->p[seg->pool];
    p->owner[seg->head] = KVT_HEAD_FREE;
    p->used[seg->head] = 0;
    P->fresh[seg->pool] &= (uint8_t) ~(1u << seg->head);
    if (P->sized && p->owner[1 - seg->head] == KVT_HEAD_FREE)
        release_pool(P, seg->pool);
    else
        push_avail(P, seg->pool);
}

void kvt_pools_retire(kvt_pools *P, const kvt_seg *seg) {
    if (P->fresh[seg->pool] & (1u << seg->head)) { /* no catalog names it: free now */
        kvt_pools_unclaim(P, seg);
        return;
    }
    P->p[seg->pool].owner[seg->head] = KVT_HEAD_RETIRED;
    P->retired[P->nretired++] = seg->pool << 1 | seg->head;
}

void kvt_pools_committed(kvt_pools *P, uint32_t count) {
    if (count > P->nretired) count = P->nretired;
    for (uint32_t i = 0; i < count; i++) {
        kvt_seg s = {P->retired[i] >> 1, P->retired[i] & 1, 0};
        if (s.pool < P->n && P->p[s.pool].owner[s.head] == KVT_HEAD_RETIRED) kvt_pools_unclaim(P, &s);
    }
    if (count) memmove(P->retired, P->retired + count, (P->nretired - count) * sizeof *P->retired);
    P->nretired -= count;
}

void kvt_pools_push_free(kvt_pools *P, const kvt_layout *L, uint32_t from) {
    for (uint32_t i = from; i < P->n; i++) {
        kvt_pool *p = &P->p[i];
        if (p->units && (p->owner[0] == KVT_HEAD_FREE || p->owner[1] == KVT_HEAD_FREE) && kvt_pool_room(L, p) > 0)
            push_avail(P, i);
    }
}

void kvt_pools_named(kvt_pools *P) {
    if (P->n) memset(P->fresh, 0, P->n);
}

static int by_base(const void *a, const void *b) {
    uint32_t x = ((const kvt_run *)a)->base, y = ((const kvt_run *)b)->base;
    return x < y ? -1 : x > y;
}

int kvt_pools_rebuild(kvt_pools *P, const kvt_layout *L) {
    P->navail = 0;
    P->nretired = 0;
    kvt_pools_named(P); /* loaded heads are the catalog's */
    for (uint32_t i = 0; i < P->n; i++)
        for (int h = 0; h < 2; h++)
            if (P->p[i].owner[h] < 0) {
                P->p[i].owner[h] = KVT_HEAD_FREE;
                P->p[i].used[h] = 0;
            }
    if (P->sized) { /* the free runs: what no owned pool covers; unowned pools are given back */
        P->nruns = P->nspare = 0;
        uint32_t nlive = 0;
        for (uint32_t i = 0; i < P->n; i++) {
            kvt_pool *p = &P->p[i];
            if (p->units && (p->owner[0] >= 0 || p->owner[1] >= 0))
                P->runs[nlive++] = (kvt_run){p->base, p->units};
            else {
                *p = (kvt_pool){{KVT_HEAD_FREE, KVT_HEAD_FREE}, {0, 0}, P->spare_head, 0};
                P->spare_head = i;
                P->nspare++;
            }
        }
        /* runs[] holds the live pools for a moment: sorted, their gaps become the free runs,
         * written in place (gap i goes to a slot <= i, after live pool i is read) */
        if (nlive) qsort(P->runs, nlive, sizeof *P->runs, by_base); /* runs is NULL in an empty table */
        uint32_t at = 0, nfree = 0;
        for (uint32_t i = 0; i < nlive; i++) {
            kvt_run lv = P->runs[i];
            if (lv.base < at) return KVT_ECORRUPT; /* two pools overlap */
            if (lv.base > at) P->runs[nfree++] = (kvt_run){at, lv.base - at};
            if (lv.base + lv.units > at) at = lv.base + lv.units;
        }
        P->nruns = nfree;
        P->end = at;
        if (P->peak < at) P->peak = at;
    }
    kvt_pools_push_free(P, L, 0);
    return 0;
}

void kvt_pools_free(kvt_pools *P) {
    free(P->p);
    free(P->avail);
    free(P->retired);
    free(P->fresh);
    free(P->runs);
    memset(P, 0, sizeof *P);
}
