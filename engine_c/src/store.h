/*
 * store.h — the store layer: ties io, pools, clusters and the cache into collections.
 * Its public face is kvtier.h; this header only names the internal structures that the C
 * tests inspect.
 */
#ifndef KVT_STORE_H
#define KVT_STORE_H

#include <pthread.h>

#include "cache.h"
#include "cluster.h"
#include "io.h"
#include "kvtier.h"
#include "pool.h"
#include "simd.h"

typedef struct kvt_loc { uint32_t cl, idx; } kvt_loc;

struct kvt_store {
    pthread_mutex_t mu;     /* serialises every call on the store and its collections */
    kvt_io io;
    kvt_cache cache;
    const kvt_kernels *K;
    char *dir;
    kvt_coll **colls;
    uint32_t ncolls, collcap;
};

struct kvt_coll {
    kvt_store *st;
    uint32_t no;
    kvt_coll_params p;
    kvt_layout L;
    kvt_file *f;
    uint64_t n;                 /* entries; ids are 0..n-1 */
    kvt_cluster *cl;
    float *cent, *cnorm;        /* clcap * dim representatives and their squared norms */
    uint32_t ncl, clcap;
    kvt_pools pools;
    kvt_loc *loc;               /* id -> (cluster, index in cluster) */
    uint64_t loccap;
    uint8_t *dirty;             /* per id-map chunk: changed since last commit */
    uint64_t dirtycap;
    uint64_t acct;              /* budget bytes reserved for the structures above */
};

#endif
