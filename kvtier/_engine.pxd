# Declarations of the C engine's public header (engine_c/include/kvtier.h); nothing else.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cdef extern from "kvtier.h" nogil:
    int KVT_FORMAT_VERSION
    int KVT_EINVAL, KVT_ECORRUPT, KVT_EBUDGET, KVT_ENOTFOUND, KVT_EFORMAT, KVT_ECLOSED, KVT_EINJECTED
    unsigned int KVT_LOC_CHUNK

    const char *kvt_strerror(int code)
    const char *kvt_last_error()

    int KVT_ON_CORRUPT_RAISE, KVT_ON_CORRUPT_SKIP
    int kvt_set_on_corrupt(int mode)
    ctypedef struct kvt_unreadable:
        uint32_t coll
        int64_t id
    size_t kvt_last_unreadable(const kvt_unreadable **out)

    ctypedef struct kvt_device:
        double latency_s
        double iops
        double bandwidth_Bps
        int queue_depth
        int page_size
        int throttle

    ctypedef struct kvt_store_opts:
        uint64_t dram_budget
        kvt_device device
        int direct
        uint64_t merge_gap
        int cache_policy
        uint64_t write_buffer

    ctypedef struct kvt_coll_params:
        uint32_t dim
        uint32_t value_dim
        int dtype
        int metric
        int policy
        uint32_t init_cluster_size
        uint32_t max_cluster_size
        uint32_t kmeans_iters
        uint64_t seed
        double tau, tau_factor
        uint32_t pending_budget
        uint32_t local_window, local_cluster_size
        double score_temp
        uint32_t colocate_after
        int layout
        int value_sums

    ctypedef struct kvt_store:
        pass
    ctypedef struct kvt_coll:
        pass
    ctypedef struct kvt_result:
        pass

    int kvt_store_open(const char *dir, const kvt_store_opts *opts, kvt_store **out)
    void kvt_store_close(kvt_store *store)

    # The statistics' fields come from kvtier.h's tables (KVT_STORE_STATS, KVT_COLL_STATS),
    # read through kvt_*_stat_fields: nothing here names a counter.
    ctypedef struct kvt_store_stats:
        pass
    int kvt_store_stats_get(kvt_store *store, kvt_store_stats *out)
    int kvt_store_reset_io_stats(kvt_store *store)
    int kvt_store_step(kvt_store *store)
    const char *kvt_store_io_backend(kvt_store *store)

    int kvt_coll_create(kvt_store *store, uint32_t coll_no, const kvt_coll_params *params, kvt_coll **out)
    int kvt_coll_open(kvt_store *store, uint32_t coll_no, const kvt_coll_params *params,
                      const void *dir_blob, size_t dir_len, const void *const *chunks,
                      const size_t *chunk_lens, size_t n_chunks, kvt_coll **out)
    int kvt_coll_add(kvt_coll *coll, const void *keys, const void *values, uint64_t n, int64_t *first_id)
    int kvt_coll_search(kvt_coll *coll, const float *queries, uint64_t nq, uint32_t k,
                        uint32_t nprobe, int64_t *ids_out, float *scores_out)
    int kvt_coll_retrieve(kvt_coll *coll, const float *queries, uint64_t nq, uint64_t budget,
                          kvt_result **out)
    int kvt_retrieve_batch(kvt_coll *const *colls, size_t n, const float *queries, uint64_t nq,
                           const uint64_t *budgets, uint64_t cap, int64_t *ids, void *keys,
                           void *values, int32_t *clusters, uint64_t *counts)
    int kvt_coll_prefetch(kvt_coll *coll, const float *queries, uint64_t nq, uint64_t budget, uint64_t *queued)
    ctypedef struct kvt_estimate_opts:
        int64_t clusters
        double scale
        int variance
    int kvt_coll_retrieve_est(kvt_coll *coll, const float *queries, uint64_t nq, uint64_t budget,
                              const kvt_estimate_opts *est, kvt_result **out)
    ctypedef struct kvt_step_args:
        kvt_coll *const *add_colls
        size_t n_add
        const void *add_keys
        const void *add_values
        uint64_t add_rows
        kvt_coll *const *prefetch_colls
        size_t n_prefetch
        const float *prefetch_queries
        uint64_t prefetch_nq
        const uint64_t *prefetch_budgets
        kvt_coll *const *colls
        size_t n
        const float *queries
        uint64_t nq
        const uint64_t *budgets
        uint64_t cap
        uint64_t stride
        int64_t *ids
        int32_t *clusters
        uint64_t *counts
        void *keys
        void *values
        int out_f32
        const kvt_estimate_opts *est
        float *est_lse
        float *est_values
        uint64_t *est_entries
    int kvt_step_batch(const kvt_step_args *args, uint64_t *queued)
    int kvt_coll_value_sums(kvt_coll *coll, uint32_t *sizes, float *sums, uint64_t cap, uint64_t *n_clusters)
    void kvt_result_estimate(const kvt_result *res, float *lse, float *values, uint64_t *clusters,
                             uint64_t *entries)
    uint64_t kvt_result_count(const kvt_result *res)
    uint64_t kvt_result_nclusters(const kvt_result *res)
    void kvt_result_copy(const kvt_result *res, int64_t *ids, void *keys, void *values, int32_t *clusters)
    void kvt_result_free(kvt_result *res)
    int kvt_coll_get(kvt_coll *coll, const int64_t *ids, uint64_t n, void *keys_out, void *values_out)
    uint64_t kvt_coll_count(const kvt_coll *coll)

    ctypedef struct kvt_coll_stats:
        pass
    int kvt_coll_stats_get(kvt_coll *coll, kvt_coll_stats *out)
    ctypedef struct kvt_stat_field:
        const char *field
        const char *key
        const char *also
        int ctype
        int kind
        size_t offset
    enum:
        KVT_STAT_CTYPE_U64, KVT_STAT_CTYPE_F64, KVT_STAT_CTYPE_I32, KVT_STAT_CTYPE_U64_24, KVT_STAT_CTYPE_F64_24
        KVT_STAT_CTYPE_STR
        KVT_STAT_KIND_INT, KVT_STAT_KIND_FLOAT, KVT_STAT_KIND_BOOL, KVT_STAT_KIND_LIST, KVT_STAT_KIND_STR
        KVT_STAT_KIND_HIDDEN
    const kvt_stat_field *kvt_store_stat_fields(size_t *n)
    const kvt_stat_field *kvt_coll_stat_fields(size_t *n)
    ctypedef struct kvt_name:
        const char *name
        int value
    const kvt_name *kvt_policy_names(size_t *n)
    const kvt_name *kvt_cache_policy_names(size_t *n)
    ctypedef struct kvt_budget_t:
        uint64_t entry_bytes, clusters, index, index_grown, keys, buffers, pending, cache
        uint64_t minimum, recommended
        double resident_per_entry
    int kvt_budget_estimate(const kvt_coll_params *params, uint64_t n, uint64_t write_buffer, double fetch,
                     kvt_budget_t *out)
    int kvt_store_park(kvt_store *store, kvt_coll *const *collections, size_t n, int keep_cache)
    int kvt_store_unpark(kvt_store *store, kvt_coll *const *collections, size_t n, int async_)
    int kvt_coll_is_parked(kvt_coll *coll)
    int kvt_coll_changed(kvt_coll *coll)
    int kvt_coll_cluster_sizes(kvt_coll *coll, uint32_t *sizes, uint64_t cap, uint64_t *n_clusters)
    ctypedef struct kvt_verify_t:
        uint64_t records, damaged, in_dram
        int header_damaged, header_checksummed
        uint64_t file_bytes, named_bytes
    int kvt_coll_verify(kvt_coll *coll, kvt_verify_t *out)
    int kvt_coll_tune_nprobe(kvt_coll *coll, const float *queries, uint64_t nq, uint32_t k, double target,
                             uint32_t *nprobe, double *recall)

    ctypedef struct kvt_checkpoint:
        pass
    int kvt_coll_checkpoint(kvt_coll *coll, kvt_checkpoint **out)
    const void *kvt_checkpoint_dir(const kvt_checkpoint *cp, size_t *len)
    size_t kvt_checkpoint_nchunks(const kvt_checkpoint *cp)
    const void *kvt_checkpoint_chunk(const kvt_checkpoint *cp, size_t i, uint64_t *chunk, size_t *len)
    int kvt_coll_committed(kvt_coll *coll, const kvt_checkpoint *cp)
    void kvt_checkpoint_free(kvt_checkpoint *cp)
    void kvt_free(void *p)

    int kvt_store_inject_fault(kvt_store *store, char op, uint64_t nth, int code)
    const char *kvt_simd_kernel()
