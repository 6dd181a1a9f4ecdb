/*
 * token.h — the token-level side (token.c): the no-cluster baseline (policy none: exact
 * top-k, each entry read on its own, the key scan) and the token layout's log, where records
 * sit in id order. Every function expects the store mutex held.
 */
#ifndef KVT_TOKEN_H
#define KVT_TOKEN_H

#include <stdint.h>

#include "score.h"
#include "store.h"

/* File offset of the record of id (which must be on flash). */
int kvt_record_offset(kvt_coll *c, uint64_t id, uint64_t *off);
/* Policy none: the exact top-budget entries by score, into r. */
int kvt_retrieve_tokens(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result *r);
/* Policy none: fn(ctx, id, key) for every entry, from the resident keys or from flash. */
typedef void (*key_fn)(void *ctx, uint64_t id, const void *key);
int kvt_scan_keys(kvt_coll *c, key_fn fn, void *ctx);

#endif
