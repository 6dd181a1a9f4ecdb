/*
 * regroup.h — replacing a cluster by groups of its records, copy on write (regroup.c).
 * Expects the store mutex held.
 */
#ifndef KVT_REGROUP_H
#define KVT_REGROUP_H

#include <stdint.h>

#include "store.h"

/* Replaces cluster `src` (whose records, in order, are `recs`) by nt clusters: group t gets
 * the records with part[i] == t. One group keeps the index src (group 0; format 3 with two
 * groups, the one with more records on src's flash or tail, which keeps its segments: regroup.c 4),
 * *kept_by says which; the others take new slots, the first of them *first_new. Either
 * pointer may be NULL. On failure the cluster is as it was. */
int kvt_regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt, uint32_t *first_new,
                uint32_t *kept_by);

/* Relabels a two-group split of cluster src (part[i] in {0, 1} for its records `recs`) so
 * that group 0 holds more of the records that were on its flash or in its tail before it was
 * held: the child that keeps src's index (regroup.c 4) is then the same at every DRAM budget
 * and write buffer, in place or not, and so are the seeds of its later splits. */
void kvt_split_labels(const kvt_coll *c, uint32_t src, const uint8_t *recs, uint32_t n, uint32_t *part);

/* Format 3: whether cluster j holds dead slots that outnumber its live records on flash, or
 * more than one segment, and the consolidation budget has room to rewrite it. */
int kvt_wants_consolidation(const kvt_coll *c, uint32_t j);
/* Rewrites cluster j, whose records in order are `recs`, into one fresh head (copy on
 * write): no dead slots, one segment. Counted as a consolidation. */
int kvt_consolidate(kvt_coll *c, uint32_t j, const uint8_t *recs);

#endif
