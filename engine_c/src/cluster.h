/*
 * cluster.h — representatives and the arithmetic on them: k-means for a first partition,
 * nearest-representative assignment, Welford updates of a cluster's mean and variance, and
 * scoring of representatives against a query group.
 *
 * Keys arrive in the collection dtype (float16 or float32); representatives are float32.
 * A cluster's variance is the mean squared distance of its entries to its mean.
 */
#ifndef KVT_CLUSTER_H
#define KVT_CLUSTER_H

#include <stdint.h>

#include "simd.h"

typedef struct kvt_kmeans_scratch {
    double *sums;     /* k * dim */
    uint32_t *counts; /* k */
    float *norms;     /* k */
} kvt_kmeans_scratch;

/* Bytes of working memory kvt_kmeans needs for n points and k centroids (for accounting). */
uint64_t kvt_kmeans_bytes(uint64_t n, uint32_t k, uint32_t dim);

/* Lloyd's k-means over points idx[0..n) of `keys` (dim values of dtype per row, rows `stride`
 * bytes apart; idx NULL means rows 0..n-1). Writes k
 * centroids and, for each listed point, its cluster in assign[i]. Deterministic for a seed.
 * When k is large the partition is built in two levels (sqrt(k) coarse clusters, each split
 * in proportion to its size), so the cost stays about n * 2 sqrt(k) * dim per iteration. */
int kvt_kmeans(const kvt_kernels *K, int dtype, const void *keys, uint32_t dim, size_t stride, const uint32_t *idx,
               uint64_t n, uint32_t k, uint32_t iters, uint64_t seed, float *centroids, uint32_t *assign);

/* Index of the representative nearest (L2) to key; norms[c] = |centroid c|^2. */
uint32_t kvt_nearest(const kvt_kernels *K, int dtype, const void *key, const float *centroids, const float *norms,
                     uint32_t k, uint32_t dim);

/* The same over float16 representatives (a collection's), the key converted once into x
 * (dim floats of scratch). */
uint32_t kvt_nearest_rep(const kvt_kernels *K, int dtype, const void *key, const uint16_t *reps, const float *norms,
                         uint32_t k, uint32_t dim, float *x);

/* Adds x (float32) to a cluster of n entries with mean `mean` and sum of squared distances
 * *m2; m2d (may be NULL) holds the same sum per dimension. */
void kvt_welford_add(float *mean, double *m2, float *m2d, uint32_t n, const float *x, uint32_t dim);

/* Converts one key of dtype into float32. */
void kvt_key_to_f32(const kvt_kernels *K, int dtype, const void *key, float *out, uint32_t dim);

#endif
