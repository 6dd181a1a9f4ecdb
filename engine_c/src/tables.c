/*
 * tables.c — the tables of kvtier.h as data, for bindings: the statistics of KVT_STORE_STATS
 * and KVT_COLL_STATS (each field's key, type and offset) and the names of KVT_POLICIES and
 * KVT_CACHE_POLICIES. Everything here is expanded from those X-macros: a counter or a name
 * is written once, in kvtier.h.
 *
 * Invariants:
 * 1. The tables list their entries in the X-macros' order, and every entry of an X-macro.
 */
#include <stddef.h>

#include "kvtier.h"

#define STAT_ENTRY_(type, ctype, name, kind, key, also)                                                                \
    {#name, key, also, KVT_STAT_CTYPE_##ctype, KVT_STAT_KIND_##kind, offsetof(type, name)},
#define STORE_ENTRY_(ctype, name, kind, key, also) STAT_ENTRY_(kvt_store_stats, ctype, name, kind, key, also)
#define COLL_ENTRY_(ctype, name, kind, key, also)  STAT_ENTRY_(kvt_coll_stats, ctype, name, kind, key, also)

static const kvt_stat_field store_fields[] = {KVT_STORE_STATS(STORE_ENTRY_)};
static const kvt_stat_field coll_fields[] = {KVT_COLL_STATS(COLL_ENTRY_)};

const kvt_stat_field *kvt_store_stat_fields(size_t *n) {
    *n = sizeof store_fields / sizeof *store_fields;
    return store_fields;
}

const kvt_stat_field *kvt_coll_stat_fields(size_t *n) {
    *n = sizeof coll_fields / sizeof *coll_fields;
    return coll_fields;
}

#define NAME_ENTRY_(id, value, name) {#name, value},

static const kvt_name policy_names[] = {KVT_POLICIES(NAME_ENTRY_)};
static const kvt_name cache_policy_names[] = {KVT_CACHE_POLICIES(NAME_ENTRY_)};

const kvt_name *kvt_policy_names(size_t *n) {
    *n = sizeof policy_names / sizeof *policy_names;
    return policy_names;
}

const kvt_name *kvt_cache_policy_names(size_t *n) {
    *n = sizeof cache_policy_names / sizeof *cache_policy_names;
    return cache_policy_names;
}
