/*
 * regroup.h — replacing a cluster by groups of its records, copy on write (regroup.c).
 * Expects the store mutex held.
 */
#ifndef KVT_REGROUP_H
#define KVT_REGROUP_H

#include <stdint.h>

#include "store.h"

/* Replaces cluster `src` (whose records, in order, are `recs`) by nt clusters: group t gets
 * the records with part[i] == t. Group 0 keeps the index src; the others take new slots,
 * the first of them *first_new. On failure the cluster is as it was. */
int kvt_regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt, uint32_t *first_new);

#endif
