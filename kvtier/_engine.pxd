# Declarations of the C engine's public header (engine_c/include/kvtier.h); nothing else.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cdef extern from "kvtier.h" nogil:
    int KVT_FORMAT_VERSION
    int KVT_EINVAL, KVT_ECORRUPT, KVT_EBUDGET, KVT_ENOTFOUND, KVT_EFORMAT, KVT_ECLOSED, KVT_EINJECTED
    unsigned int KVT_LOC_CHUNK

    const char *kvt_strerror(int code)
    const char *kvt_last_error()

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

    ctypedef struct kvt_store_stats:
        uint64_t dram_bytes, dram_budget, dram_peak_bytes
        uint64_t cache_bytes, cached_clusters
        uint64_t cache_hits, cache_misses, evictions
        uint64_t read_ops, read_bytes, read_entries
        uint64_t contiguous_reads, gap_bytes
        uint64_t write_ops, write_bytes, sync_ops
        double modeled_io_seconds
        int direct_io
        uint64_t read_size_hist[24]
        uint64_t prefetch_issued, prefetch_hits, prefetch_read_bytes, prefetch_errors
        double io_wait_seconds
        uint64_t parked_collections, swap_outs, swap_ins, swap_demand_ins
        uint64_t swap_write_bytes, swap_read_bytes, swap_file_bytes
        uint64_t split_read_bytes, relayout_read_bytes, partial_page_writes
        uint64_t write_buffer_entries, write_buffer_evictions, write_buffer_errors
        double read_seconds
        double read_size_seconds[24]
        uint64_t read_size_bytes[24]
        uint64_t dram_index_bytes, dram_pending_bytes, dram_buffer_bytes
        uint64_t dram_index_peak, dram_cache_peak, dram_pending_peak, dram_buffer_peak, dram_fixed_peak
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
        uint64_t entries, clusters, pools, data_file_bytes
        double mean_cluster_size, max_cluster_size, mean_variance
        uint64_t cached_clusters
        double tau
        uint64_t splits, unsplittable, deferred_splits, forced_loads, pending_entries
        uint64_t flagged_clusters, split_read_bytes, split_write_bytes, split_errors, split_skipped
        uint64_t relayouts, relayout_bytes, relayout_read_bytes, append_bytes, naive_move_bytes
        uint64_t parked, partial_page_writes, write_buffer_entries, write_buffer_evictions
        uint64_t write_buffer_errors, pending_flushes, keys_on_flash
        uint64_t splits_variance, splits_size, splits_pending, fill_retrieves
        double fill_sum, mean_fill
    int kvt_coll_stats_get(kvt_coll *coll, kvt_coll_stats *out)
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
