/*
 * estimate.h — value summaries per cluster and the estimate of the attention mass of the
 * clusters a retrieve did not fetch (internal; the public face is kvt_coll_retrieve_est in
 * kvtier.h). The store keeps, beside each cluster's representative, the float32 sum of its
 * values (kvt_coll.vsum); these functions maintain it and read it.
 */
#ifndef KVT_ESTIMATE_H
#define KVT_ESTIMATE_H

#include "store.h"

/* 1 if collection c keeps value sums (value_sums set, a clustered policy, values). */
int kvt_vsum_kept(const kvt_coll *c);
/* Adds one stored value (collection dtype) to cluster j's sum. */
void kvt_vsum_add(kvt_coll *c, uint32_t j, const void *value);
/* Cluster j's sum recomputed exactly from n records in DRAM. */
void kvt_vsum_from_records(kvt_coll *c, uint32_t j, const uint8_t *recs, uint32_t n);
/* Zeroes cluster j's sum (a fresh slot). */
void kvt_vsum_clear(kvt_coll *c, uint32_t j);

/* The estimate of one retrieve: for each of the nq query rows, the log-sum-exp over the
 * estimated clusters E of log(n_j) + scale * q . mean_j, and the value mean weighted by
 * those masses, sum_j softmax_j * vsum_j / n_j. With `variance`, each log-mass also gets
 * scale^2 / 2 * sum_k q_k^2 var_jk (the keys as a Gaussian around the mean: E exp(t q.k)). E is the `want` best-scored clusters (by
 * `scores`, descending, ties by index) among those not in taken[0..ntaken) with n_j > 0; want < 0
 * takes all of them. Reads nothing from flash. Scratch is reserved against the budget.
 * lse: nq floats (-inf when E is empty); val: nq * value_dim floats (zeros then). */
int kvt_estimate(kvt_coll *c, const float *q, uint64_t nq, const float *scores, const uint32_t *taken, uint64_t ntaken,
                 int64_t want, double scale, int variance, float *lse, float *val, uint64_t *ncl_out,
                 uint64_t *nent_out);

#endif
