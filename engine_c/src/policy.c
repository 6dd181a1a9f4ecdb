/*
 * policy.c — the policy table (policy.h): the one place a collection's policy number (enum
 * kvt_policy, kvtier.h) becomes what the policy does. The static policy is the default every
 * hook falls back to: entries join their nearest cluster (add.c), clusters never split,
 * retrieves read whole clusters (retrieve.c).
 *
 * Invariants:
 * 1. Every policy of KVT_POLICIES has an entry, at its value, and its hooks are named after
 *    it (kvt_policy_<name>): the names are written once, in kvtier.h.
 */
#include <stddef.h>

#include "policy.h"

const kvt_policy_ops kvt_policy_static = {.clustered = 1};

/* Each policy of KVT_POLICIES (kvtier.h) at its value: its ops are kvt_policy_<name>. */
#define ENTRY_(id, value, name) [value] = &kvt_policy_##name,
static const kvt_policy_ops *const table[] = {KVT_POLICIES(ENTRY_)};

const kvt_policy_ops *kvt_policy_ops_for(int policy) {
    return policy >= 0 && (size_t)policy < sizeof table / sizeof(table[0]) ? table[policy] : NULL;
}
