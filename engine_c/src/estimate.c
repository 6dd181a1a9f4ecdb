/*
 * estimate.c — value summaries per cluster, and the estimated attention of the clusters a
 * retrieve did not fetch.
 *
 * Why: a sparse retrieve drops the attention mass of every entry it does not fetch. The
 * engine already holds each cluster's mean key and size in DRAM; with the sum of its values
 * it can stand in for a cluster it did not read: weight n_j * exp(scale * q . mean_j) (every
 * key replaced by the mean), value vsum_j / n_j. A caller merges that zone with its exact
 * attention by log-sum-exp; it costs no I/O.
 *
 * Invariants:
 * 1. For every cluster j of a collection that keeps sums (kvt_vsum_kept), vsum[j] is the
 *    float32 sum of the values of its cl[j].n entries, those on flash and those pending in
 *    DRAM alike (up to float rounding of the running sum): an add adds each new value once,
 *    a split or regroup recomputes each group's sum from its records, a fresh slot is zero.
 * 2. vsum has clcap * value_dim floats, grown, freed, counted in the DRAM budget, exported
 *    in the directory blob and carried in park images together with the representatives.
 * 3. kvt_estimate reads only DRAM state (representatives, sizes, sums): a retrieve with an
 *    estimate issues exactly the reads of the same retrieve without one.
 * 4. Only a collection created (or reopened) with value_sums keeps sums; policy none (no
 *    clusters) and value_dim 0 never do, and estimate nothing.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "estimate.h"
#include "policy.h"
#include "score.h"
#include "simd.h"
#include "store.h"

int kvt_vsum_kept(const kvt_coll *c) { return c->p.value_sums && c->p.value_dim > 0 && c->ops->clustered; }

void kvt_vsum_add(kvt_coll *c, uint32_t j, const void *value) {
    if (!c->vsum) return;
    uint32_t vd = c->p.value_dim;
    float *s = c->vsum + (size_t)j * vd;
    if (c->p.dtype == KVT_F16) {
        const uint16_t *h = value;
        for (uint32_t i = 0; i < vd; i++) s[i] += kvt_half_to_float(h[i]);
    } else {
        const float *f = value;
        for (uint32_t i = 0; i < vd; i++) s[i] += f[i];
    }
}

void kvt_vsum_clear(kvt_coll *c, uint32_t j) {
    if (c->vsum) memset(c->vsum + (size_t)j * c->p.value_dim, 0, (size_t)c->p.value_dim * 4);
}

void kvt_vsum_from_records(kvt_coll *c, uint32_t j, const uint8_t *recs, uint32_t n) {
    kvt_vsum_clear(c, j);
    for (uint32_t i = 0; i < n; i++) kvt_vsum_add(c, j, kvt_rec_value(&c->L, recs + (size_t)i * c->L.esz));
}

/* candidates in descending score, ties by index; runs under the store mutex, which also
 * guards the comparator's static */
int kvt_estimate(kvt_coll *c, const float *q, uint64_t nq, const float *scores, const uint32_t *taken, uint64_t ntaken,
                 int64_t want, double scale, int variance, float *lse, float *val, uint64_t *ncl_out,
                 uint64_t *nent_out) {
    const kvt_kernels *K = c->st->K;
    uint32_t d = c->p.dim, vd = c->p.value_dim, m = 0;
    for (uint64_t i = 0; i < nq; i++) lse[i] = -INFINITY;
    memset(val, 0, nq * vd * 4);
    *ncl_out = *nent_out = 0;
    if (!c->vsum || c->ncl == 0 || want == 0) return 0;
    uint64_t bytes = (uint64_t)c->ncl * 13 + 16 + (uint64_t)d * 4;
    int rc = kvt_mem_reserve(&c->st->mem, bytes);
    if (rc) return rc;
    uint32_t *zone = malloc((size_t)c->ncl * 4 + 4);
    float *logn = malloc((size_t)c->ncl * 4 + 4), *s = malloc((size_t)c->ncl * 4 + 4);
    uint8_t *mark = calloc((size_t)c->ncl + 1, 1);
    float *q2 = malloc((size_t)d * 4);
    if (!zone || !logn || !s || !mark || !q2) {
        rc = kvt_fail(ENOMEM, "retrieve: out of memory for the estimate");
        goto out;
    }
    for (uint64_t t = 0; t < ntaken; t++) mark[taken[t]] = 1;
    for (uint32_t j = 0; j < c->ncl; j++)
        if (!mark[j] && c->cl[j].n) zone[m++] = j;
    if (want > 0 && (uint64_t)want < m) { /* the best `want` of the rest, as the ranking goes */
        for (uint32_t j = 0; j < c->ncl; j++) s[j] = !mark[j] && c->cl[j].n ? scores[j] : -INFINITY;
        kvt_top_by_score(zone, c->ncl, (uint32_t)want, s); /* the excluded rank last */
        m = (uint32_t)want;
    }
    for (uint32_t t = 0; t < m; t++) {
        logn[t] = logf((float)c->cl[zone[t]].n);
        *nent_out += c->cl[zone[t]].n;
    }
    *ncl_out = m;
    if (!m) goto out;
    float half_t2 = (float)(0.5 * scale * scale);
    for (uint64_t i = 0; i < nq; i++) {
        const float *qi = q + i * d;
        float mx = -INFINITY, qq = variance ? K->dot_f32(qi, qi, d) : 0;
        if (variance && c->m2d)
            for (uint32_t k = 0; k < d; k++) q2[k] = qi[k] * qi[k];
        for (uint32_t t = 0; t < m; t++) {
            uint32_t j = zone[t];
            s[t] = logn[t] + (float)scale * K->dot_f16_f32(c->cent + (size_t)j * d, qi, d);
            if (variance) { /* m2 sums are over n entries: var = m2 / n */
                float inv_n = 1.0f / (float)c->cl[j].n;
                s[t] += half_t2 * inv_n *
                        (c->m2d ? K->dot_f32(q2, c->m2d + (size_t)j * d, d) : qq * (float)(c->cl[j].m2 / (float)d));
            }
            if (s[t] > mx) mx = s[t];
        }
        double sum = 0;
        float *vi = val + i * vd;
        for (uint32_t t = 0; t < m; t++) {
            float w = expf(s[t] - mx);
            sum += w;
            /* w * mean value = (w / n) * sum of values */
            float a = w / (float)c->cl[zone[t]].n;
            const float *vs = c->vsum + (size_t)zone[t] * vd;
            for (uint32_t k = 0; k < vd; k++) vi[k] += a * vs[k];
        }
        float inv = (float)(1.0 / sum);
        for (uint32_t k = 0; k < vd; k++) vi[k] *= inv;
        lse[i] = mx + (float)log(sum);
    }
out:
    free(q2);
    free(mark);
    free(zone);
    free(logn);
    free(s);
    kvt_mem_release(&c->st->mem, bytes);
    return rc;
}
