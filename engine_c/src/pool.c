/*
 * pool.c — record encoding and pool allocation.
 *
 * Invariants:
 * 1. A record's bytes depend only on (id, key, value) and the layout; its CRC covers them all.
 * 2. For every pool, used[0] + used[1] <= its capacity, and a head with used > 0 is owned or
 *    retired.
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

/* A table array resized: a failed shrink keeps the larger block, a failed growth clears *ok. */
static void *resize(void *ptr, size_t bytes, int grow, int *ok) {
    if (!*ok) return ptr;
    void *q = realloc(ptr, bytes);
    if (!q && grow) *ok = 0;
    return q ? q : ptr;
}

int kvt_pools_reserve(kvt_pools *P, uint32_t need) {
    if (need == P->cap || !need) return 0;
    if (need < P->n) return kvt_fail(KVT_EINVAL, "pool table: %u pools do not fit in %u", P->n, need);
    /* avail lists a pool once (KVT_POOL_LISTED): entries past the table go (a table cut) */
    uint32_t keep = 0;
    for (uint32_t i = 0; i < P->navail; i++)
        if (P->avail[i] < need && keep < need) P->avail[keep++] = P->avail[i];
    P->navail = keep;
    int ok = 1, grow = need > P->cap;
    P->p = resize(P->p, (size_t)need * sizeof *P->p, grow, &ok);
    P->avail = resize(P->avail, (size_t)need * sizeof *P->avail, grow, &ok);
    P->st = resize(P->st, need, grow, &ok);
    /* free runs lie between live pools: at most one more than the pools */
    P->runs = resize(P->runs, ((size_t)need + 1) * sizeof *P->runs, grow, &ok);
    if (!ok) return kvt_fail(ENOMEM, "pool table: out of memory"); /* arrays grown so far are just larger */
    if (grow) memset(P->st + P->cap, 0, need - P->cap);
    P->cap = need;
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

/* Table slot idx holds pool v, its heads in states st (fresh bits included); whether it is
 * listed in avail stays as it was (the list still holds it). */
static void put_pool(kvt_pools *P, uint32_t idx, kvt_pool v, unsigned st) {
    P->p[idx] = v;
    P->st[idx] = (uint8_t)((P->st[idx] & KVT_POOL_LISTED) | st);
}

void kvt_pools_blank(kvt_pools *P, uint32_t pool) { put_pool(P, pool, (kvt_pool){{0, 0}, 0, 0}, 0); }

void kvt_pools_own(kvt_pools *P, uint32_t pool, uint32_t head) {
    kvt_head_set(P, pool, head, KVT_HEAD_OWNED);
    P->st[pool] |= (uint8_t)KVT_POOL_FRESH(head);
}

/* A table slot for a new pool: a given-back one, else the next. */
static int new_slot(kvt_pools *P, uint32_t *idx) {
    if (P->nspare) { /* given-back slots are chained through their base field */
        *idx = P->spare_head;
        P->spare_head = P->p[*idx].base;
        P->nspare--;
    } else if (P->n < P->cap) {
        *idx = P->n++;
        P->st[*idx] = 0; /* a slot past a cut table may keep stale bits */
    } else
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
    put_pool(P, idx, (kvt_pool){{0, 0}, base, units}, 0);
    *pool = idx;
    return 0;
}

int kvt_pools_append_fixed(kvt_pools *P, const kvt_layout *L, uint32_t *pool) {
    if (P->n >= P->cap) return kvt_fail(KVT_EINVAL, "pool table full (reserve first)");
    *pool = P->n++;
    P->st[*pool] = 0;
    put_pool(P, *pool, (kvt_pool){{0, 0}, 0, 0}, 0);
    kvt_pools_fixed(P, L, *pool);
    return 0;
}

static void push_avail(kvt_pools *P, uint32_t pool) {
    /* listed once: stale entries (the pool changed since) are filtered when popped */
    if (P->st[pool] & KVT_POOL_LISTED || P->navail >= P->cap) return;
    P->st[pool] |= KVT_POOL_LISTED;
    P->avail[P->navail++] = pool;
}

/* Takes entry i out of avail (the last one takes its place). */
static void unlist(kvt_pools *P, uint32_t i) {
    uint32_t idx = P->avail[i];
    if (idx < P->n) P->st[idx] &= (uint8_t)~KVT_POOL_LISTED;
    P->avail[i] = P->avail[--P->navail];
}

static int is_own(const kvt_seg *own, uint32_t nown, uint32_t pool) {
    for (uint32_t g = 0; g < nown; g++)
        if (own[g].pool == pool) return 1;
    return 0;
}

int kvt_pools_claim(kvt_pools *P, const kvt_layout *L, const kvt_seg *own, uint32_t nown, uint32_t need, uint32_t live,
                    kvt_seg *seg) {
    /* Look at the most recently freed pools; drop stale entries, skip pools whose only free
     * head would pair a cluster with itself (another cluster can still use them), and
     * (format 3) pools too small for what the claim writes and a quarter more: a pool made
     * for one cluster keeps half its size free, which a smaller partner (a split's moved
     * child) fills instead of a pool of its own (docs/design.md §2.2). */
    uint32_t want = P->sized ? (need ? need : 1) : 1, pair_want = P->sized ? want + want / 4 : 1;
    for (uint32_t i = P->navail, looked = 0; i-- > 0 && looked < 32; looked++) {
        uint32_t idx = P->avail[i];
        if (idx >= P->n) { /* stale: the table was cut since */
            unlist(P, i);
            continue;
        }
        kvt_pool *p = &P->p[idx];
        int h0 = kvt_head_state(P, idx, 0) == KVT_HEAD_FREE, h1 = kvt_head_state(P, idx, 1) == KVT_HEAD_FREE;
        if (!p->units || (!h0 && !h1) || kvt_pool_room(L, p) == 0) {
            unlist(P, i);
            continue;
        }
        if (is_own(own, nown, idx) || kvt_pool_room(L, p) < pair_want) continue;
        int head = h0 ? 0 : 1;
        kvt_pools_own(P, idx, (uint32_t)head);
        if (!h0 || !h1) unlist(P, i);
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
        put_pool(P, idx, (kvt_pool){{0, 0}, take_units(P, units), units}, 0);
    } else {
        put_pool(P, idx, (kvt_pool){{0, 0}, 0, 0}, 0);
        kvt_pools_fixed(P, L, idx);
    }
    kvt_pools_own(P, idx, 0);
    push_avail(P, idx);
    *seg = (kvt_seg){idx, 0, 0};
    return 0;
}

int kvt_pools_claim_pair(kvt_pools *P, const kvt_layout *L, uint32_t n0, uint32_t n1, kvt_seg *s0, kvt_seg *s1) {
    uint32_t a = UINT32_MAX;
    for (uint32_t i = P->navail, looked = 0; i-- > 0 && looked < 32 && a == UINT32_MAX; looked++) {
        uint32_t x = P->avail[i];
        if (x + 1 >= P->n) continue;
        if (kvt_head_state(P, x, 1) == KVT_HEAD_FREE && kvt_head_state(P, x + 1, 0) == KVT_HEAD_FREE &&
            kvt_pool_room(L, &P->p[x]) >= n0 && kvt_pool_room(L, &P->p[x + 1]) >= n1)
            a = x;
    }
    if (a == UINT32_MAX) {
        if (P->n + 2 > P->cap) return kvt_fail(KVT_EINVAL, "pool table full (reserve first)");
        uint32_t b = 0;
        (void)kvt_pools_append_fixed(P, L, &a); /* room checked above */
        (void)kvt_pools_append_fixed(P, L, &b);
        push_avail(P, a); /* their other heads are free for anyone */
        push_avail(P, b);
    }
    kvt_pools_own(P, a, 1);
    kvt_pools_own(P, a + 1, 0);
    *s0 = (kvt_seg){a, 1, 0};
    *s1 = (kvt_seg){a + 1, 0, 0};
    return 0;
}

/* Format 3: a pool whose heads are both free gives its units and its table slot back. */
static void release_pool(kvt_pools *P, uint32_t idx) {
    kvt_pool *p = &P->p[idx];
    give_units(P, p->base, p->units);
    put_pool(P, idx, (kvt_pool){{0, 0}, P->spare_head, 0}, 0);
    P->spare_head = idx;
    P->nspare++;
}

void kvt_pools_unclaim(kvt_pools *P, const kvt_seg *seg) {
    kvt_pool *p = &P->p[seg->pool];
    kvt_head_set(P, seg->pool, seg->head, KVT_HEAD_FREE);
    p->used[seg->head] = 0;
    P->st[seg->pool] &= (uint8_t)~KVT_POOL_FRESH(seg->head);
    if (P->sized && kvt_head_state(P, seg->pool, 1 - seg->head) == KVT_HEAD_FREE)
        release_pool(P, seg->pool);
    else
        push_avail(P, seg->pool);
}

void kvt_pools_retire(kvt_pools *P, const kvt_seg *seg) {
    if (P->st[seg->pool] & KVT_POOL_FRESH(seg->head)) { /* no catalog names it: free now */
        kvt_pools_unclaim(P, seg);
        return;
    }
    kvt_head_set(P, seg->pool, seg->head, KVT_HEAD_RETIRED);
    P->nretired++;
}

void kvt_pools_committed(kvt_pools *P, uint32_t capture) {
    if (capture != P->captures || !P->nretired) return;
    for (uint32_t i = 0; i < P->n; i++)
        for (uint32_t h = 0; h < 2; h++)
            if (kvt_head_state(P, i, h) == KVT_HEAD_DUE) {
                P->nretired--;
                kvt_pools_unclaim(P, &(kvt_seg){i, h, 0});
            }
}

void kvt_pools_push_free(kvt_pools *P, const kvt_layout *L, uint32_t from) {
    for (uint32_t i = from; i < P->n; i++) {
        int free0 = kvt_head_state(P, i, 0) == KVT_HEAD_FREE, free1 = kvt_head_state(P, i, 1) == KVT_HEAD_FREE;
        if (P->p[i].units && (free0 || free1) && kvt_pool_room(L, &P->p[i]) > 0) push_avail(P, i);
    }
}

uint32_t kvt_pools_named(kvt_pools *P) {
    for (uint32_t i = 0; i < P->n; i++) {
        P->st[i] &= (uint8_t) ~(KVT_POOL_FRESH(0) | KVT_POOL_FRESH(1));
        for (uint32_t h = 0; h < 2; h++)
            if (kvt_head_state(P, i, h) == KVT_HEAD_RETIRED) kvt_head_set(P, i, h, KVT_HEAD_DUE);
    }
    return ++P->captures;
}

static int by_base(const void *a, const void *b) {
    uint32_t x = ((const kvt_run *)a)->base, y = ((const kvt_run *)b)->base;
    return x < y ? -1 : x > y;
}

int kvt_pools_rebuild(kvt_pools *P, const kvt_layout *L) {
    P->navail = 0;
    P->nretired = 0;
    for (uint32_t i = 0; i < P->n; i++) { /* loaded heads are the catalog's: none fresh */
        P->st[i] &= (uint8_t)(3u | 3u << 2);
        for (uint32_t h = 0; h < 2; h++)
            if (kvt_head_state(P, i, h) != KVT_HEAD_OWNED) {
                kvt_head_set(P, i, h, KVT_HEAD_FREE);
                P->p[i].used[h] = 0;
            }
    }
    if (P->sized) { /* the free runs: what no owned pool covers; unowned pools are given back */
        P->nruns = P->nspare = 0;
        uint32_t nlive = 0;
        for (uint32_t i = 0; i < P->n; i++) {
            kvt_pool *p = &P->p[i];
            if (p->units && P->st[i])
                P->runs[nlive++] = (kvt_run){p->base, p->units};
            else {
                put_pool(P, i, (kvt_pool){{0, 0}, P->spare_head, 0}, 0);
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
    free(P->st);
    free(P->runs);
    memset(P, 0, sizeof *P);
}
