/*
 * add.h — an add in flight (add.c's pipeline), as the policies' hooks see it (policy.h):
 * what each step hands the next. Every function expects the store mutex held.
 */
#ifndef KVT_ADD_H
#define KVT_ADD_H

#include <stdint.h>

#include "layout.h"
#include "store.h"

typedef struct kvt_add {
    const void *keys, *values; /* the caller's rows */
    uint64_t n, n0;            /* entries added; the first new id */
    uint64_t ch;               /* chunk: the most rows staged at once */
    uint64_t avail;            /* what the chunk's staging may take (add.c 4) */
    uint64_t transient;        /* bytes reserved for the staging */
    uint32_t ncl0;             /* clusters before the add */
    uint32_t k;                /* clusters the plan spans: 0..k-1 */
    uint32_t sr;               /* scratch records */
    int first_batch;           /* the collection's first partition is made by this add */
    /* assignment: each entry's cluster waits in the id map's slot past n (c->loc[n0+i]) */
    uint32_t *row;   /* chunk rows grouped by cluster (write step) */
    uint32_t *start; /* k + 1: where each cluster's rows start in row */
    /* the plan, per cluster (k + 1 each): entries joining it, how many of its tail and new
     * entries are written now, whether the rest waits in its pending buffer, and (write and
     * publish steps) the new entries met so far */
    uint32_t *cnt, *wnow, *seen;
    uint8_t *topend;
    uint64_t new_room;  /* write-buffer share left for new tails, in entries */
    uint64_t wait_room; /* adaptive: entries that may still wait for splits */
    uint8_t *scratch;   /* sr records for encoding */
    float *x;           /* one key as float32, then a mean (2 x dim floats) */
    undo_log log;       /* the appends made, for a rollback */
} kvt_add;

/* Default assignment (static, adaptive): every entry joins its nearest cluster. */
int kvt_add_nearest(kvt_coll *c, kvt_add *a);
/* The key of row r of the add. */
static inline const uint8_t *kvt_add_key(const kvt_coll *c, const kvt_add *a, uint64_t r) {
    return (const uint8_t *)a->keys + r * c->L.key_bytes;
}

#endif
