/*
 * virtualize.c — group virtualization (docs/design.md §2.3): parking a group of collections
 * (an LLM layer's KV heads) in the volatile swap file and bringing it back; and, when the
 * budget is tight, moving what the resident collections buffer in DRAM to flash.
 *
 * Invariants:
 * 1. A parked collection holds no DRAM but its pool table and counters; everything else is
 *    in its swap image, and any operation on it brings it back first, so results never
 *    change.
 * 2. The swap file is volatile: a parked collection's durable state is its data file and
 *    catalog, so a crash while parked loses nothing a checkpoint made durable.
 * 3. Giving way under budget pressure (kvt_give_way, which RUN_READY calls before running a
 *    call once more) only moves state whose flash copy serves readers the same and that no
 *    policy decision reads: the tails of clusters no policy holds are written as they are,
 *    token-level keys dropped, array slack given back; a held cluster's buffer (its old tail
 *    and the entries waiting for its split) stays but in a call's last run. Results never change; splits do not while paging can make the room.
 * 4. Demand paging (kvt_page_out) parks only collections no call is using: never the one
 *    whose call asked for room, none with reads in flight, and only between two runs of a
 *    call (RUN_READY), when no operation holds pointers into any collection's arrays.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "index.h"
#include "layout.h"
#include "loader.h"
#include "policy.h"
#include "simd.h"
#include "store.h"
#include "swap.h"
#include "virtualize.h"

static int install_image(kvt_coll *c, const uint8_t *img, uint64_t len);

/* A swap-in: one read of consecutive images, then each installed under the mutex. A failed
 * read or install leaves the collection parked (counted): its next operation reads it again
 * and reports the error. The read was charged when the swap-in was queued, and is no
 * prefetch. */
static void run_swap_job(kvt_store *s, kvt_job *j) {
    kvt_io_thread_uncharged(KVT_READS_UNCHARGED);
    int rc = kvt_file_read(s->swap, j->run[0]->swap_off, j->swap_len, j->swap_buf, 0);
    kvt_io_thread_uncharged(KVT_READS_PREFETCH);
    LOCK(s);
    if (!rc) s->swap_read_bytes += j->swap_len;
    s->loading_bytes -= j->swap_len;
    for (uint32_t t = 0; t < j->nseg; t++) {
        kvt_coll *c = j->run[t];
        uint64_t at = c->swap_off - j->run[0]->swap_off; /* slots back to back, each read whole */
        if (rc || install_image(c, j->swap_buf + at, c->swap_len)) s->prefetch_errors++;
        c->inflight--;
    }
    free(j->swap_buf);
    kvt_mem_release(&s->mem, j->swap_len);
    pthread_cond_broadcast(&s->done_cv);
    UNLOCK(s);
    free(j->run);
    free(j);
}

/* ---- group virtualization: parking collections in the swap file --------------------------- */

/* A parked collection's image: everything it holds in DRAM except the pool table and its
 * counters, written to the collection's slot of the store's swap file "swap.kvs" (swap.c).
 * The file is volatile (recreated at the first park of each run): a parked collection's
 * durable state is its data file and catalog as ever, so a crash while parked loses nothing
 * a checkpoint had made durable.
 *
 *   "KVTSWAP6" u32 ncl, u32 nco, u64 n, u32 ncached, u32 has_m2d, u32 img_cl, u64 img_n
 *   img_cl x dim f16 representatives [, img_cl x dim f32 per-dimension m2]
 *   [, img_cl x value_dim f32 value sums (estimate.c)]
 *   img_n x locw id map (cluster)                        (rows past ncl, past n: zeros)
 *   the policy's section (none: [n x key keys])
 *   per cluster: u32 n, nseg, pend, 2 words of policy state (policy.h), ptail, dead; f32 heat,
 *                u32 heat_visit (its cache entry's when cached); f64 m2; nseg x (u32 pool,
 *                head, n);
 *                pend records (its pending buffer)
 *   [, nco x nco u16 co-retrieval counts]
 *   ncached x (u32 cluster, u32 n, n records)     the cached clusters, most recent last
 *   u32 CRC-32C of all the above, then zeros to the I/O alignment
 *
 * The large per-cluster and per-entry arrays come first, at offsets fixed by the image's
 * capacities (img_cl clusters, img_n entries, kept per collection and grown with slack), so
 * that a layer parked again after a step finds most pages as it wrote them: the writer
 * skips those (swap.c) and a park writes what changed, page by page, not the whole index.
 */
#define SWAP_MAGIC "KVTSWAP6" /* 3: ptail per cluster; 4: dead slots; 5: fixed-offset arrays first; 6: u32 id map */

/* The writer's staging buffer: up to 256 KiB, less under a small budget (a multiple of the
 * I/O alignment, so the image's zero tail always fits in it). */
static uint64_t swap_stage(const kvt_store *s) {
    uint64_t b = kvt_round_down(s->mem.budget / 16, KVT_IO_ALIGN);
    return b < KVT_IO_ALIGN ? KVT_IO_ALIGN : b > (256u << 10) ? (256u << 10) : b;
}

static void put(void *w, const void *p, size_t n) { kvt_sw_put(w, p, n); } /* for the policy (kvt_put_fn) */

static void write_clusters(kvt_coll *c, kvt_swap_writer *w) {
    const kvt_layout *L = &c->L;
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        uint32_t f[7] = {k->n, k->nseg, k->pend, 0, 0, kvt_ptail(k), k->dead};
        kvt_policy_cluster_save(c, k, f + 3); /* the policy's two words (policy.h) */
        kvt_sw_put(w, f, sizeof f);
        /* the cache policy's memory of it: re-admitted, it is as hot as it was */
        const kvt_cache_ent *e = kvt_cached(c, j);
        float heat = e ? e->heat : kvt_half_to_float(k->heat);
        uint32_t hv = e ? (uint32_t)e->use_visit : k->heat_visit;
        double m2 = k->m2;
        kvt_sw_put(w, &heat, 4);
        kvt_sw_u32(w, hv);
        kvt_sw_put(w, &m2, 8);
        for (uint32_t g = 0; g < k->nseg; g++) {
            uint32_t sg[3] = {k->segs[g].pool, k->segs[g].head, k->segs[g].n};
            kvt_sw_put(w, sg, sizeof sg);
        }
        kvt_sw_put(w, kvt_pbuf(k), (size_t)k->pend * L->esz);
    }
}

/* The fixed-offset arrays: each written up to its capacity in the image, zeros past what
 * it holds. */
static void write_arrays(kvt_coll *c, kvt_swap_writer *w) {
    uint64_t dim = c->p.dim, at = w->total, ic = c->img_cl;
    kvt_sw_put(w, c->cent, (size_t)(c->ncl * dim * 2));
    kvt_sw_zeros(w, at += ic * dim * 2);
    if (c->m2d) {
        kvt_sw_put(w, c->m2d, (size_t)(c->ncl * dim * 4));
        kvt_sw_zeros(w, at += ic * dim * 4);
    }
    if (c->vsum) {
        kvt_sw_put(w, c->vsum, (size_t)c->ncl * c->p.value_dim * 4);
        kvt_sw_zeros(w, at += ic * c->p.value_dim * 4);
    }
    kvt_sw_put(w, c->loc, c->n * c->locw);
    kvt_sw_zeros(w, at + c->img_n * c->locw);
}

static void write_image(kvt_coll *c, kvt_swap_writer *w, int keep_cache) {
    const kvt_layout *L = &c->L;
    /* the working set: clusters used (read, appended to, split) since the collection was
     * last brought in. The rest are clean copies of the data file, read again from it if
     * ever needed; carrying them would rewrite and reread the whole cache at every park. */
    uint32_t ncached = 0;
    for (uint32_t j = 0; j < c->ncl && keep_cache; j++) {
        const kvt_cache_ent *e = kvt_cached(c, j);
        ncached += e != NULL && e->last_use > c->resident_tick;
    }
    kvt_sw_put(w, SWAP_MAGIC, 8);
    kvt_sw_u32(w, c->ncl);
    kvt_sw_u32(w, c->cofreq ? c->nco : 0);
    kvt_sw_put(w, &c->n, 8);
    kvt_sw_u32(w, ncached);
    kvt_sw_u32(w, c->m2d != NULL);
    kvt_sw_u32(w, c->img_cl);
    kvt_sw_put(w, &c->img_n, 8);
    write_arrays(c, w);
    if (c->ops->image_put) c->ops->image_put(c, put, w); /* policy none: its resident keys */
    write_clusters(c, w);
    if (c->cofreq) kvt_sw_put(w, c->cofreq, (size_t)c->nco * c->nco * 2);
    /* cached clusters oldest first, so that re-admitting them in order restores recency */
    for (kvt_cache_ent *e = c->st->cache.lru.prev; e != &c->st->cache.lru; e = e->prev) {
        if (!keep_cache || e->owner != c || e->last_use <= c->resident_tick) continue;
        kvt_sw_u32(w, e->cluster);
        kvt_sw_u32(w, e->n);
        kvt_sw_put(w, e->rec, (size_t)e->n * L->esz);
    }
    uint32_t crc = w->crc;
    kvt_sw_u32(w, crc);
}

/* Frees what a resident collection holds in DRAM besides the pool table (park, or a failed
 * install). Cached clusters are dropped. */
static void drop_resident(kvt_coll *c) {
    kvt_cache_drop_owner(&c->st->cache, c);
    for (uint32_t j = 0; j < c->clcap; j++) {
        kvt_cluster *k = &c->cl[j];
        if (k->segs) kvt_free_array(c, k->segs, k->segcap, sizeof(kvt_seg));
        kvt_side_free(c, k);
    }
    kvt_free_array(c, c->cl, c->clcap, sizeof *c->cl);
    kvt_free_array(c, c->cent, c->clcap, (size_t)c->p.dim * 2);
    kvt_free_array(c, c->cnorm, c->clcap, 4);
    if (c->m2d) kvt_free_array(c, c->m2d, c->clcap, (size_t)c->p.dim * 4);
    if (c->vsum) kvt_free_array(c, c->vsum, c->clcap, (size_t)c->p.value_dim * 4);
    kvt_free_array(c, c->loc, c->loccap, c->locw);
    if (c->ops->drop) c->ops->drop(c); /* policy none: its resident keys */
    if (c->cofreq) kvt_free_array(c, c->cofreq, (uint64_t)c->nco * c->nco, 2);
    c->cl = NULL;
    c->cent = NULL;
    c->cnorm = c->m2d = c->vsum = NULL;
    c->loc = NULL;
    c->cofreq = NULL;
    c->clcap = 0;
    c->loccap = 0;
}

/* The image's capacities (write_arrays): grown with slack when the collection outgrew them,
 * which moves every array in the image (1: nothing in the slot can be kept). */
static int image_capacities(kvt_coll *c) {
    if (c->img_cl && c->ncl <= c->img_cl && c->n <= c->img_n) return 0;
    c->img_cl = c->ncl + (c->ncl / 16 > 8 ? c->ncl / 16 : 8);
    c->img_n = c->n + (c->n / 32 > 128 ? c->n / 32 : 128);
    return 1;
}

/* c's slot for an image of len bytes: kept when the image fits it and its arrays did not
 * move (the writer then skips the pages it holds already), else a new one with an eighth to
 * grow into. The page hashes are index, charged to the budget; without room for them every
 * page is written. */
static void image_slot(kvt_coll *c, uint64_t len, int moved, kvt_swap_writer *w) {
    kvt_store *s = c->st;
    int keep = c->swap_cap && !moved && len <= c->swap_cap;
    if (!keep) {
        kvt_swap_free(s, c->swap_off, c->swap_cap);
        c->swap_cap = kvt_round_up(len + len / 8, KVT_IO_ALIGN);
        kvt_swap_alloc(s, c->swap_cap, &c->swap_off);
    }
    uint64_t npg = c->swap_cap / KVT_IO_ALIGN;
    w->reuse = keep && c->swap_hashed;
    if (kvt_grow_array(c, (void **)&c->swap_pgh, sizeof *c->swap_pgh, &c->swap_pghcap, npg)) {
        kvt_clear_error();
        w->reuse = 0;
    } else {
        w->pgh = c->swap_pgh;
        w->npg = (uint32_t)npg;
    }
    c->swap_hashed = 0; /* until this write completes */
    w->base = w->off = c->swap_off;
}

/* Writes c's image to its slot of the swap file and frees what it holds in DRAM.
 * On a write error c stays resident and unchanged. */
static int park_one(kvt_coll *c, int keep_cache) {
    kvt_store *s = c->st;
    if (c->parked) return 0;
    int rc = kvt_swap_open(s), moved = image_capacities(c);
    if (rc) return rc;
    /* the staging buffer: the image's size up to swap_stage. Reserving it may evict some of
     * c's cached clusters, so the image is sized again after. A budget too full for it (the
     * case demand paging meets: parking is what makes room) stages one alignment unit at a
     * time in the call's stack frame, like any call's locals: more, smaller writes */
    uint8_t frame[KVT_IO_ALIGN];
    kvt_swap_writer w = {0};
    write_image(c, &w, keep_cache);
    uint64_t sb = kvt_round_up(w.total, KVT_IO_ALIGN), held = 0;
    if (sb > swap_stage(s)) sb = swap_stage(s);
    uint8_t *stage = frame;
    if (!kvt_mem_reserve(&s->mem, sb)) {
        held = sb;
        if (!(stage = malloc(sb))) {
            kvt_mem_release(&s->mem, sb);
            return kvt_fail(ENOMEM, "park: out of memory");
        }
    } else {
        kvt_clear_error();
        sb = KVT_IO_ALIGN;
    }
    w = (kvt_swap_writer){0};
    write_image(c, &w, keep_cache);
    uint64_t len = kvt_round_up(w.total, KVT_IO_ALIGN);
    w = (kvt_swap_writer){.f = s->swap, .buf = stage, .cap = (size_t)sb};
    image_slot(c, len, moved, &w);
    write_image(c, &w, keep_cache);
    kvt_sw_finish(&w);
    if (held) {
        free(stage);
        kvt_mem_release(&s->mem, held);
    }
    s->swap_write_bytes += w.written;
    s->swap_unchanged_bytes += w.skipped;
    if (w.rc) return w.rc; /* the slot's content is unknown now: its next image is written whole */
    c->swap_hashed = w.pgh != NULL;
    uint32_t ncl = c->ncl;
    kvt_cluster_stats(c, &c->parked_stats);
    drop_resident(c);
    c->ncl = ncl;
    c->parked = 1;
    c->swap_len = len;
    s->swap_outs++;
    return 0;
}

/* The image's clusters (ncl of them) into c's table: sizes, policy words, heat, m2,
 * segments and pending buffers. A damaged image sets r->bad. */
static int install_clusters(kvt_coll *c, kvt_rbuf *r, uint32_t ncl) {
    const kvt_layout *L = &c->L;
    int rc = 0;
    for (uint32_t j = 0; j < ncl && !rc && !r->bad; j++) {
        kvt_cluster *k = &c->cl[j];
        memset(k, 0, sizeof *k);
        uint32_t f[7];
        float heat = 0;
        kvt_rbuf_get(r, f, sizeof f);
        kvt_rbuf_get(r, &heat, 4);
        k->heat = kvt_float_to_half(heat);
        k->heat_visit = (uint16_t)kvt_rbuf_u32(r);
        k->m2 = (float)kvt_rbuf_f64(r);
        k->n = f[0];
        kvt_policy_cluster_load(c, k, f + 3, 1);
        k->dead = f[6];
        if (r->bad || f[1] > (r->len - r->pos) / 12 || (uint64_t)f[2] * L->esz > r->len - r->pos) {
            r->bad = 1;
            break;
        }
        if (f[1] && (rc = kvt_ensure_segs(c, k, f[1]))) break;
        for (uint32_t g = 0; g < f[1]; g++) {
            uint32_t sg[3];
            kvt_rbuf_get(r, sg, sizeof sg);
            k->segs[g] = (kvt_seg){sg[0], sg[1], sg[2]};
        }
        k->nseg = f[1];
        if (f[2]) {
            if ((rc = kvt_ensure_pbuf(c, k, f[2]))) break;
            kvt_rbuf_get(r, k->x->pbuf, (size_t)f[2] * L->esz);
            k->pend = f[2];
            k->x->ptail = f[5] <= f[2] ? f[5] : f[2];
        }
    }
    return rc;
}

/* The image's cached clusters: re-admitted while the budget has room for them without
 * evicting (what is not admitted is read from the data file on use, as after an eviction). */
static void install_cached(kvt_coll *c, kvt_rbuf *r, uint32_t ncached, uint32_t ncl) {
    kvt_store *s = c->st;
    size_t esz = c->L.esz;
    for (uint32_t t = 0; t < ncached && !r->bad; t++) {
        uint32_t cl = kvt_rbuf_u32(r), cn = kvt_rbuf_u32(r);
        if (r->bad || cl >= ncl || cn != c->cl[cl].n || (uint64_t)cn * esz > r->len - r->pos) {
            r->bad = 1;
            break;
        }
        const uint8_t *recs = r->p + r->pos;
        r->pos += (size_t)cn * esz;
        uint64_t need = (uint64_t)cn * esz + sizeof(kvt_cache_ent);
        if (s->mem.used + need > s->mem.budget) continue;
        kvt_cache_ent *e = kvt_cache_admit(&s->cache, c, cl, cn, esz);
        if (!e) continue;
        memcpy(e->rec, recs, (size_t)cn * esz);
        e->n = cn;
        e->pins--;
    }
}

/* Rebuilds c from its image (len bytes at img). On failure c stays parked, holding nothing. */
/* The fixed-offset arrays (write_arrays) from an image whose capacities are ic, in. */
static void install_arrays(kvt_coll *c, kvt_rbuf *r, uint64_t ic, uint64_t in) {
    uint64_t dim = c->p.dim, vd = c->p.value_dim;
    if (ic < c->ncl || in < c->n || ic > (r->len - r->pos) / (dim * 2) || in > (r->len - r->pos) / c->locw) {
        r->bad = 1;
        return;
    }
    size_t at = r->pos;
    kvt_rbuf_get(r, c->cent, (size_t)(c->ncl * dim * 2));
    r->pos = at += (size_t)(ic * dim * 2);
    if (c->m2d) {
        kvt_rbuf_get(r, c->m2d, (size_t)(c->ncl * dim * 4));
        r->pos = at += (size_t)(ic * dim * 4);
    }
    if (c->vsum) {
        kvt_rbuf_get(r, c->vsum, (size_t)(c->ncl * vd * 4));
        r->pos = at += (size_t)(ic * vd * 4);
    }
    if (at > r->len) {
        r->bad = 1;
        return;
    }
    kvt_rbuf_get(r, c->loc, c->n * c->locw);
    r->pos = at + (size_t)(in * c->locw);
    if (r->pos > r->len) r->bad = 1;
}

/* Rebuilds c from its image (len bytes at img). On failure c stays parked, holding nothing;
 * on success its slot keeps the image (the next park writes only the pages that change). */
static int install_image(kvt_coll *c, const uint8_t *img, uint64_t len) {
    kvt_store *s = c->st;
    kvt_rbuf r = {img, (size_t)len, 8, 0};
    uint32_t ncl = kvt_rbuf_u32(&r), nco = kvt_rbuf_u32(&r);
    uint64_t n = kvt_rbuf_u64(&r);
    uint32_t ncached = kvt_rbuf_u32(&r), has_m2d = kvt_rbuf_u32(&r), ic = kvt_rbuf_u32(&r);
    uint64_t in = kvt_rbuf_u64(&r);
    if (memcmp(img, SWAP_MAGIC, 8) != 0 || r.bad || ncl != c->ncl || n != c->n || has_m2d != (c->p.score_temp > 0))
        return kvt_fail(KVT_ECORRUPT, "swap: the image of collection %u at offset %llu is damaged", c->no,
                        (unsigned long long)c->swap_off);
    c->ncl = 0; /* ensure_clusters grows from zero */
    int rc = kvt_ensure_clusters(c, ncl);
    if (!rc) rc = kvt_ensure_ids(c, n); /* (policy none: drops its keys to flash if they no longer fit) */
    if (!rc && nco) {
        uint64_t cap = 0;
        rc = kvt_grow_array(c, (void **)&c->cofreq, 2, &cap, (uint64_t)nco * nco);
    }
    c->ncl = ncl;
    c->nco = nco ? nco : c->nco;
    if (!rc) {
        install_arrays(c, &r, ic, in);
        if (!r.bad && c->ops->image_get && c->ops->image_get(c, &r)) r.bad = 1;
        if (!r.bad) rc = install_clusters(c, &r, ncl);
    }
    if (!rc && !r.bad) {
        if (nco) kvt_rbuf_get(&r, c->cofreq, (size_t)nco * nco * 2);
        for (uint32_t j = 0; j < ncl; j++) kvt_update_norm(c, j);
        if (!r.bad && token(c)) rc = kvt_rebuild_members(c);
    }
    if (!rc && !r.bad) install_cached(c, &r, ncached, ncl);
    if (!rc && (r.bad || r.len - r.pos < 4))
        rc = kvt_fail(KVT_ECORRUPT, "swap: the image of collection %u is inconsistent", c->no);
    if (!rc) {
        uint32_t crc;
        memcpy(&crc, r.p + r.pos, 4);
        if (crc != kvt_crc32c(0, img, r.pos))
            rc = kvt_fail(KVT_ECORRUPT, "swap: the image of collection %u fails its checksum", c->no);
    }
    if (rc) {
        drop_resident(c);
        c->ncl = ncl;
        return rc;
    }
    c->resident_tick = s->cache.tick;
    c->parked = 0;
    s->swap_ins++;
    return 0;
}

/* Reads and installs one parked collection now (an operation needs it). */
static int unpark_now(kvt_coll *c, int demand) {
    kvt_store *s = c->st;
    if (!c->parked) return 0;
    uint64_t len = c->swap_len;
    int rc = kvt_mem_reserve(&s->mem, len);
    if (rc) return rc;
    uint8_t *img = malloc(len);
    if (!img) rc = kvt_fail(ENOMEM, "unpark: out of memory");
    if (!rc) rc = kvt_file_read(s->swap, c->swap_off, len, img, 0);
    if (!rc) s->swap_read_bytes += len;
    if (!rc) rc = install_image(c, img, len);
    if (!rc && demand) s->swap_demand_ins++;
    free(img);
    kvt_mem_release(&s->mem, len);
    return rc;
}

/* A parked c brought in; an image that does not fit pages other collections out first (the
 * callers run before any operation is under way, invariant 4). */
static int bring_in(kvt_coll *c, int demand) {
    int rc = c->parked ? unpark_now(c, demand) : 0;
    while (rc == KVT_EBUDGET && kvt_page_out(c->st, c, c->st->mem.short_by)) rc = unpark_now(c, demand);
    return rc;
}

/* A hint's start (prefetch): no loader busy with c; a parked c comes in only if its image fits
 * as the budget stands (else it stays parked, and 0: nothing is paged out for a guess). A
 * hint is no use, so it leaves the recency demand paging goes by as it was. */
int kvt_ready_for_hint(kvt_coll *c) {
    kvt_wait_idle(c);
    int rc = c->parked ? unpark_now(c, 0) : 0;
    if (rc == KVT_EBUDGET) { /* its image does not fit beside what is in use: it stays parked */
        kvt_clear_error();
        rc = 0;
    }
    return rc;
}

/* Every operation on a collection starts here: no loader busy with it, and it is resident. */
int kvt_ready(kvt_coll *c) {
    kvt_wait_idle(c);
    uint64_t now = ++c->st->op_clock;
    if (c->used_at) /* the usual gap between its uses: a running mean that follows a change */
        c->use_gap = c->use_gap ? 0.75f * c->use_gap + 0.25f * (float)(now - c->used_at) : (float)(now - c->used_at);
    c->used_at = now;
    return bring_in(c, 1);
}

/* Whether c is idle: not used for more than KVT_PAGE_IDLE_GAPS of its usual gaps between
 * uses (and KVT_PAGE_IDLE_MIN operations of the store): its turn is not coming round. */
#define KVT_PAGE_IDLE_GAPS 3.0f
#define KVT_PAGE_IDLE_MIN  16u
static int idle(const kvt_store *s, const kvt_coll *c) {
    uint64_t since = s->op_clock - c->used_at;
    return since > KVT_PAGE_IDLE_MIN && (!c->use_gap || (float)since > KVT_PAGE_IDLE_GAPS * c->use_gap);
}

/* The collection to park: idle ones first, least recently used first (a vector store queried
 * one collection after another); among collections all in use, the most recently used,
 * because an LLM uses its layers in a cycle, and the layer just used comes round again last
 * (LRU would park the layer needed next, and page every layer in at every step). */
static int better_victim(const kvt_store *s, const kvt_coll *c, const kvt_coll *v) {
    int ic = idle(s, c), iv = idle(s, v);
    if (ic != iv) return ic;
    return ic ? c->used_at < v->used_at : c->used_at > v->used_at;
}

/* Demand paging (docs/design.md §2.3; invariant 4): parks resident collections (better_victim
 * first) until `need` bytes of the budget are free again or none is left to park. Never
 * `keep` (the collection whose call asked), nor one with reads in flight; its cached clusters
 * leave with it (clean copies of the data file). 1 if any was parked. */
int kvt_page_out(kvt_store *s, const kvt_coll *keep, uint64_t need) {
    uint64_t freed = 0;
    int any = 0;
    while (freed < need) {
        kvt_coll *v = NULL;
        for (uint32_t i = 0; i < s->ncolls; i++) {
            kvt_coll *c = s->colls[i];
            if (!c || c == keep || c->parked || c->inflight || !(c->acct + c->acct_pend)) continue;
            if (!v || better_victim(s, c, v)) v = c;
        }
        uint64_t before = s->mem.used;
        if (!v || park_one(v, 0)) break; /* a failed park leaves v resident and unchanged */
        s->swap_pressure_outs++;
        freed += before > s->mem.used ? before - s->mem.used : 0;
        any = 1;
    }
    if (!any) return 0;
    kvt_clear_error();
    return 1;
}

/* The budget is tight: after the cache (evicted by every reservation), the write buffers'
 * tails, the token-level keys and the arrays' growth slack give way. Writes the tails of the
 * store's resident collections to flash, drops the resident keys of policy-none collections
 * (scanned from flash instead) and gives back the slack of their arrays (kvt_trim_slack).
 * A cluster a policy holds for a split (kvt_held) keeps its buffer, old tail included, unless
 * `held`: when a cluster splits
 * and what each child keeps must not depend on the budget, so they leave DRAM with their
 * collection's image when it is paged out (kvt_page_out), and are written only for a call's
 * last run, when nothing is left to page out. Collections with reads in flight are left
 * alone (a job copied their segments). 1 if anything was freed. */
int kvt_give_way(kvt_store *s, int held) {
    int freed = 0;
    for (uint32_t i = 0; i < s->ncolls; i++) {
        kvt_coll *c = s->colls[i];
        if (!c || c->parked || c->inflight) continue;
        for (uint32_t j = 0; j < c->ncl; j++)
            if (c->cl[j].pend && (held || !kvt_held(c, &c->cl[j])) && !kvt_write_pending(c, j)) {
                c->ctr.pending_flushes++;
                freed = 1;
            }
        if (c->ops->give_way && c->ops->give_way(c)) freed = 1; /* policy none: its resident keys */
        if (kvt_trim_slack(c)) freed = 1;
    }
    return freed;
}

static int check_group(kvt_store *s, kvt_coll *const *colls, size_t n) {
    if (!colls && n) return kvt_fail(KVT_EINVAL, "collections: NULL list");
    for (size_t i = 0; i < n; i++) {
        if (!colls[i] || colls[i]->st != s)
            return kvt_fail(KVT_EINVAL, "collections: entry %zu is not a collection of this store", i);
        for (size_t t = 0; t < i; t++)
            if (colls[t] == colls[i]) return kvt_fail(KVT_EINVAL, "collections: entry %zu repeats entry %zu", i, t);
    }
    return 0;
}

int kvt_store_park(kvt_store *s, kvt_coll *const *collections, size_t n, int keep_cache) {
    kvt_coll *const *colls = collections;
    kvt_clear_error();
    LOCK(s);
    int rc = check_group(s, colls, n);
    /* the group's images go to consecutive ranges when the file has no hole for them, so an
     * unpark of the whole group is one sequential read */
    for (size_t i = 0; i < n && !rc; i++) {
        kvt_wait_idle(colls[i]);
        rc = park_one(colls[i], keep_cache);
    }
    UNLOCK(s);
    return rc;
}

/* Operations that only look (stats, checkpoints) leave a parked collection parked: it is
 * brought in for the call and written back after. */
int kvt_peek_begin(kvt_coll *c, int *was_parked) {
    kvt_wait_idle(c);
    *was_parked = c->parked;
    return bring_in(c, 0);
}

void kvt_peek_end(kvt_coll *c, int was_parked) {
    if (was_parked && !c->parked) park_one(c, 1); /* on failure it stays resident: nothing is lost */
}

/* Group swap-ins: the parked collections sorted by image offset; images that touch form one
 * read. */
static int by_swap_off(const void *a, const void *b) {
    uint64_t x = (*(kvt_coll *const *)a)->swap_off, y = (*(kvt_coll *const *)b)->swap_off;
    return x < y ? -1 : x > y;
}

/* An asynchronous swap-in of the run v[0..k) of back-to-back slots (len bytes, read into
 * img): queued on the loaders, which own img from here. On failure img is freed and its
 * reservation released. */
static int queue_swap_in(kvt_store *s, kvt_coll **v, size_t k, uint8_t *img, uint64_t len) {
    kvt_job *j = malloc(sizeof *j);
    kvt_coll **run = j ? malloc(k * sizeof(kvt_coll *)) : NULL;
    if (!j || !run) {
        free(j);
        free(img);
        kvt_mem_release(&s->mem, len);
        return kvt_fail(ENOMEM, "unpark: out of memory");
    }
    *j = (kvt_job){NULL, v[0], KVT_SWAP_JOB, (uint32_t)k, NULL, run, img, len, run_swap_job};
    memcpy(j->run, v, k * sizeof(kvt_coll *));
    for (size_t t = 0; t < k; t++) v[t]->inflight++;
    s->loading_bytes += len;
    if (s->jobs_tail)
        s->jobs_tail->next = j;
    else
        s->jobs = j;
    s->jobs_tail = j;
    return 0;
}

/* A swap-in of the run v[0..k) now: one read, each image installed; img freed after. */
static int swap_in_now(kvt_store *s, kvt_coll **v, size_t k, uint8_t *img, uint64_t len) {
    kvt_io_batch_begin(&s->io);
    int rc = kvt_file_read(s->swap, v[0]->swap_off, len, img, 0);
    kvt_io_batch_end(&s->io);
    if (!rc) s->swap_read_bytes += len;
    for (size_t t = 0; t < k && !rc; t++) /* slots back to back, each read whole */
        rc = install_image(v[t], img + (v[t]->swap_off - v[0]->swap_off), v[t]->swap_len);
    free(img);
    kvt_mem_release(&s->mem, len);
    return rc;
}

int kvt_store_unpark(kvt_store *s, kvt_coll *const *collections, size_t n, int async) {
    kvt_coll *const *colls = collections;
    kvt_clear_error();
    LOCK(s);
    int rc = check_group(s, colls, n);
    kvt_coll **v = NULL;
    size_t m = 0;
    if (!rc && n && !(v = malloc(n * sizeof(kvt_coll *)))) rc = kvt_fail(ENOMEM, "unpark: out of memory");
    for (size_t i = 0; i < n && !rc; i++) {
        if (!async) kvt_wait_idle(colls[i]);
        if (colls[i]->parked && !colls[i]->inflight) v[m++] = colls[i];
    }
    if (!rc && m) qsort(v, m, sizeof(kvt_coll *), by_swap_off);
    if (async && !rc && m) kvt_start_loaders(s, &rc);
    uint64_t ops = 0, bytes = 0;
    for (size_t a = 0; a < m && !rc;) {
        size_t e = a + 1;
        /* slots back to back form one read (a slot's unused end is read along) */
        while (e < m && v[e]->swap_off == v[e - 1]->swap_off + v[e - 1]->swap_cap) e++;
        uint64_t len = v[e - 1]->swap_off + v[e - 1]->swap_len - v[a]->swap_off;
        if (kvt_mem_reserve(&s->mem, len) != 0) { /* no room for the whole run: one at a time */
            e = a + 1;
            len = v[a]->swap_len;
            if ((rc = kvt_mem_reserve(&s->mem, len))) break;
        }
        uint8_t *img = malloc(len);
        if (!img) {
            kvt_mem_release(&s->mem, len);
            rc = kvt_fail(ENOMEM, "unpark: out of memory");
            break;
        }
        rc = async ? queue_swap_in(s, v + a, e - a, img, len) : swap_in_now(s, v + a, e - a, img, len);
        if (async && !rc) {
            ops++;
            bytes += len;
        }
        a = e;
    }
    if (async && ops) {
        kvt_io_charge(&s->io, ops, bytes);
        pthread_cond_broadcast(&s->job_cv);
    }
    free(v);
    UNLOCK(s);
    return rc;
}

int kvt_coll_is_parked(kvt_coll *c) {
    LOCK(c->st);
    int p = c->parked;
    UNLOCK(c->st);
    return p;
}
