/*
 * local.h — the local-update baseline (local.c). Expects the store mutex held.
 */
#ifndef KVT_LOCAL_H
#define KVT_LOCAL_H

#include "store.h"

/* The staging cluster reached its window: clusters its entries on their own. */
int kvt_recluster_staging(kvt_coll *c);

#endif
