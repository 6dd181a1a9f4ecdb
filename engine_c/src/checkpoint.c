/*
 * checkpoint.c — durability: exporting a collection's directory and id-map chunks for the
 * catalog, marking a checkpoint committed, and reopening a collection from them.
 *
 * Invariants:
 * 1. A checkpoint first writes every pending tail and syncs the data; the caller commits the
 *    exported blobs in one catalog transaction; only then are retired heads reused.
 * 2. Every blob carries a CRC-32C; a mismatch on load is KVT_ECORRUPT.
 * 3. A data file's header page must match the catalog and its page checksum; in skip mode
 *    (kvt_set_on_corrupt) a damaged one is noted (header_damaged) and the catalog's geometry
 *    used, since the catalog's blobs are checked on their own.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "estimate.h"
#include "index.h"
#include "layout.h"
#include "policy.h"
#include "read.h"
#include "simd.h"
#include "store.h"
#include "virtualize.h"

/* ---- durability: checkpoints and reopen --------------------------------------------------- */

#define DIR_MAGIC "KVTDIR01"

/* estimate.c: the same with each cluster's value sum after its representative. A KVTDIR01
 * blob of a collection opened with value sums on (exported without them, or before they
 * existed) is read and its sums recomputed from the stored values on open. */
#define DIR_MAGIC_VSUM "KVTDIR02"

#define LOC_MAGIC    "KVTLOC02" /* u32 cluster per id */
#define LOC_MAGIC_V1 "KVTLOC01" /* u32 cluster, u32 slot per id: read, the slot ignored (store.c 2) */

struct kvt_checkpoint {
    void *dir;
    size_t dirlen, nch;
    uint64_t *idx;
    void **blob;
    size_t *len;
    uint64_t mod_at;
    uint32_t capture; /* the pool table's capture number (kvt_pools_named) */
};

void kvt_checkpoint_free(kvt_checkpoint *cp) {
    if (!cp) return;
    free(cp->dir);
    for (size_t i = 0; i < cp->nch; i++) free(cp->blob[i]);
    free(cp->blob);
    free(cp->idx);
    free(cp->len);
    free(cp);
}

const void *kvt_checkpoint_dir(const kvt_checkpoint *cp, size_t *len) {
    *len = cp->dirlen;
    return cp->dir;
}

size_t kvt_checkpoint_nchunks(const kvt_checkpoint *cp) { return cp->nch; }

const void *kvt_checkpoint_chunk(const kvt_checkpoint *cp, size_t i, uint64_t *chunk, size_t *len) {
    *chunk = cp->idx[i];
    *len = cp->len[i];
    return cp->blob[i];
}

/* Ends a blob with the CRC-32C of its bytes and hands it to the caller. */
static int seal_blob(kvt_wbuf *w, void **blob, size_t *len) {
    uint32_t crc = kvt_crc32c(0, w->p, w->len);
    kvt_wbuf_u32(w, crc);
    if (w->oom) {
        free(w->p);
        return kvt_fail(ENOMEM, "export: out of memory");
    }
    *blob = w->p;
    *len = w->len;
    return 0;
}

static int export_dir(kvt_coll *c, void **blob, size_t *len) {
    kvt_wbuf w = {0};
    kvt_wbuf_put(&w, c->vsum ? DIR_MAGIC_VSUM : DIR_MAGIC, 8);
    kvt_wbuf_u32(&w, c->L.format); /* a format-1 file keeps format-1 catalogs: old engines read both */
    kvt_wbuf_u32(&w, c->p.dim);
    kvt_wbuf_u32(&w, c->p.value_dim);
    kvt_wbuf_u32(&w, (uint32_t)c->p.dtype);
    kvt_wbuf_u32(&w, (uint32_t)c->p.metric);
    kvt_wbuf_u32(&w, (uint32_t)c->p.policy);
    kvt_wbuf_u32(&w, c->L.esz);
    kvt_wbuf_u64(&w, c->L.pool_bytes);
    kvt_wbuf_u64(&w, c->n);
    kvt_wbuf_u32(&w, c->ncl);
    kvt_wbuf_u32(&w, c->pools.n);
    kvt_wbuf_f64(&w, c->ops->tau ? c->ops->tau(c) : c->p.tau); /* the policy's words (policy.h) */
    kvt_wbuf_u32(&w, c->ops->staging ? c->ops->staging(c) : KVT_NONE);
    if (c->L.format >= 3) /* pools sized when made: where each lies (units 0: a free slot) */
        for (uint32_t p = 0; p < c->pools.n; p++) {
            kvt_wbuf_u32(&w, c->pools.p[p].base);
            kvt_wbuf_u32(&w, c->pools.p[p].units);
        }
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        kvt_wbuf_u32(&w, k->n);
        kvt_wbuf_u32(&w, k->nseg);
        kvt_wbuf_f64(&w, k->m2);
        uint32_t pw[2];
        kvt_policy_cluster_save(c, k, pw);
        kvt_wbuf_u32(&w, pw[0]);
        kvt_wbuf_u32(&w, pw[1]);
        if (c->L.format >= 3) kvt_wbuf_u32(&w, k->dead);
        for (uint32_t g = 0; g < k->nseg; g++) {
            kvt_wbuf_u32(&w, k->segs[g].pool);
            kvt_wbuf_u32(&w, k->segs[g].head);
            kvt_wbuf_u32(&w, k->segs[g].n);
        }
        /* the directory keeps float32 representatives (their float16 values, exactly) */
        for (uint32_t i = 0; i < c->p.dim; i++) {
            float f = kvt_half_to_float(c->cent[(size_t)j * c->p.dim + i]);
            kvt_wbuf_put(&w, &f, 4);
        }
        if (c->m2d) kvt_wbuf_put(&w, c->m2d + (size_t)j * c->p.dim, (size_t)c->p.dim * 4);
        if (c->vsum) kvt_wbuf_put(&w, c->vsum + (size_t)j * c->p.value_dim, (size_t)c->p.value_dim * 4);
    }
    return seal_blob(&w, blob, len);
}

static int export_chunk(kvt_coll *c, uint64_t chunk, void **blob, size_t *len) {
    uint64_t lo = chunk * KVT_LOC_CHUNK;
    uint32_t cnt = (uint32_t)(c->n - lo < KVT_LOC_CHUNK ? c->n - lo : KVT_LOC_CHUNK);
    kvt_wbuf w = {0};
    kvt_wbuf_put(&w, LOC_MAGIC, 8);
    kvt_wbuf_u64(&w, chunk);
    kvt_wbuf_u32(&w, cnt);
    for (uint32_t i = 0; i < cnt; i++) kvt_wbuf_u32(&w, kvt_loc(c, lo + i)); /* u32 whatever locw is */
    return seal_blob(&w, blob, len);
}

/* Writes every cluster's pending entries to flash (they then stop being pending). */
static int write_all_pending(kvt_coll *c) {
    int rc = 0;
    for (uint32_t j = 0; j < c->ncl && !rc; j++) rc = kvt_write_pending(c, j);
    return rc;
}

int kvt_coll_checkpoint(kvt_coll *c, kvt_checkpoint **out) {
    kvt_clear_error();
    LOCK(c->st);
    int was_parked = 0;
    kvt_checkpoint *cp = calloc(1, sizeof *cp);
    int rc = cp ? 0 : kvt_fail(ENOMEM, "checkpoint: out of memory");
    if (!rc) rc = kvt_peek_begin(c, &was_parked);
    if (!rc) rc = write_all_pending(c);
    if (!rc) kvt_kill_point("checkpoint.pending_written");
    if (!rc) rc = kvt_file_sync(c->f);
    if (!rc) kvt_kill_point("checkpoint.synced");
    if (!rc) rc = export_dir(c, &cp->dir, &cp->dirlen);
    uint64_t nch = c->n ? (c->n - 1) / KVT_LOC_CHUNK + 1 : 0;
    if (!rc) {
        cp->idx = malloc(nch * 8 + 8);
        cp->blob = calloc(nch + 1, sizeof *cp->blob);
        cp->len = malloc(nch * sizeof *cp->len + 8);
        if (!cp->idx || !cp->blob || !cp->len) rc = kvt_fail(ENOMEM, "checkpoint: out of memory");
    }
    for (uint64_t ch = 0; ch < nch && !rc; ch++) {
        if (c->mod[ch] <= c->committed_mod) continue;
        cp->idx[cp->nch] = ch;
        rc = export_chunk(c, ch, &cp->blob[cp->nch], &cp->len[cp->nch]);
        if (!rc) cp->nch++;
    }
    if (cp) {
        cp->mod_at = c->modc;
        cp->capture = kvt_pools_named(&c->pools); /* it names every head owned now */
    }
    if (cp && !c->parked) kvt_peek_end(c, was_parked);
    UNLOCK(c->st);
    if (rc)
        kvt_checkpoint_free(cp);
    else
        *out = cp;
    return rc;
}

int kvt_coll_changed(kvt_coll *c) {
    LOCK(c->st);
    int changed = c->modc != c->committed_mod;
    UNLOCK(c->st);
    return changed;
}

int kvt_coll_committed(kvt_coll *c, const kvt_checkpoint *cp) {
    LOCK(c->st);
    if (cp->mod_at > c->committed_mod) c->committed_mod = cp->mod_at;
    kvt_pools_committed(&c->pools, cp->capture);
    UNLOCK(c->st);
    return 0;
}

/* The most units a format-3 pool spans (kvt_pools_claim never makes one larger than a
 * format-2 pool). */
static uint32_t max_pool_units(const kvt_layout *L) { return kvt_pool_units(L, L->pool_cap); }

static int blob_crc_ok(const void *blob, size_t len) {
    if (len < 12) return 0;
    uint32_t crc;
    memcpy(&crc, (const uint8_t *)blob + len - 4, 4);
    return crc == kvt_crc32c(0, blob, len - 4);
}

/* One cluster of a directory blob: its size, statistics, policy words and segments (their
 * heads claimed in the pool table, checked to be free and to fit), its representative. Adds
 * its size to *total; a blob that does not hold together sets r->bad. */
static int load_cluster(kvt_coll *c, kvt_rbuf *r, uint32_t j, uint32_t npools, int with_sums, uint64_t *total) {
    uint32_t dim = c->p.dim, vdim = c->p.value_dim;
    kvt_cluster *k = &c->cl[j];
    uint32_t kn = kvt_rbuf_u32(r), nseg = kvt_rbuf_u32(r), pw[2];
    k->m2 = (float)kvt_rbuf_f64(r);
    pw[0] = kvt_rbuf_u32(r);
    pw[1] = kvt_rbuf_u32(r);
    k->dead = c->L.format >= 3 ? kvt_rbuf_u32(r) : 0;
    kvt_policy_cluster_load(c, k, pw, 0);              /* a directory keeps whether, not why (policy.h) */
    if (r->bad || nseg > (r->len + 4 - r->pos) / 12) { /* r->len + 4: the blob with its CRC */
        r->bad = 1;
        return 0;
    }
    int rc = kvt_ensure_segs(c, k, nseg);
    if (rc) return rc;
    uint32_t sum = 0;
    for (uint32_t g = 0; g < nseg; g++) {
        kvt_seg sg;
        sg.pool = kvt_rbuf_u32(r);
        sg.head = kvt_rbuf_u32(r);
        sg.n = kvt_rbuf_u32(r);
        if (sg.pool >= npools || sg.head > 1 || kvt_head_state(&c->pools, sg.pool, sg.head) != KVT_HEAD_FREE ||
            !c->pools.p[sg.pool].units) {
            r->bad = 1;
            break;
        }
        kvt_pool *pl = &c->pools.p[sg.pool];
        kvt_head_set(&c->pools, sg.pool, sg.head, KVT_HEAD_OWNED);
        pl->used[sg.head] = sg.n;
        if ((uint64_t)pl->used[0] + pl->used[1] > kvt_pool_cap(&c->L, pl)) {
            r->bad = 1;
            break;
        }
        k->segs[g] = sg;
        sum += sg.n;
    }
    k->nseg = nseg;
    k->n = kn;
    /* a checkpoint writes every pending entry first: the slots hold them all, and the dead */
    if (token(c) ? nseg != 0 : (uint64_t)sum != (uint64_t)kn + k->dead) r->bad = 1;
    *total += kn;
    for (uint32_t i = 0; i < dim; i++) {
        float f = 0;
        kvt_rbuf_get(r, &f, 4);
        c->cent[(size_t)j * dim + i] = kvt_float_to_half(f);
    }
    if (c->m2d) kvt_rbuf_get(r, c->m2d + (size_t)j * dim, (size_t)dim * 4);
    if (with_sums) kvt_rbuf_get(r, c->vsum + (size_t)j * vdim, (size_t)vdim * 4);
    return 0;
}

static int load_dir(kvt_coll *c, const void *blob, size_t len, int *sums_missing) {
    const char *what = "cluster directory";
    int with_sums = blob_crc_ok(blob, len) && memcmp(blob, DIR_MAGIC_VSUM, 8) == 0;
    if (!blob_crc_ok(blob, len) || (!with_sums && memcmp(blob, DIR_MAGIC, 8) != 0))
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u fails its checksum", what, c->no);
    if (with_sums && !kvt_vsum_kept(c))
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u carries value sums its parameters do not keep",
                        what, c->no);
    *sums_missing = kvt_vsum_kept(c) && !with_sums;
    kvt_rbuf r = {blob, len - 4, 8, 0};
    uint32_t ver = kvt_rbuf_u32(&r);
    if (ver < 1 || ver > KVT_FORMAT_VERSION)
        return kvt_fail(KVT_EFORMAT, "catalog: %s has format version %u, this engine reads 1 to %u", what, ver,
                        KVT_FORMAT_VERSION);
    if (ver != c->L.format)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u has format %u but its data file format %u", what,
                        c->no, ver, c->L.format);
    uint32_t dim = kvt_rbuf_u32(&r), vdim = kvt_rbuf_u32(&r), dtype = kvt_rbuf_u32(&r), metric = kvt_rbuf_u32(&r),
             policy = kvt_rbuf_u32(&r), esz = kvt_rbuf_u32(&r);
    uint64_t pool_bytes = kvt_rbuf_u64(&r), n = kvt_rbuf_u64(&r);
    uint32_t ncl = kvt_rbuf_u32(&r), npools = kvt_rbuf_u32(&r);
    double tau = kvt_rbuf_f64(&r);
    uint32_t staging = kvt_rbuf_u32(&r);
    if (r.bad || dim != c->p.dim || vdim != c->p.value_dim || dtype != (uint32_t)c->p.dtype ||
        metric != (uint32_t)c->p.metric || policy != (uint32_t)c->p.policy || esz != c->L.esz ||
        pool_bytes != c->L.pool_bytes)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u does not match its parameters", what, c->no);
    if (ncl > len / 16 || npools > (1u << 30) || (staging != KVT_NONE && staging >= ncl) || !(tau >= 0))
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u has impossible counts", what, c->no);
    int rc = kvt_ensure_clusters(c, ncl);
    if (!rc) rc = kvt_ensure_pools(c, npools);
    if (!rc) rc = kvt_ensure_ids(c, n);
    if (rc) return rc;
    if (c->ops->load_dir) c->ops->load_dir(c, tau, staging);
    c->pools.n = npools;
    for (uint32_t p = 0; p < npools; p++) kvt_pools_blank(&c->pools, p);
    if (c->pools.sized) { /* where each pool lies, checked to stay inside the file's reach */
        if (npools > (r.len - r.pos) / 8) r.bad = 1;
        for (uint32_t p = 0; p < npools && !r.bad; p++) {
            c->pools.p[p].base = kvt_rbuf_u32(&r);
            c->pools.p[p].units = kvt_rbuf_u32(&r);
            if ((uint64_t)c->pools.p[p].base + c->pools.p[p].units > UINT32_MAX ||
                c->pools.p[p].units > max_pool_units(&c->L))
                r.bad = 1;
        }
    } else {
        kvt_pools_fixed(&c->pools, &c->L, 0);
    }
    uint64_t total = 0;
    for (uint32_t j = 0; j < ncl && !r.bad; j++) {
        rc = load_cluster(c, &r, j, npools, with_sums, &total);
        if (rc) return rc;
        c->ncl = j + 1;
        kvt_update_norm(c, j);
    }
    c->ncl = ncl;
    if (r.bad || total != n || r.pos != r.len)
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u is inconsistent", what, c->no);
    c->n = n;
    if (kvt_pools_rebuild(&c->pools, &c->L))
        return kvt_fail(KVT_ECORRUPT, "catalog: %s of collection %u has pools that overlap", what, c->no);
    return 0;
}

/* An id map chunk, either format (its words per id: 1, or 2 with the slot the first format
 * kept); each cluster's count is checked against the directory by the caller. */
static int load_chunk(kvt_coll *c, uint64_t chunk, const void *blob, size_t len, uint32_t *counts) {
    int v1 = blob_crc_ok(blob, len) && memcmp(blob, LOC_MAGIC_V1, 8) == 0;
    if (!v1 && (!blob_crc_ok(blob, len) || memcmp(blob, LOC_MAGIC, 8) != 0))
        return kvt_fail(KVT_ECORRUPT, "catalog: id map chunk %llu of collection %u fails its checksum",
                        (unsigned long long)chunk, c->no);
    kvt_rbuf r = {blob, len - 4, 8, 0};
    uint64_t ch = kvt_rbuf_u64(&r);
    uint32_t cnt = kvt_rbuf_u32(&r);
    uint64_t lo = chunk * KVT_LOC_CHUNK;
    uint64_t want = c->n - lo < KVT_LOC_CHUNK ? c->n - lo : KVT_LOC_CHUNK;
    size_t words = v1 ? 2 : 1;
    if (r.bad || ch != chunk || cnt != want || r.len - r.pos != (size_t)cnt * words * 4)
        return kvt_fail(KVT_ECORRUPT, "catalog: id map chunk %llu of collection %u is inconsistent",
                        (unsigned long long)chunk, c->no);
    for (uint32_t i = 0; i < cnt; i++) {
        uint32_t cl;
        memcpy(&cl, (const uint8_t *)blob + r.pos + (size_t)i * words * 4, 4);
        if (cl >= c->ncl)
            return kvt_fail(KVT_ECORRUPT, "catalog: id %llu of collection %u maps outside the directory",
                            (unsigned long long)(lo + i), c->no);
        kvt_loc_put(c, lo + i, cl);
        counts[cl]++;
    }
    return 0;
}

/* The data format a directory blob records (0 if the blob fails its checksum): in skip mode
 * the word of the catalog when the data file's header page is damaged. */
static uint32_t dir_format(const void *blob, size_t len) {
    if (!blob_crc_ok(blob, len) || (memcmp(blob, DIR_MAGIC, 8) != 0 && memcmp(blob, DIR_MAGIC_VSUM, 8) != 0)) return 0;
    uint32_t v;
    memcpy(&v, (const uint8_t *)blob + 8, 4);
    return v;
}

typedef struct keys_ctx {
    kvt_coll *c;
} keys_ctx;

/* estimate.c: a directory exported before value sums existed; they are summed from the
 * stored values (the sums start at zero). */
static void take_vsum(void *vctx, uint32_t ci, const uint8_t *recs, uint32_t n) {
    kvt_coll *c = ((keys_ctx *)vctx)->c;
    for (uint32_t i = 0; i < n; i++) kvt_vsum_add(c, ci, kvt_rec_value(&c->L, recs + (size_t)i * c->L.esz));
}

/* The data file's header page against the collection (invariant 3): the catalog's word
 * (checksummed) on the file's format decides its geometry. A header declaring a later format
 * is a newer kvtier's file (KVT_EFORMAT), or, in skip mode when the catalog declares a format
 * this engine reads, a damaged header read on with the catalog's geometry. */
static int open_header(kvt_coll *c, const kvt_coll_params *p, const void *dir_blob, size_t dir_len, int skip) {
    uint8_t page[KVT_DATA_HEADER];
    int rc = skip ? kvt_read_clamped(c, 0, sizeof page, page, 0) : kvt_file_read(c->f, 0, sizeof page, page, 0);
    uint32_t version = rc ? 0 : kvt_data_header_version(page), dir_version = dir_format(dir_blob, dir_len);
    int dir_known = dir_version >= 1 && dir_version <= KVT_FORMAT_VERSION;
    int header_version = (int)version, foreign = version > KVT_FORMAT_VERSION && (!skip || !dir_known);
    if (dir_known) version = dir_version;
    if (version >= 1 && version < KVT_FORMAT_VERSION) /* an older file: read in its own geometry */
        kvt_layout_init(&c->L, p->dim, p->value_dim, p->dtype, p->max_cluster_size, version, !kvt_token_log(p));
    c->pools.sized = c->L.format >= 3; /* format 1/2: pools of one size (pool.h) */
    if (rc) return rc;
    int fields_ok, checksummed;
    rc = kvt_data_header_check(&c->L, p, page, &fields_ok, &checksummed);
    if (rc == KVT_EFORMAT && !foreign) rc = KVT_ECORRUPT;
    if (rc && skip && !foreign) {
        c->ctr.header_damaged = 1;
        return 0;
    }
    if (rc == KVT_EFORMAT)
        return kvt_fail(rc,
                        "%s: data file header is of another format version (%d; this kvtier reads 1 to %d, the "
                        "catalog says %u): written by a newer kvtier, or a damaged header (kvtier verify)",
                        kvt_file_path(c->f), header_version, KVT_FORMAT_VERSION, dir_version);
    if (rc)
        return kvt_fail(rc, "%s: data file header page of collection %u is %s", kvt_file_path(c->f), c->no,
                        fields_ok ? "damaged past its fields (they match the catalog: no entry is affected; "
                                    "open with on_corrupt='skip' to read it)"
                                  : "damaged or does not match the catalog");
    return 0;
}

int kvt_coll_open(kvt_store *s, uint32_t no, const kvt_coll_params *p, const void *dir_blob, size_t dir_len,
                  const void *const *chunks, const size_t *chunk_lens, size_t n_chunks, kvt_coll **out) {
    kvt_clear_error();
    LOCK(s);
    kvt_coll *c;
    uint32_t *counts = NULL;
    int skip = kvt_read_begin() == KVT_READ_SKIP;
    int rc = kvt_coll_new(s, no, p, 0, &c);
    if (rc) goto done;
    rc = open_header(c, p, dir_blob, dir_len, skip);
    int sums_missing = 0;
    if (!rc) rc = load_dir(c, dir_blob, dir_len, &sums_missing);
    uint64_t want = c->n ? (c->n - 1) / KVT_LOC_CHUNK + 1 : 0;
    if (!rc && n_chunks != want)
        rc = kvt_fail(KVT_ECORRUPT, "catalog: collection %u has %zu id map chunks, %llu expected", no, n_chunks,
                      (unsigned long long)want);
    if (!rc && !(counts = calloc((size_t)c->ncl + 1, 4))) rc = kvt_fail(ENOMEM, "open: out of memory");
    for (size_t i = 0; i < n_chunks && !rc; i++) rc = load_chunk(c, i, chunks[i], chunk_lens[i], counts);
    for (uint32_t j = 0; j < c->ncl && !rc; j++)
        if (counts[j] != c->cl[j].n)
            rc = kvt_fail(KVT_ECORRUPT, "catalog: cluster %u of collection %u has %u entries but the id map names %u",
                          j, no, c->cl[j].n, counts[j]);
    if (!rc && token(c)) rc = kvt_rebuild_members(c);
    if (!rc && sums_missing) {
        keys_ctx kc = {c};
        for (uint32_t j = 0; j < c->ncl && !rc; j++) rc = kvt_visit_cluster(c, j, take_vsum, &kc);
        kvt_cache_drop_owner(&s->cache, c);
    }
    if (!rc && c->ops->reopen) rc = c->ops->reopen(c); /* policy none: its resident keys */
    if (!rc) c->committed_mod = c->modc;
    if (rc)
        kvt_coll_forget(s, c);
    else
        *out = c;
done:
    free(counts);
    UNLOCK(s);
    return rc;
}
