/*
 * colocate.h — co-location (colocate.c): counting which clusters retrieves fetch together,
 * then rewriting them once next to each other. Both functions expect the store mutex held.
 */
#ifndef KVT_COLOCATE_H
#define KVT_COLOCATE_H

#include <stdint.h>

#include "store.h"

/* Counts the clusters one retrieve fetched together (the first colocate_after retrieves). */
void kvt_count_coretrieval(kvt_coll *c, const uint32_t *sel, uint64_t nsel);
/* Whether the counting is done and the one-time rewrite is due. */
static inline int kvt_relayout_due(const kvt_coll *c) { return c->cofreq && c->retrieves >= c->p.colocate_after; }
/* The one-time rewrite along the co-retrieval chain. */
int kvt_relayout(kvt_coll *c);

#endif
