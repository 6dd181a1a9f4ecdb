/*
 * read.c — reading clusters: where a cluster's records are (its extents, in either layout),
 * merging nearby extents into one request, checking them against the id map, and handing
 * them, cached or freshly read, to a visitor.
 *
 * Invariants:
 * 1. A cached cluster's records equal its live records on flash plus its pending buffer, in
 *    order.
 * 2. Every record read is checked against the id map (store.c 2) before anyone sees it: the
 *    map names its cluster, or (format 3) the slot is dead (its record, intact, belongs to
 *    another cluster now); its id is above the previous slot's (ids ascend along a cluster's
 *    slots, so a record of the cluster in another's slot is found); and live and dead slots
 *    add up to what the directory says. A mismatch is KVT_ECORRUPT naming the ids the id map
 *    puts there (a slot's by its rank among the cluster's ids), never silent garbage. In skip mode
 *    (kvtier.h, kvt_set_on_corrupt) the damaged records are listed and left out, and their
 *    cluster is not cached.
 * 3. The read buffers are reserved against the budget before the reads are issued.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "read.h"
#include "store.h"

/* ---- damaged records ---------------------------------------------------------------------- */

int kvt_read_begin(void) {
    kvt_unreadable_clear();
    return kvt_on_corrupt() == KVT_ON_CORRUPT_SKIP ? KVT_READ_SKIP : KVT_READ_RAISE;
}

/* The id of an intact record of the collection, else -1. */
static int64_t intact_id(const kvt_coll *c, const uint8_t *rec) {
    int64_t id;
    return !kvt_rec_check(&c->L, rec, &id) && id >= 0 && (uint64_t)id < c->n ? id : -1;
}

/* Whether record i of a run of consecutive slots comes after record i-1 in id order (store.c
 * 2); a damaged record i-1 orders nothing. The raw id is compared first, so that an intact
 * run costs one checksum a record. */
static int in_order(const kvt_coll *c, const uint8_t *recs, uint32_t i, int64_t id) {
    if (!i) return 1;
    int64_t prev;
    memcpy(&prev, recs + (size_t)(i - 1) * c->L.esz, 8);
    return prev < id || intact_id(c, recs + (size_t)(i - 1) * c->L.esz) < 0;
}

int kvt_rec_ok(const kvt_coll *c, uint32_t ci, const uint8_t *recs, uint32_t i) {
    int64_t id = intact_id(c, recs + (size_t)i * c->L.esz);
    return id >= 0 && kvt_loc(c, id) == ci && in_order(c, recs, i, id);
}

/* Format 3: 1 if record i of a run of cluster ci is intact and in order but the id map puts
 * it in another cluster: a dead slot (a split moved that record to the other child). */
int kvt_slot_dead(const kvt_coll *c, uint32_t ci, const uint8_t *recs, uint32_t i) {
    if (!c->cl[ci].dead) return 0;
    int64_t id = intact_id(c, recs + (size_t)i * c->L.esz);
    return id >= 0 && kvt_loc(c, id) != ci && in_order(c, recs, i, id);
}

int kvt_cluster_damaged(const kvt_coll *c, uint32_t ci) {
    if (c->ndmg_cl > KVT_DMG_SLOTS) return 1;
    for (uint32_t i = 0; i < c->ndmg_cl; i++)
        if (c->dmg_cl[i] == ci) return 1;
    return 0;
}

/* "3, 7-9, 12" for ascending ids, then ", ..." when there were more than shown. */
static void format_ids(char *buf, size_t cap, const int64_t *ids, uint32_t n, uint64_t total) {
    size_t at = 0;
    buf[0] = '\0';
    for (uint32_t i = 0; i < n && at + 1 < cap;) {
        uint32_t j = i;
        while (j + 1 < n && ids[j + 1] == ids[j] + 1) j++;
        int w = j > i ? snprintf(buf + at, cap - at, "%s%lld-%lld", i ? ", " : "", (long long)ids[i], (long long)ids[j])
                      : snprintf(buf + at, cap - at, "%s%lld", i ? ", " : "", (long long)ids[i]);
        at += w > 0 ? (size_t)w : 0;
        i = j + 1;
    }
    if (total > n && at + 6 < cap) (void)snprintf(buf + at, cap - at, ", ...");
}

/* A run's positions: intact and live (RUN_OK, with its id), a dead slot, or damaged; and the
 * ids of the nearest intact records before and after each (-1 and n past the run's ends). */
enum { RUN_BAD = 0, RUN_OK = 1, RUN_DEAD = 2 };
typedef struct run_map {
    uint8_t *st;
    int64_t *id, *lo, *hi;
} run_map;

static int map_run(const kvt_coll *c, uint32_t ci, const uint8_t *recs, uint32_t n, run_map *m) {
    m->st = malloc((size_t)n + 1);
    m->id = malloc((size_t)n * 24 + 8);
    if (!m->st || !m->id) return -1;
    m->lo = m->id + n;
    m->hi = m->lo + n;
    int64_t last = -1;
    for (uint32_t i = 0; i < n; i++) {
        m->st[i] = kvt_rec_ok(c, ci, recs, i) ? RUN_OK : kvt_slot_dead(c, ci, recs, i) ? RUN_DEAD : RUN_BAD;
        m->id[i] = m->st[i] ? intact_id(c, recs + (size_t)i * c->L.esz) : -1;
        m->lo[i] = last;
        if (m->st[i]) last = m->id[i];
    }
    last = (int64_t)c->n;
    for (uint32_t i = n; i-- > 0;) {
        m->hi[i] = last;
        if (m->st[i]) last = m->id[i];
    }
    return 0;
}

/* Whether cluster ci's live id of rank r, not among the run's intact records, sat in a damaged
 * position of the run (slots first..): its slot is r plus the dead slots before it (store.c
 * 2), so r without dead slots, else one of r..r+dead between the intact ids around it. */
static int names(const kvt_coll *c, uint32_t ci, uint32_t first, uint32_t n, const run_map *m, uint64_t r, int64_t id) {
    if (!n) return 0;
    uint64_t dead = c->cl[ci].dead, a = r > first ? r : first,
             b = r + dead < first + n - 1ull ? r + dead : first + n - 1ull;
    for (uint64_t s = a; s <= b; s++) {
        uint64_t p = s - first;
        if (m->st[p] == RUN_BAD && (!dead || (m->lo[p] < id && id < m->hi[p]))) return 1;
    }
    return 0;
}

/* A run with a damaged record: the ids the id map puts at its damaged positions, found in one
 * pass over the id map by rank (damage is rare; the engine keeps no map from positions to ids). */
int kvt_damaged_run(kvt_coll *c, int mode, uint32_t ci, uint32_t first_idx, const uint8_t *recs, uint32_t n,
                    uint64_t off, uint32_t *bad) {
    enum { SHOWN = 24 };
    int64_t shown[SHOWN];
    uint32_t nshown = 0, rejects = 0, q = 0;
    uint64_t named = 0, rank = 0;
    run_map m;
    int mapped = map_run(c, ci, recs, n, &m) == 0;
    for (uint32_t i = 0; mapped && i < n; i++) rejects += m.st[i] == RUN_BAD;
    for (uint64_t id = 0; mapped && id < c->n; id++) {
        if (kvt_loc(c, id) != ci) continue;
        uint64_t r = rank++;
        if (r >= (uint64_t)first_idx + n) break;
        if (r + c->cl[ci].dead < first_idx) continue;
        while (q < n && (m.st[q] != RUN_OK || m.id[q] < (int64_t)id)) q++;
        if ((q < n && m.id[q] == (int64_t)id) || !names(c, ci, first_idx, n, &m, r, (int64_t)id)) continue;
        named++;
        if (nshown < SHOWN) shown[nshown++] = (int64_t)id;
        if (mode != KVT_READ_OWN) kvt_unreadable_add(c->no, (int64_t)id);
    }
    if (!mapped) rejects = n; /* out of memory naming them: every record counts as damaged */
    free(m.st);
    free(m.id);
    c->ctr.damaged_reads += rejects;
    if (c->ndmg_cl < KVT_DMG_SLOTS)
        c->dmg_cl[c->ndmg_cl++] = ci;
    else
        c->ndmg_cl = KVT_DMG_SLOTS + 1; /* too many to list: every cluster counts as damaged */
    if (mode == KVT_READ_SKIP) {
        if (bad) *bad = rejects;
        return 0;
    }
    char ids[256];
    format_ids(ids, sizeof ids, shown, nshown, named);
    return kvt_fail(KVT_ECORRUPT,
                    "%s: collection %u: %llu damaged record%s (id%s %s) in the %u read from offset %llu: "
                    "checksum or catalog mismatch",
                    kvt_file_path(c->f), c->no, (unsigned long long)named, named == 1 ? "" : "s", named == 1 ? "" : "s",
                    named ? ids : "none: positions the id map does not name", n, (unsigned long long)off);
}

int kvt_check_run(kvt_coll *c, int mode, uint32_t ci, uint32_t first_idx, const uint8_t *recs, uint32_t n, uint64_t off,
                  uint32_t *bad) {
    if (bad) *bad = 0;
    for (uint32_t i = 0; i < n; i++)
        if (!kvt_rec_ok(c, ci, recs, i)) return kvt_damaged_run(c, mode, ci, first_idx, recs, n, off, bad);
    return 0;
}

int kvt_read_clamped(kvt_coll *c, uint64_t off, size_t len, void *dst, uint64_t entries) {
    uint64_t size = kvt_file_size(c->f);
    size_t have = off >= size ? 0 : (size_t)(size - off < len ? size - off : len);
    if (have < len) memset((uint8_t *)dst + have, 0, len - have);
    return have ? kvt_file_read(c->f, off, have, dst, entries) : 0;
}

/* ---- reading clusters --------------------------------------------------------------------- */

typedef kvt_extent extent;

uint32_t kvt_cluster_extents(const kvt_coll *c, const kvt_cluster *k, const kvt_seg *segs, uint32_t nseg,
                             kvt_extent *out) {
    const kvt_layout *L = &c->L;
    uint32_t m = 0;
    if (token(c)) { /* runs of consecutive ids in the log, records unpadded in place */
        for (uint32_t i0 = 0; i0 < k->n;) {
            uint32_t i1 = token_run_end(k, i0);
            out[m++] = (kvt_extent){token_offset(c, kvt_members(k)[i0]),
                                    (uint64_t)(i1 - i0) * L->esz,
                                    (uint64_t)i0 * L->esz,
                                    i1 - i0,
                                    i0,
                                    0};
            i0 = i1;
        }
        return m;
    }
    uint32_t base = 0;
    uint64_t boff = 0;
    for (uint32_t g = 0; g < nseg; g++) {
        const kvt_seg *sg = &segs[g];
        const kvt_pool *pl = &c->pools.p[sg->pool];
        uint64_t len = kvt_run_span(L, pl, sg->head, 0, sg->n);
        if (sg->n) out[m++] = (kvt_extent){kvt_run_offset(L, pl, sg->head, 0, sg->n), len, boff, sg->n, base, 0};
        base += sg->n;
        boff += len;
    }
    return m;
}

void kvt_unpack_segs(const kvt_coll *c, const kvt_seg *segs, uint32_t nseg, uint8_t *buf) {
    const kvt_layout *L = &c->L;
    uint64_t boff = 0;
    uint32_t base = 0;
    for (uint32_t g = 0; g < nseg; g++) {
        const kvt_seg *sg = &segs[g];
        const kvt_pool *pl = &c->pools.p[sg->pool];
        uint8_t *dst = buf + (size_t)base * L->esz;
        if (sg->n) {
            kvt_unpad(L, dst, buf + boff, kvt_run_pos(L, pl, sg->head, 0, sg->n), sg->n);
            if (sg->head == 1) kvt_rec_reverse(L, dst, sg->n);
        }
        boff += kvt_run_span(L, pl, sg->head, 0, sg->n);
        base += sg->n;
    }
}

/* The records of slots 0..n-1 of cluster ci that are intact and live, moved to the front in
 * order; returns how many. */
static uint32_t keep_intact(kvt_coll *c, uint32_t ci, uint8_t *buf, uint32_t n) {
    const kvt_layout *L = &c->L;
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *rec = buf + (size_t)i * L->esz;
        if (!kvt_rec_ok(c, ci, buf, i)) continue; /* record i-1 is still in place (m <= i) */
        if (m != i) memmove(buf + (size_t)m * L->esz, rec, L->esz);
        m++;
    }
    return m;
}

int kvt_settle_segs(kvt_coll *c, int mode, uint32_t ci, const kvt_seg *segs, uint32_t nseg, uint8_t *buf,
                    uint32_t *kept) {
    const kvt_layout *L = &c->L;
    const kvt_cluster *k = &c->cl[ci];
    uint32_t flash = k->n - k->pend, slots = 0, live = 0, dead = 0, bad = 0;
    kvt_unpack_segs(c, segs, nseg, buf);
    for (uint32_t g = 0; g < nseg; g++) slots += segs[g].n;
    for (uint32_t i = 0; i < slots; i++) {
        if (kvt_rec_ok(c, ci, buf, i))
            live++;
        else if (kvt_slot_dead(c, ci, buf, i))
            dead++;
        else
            bad++;
    }
    if (kept) *kept = flash;
    if (!bad && live == flash && dead == k->dead) { /* intact: the live records, in order */
        if (dead) {
            keep_intact(c, ci, buf, slots);
            kvt_io_count_dead(&c->st->io, dead, (uint64_t)dead * L->esz);
        }
        return 0;
    }
    uint32_t rejects = 0; /* the ids the map puts in these slots whose records are not there */
    uint64_t off = nseg ? kvt_run_offset(L, &c->pools.p[segs[0].pool], segs[0].head, 0, segs[0].n ? segs[0].n : 1) : 0;
    int rc = kvt_damaged_run(c, mode, ci, 0, buf, slots, off, &rejects);
    if (rc) return rc;
    uint32_t m = keep_intact(c, ci, buf, slots);
    if (kept) *kept = m;
    return 0;
}

/* Bytes a buffer needs to read cluster k into: its segments' spans stacked (dead slots and
 * padding included), then its pending records. */
static uint64_t read_buffer_bytes(const kvt_coll *c, const kvt_cluster *k) {
    uint64_t b = (uint64_t)(k->n - k->pend) * c->L.esz;
    if (!token(c)) {
        b += (uint64_t)k->dead * c->L.esz;
        for (uint32_t g = 0; g < k->nseg; g++) {
            const kvt_seg *sg = &k->segs[g];
            b += kvt_run_span(&c->L, &c->pools.p[sg->pool], sg->head, 0, sg->n) - (uint64_t)sg->n * c->L.esz;
        }
    }
    return b + (uint64_t)k->pend * c->L.esz;
}

/* ... as a record count, for a cache entry */
uint32_t kvt_read_buffer_records(const kvt_coll *c, const kvt_cluster *k) {
    return (uint32_t)((read_buffer_bytes(c, k) + c->L.esz - 1) / c->L.esz);
}

/* A cluster's segments, read as stacked by its extents, become its records in order in the
 * same buffer and are checked. *kept: its records on flash that are intact; in skip mode the
 * damaged ones are left out, the rest moved to the front in order. */
static int finish_cluster(kvt_coll *c, uint32_t ci, uint8_t *buf, uint32_t *kept) {
    kvt_cluster *k = &c->cl[ci];
    uint32_t flash = k->n - k->pend, bad = 0;
    *kept = flash;
    if (!token(c)) return kvt_settle_segs(c, c->read_mode, ci, k->segs, k->nseg, buf, kept);
    int rc = flash ? kvt_check_run(c, c->read_mode, ci, 0, buf, flash, token_offset(c, kvt_members(k)[0]), &bad) : 0;
    if (!rc && bad) *kept = keep_intact(c, ci, buf, flash);
    return rc;
}

/* Skip mode: extents (or their parts) past the end of a truncated file are not read; their
 * bytes in the cluster's buffer are zeros, which no record check accepts. Returns how many of
 * the m extents are left to read. */
static uint32_t clamp_extents(kvt_coll *c, extent *ex, uint32_t m, uint8_t *buf, uint64_t *size) {
    if (*size == UINT64_MAX) *size = kvt_file_size(c->f);
    for (uint32_t x = 0; x < m;) {
        if (ex[x].off + ex[x].len <= *size) {
            x++;
            continue;
        }
        uint64_t have = ex[x].off < *size ? *size - ex[x].off : 0;
        memset(buf + ex[x].boff + have, 0, ex[x].len - have);
        if (have) {
            ex[x++].len = have;
        } else {
            ex[x] = ex[--m];
        }
    }
    return m;
}

/* A merged read: extents a..e-1 (sorted by offset), and its buffer when it merges several. */
typedef struct run_plan {
    uint32_t a, e;
    uint8_t *run;
} run_plan;

static int by_offset(const void *a, const void *b) {
    uint64_t x = ((const extent *)a)->off, y = ((const extent *)b)->off;
    return x < y ? -1 : x > y;
}

/* Copies extents a..e-1 out of `run` (a merged read starting at ex[a].off) to where they land
 * in their clusters' buffers. */
static void place_run(const extent *ex, uint32_t a, uint32_t e, const uint8_t *run, uint8_t *const *buf) {
    for (uint32_t t = a; t < e; t++) memcpy(buf[ex[t].slot] + ex[t].boff, run + (ex[t].off - ex[a].off), ex[t].len);
}

/* The bytes between two extents that are no gap: the unused end of a page or pool (an extent
 * ends at its last record, the next may start at the next page), read with the page anyway. */
static uint64_t page_slack(const kvt_layout *L) { return kvt_pool_slack(L); }

/* Counts the gaps between extents a..e-1 (sorted by offset) that one merged read crossed. */
static void count_gaps(kvt_coll *c, const extent *ex, uint32_t a, uint32_t e) {
    uint64_t n = 0, bytes = 0, end = ex[a].off + ex[a].len;
    for (uint32_t t = a + 1; t < e; t++) {
        if (ex[t].off > end + page_slack(&c->L)) {
            n++;
            bytes += ex[t].off - end;
        }
        if (ex[t].off + ex[t].len > end) end = ex[t].off + ex[t].len;
    }
    kvt_io_count_gaps(&c->st->io, n, bytes);
}

/* Reads extents a..e-1 (sorted by offset, gaps within the merge gap) as one request into
 * their clusters' buffers; its buffer is reserved for the call. */
static int read_run(kvt_coll *c, const extent *ex, uint32_t a, uint32_t e, uint8_t *const *buf) {
    kvt_store *s = c->st;
    uint64_t entries = 0;
    for (uint32_t t = a; t < e; t++) entries += ex[t].nrec;
    size_t len = (size_t)(ex[e - 1].off + ex[e - 1].len - ex[a].off);
    /* one extent is read straight into its cluster's buffer; several through a run buffer.
     * Either way a direct read's bounce buffer is reserved too. */
    int single = e == a + 1;
    uint64_t need = (single ? 0 : len) + kvt_file_read_scratch(c->f, ex[a].off, len);
    int rc = kvt_mem_reserve(&s->mem, need);
    if (rc) return rc;
    uint8_t *run = single ? buf[ex[a].slot] + ex[a].boff : malloc(len);
    if (!run) rc = kvt_fail(ENOMEM, "read: out of memory");
    if (!rc) rc = kvt_file_read(c->f, ex[a].off, len, run, entries);
    if (!rc && !single) {
        place_run(ex, a, e, run, buf);
        count_gaps(c, ex, a, e);
    }
    if (!single) free(run);
    kvt_mem_release(&s->mem, need);
    return rc;
}

/* One batch of kvt_visit_clusters: its clusters' buffers (a cache entry, or owned scratch),
 * their extents on flash and the merged reads planned over them. */
typedef struct batch {
    uint32_t nb, nex, nrun;
    uint64_t meta; /* the bookkeeping below, reserved against the budget */
    uint8_t **buf;
    kvt_cache_ent **ent;
    uint64_t *owned;
    extent *ex;
    run_plan *plan;
    kvt_read_req *req;
} batch;

/* Plan: consecutive list entries from i up to max_batch bytes of misses; returns the end and
 * the extents the batch may need (all its clusters': admitting one miss may evict a hit). */
static uint32_t plan_batch(const kvt_coll *c, const uint32_t *list, uint32_t i, uint32_t nlist, uint64_t max_batch,
                           uint32_t *nseg) {
    uint32_t end = i;
    uint64_t bytes = 0;
    *nseg = 0;
    while (end < nlist) {
        const kvt_cluster *k = &c->cl[list[end]];
        uint64_t b = kvt_cached(c, list[end]) ? 0 : read_buffer_bytes(c, k);
        if (end > i && bytes + b > max_batch) break;
        bytes += b;
        *nseg += token(c) ? k->n : k->nseg;
        end++;
    }
    return end;
}

static int batch_alloc(kvt_coll *c, uint32_t nb, uint32_t nseg, batch *B) {
    memset(B, 0, sizeof *B);
    B->nb = nb;
    B->meta = (uint64_t)nb * (sizeof(uint8_t *) + sizeof(kvt_cache_ent *) + 8) +
              (uint64_t)nseg * (sizeof(extent) + sizeof(run_plan) + sizeof(kvt_read_req));
    int rc = kvt_mem_reserve(&c->st->mem, B->meta);
    if (rc) {
        B->meta = 0;
        return rc;
    }
    B->buf = calloc(nb, sizeof(uint8_t *));
    B->ent = calloc(nb, sizeof(kvt_cache_ent *));
    B->owned = calloc(nb, sizeof *B->owned);
    B->ex = malloc((size_t)nseg * sizeof *B->ex + 1);
    B->plan = malloc((size_t)nseg * sizeof *B->plan + 1);
    B->req = malloc((size_t)nseg * sizeof *B->req + 1);
    if (!B->buf || !B->ent || !B->owned || !B->ex || !B->plan || !B->req)
        return kvt_fail(ENOMEM, "read: out of memory");
    return 0;
}

static void batch_free(kvt_coll *c, batch *B) {
    free(B->buf);
    free(B->ent);
    free(B->owned);
    free(B->ex);
    free(B->plan);
    free(B->req);
    kvt_mem_release(&c->st->mem, B->meta);
}

/* Stage: hits go straight to fn; misses get a buffer (their cache entry if it fits, else
 * scratch reserved against the budget) and their extents. */
static int stage_batch(kvt_coll *c, const uint32_t *list, batch *B, visit_fn fn, void *ctx) {
    kvt_store *s = c->st;
    uint64_t size = UINT64_MAX; /* the file's, looked up once when skip mode needs it */
    for (uint32_t b = 0; b < B->nb; b++) {
        uint32_t ci = list[b];
        kvt_cluster *k = &c->cl[ci];
        kvt_cache_ent *e = kvt_cached(c, ci);
        if (e) {
            s->cache.hits++;
            if (e->prefetched) {
                s->prefetch_hits++;
                e->prefetched = 0;
            }
            kvt_cache_touch(&s->cache, e);
            fn(ctx, ci, e->rec, e->n);
            continue;
        }
        s->cache.misses++;
        if (!k->n) continue;
        B->ent[b] = kvt_cache_admit(&s->cache, c, ci, kvt_read_buffer_records(c, k), c->L.esz);
        if (B->ent[b]) {
            B->buf[b] = B->ent[b]->rec;
        } else {
            B->owned[b] = read_buffer_bytes(c, k);
            int rc = kvt_mem_reserve(&s->mem, B->owned[b]);
            if (rc) {
                B->owned[b] = 0;
                return rc;
            }
            if (!(B->buf[b] = malloc(B->owned[b]))) {
                kvt_mem_release(&s->mem, B->owned[b]);
                B->owned[b] = 0;
                return kvt_fail(ENOMEM, "read: out of memory");
            }
        }
        uint32_t m = kvt_cluster_extents(c, k, k->segs, k->nseg, B->ex + B->nex);
        if (c->read_mode == KVT_READ_SKIP) m = clamp_extents(c, B->ex + B->nex, m, B->buf[b], &size);
        for (uint32_t x = 0; x < m; x++) B->ex[B->nex + x].slot = b;
        B->nex += m;
    }
    return 0;
}

/* Merge: runs of extents (sorted by offset) whose gaps are all within the merge gap, each at
 * most max_batch bytes; returns the bytes reading them all at once would reserve. */
static uint64_t merge_batch(kvt_coll *c, batch *B, uint64_t max_batch) {
    uint64_t all = 0;
    qsort(B->ex, B->nex, sizeof *B->ex, by_offset);
    B->nrun = 0;
    for (uint32_t a = 0; a < B->nex;) {
        const extent *ex = B->ex;
        uint32_t e = a + 1;
        uint64_t run_end = ex[a].off + ex[a].len, entries = ex[a].nrec;
        uint64_t gap = c->st->merge_gap > page_slack(&c->L) ? c->st->merge_gap : page_slack(&c->L);
        while (e < B->nex && ex[e].off >= run_end && ex[e].off - run_end <= gap &&
               ex[e].off + ex[e].len - ex[a].off <= max_batch) {
            run_end = ex[e].off + ex[e].len;
            entries += ex[e].nrec;
            e++;
        }
        size_t len = (size_t)(run_end - ex[a].off);
        B->plan[B->nrun] = (run_plan){a, e, NULL};
        B->req[B->nrun++] = (kvt_read_req){ex[a].off, len, NULL, entries};
        all += (e > a + 1 ? len : 0) + kvt_file_read_scratch(c->f, ex[a].off, len);
        a = e;
    }
    return all;
}

/* Issue: when the budget holds every merged read at once they are submitted together (one
 * io_uring submission where the kernel allows it: the device overlaps them), a run of one
 * extent straight into its cluster's buffer; otherwise one run at a time, and a run that
 * finds no room to merge is read extent by extent. */
static int issue_batch(kvt_coll *c, batch *B, uint64_t all) {
    kvt_store *s = c->st;
    int rc = 0;
    if (B->nrun > 1 && kvt_mem_reserve(&s->mem, all) == 0) {
        for (uint32_t r = 0; r < B->nrun && !rc; r++) {
            extent *x = &B->ex[B->plan[r].a];
            if (B->plan[r].e == B->plan[r].a + 1) {
                B->req[r].dst = B->buf[x->slot] + x->boff;
            } else if (!(B->req[r].dst = B->plan[r].run = malloc(B->req[r].len))) {
                rc = kvt_fail(ENOMEM, "read: out of memory");
            }
        }
        if (!rc) rc = kvt_file_read_batch(c->f, B->req, B->nrun);
        for (uint32_t r = 0; r < B->nrun; r++) {
            if (!rc && B->plan[r].run) {
                place_run(B->ex, B->plan[r].a, B->plan[r].e, B->plan[r].run, B->buf);
                count_gaps(c, B->ex, B->plan[r].a, B->plan[r].e);
            }
            free(B->plan[r].run);
        }
        kvt_mem_release(&s->mem, all);
        return rc;
    }
    for (uint32_t r = 0; r < B->nrun && !rc; r++) {
        rc = read_run(c, B->ex, B->plan[r].a, B->plan[r].e, B->buf);
        if (rc == KVT_EBUDGET && B->plan[r].e > B->plan[r].a + 1) {
            rc = 0;
            for (uint32_t x = B->plan[r].a; x < B->plan[r].e && !rc; x++) rc = read_run(c, B->ex, x, x + 1, B->buf);
        }
    }
    return rc;
}

/* Finish: pending entries complete each read cluster, fn sees it, then it is cached (the
 * entry keeps its records and gives back the read's padding) or its scratch freed. After an
 * error nothing more is handed out and the entries are dropped; a cluster with damaged records
 * (skip mode) is handed out without them and never cached. */
static int finish_batch(kvt_coll *c, const uint32_t *list, batch *B, int rc, visit_fn fn, void *ctx) {
    kvt_store *s = c->st;
    const kvt_layout *L = &c->L;
    if (!B->buf || !B->ent || !B->owned) return rc; /* the batch was never staged */
    for (uint32_t b = 0; b < B->nb; b++) {
        if (!B->buf[b]) continue;
        uint32_t ci = list[b];
        kvt_cluster *k = &c->cl[ci];
        uint32_t kept = 0;
        if (!rc) rc = finish_cluster(c, ci, B->buf[b], &kept);
        if (!rc && k->pend) memcpy(B->buf[b] + (size_t)kept * L->esz, k->x->pbuf, (size_t)k->pend * L->esz);
        if (!rc) fn(ctx, ci, B->buf[b], kept + k->pend);
        if (B->ent[b]) {
            if (rc || kept + k->pend != k->n) {
                kvt_cache_drop(&s->cache, B->ent[b]);
            } else {
                B->ent[b]->n = k->n;
                B->ent[b]->pins--;
                kvt_cache_fit(&s->cache, B->ent[b]); /* the read's padding is budget */
            }
        } else if (B->owned[b]) {
            free(B->buf[b]);
            kvt_mem_release(&s->mem, B->owned[b]);
        }
    }
    return rc;
}

/* Calls fn(ctx, cluster, records, n) once per listed cluster with all its records in order:
 * from the cache, or from flash plus its pending buffer. Clusters are read in batches of
 * bounded bytes (plan); hits are handed out at once and misses get buffers and extents
 * (stage); within a batch the extents are sorted by offset and neighbours closer than the
 * store's merge gap become one read, so co-located clusters cost one I/O (merge, issue);
 * then each read cluster is completed, handed out and cached when the budget allows
 * (finish). */
int kvt_visit_clusters(kvt_coll *c, const uint32_t *list, uint32_t nlist, visit_fn fn, void *ctx) {
    return kvt_visit_clusters_or_pieces(c, list, nlist, fn, NULL, ctx);
}

int kvt_visit_clusters_or_pieces(kvt_coll *c, const uint32_t *list, uint32_t nlist, visit_fn fn, visit_fn pieces,
                                 void *ctx) {
    const kvt_layout *L = &c->L;
    const kvt_mem *m = &c->st->mem;
    /* a batch pins its misses until it finishes: a quarter of the budget, and at most half of
     * what the index and buffers leave, so that the reads' scratch still fits beside it at
     * the smallest budget (plan_batch takes one cluster whatever its size) */
    uint64_t left = kvt_mem_left(m);
    uint64_t max_batch = m->budget / 4 < left / 2 ? m->budget / 4 : left / 2;
    if (max_batch < L->pool_bytes) max_batch = L->pool_bytes;
    int rc = 0;
    for (uint32_t i = 0; i < nlist && !rc;) {
        uint32_t nseg;
        uint32_t end = plan_batch(c, list, i, nlist, max_batch, &nseg);
        batch B;
        rc = batch_alloc(c, end - i, nseg, &B);
        if (!rc) rc = stage_batch(c, list + i, &B, fn, ctx);
        if (!rc) rc = issue_batch(c, &B, merge_batch(c, &B, max_batch));
        rc = finish_batch(c, list + i, &B, rc, fn, ctx);
        batch_free(c, &B);
        if (rc == KVT_EBUDGET && pieces && end == i + 1) { /* alone, it was a miss: fn never saw it */
            kvt_clear_error();
            rc = kvt_visit_cluster_pieces(c, list[i], pieces, ctx);
        }
        i = end;
    }
    return rc;
}

int kvt_visit_cluster(kvt_coll *c, uint32_t ci, visit_fn fn, void *ctx) {
    return kvt_visit_clusters(c, &ci, 1, fn, ctx);
}

typedef struct collect_ctx {
    uint8_t *dst;
    size_t esz;
} collect_ctx;

static void collect(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    collect_ctx *x = vctx;
    memcpy(x->dst, recs, (size_t)n * x->esz);
    x->dst += (size_t)n * x->esz;
}

/* All records of cluster j in one buffer: the cached copy, pinned (*pinned), or a reserved
 * buffer read from flash (*owned = its bytes; those reads are counted as a split's). */
int kvt_load_records(kvt_coll *c, uint32_t j, uint8_t **recs, uint64_t *owned, kvt_cache_ent **pinned,
                     uint64_t *read_bytes) {
    kvt_cluster *k = &c->cl[j];
    *owned = 0;
    *pinned = NULL;
    kvt_cache_ent *e = kvt_cached(c, j);
    if (!e) {
        uint64_t bytes = (uint64_t)k->n * c->L.esz;
        int rc = kvt_mem_reserve(&c->st->mem, bytes);
        if (rc) return rc;
        uint8_t *buf = malloc(bytes ? bytes : 1);
        if (!buf) {
            kvt_mem_release(&c->st->mem, bytes);
            return kvt_fail(ENOMEM, "split: out of memory");
        }
        kvt_io_stats before, after;
        kvt_io_stats_get(&c->st->io, &before);
        collect_ctx x = {buf, c->L.esz};
        rc = kvt_visit_cluster(c, j, collect, &x);
        kvt_io_stats_get(&c->st->io, &after);
        *read_bytes += after.read_bytes - before.read_bytes;
        if (rc || (e = kvt_cached(c, j))) { /* failed, or the visit cached it after all: use that copy */
            free(buf);
            kvt_mem_release(&c->st->mem, bytes);
            if (rc) return rc;
        } else {
            *recs = buf;
            *owned = bytes;
            return 0;
        }
    }
    e->pins++;
    *pinned = e;
    *recs = e->rec;
    return 0;
}

/* Undoes load_records. `consumed`: a regroup replaced the cluster, which freed the pinned
 * cache entry along with the old cluster. */
void kvt_release_records(kvt_coll *c, uint8_t *recs, uint64_t owned, kvt_cache_ent *pinned, int consumed) {
    if (owned) {
        free(recs);
        kvt_mem_release(&c->st->mem, owned);
    }
    if (pinned && !consumed) pinned->pins--;
}
