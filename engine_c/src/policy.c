/*
 * policy.c — the policy table (policy.h): the one place a collection's policy number (enum
 * kvt_policy, kvtier.h) becomes what the policy does. The static policy is the default every
 * hook falls back to: entries join their nearest cluster (add.c), clusters never split,
 * retrieves read whole clusters (retrieve.c).
 *
 * Invariants:
 * 1. Every value of enum kvt_policy has an entry, and an entry's name is the policy's name
 *    in the Python API (kvtier.config).
 */
#include <stddef.h>

#include "policy.h"

const kvt_policy_ops kvt_policy_static = {.name = "static", .clustered = 1};

static const kvt_policy_ops *const table[] = {
    [KVT_POLICY_STATIC] = &kvt_policy_static,
    [KVT_POLICY_ADAPTIVE] = &kvt_policy_adaptive,
    [KVT_POLICY_LOCAL] = &kvt_policy_local,
    [KVT_POLICY_NONE] = &kvt_policy_none,
};

const kvt_policy_ops *kvt_policy_ops_for(int policy) {
    return policy >= 0 && (size_t)policy < sizeof table / sizeof *table ? table[policy] : NULL;
}
