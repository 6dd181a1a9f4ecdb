/*
 * index.c — a collection's resident index (store.h's kvt_coll in DRAM): making and freeing
 * one, the arrays every file grows against the DRAM budget (the cluster table with its
 * representatives, segment and member lists, pending buffers, the id map, the pool table,
 * token-level keys), giving their slack back, and cluster slots with their statistics.
 *
 * Invariants (besides the collection layer's, store.c 1-5):
 * 1. Every array is grown through grow_to, which reserves its growth first, for the index
 *    (coll->acct) or for pending buffers (coll->acct_pend), and frees give it back: acct and
 *    acct_pend are what the collection holds of the ledger, released whole when it is freed.
 * 2. The per-cluster arrays (cl, cent, cnorm, m2d, vsum) always have one capacity, clcap.
 * 3. Growth slack is never what makes an operation fail: without room for it an array grows
 *    to exactly what it needs, and a call run again for want of budget grows none.
 * 4. Representatives are stored in float16 and every computation on them is float32: a mean
 *    is loaded (kvt_rep_load), updated and stored back rounded (kvt_rep_store), and cnorm is
 *    the squared norm of the stored, rounded mean, so scoring and assignment see one vector.
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "common.h"
#include "estimate.h"
#include "index.h"
#include "policy.h"
#include "simd.h"
#include "store.h"

/* ---- arrays grown against the budget ------------------------------------------------------ */

/* Grows *ptr (elements of `size`) to exactly `target` elements, reserving the growth against
 * the budget for `use` first. New elements are zeroed. */
static int grow_to(kvt_coll *c, int use, void **ptr, size_t size, uint64_t *cap, uint64_t target) {
    if (target <= *cap) return 0;
    uint64_t more = (target - *cap) * size;
    int rc = kvt_mem_reserve_as(&c->st->mem, use, more);
    if (rc) return rc;
    void *p = realloc(*ptr, target * size);
    if (!p) {
        kvt_mem_release_as(&c->st->mem, use, more);
        return kvt_fail(ENOMEM, "out of memory growing an array to %llu elements", (unsigned long long)target);
    }
    memset((char *)p + *cap * size, 0, more);
    *ptr = p;
    *cap = target;
    if (use == KVT_USE_PENDING)
        c->acct_pend += more;
    else
        c->acct += more;
    return 0;
}

/* The capacity to grow an array of elem_bytes per element to, for need elements: the growth
 * step (kvt_grow_step: 1.5x, 1.25x past 128K elements, so that the id map, the largest
 * structure, does not spend half of itself as slack) when the budget has room for it, else
 * exactly need: slack is never what makes an operation fail. */
static uint64_t grow_target(kvt_coll *c, int use, uint64_t cap, uint64_t need, uint64_t elem_bytes) {
    uint64_t nc = kvt_grow_step(cap, need);
    if (nc == need || c->st->tight) return need; /* a call run again for want of budget: no slack */
    if (kvt_mem_reserve_as(&c->st->mem, use, (nc - cap) * elem_bytes)) {
        kvt_clear_error();
        return need;
    }
    kvt_mem_release_as(&c->st->mem, use, (nc - cap) * elem_bytes);
    return nc;
}

int kvt_grow_as(kvt_coll *c, int use, void **ptr, size_t size, uint64_t *cap, uint64_t need) {
    if (need <= *cap) return 0;
    return grow_to(c, use, ptr, size, cap, grow_target(c, use, *cap, need, size));
}
int kvt_grow_array(kvt_coll *c, void **ptr, size_t size, uint64_t *cap, uint64_t need) {
    return kvt_grow_as(c, KVT_USE_INDEX, ptr, size, cap, need);
}

/* Shrinks an array grown by kvt_grow_as to `target` elements (its slack given back). */
static uint64_t shrink_to(kvt_coll *c, int use, void **ptr, size_t size, uint64_t *cap, uint64_t target) {
    if (target >= *cap || !*ptr) return 0;
    void *p = target ? realloc(*ptr, target * size) : NULL;
    if (target && !p) return 0; /* it stays as it was */
    if (!target) free(*ptr);
    uint64_t less = (*cap - target) * size;
    *ptr = p;
    *cap = target;
    kvt_mem_release_as(&c->st->mem, use, less);
    if (use == KVT_USE_PENDING)
        c->acct_pend -= less;
    else
        c->acct -= less;
    return less;
}

uint64_t kvt_shrink_array(kvt_coll *c, void **ptr, size_t size, uint64_t *cap, uint64_t target) {
    return shrink_to(c, KVT_USE_INDEX, ptr, size, cap, target);
}

/* Gives back the pool table's slack: its capacity becomes the slots it uses. */
static uint64_t trim_pools(kvt_coll *c) {
    uint32_t old = c->pools.cap;
    if (!c->pools.n || c->pools.n >= old) return 0;
    (void)kvt_pools_reserve(&c->pools, c->pools.n); /* shrinking never fails */
    uint64_t less = (uint64_t)(old - c->pools.cap) * KVT_POOL_BYTES;
    kvt_mem_release_as(&c->st->mem, KVT_USE_INDEX, less);
    c->acct -= less;
    return less;
}

/* Gives back the growth slack of the arrays that scale with the entries and clusters (the id
 * map, its chunk counters, token-level keys, the per-cluster arrays): under budget pressure an
 * array holds what it holds, so that the budget kvt_budget_estimate calls the minimum (the
 * index without slack) is enough. Bytes freed. */
uint64_t kvt_trim_slack(kvt_coll *c) {
    uint64_t freed = shrink_to(c, KVT_USE_INDEX, &c->loc, c->locw, &c->loccap, c->n);
    freed += shrink_to(c, KVT_USE_INDEX, (void **)&c->mod, sizeof *c->mod, &c->modcap, c->n / KVT_LOC_CHUNK + 1);
    if (c->ops->trim) freed += c->ops->trim(c); /* the policy's arrays: token-level keys */
    freed += trim_pools(c);
    /* the per-cluster arrays, when the slots past ncl own nothing (a slot keeps its buffers
     * for reuse) */
    for (uint32_t j = c->ncl; j < c->clcap; j++)
        if (c->cl[j].segs || c->cl[j].x) return freed;
    if (c->ncl && c->ncl < c->clcap) {
        uint64_t to = c->ncl, cap = c->clcap;
        freed += shrink_to(c, KVT_USE_INDEX, (void **)&c->cl, sizeof *c->cl, &cap, to);
        cap = c->clcap;
        freed += shrink_to(c, KVT_USE_INDEX, (void **)&c->cent, (size_t)c->p.dim * sizeof(uint16_t), &cap, to);
        cap = c->clcap;
        freed += shrink_to(c, KVT_USE_INDEX, (void **)&c->cnorm, sizeof(float), &cap, to);
        cap = c->clcap;
        if (c->m2d) freed += shrink_to(c, KVT_USE_INDEX, (void **)&c->m2d, (size_t)c->p.dim * sizeof(float), &cap, to);
        cap = c->clcap;
        if (c->vsum)
            freed += shrink_to(c, KVT_USE_INDEX, (void **)&c->vsum, (size_t)c->p.value_dim * sizeof(float), &cap, to);
        c->clcap = (uint32_t)to;
    }
    return freed;
}

/* Frees an array grown by kvt_grow_as and returns its bytes to the budget. */
void kvt_free_as(kvt_coll *c, int use, void *p, uint64_t cap, size_t size) {
    free(p);
    kvt_mem_release_as(&c->st->mem, use, cap * size);
    if (use == KVT_USE_PENDING)
        c->acct_pend -= cap * size;
    else
        c->acct -= cap * size;
}
void kvt_free_array(kvt_coll *c, void *p, uint64_t cap, size_t size) { kvt_free_as(c, KVT_USE_INDEX, p, cap, size); }

uint64_t kvt_cluster_slot_bytes(const kvt_coll_params *p) {
    return sizeof(kvt_cluster) + (uint64_t)p->dim * (sizeof(uint16_t) + (p->score_temp > 0) * sizeof(float)) +
           sizeof(float) +
           (p->value_sums && p->value_dim && kvt_policy_ops_for(p->policy)->clustered
                ? (uint64_t)p->value_dim * sizeof(float)
                : 0);
}

/* The id map at 4 bytes an entry, before the cluster table grows past KVT_LOC_NARROW slots:
 * a new array, reserved first, then converted (a parked collection's map is not resident:
 * its width is all that changes, and its next image is laid out anew). */
int kvt_widen_ids(kvt_coll *c, uint64_t need) {
    if (c->locw == 4 || need <= KVT_LOC_NARROW) return 0;
    uint32_t *wide = NULL;
    if (c->loccap) {
        int rc = kvt_mem_reserve_as(&c->st->mem, KVT_USE_INDEX, c->loccap * 4);
        if (rc) return rc;
        if (!(wide = malloc(c->loccap * 4))) {
            kvt_mem_release_as(&c->st->mem, KVT_USE_INDEX, c->loccap * 4);
            return kvt_fail(ENOMEM, "out of memory widening the id map");
        }
        c->acct += c->loccap * 4;
        for (uint64_t id = 0; id < c->loccap; id++) wide[id] = ((const uint16_t *)c->loc)[id];
        kvt_free_array(c, c->loc, c->loccap, 2);
    }
    c->loc = wide;
    c->locw = 4;
    c->img_cl = 0; /* the swap image's id map doubles: its arrays move (virtualize.c) */
    return 0;
}

/* One reservation for every per-cluster array, so that a budget that fails part way grows
 * none of them: growing them one by one leaked the accounting of those that grew before the
 * one that failed (they were charged, clcap stayed, and they were freed as clcap's) — under
 * demand paging, a parked collection kept ~5 KB of phantom index per failed growth. */
int kvt_ensure_clusters(kvt_coll *c, uint32_t need) {
    if (need <= c->clcap) return 0;
    /* per-dimension variances only serve the Gaussian score: kept only when it is on;
     * estimate.c: value sums beside the representatives */
    int m2d = c->p.score_temp > 0, vs = kvt_vsum_kept(c);
    uint64_t per = kvt_cluster_slot_bytes(&c->p), old = c->clcap;
    uint64_t to = grow_target(c, KVT_USE_INDEX, old, need, per); /* one capacity for all */
    /* slots a 2-byte id map names: its slack stops at KVT_LOC_NARROW, past it the map widens */
    if (c->locw == 2 && need <= KVT_LOC_NARROW && to > KVT_LOC_NARROW) to = KVT_LOC_NARROW;
    int rc = kvt_widen_ids(c, to);
    if (rc) return rc;
    rc = kvt_mem_reserve_as(&c->st->mem, KVT_USE_INDEX, (to - old) * per);
    if (rc) return rc;
    struct {
        void **p;
        size_t size;
    } arr[5] = {{(void **)&c->cl, sizeof *c->cl},
                {(void **)&c->cent, (size_t)c->p.dim * sizeof(uint16_t)},
                {(void **)&c->cnorm, sizeof(float)},
                {(void **)&c->m2d, m2d ? (size_t)c->p.dim * sizeof(float) : 0},
                {(void **)&c->vsum, vs ? (size_t)c->p.value_dim * sizeof(float) : 0}};
    for (int i = 0; i < 5; i++) {
        if (!arr[i].size) continue;
        /* a realloc that fails leaves the array as it was; one that succeeded before it holds
         * more than clcap says, unaccounted and unused, until the next growth */
        void *p = realloc(*arr[i].p, to * arr[i].size);
        if (!p) {
            kvt_mem_release_as(&c->st->mem, KVT_USE_INDEX, (to - old) * per);
            return kvt_fail(ENOMEM, "out of memory growing the cluster table to %llu", (unsigned long long)to);
        }
        memset((char *)p + old * arr[i].size, 0, (to - old) * arr[i].size);
        *arr[i].p = p;
    }
    for (uint64_t j = old; j < to; j++) c->cnorm[j] = FLT_MAX;
    c->acct += (to - old) * per;
    c->clcap = (uint32_t)to; /* all grew to the same capacity */
    return 0;
}

int kvt_ensure_segs(kvt_coll *c, kvt_cluster *k, uint32_t need) {
    uint64_t cap = k->segcap;
    int rc = kvt_grow_array(c, (void **)&k->segs, sizeof *k->segs, &cap, need);
    k->segcap = (uint32_t)cap;
    return rc;
}

/* Cluster k's side record (store.h kvt_cside), made when it has none, reserved under `use`
 * (pending buffers: KVT_USE_PENDING; member lists: the index). */
static kvt_cside *side(kvt_coll *c, kvt_cluster *k, int use, int *rc) {
    if (k->x) return k->x;
    if ((*rc = kvt_mem_reserve_as(&c->st->mem, use, sizeof(kvt_cside)))) return NULL;
    if (!(k->x = calloc(1, sizeof(kvt_cside)))) {
        kvt_mem_release_as(&c->st->mem, use, sizeof(kvt_cside));
        *rc = kvt_fail(ENOMEM, "out of memory");
        return NULL;
    }
    if (use == KVT_USE_PENDING)
        c->acct_pend += sizeof(kvt_cside);
    else
        c->acct += sizeof(kvt_cside);
    k->x->use = use;
    k->x->wtick = c->wclock;
    return k->x;
}

kvt_cside *kvt_side_new(kvt_coll *c, int use, int *rc) {
    kvt_cluster tmp = {0};
    return side(c, &tmp, use, rc);
}

void kvt_side_discard(kvt_coll *c, kvt_cside *x) {
    kvt_cluster tmp = {0};
    tmp.x = x;
    kvt_side_free(c, &tmp);
}

void kvt_side_attach(kvt_coll *c, kvt_cluster *k, kvt_cside *x, uint8_t *pbuf, uint32_t pcap) {
    if (k->x) { /* it has one already (it cannot hold a buffer here): the new one is not needed */
        kvt_side_discard(c, x);
        x = k->x;
    }
    x->pbuf = pbuf;
    x->pcap = pcap;
    x->ptail = 0;
    x->wtick = c->wclock;
    k->x = x;
}

void kvt_side_release(kvt_coll *c, kvt_cluster *k) {
    if (!k->x || k->x->pbuf || k->x->mem) return;
    kvt_free_as(c, k->x->use, k->x, 1, sizeof(kvt_cside));
    k->x = NULL;
}

/* Frees everything cluster k holds beside it (its side record with its buffers). */
void kvt_side_free(kvt_coll *c, kvt_cluster *k) {
    kvt_cside *x = k->x;
    if (!x) return;
    if (x->pbuf) kvt_free_as(c, KVT_USE_PENDING, x->pbuf, x->pcap, c->L.esz);
    if (x->mem) kvt_free_array(c, x->mem, x->memcap, sizeof *x->mem);
    x->pbuf = NULL;
    x->mem = NULL;
    x->pcap = x->memcap = x->ptail = 0;
    kvt_side_release(c, k);
}

int kvt_ensure_mem(kvt_coll *c, kvt_cluster *k, uint32_t need) {
    int rc = 0;
    kvt_cside *x = side(c, k, KVT_USE_INDEX, &rc);
    if (!x) return rc;
    uint64_t cap = x->memcap;
    rc = kvt_grow_array(c, (void **)&x->mem, sizeof *x->mem, &cap, need);
    x->memcap = (uint32_t)cap;
    if (rc) kvt_side_release(c, k);
    return rc;
}

/* Token layout: every cluster's member list from the id map (after a load): its ids in
 * ascending order (store.c 2); KVT_ECORRUPT if the map does not name each cluster's n. */
int kvt_rebuild_members(kvt_coll *c) {
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        int rc = kvt_ensure_mem(c, k, k->n);
        if (rc) return rc;
        uint32_t *mem = kvt_members(k); /* NULL only when k holds no entry */
        for (uint32_t i = 0; mem && i < k->n; i++) mem[i] = UINT32_MAX;
    }
    uint64_t tmp = (uint64_t)c->ncl * 4 + 4;
    int rc = kvt_mem_reserve(&c->st->mem, tmp);
    if (rc) return rc;
    uint32_t *fill = calloc(c->ncl + 1, 4);
    int made = fill != NULL;
    for (uint64_t id = 0; made && id < c->n; id++) { /* load_chunk checked each cluster's count */
        uint32_t j = kvt_loc(c, id), *mem = kvt_members(&c->cl[j]);
        if (mem && fill[j] < c->cl[j].n) mem[fill[j]++] = (uint32_t)id;
    }
    free(fill);
    kvt_mem_release(&c->st->mem, tmp);
    if (!made) return kvt_fail(ENOMEM, "catalog: out of memory");
    for (uint32_t j = 0; j < c->ncl; j++) {
        const uint32_t *mem = kvt_members(&c->cl[j]);
        for (uint32_t i = 0; mem && i < c->cl[j].n; i++)
            if (mem[i] == UINT32_MAX || (i && mem[i] <= mem[i - 1]))
                return kvt_fail(KVT_ECORRUPT, "catalog: cluster %u of collection %u has an inconsistent member list", j,
                                c->no);
    }
    return 0;
}

int kvt_ensure_pbuf(kvt_coll *c, kvt_cluster *k, uint32_t need) {
    int rc = 0;
    kvt_cside *x = side(c, k, KVT_USE_PENDING, &rc);
    if (!x) return rc;
    uint64_t cap = x->pcap;
    rc = kvt_grow_as(c, KVT_USE_PENDING, (void **)&x->pbuf, c->L.esz, &cap, need);
    x->pcap = (uint32_t)cap;
    if (rc) kvt_side_release(c, k);
    return rc;
}

/* The pool table grows like the other arrays (grow_target: the growth step when the budget
 * has room for it, else exactly what is needed), as one array of KVT_POOL_BYTES per pool. */
int kvt_ensure_pools(kvt_coll *c, uint32_t need) {
    if (need <= c->pools.cap) return 0;
    uint32_t old = c->pools.cap, nc = (uint32_t)grow_target(c, KVT_USE_INDEX, old, need, KVT_POOL_BYTES);
    uint64_t more = (uint64_t)(nc - old) * KVT_POOL_BYTES;
    int rc = kvt_mem_reserve_as(&c->st->mem, KVT_USE_INDEX, more);
    if (rc) return rc;
    rc = kvt_pools_reserve(&c->pools, nc);
    if (rc) {
        kvt_mem_release_as(&c->st->mem, KVT_USE_INDEX, more);
        return rc;
    }
    c->acct += more;
    return 0;
}

int kvt_ensure_ids(kvt_coll *c, uint64_t need) {
    int rc = kvt_grow_array(c, &c->loc, c->locw, &c->loccap, need);
    if (!rc) rc = kvt_grow_array(c, (void **)&c->mod, sizeof *c->mod, &c->modcap, need / KVT_LOC_CHUNK + 1);
    if (!rc && c->ops->grow_ids) rc = c->ops->grow_ids(c, need); /* token-level keys (store.c 5) */
    return rc;
}

void kvt_update_norm(kvt_coll *c, uint32_t k) {
    const uint16_t *h = c->cent + (size_t)k * c->p.dim;
    float s = 0;
    for (uint32_t i = 0; i < c->p.dim; i++) {
        float v = kvt_half_to_float(h[i]);
        s += v * v;
    }
    c->cnorm[k] = c->cl[k].n ? s : FLT_MAX;
}

void kvt_rep_load(const kvt_coll *c, uint32_t j, float *out) {
    c->st->K->f16_to_f32(c->cent + (size_t)j * c->p.dim, out, c->p.dim);
}

void kvt_rep_store(kvt_coll *c, uint32_t j, const float *mean) {
    uint16_t *h = c->cent + (size_t)j * c->p.dim;
    for (uint32_t i = 0; i < c->p.dim; i++) h[i] = kvt_float_to_half(mean[i]);
}

/* A free cluster slot (n == 0, owning nothing), growing the table if needed. */
int kvt_new_cluster(kvt_coll *c, uint32_t *out) {
    int rc = kvt_ensure_clusters(c, c->ncl + 1);
    if (rc) return rc;
    uint32_t j = c->ncl++;
    kvt_cluster *k = &c->cl[j];
    static const uint32_t fresh[2] = {0, 0};
    k->n = k->nseg = k->pend = k->dead = 0;
    kvt_side_free(c, k);
    kvt_policy_cluster_load(c, k, fresh, 1);
    k->m2 = 0;
    k->heat = 0;
    c->cnorm[j] = FLT_MAX;
    if (c->m2d) memset(c->m2d + (size_t)j * c->p.dim, 0, (size_t)c->p.dim * 4);
    kvt_vsum_clear(c, j);
    *out = j;
    return 0;
}

/* Exact mean and squared-distance sum of n records' keys (x: 2 x dim floats of scratch). */
void kvt_stats_from_records(kvt_coll *c, uint32_t j, const uint8_t *recs, uint32_t n, float *x) {
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim;
    float *mean = x + d, *m2d = c->m2d ? c->m2d + (size_t)j * d : NULL;
    double m2 = 0;
    memset(mean, 0, (size_t)d * 4);
    if (m2d) memset(m2d, 0, (size_t)d * 4);
    for (uint32_t i = 0; i < n; i++) {
        kvt_key_to_f32(K, c->p.dtype, kvt_rec_key(recs + (size_t)i * c->L.esz), x, d);
        kvt_welford_add(mean, &m2, m2d, i, x, d);
    }
    kvt_rep_store(c, j, mean);
    kvt_vsum_from_records(c, j, recs, n); /* estimate.c: exact again after a split */
    c->cl[j].m2 = (float)m2;
    c->cl[j].n = n;
    kvt_update_norm(c, j);
}

double kvt_variance(const kvt_cluster *k) { return k->n ? k->m2 / (float)k->n : 0; }

/* ---- collections ------------------------------------------------------------------------- */

void kvt_coll_free(kvt_coll *c) {
    if (!c) return;
    kvt_cache_drop_owner(&c->st->cache, c);
    for (uint32_t i = 0; i < c->clcap; i++) {
        free(c->cl[i].segs);
        if (c->cl[i].x) {
            free(c->cl[i].x->pbuf);
            free(c->cl[i].x->mem);
            free(c->cl[i].x);
        }
    }
    free(c->cl);
    free(c->cent);
    free(c->cnorm);
    free(c->m2d);
    free(c->vsum);
    free(c->cofreq);
    free(c->loc);
    free(c->mod);
    free(c->swap_pgh);
    if (c->ops && c->ops->drop) c->ops->drop(c);
    kvt_pools_free(&c->pools);
    kvt_file_close(c->f);
    kvt_mem_release_as(&c->st->mem, KVT_USE_INDEX, c->acct);
    kvt_mem_release_as(&c->st->mem, KVT_USE_PENDING, c->acct_pend);
    free(c);
}

static int check_params(const kvt_coll_params *p) {
    if (p->dim < 1 || p->dim > 4096) return kvt_fail(KVT_EINVAL, "dim: 1..4096 expected, got %u", p->dim);
    if (p->value_dim > 4096) return kvt_fail(KVT_EINVAL, "value_dim: 0..4096 expected, got %u", p->value_dim);
    if (p->dtype != KVT_F32 && p->dtype != KVT_F16) return kvt_fail(KVT_EINVAL, "dtype: float32 or float16 expected");
    if (p->metric != KVT_METRIC_IP && p->metric != KVT_METRIC_L2)
        return kvt_fail(KVT_EINVAL, "metric: ip or l2 expected");
    const kvt_policy_ops *ops = kvt_policy_ops_for(p->policy);
    if (!ops) return kvt_fail(KVT_EINVAL, "policy: unknown value %d", p->policy);
    if (p->init_cluster_size < 1 || p->init_cluster_size > (1u << 20))
        return kvt_fail(KVT_EINVAL, "init_cluster_size: 1..2^20 expected, got %u", p->init_cluster_size);
    if (p->max_cluster_size < 2 || p->max_cluster_size > (1u << 20))
        return kvt_fail(KVT_EINVAL, "max_cluster_size: 2..2^20 expected, got %u", p->max_cluster_size);
    if (!(p->tau >= 0) || !isfinite(p->tau))
        return kvt_fail(KVT_EINVAL, "tau: a finite value >= 0 expected (0 derives it)");
    if (!(p->tau_factor > 0) || !isfinite(p->tau_factor))
        return kvt_fail(KVT_EINVAL, "tau_factor: a finite value > 0 expected");
    if (!(p->score_temp >= 0) || !isfinite(p->score_temp))
        return kvt_fail(KVT_EINVAL, "score_temp: a finite value >= 0 expected");
    if (p->layout != KVT_LAYOUT_CLUSTERED && p->layout != KVT_LAYOUT_TOKEN)
        return kvt_fail(KVT_EINVAL, "layout: 0 (clustered) or 1 (token) expected, got %d", p->layout);
    return ops->check_params ? ops->check_params(p) : 0;
}

int kvt_coll_new(kvt_store *s, uint32_t no, const kvt_coll_params *p, int truncate, kvt_coll **out) {
    int rc = check_params(p);
    if (rc) return rc;
    for (uint32_t i = 0; i < s->ncolls; i++)
        if (s->colls[i]->no == no) return kvt_fail(KVT_EINVAL, "collection %u is already open", no);
    kvt_coll *c = calloc(1, sizeof *c);
    if (!c) return kvt_fail(ENOMEM, "out of memory");
    c->st = s;
    c->no = no;
    c->p = *p;
    c->ops = kvt_policy_ops_for(p->policy);
    if (c->ops->init) c->ops->init(c);
    kvt_layout_init(&c->L, p->dim, p->value_dim, p->dtype, p->max_cluster_size, KVT_FORMAT_VERSION, !kvt_token_log(p));
    c->pools.sized = c->L.format >= 3; /* pools sized to what they hold (pool.h) */
    c->locw = 2;                       /* until the cluster table passes KVT_LOC_NARROW */
    char path[4096];
    if (snprintf(path, sizeof path, "%s/c%u.kvd", s->dir, no) >= (int)sizeof path) {
        free(c);
        return kvt_fail(KVT_EINVAL, "dir: the store's path is too long (%zu bytes)", strlen(s->dir));
    }
    rc = kvt_file_open(&s->io, path, truncate, &c->f);
    if (rc) {
        free(c);
        return rc;
    }
    if (s->ncolls == s->collcap) {
        uint32_t cap = s->collcap ? s->collcap * 2 : 8;
        kvt_coll **a = realloc(s->colls, cap * sizeof(kvt_coll *));
        if (!a) {
            kvt_coll_free(c);
            return kvt_fail(ENOMEM, "out of memory");
        }
        s->colls = a;
        s->collcap = cap;
    }
    s->colls[s->ncolls++] = c;
    *out = c;
    return 0;
}

void kvt_coll_forget(kvt_store *s, kvt_coll *c) {
    for (uint32_t i = 0; i < s->ncolls; i++)
        if (s->colls[i] == c) {
            s->colls[i] = s->colls[--s->ncolls];
            break;
        }
    kvt_coll_free(c);
}

/* The fields of kvt_coll_stats that come from the cluster table. */
void kvt_cluster_stats(kvt_coll *c, kvt_coll_stats *o) {
    o->cached_clusters = o->flagged_clusters = o->dead_slots = 0;
    o->max_cluster_size = 0;
    double var = 0;
    uint64_t nonempty = 0;
    for (uint32_t j = 0; j < c->ncl; j++) {
        kvt_cluster *k = &c->cl[j];
        if (kvt_cached(c, j)) o->cached_clusters++;
        if (kvt_held(c, k)) o->flagged_clusters++;
        o->dead_slots += k->dead;
        if (!k->n) continue;
        nonempty++;
        var += kvt_variance(k);
        if (k->n > o->max_cluster_size) o->max_cluster_size = k->n;
    }
    o->clusters = nonempty;
    o->mean_cluster_size = nonempty ? (double)c->n / (double)nonempty : 0;
    o->mean_variance = nonempty ? var / (double)nonempty : 0;
}
