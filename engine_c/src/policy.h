/*
 * policy.h — the clustering policies behind one table (policy.c): static (PQCache-like, the
 * default: entries join their nearest cluster, nothing splits), adaptive (adapt.c: the
 * method's splits), local (local.c: ClusterKV-like windows) and none (token.c: exact
 * token-level retrieval, no clusters). A collection reaches its policy through c->ops; no
 * other file asks which policy a collection has. A hook left NULL means the default: the
 * static policy's behaviour, or nothing to do.
 *
 * Each policy's state lives in a struct of its own, embedded in the structures of store.h
 * (kvt_coll.adapt, .local, .exact; kvt_cluster.ad) and touched only by the policy's file
 * (scripts/check_engine.py checks it); the others call the hooks below or the accessors at
 * the end of this header.
 *
 * The table sits above the files that call it: calls through c->ops are the collection
 * layer's only upcalls (engine_c/README.md), so a policy may use every file beneath it.
 */
#ifndef KVT_POLICY_H
#define KVT_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "kvtier.h"

struct kvt_cluster;
struct kvt_add;
struct kvt_layout;

/* adaptive (adapt.c): the split threshold in force (kvt_coll_params.tau, or derived) */
typedef struct kvt_adapt_coll {
    double tau;
} kvt_adapt_coll;
/* adaptive (adapt.c), per cluster: why a split is wanted (0: not), and the size a cluster
 * that could not split must grow past before it is tried again */
typedef struct kvt_adapt_cluster {
    uint32_t flagged : 2, hold : 30;
} kvt_adapt_cluster;
/* local (local.c): the cluster gathering new entries, or KVT_NONE */
typedef struct kvt_local_coll {
    uint32_t staging;
} kvt_local_coll;
/* none (token.c): every key resident for exact scoring, until they no longer fit the budget
 * (keys_flash: then the key column is scanned from flash) */
typedef struct kvt_exact_coll {
    uint8_t *keys;
    uint64_t keyscap; /* in entries */
    int keys_flash;
    int keys_in_image; /* the last swap image written carries the keys */
} kvt_exact_coll;

/* A writer of a parked collection's swap image (virtualize.c). */
typedef void (*kvt_put_fn)(void *w, const void *p, size_t n);

typedef struct kvt_policy_ops {
    /* 0: the policy keeps no clusters to score, split or estimate (none): one chain of
     * entries in token order, retrieved exactly (its retrieve hook) and searched by scanning
     * every key (search.c, token.c) */
    int clustered;

    /* ---- parameters and sizes (kvt_coll_create, budget.c) */
    int (*check_params)(const kvt_coll_params *p);
    /* entries per cluster the policy aims for (kvt_budget_estimate's cluster count) */
    uint64_t (*cluster_size)(const kvt_coll_params *p);
    /* what the policy holds beside the clusters, per collection of n entries: resident keys,
     * the scratch of its own retrieve (0: a cluster read), entries waiting for splits */
    void (*budget)(const kvt_coll_params *p, uint64_t n, const struct kvt_layout *L, double fetch, uint64_t *keys,
                   uint64_t *read, uint64_t *pending);

    /* ---- a collection's life (index.c, virtualize.c, checkpoint.c, stats.c) */
    void (*init)(kvt_coll *c);
    void (*drop)(kvt_coll *c);                   /* frees what its state holds in DRAM (parked, or freed) */
    int (*reopen)(kvt_coll *c);                  /* reopened from a checkpoint: rebuilds what its state holds */
    int (*grow_ids)(kvt_coll *c, uint64_t need); /* the index grows to `need` entries */
    uint64_t (*trim)(kvt_coll *c);               /* gives back growth slack: bytes freed */
    int (*give_way)(kvt_coll *c);                /* frees what may go under pressure: 1 if any */
    /* the directory's policy words (checkpoint.c) and the collection's statistics */
    double (*tau)(const kvt_coll *c);
    uint32_t (*staging)(const kvt_coll *c);
    void (*load_dir)(kvt_coll *c, double tau, uint32_t staging);
    /* per cluster, two words of state for the directory and the swap image; a directory
     * keeps whether a cluster is flagged, not why (reason_kept 0) */
    void (*cluster_save)(const kvt_coll *c, const struct kvt_cluster *k, uint32_t w[2]);
    void (*cluster_load)(kvt_coll *c, struct kvt_cluster *k, const uint32_t w[2], int reason_kept);
    /* the swap image's policy section, after the id map (virtualize.c); image_get returns
     * 0, or -1 when the image is inconsistent */
    void (*image_put)(kvt_coll *c, kvt_put_fn put, void *w);
    int (*image_get)(kvt_coll *c, kvt_rbuf *r);
    void (*stats)(const kvt_coll *c, kvt_coll_stats *o);

    /* ---- an add (add.c's pipeline, add.h) */
    /* every new entry's cluster, into the id map's slots past n (the first partition of a
     * clustered policy is add.c's own) */
    int (*assign)(kvt_coll *c, struct kvt_add *a);
    /* where cluster j's new entries go: 1 if the policy decided (a->wnow[j], a->topend[j]),
     * 0 for the default (written, the write buffer keeping partial pages); plan_begin runs
     * once before the clusters are planned */
    void (*plan_begin)(kvt_coll *c, struct kvt_add *a);
    int (*plan)(kvt_coll *c, struct kvt_add *a, uint32_t j, int *rc);
    /* upkeep once the entries are in place (never fails the add) */
    void (*after_add)(kvt_coll *c, const struct kvt_add *a);
    /* an add that failed after assign: what assign made is undone (clusters past ncl0 are
     * already gone) */
    void (*undo_add)(kvt_coll *c, const struct kvt_add *a);
    /* whether cluster k holds its new entries in DRAM (in its pending buffer, for a split):
     * its write-buffer tail then waits with them */
    int (*held)(const kvt_coll *c, const struct kvt_cluster *k);

    /* ---- a retrieve (retrieve.c's pipeline) */
    /* the whole retrieve, for a policy without clusters (into r, an empty result) */
    int (*retrieve)(kvt_coll *c, const float *q, uint64_t nq, uint64_t budget, kvt_result *r);
    /* whether the policy wants cluster j's records once read; then it gets them, in order,
     * in a buffer it may permute (rc 0), or learns why not (recs NULL, rc an error) */
    int (*wants_records)(const kvt_coll *c, uint32_t j);
    void (*records_read)(kvt_coll *c, uint32_t j, uint8_t *recs, int rc);
    /* the DRAM records_read takes beside cluster j's records: *scratch while it works (given
     * back), plus what stays taken after it (returned); retrieve.c reserves it with the read,
     * before anything changes, so that the policy's work never depends on what the budget
     * left free (a short budget pages other collections out first) */
    uint64_t (*records_room)(const kvt_coll *c, uint32_t j, uint64_t *scratch);
    void (*after_read)(kvt_coll *c); /* upkeep after the records were handed over */
} kvt_policy_ops;

/* Each policy of KVT_POLICIES (kvtier.h) has its hooks in kvt_policy_<name>, defined in its
 * file (static: policy.c). */
#define KVT_POLICY_OPS_DECL_(id, value, name) extern const kvt_policy_ops kvt_policy_##name;
KVT_POLICIES(KVT_POLICY_OPS_DECL_)
#undef KVT_POLICY_OPS_DECL_

/* The policy of enum kvt_policy value `policy`, or NULL (policy.c: the one table). */
const kvt_policy_ops *kvt_policy_ops_for(int policy);

/* Whether collections of these parameters keep their records in one token-order log (the
 * token layout, for a clustered policy; policy none always keeps token order in pools). */
static inline int kvt_token_log(const kvt_coll_params *p) {
    const kvt_policy_ops *ops = kvt_policy_ops_for(p->policy);
    return p->layout == KVT_LAYOUT_TOKEN && ops && ops->clustered;
}

#endif
