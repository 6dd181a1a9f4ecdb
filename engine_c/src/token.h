/*
 * token.h — the token-level side (token.c): reading single records where they are, and the
 * key scan of the no-cluster baseline (policy none, whose hooks are in its table,
 * policy.h). Every function expects the store mutex held.
 */
#ifndef KVT_TOKEN_H
#define KVT_TOKEN_H

#include <stdint.h>

#include "store.h"

/* File offset of the record of id (which must be on flash). */
int kvt_record_offset(kvt_coll *c, uint64_t id, uint64_t *off);
/* Policy none: fn(ctx, id, key) for every entry, from the resident keys or from flash. */
typedef void (*key_fn)(void *ctx, uint64_t id, const void *key);
int kvt_scan_keys(kvt_coll *c, key_fn fn, void *ctx);

#endif
