/*
 * adapt.h — the adaptive policy (adapt.c): the split rule, flagging, splits of records in
 * DRAM and the pending budget. Every function expects the store mutex held.
 */
#ifndef KVT_ADAPT_H
#define KVT_ADAPT_H

#include <stdint.h>

#include "store.h"

void kvt_maybe_flag(kvt_coll *c, uint32_t j);
void kvt_derive_tau(kvt_coll *c);
int kvt_regroup(kvt_coll *c, uint32_t src, const uint8_t *recs, const uint32_t *part, uint32_t nt, uint32_t *first_new);
void kvt_split_records(kvt_coll *c, uint32_t j, uint8_t *recs, int forced);
void kvt_relieve_pending(kvt_coll *c);
void kvt_split_oversized(kvt_coll *c, uint32_t j);

#endif
