/*
 * kvtier.h — the public C API of the kvtier engine.
 *
 * kvtier keeps vectors (keys) with attached values mostly on flash and a budgeted hot set in
 * DRAM. Entries are grouped into clusters; a cluster's entries (id, key, value) are stored
 * contiguously in an extent of a pool on flash, so a cluster is one read.
 *
 * Conventions (in the manner of LMDB's header):
 *  - Handles are opaque. Every call returns int: 0 is success, negative codes are kvtier's
 *    own (KVT_E*), positive codes are errno values from the system.
 *  - kvt_strerror(code) returns "KVT_NAME: text" for every code; kvt_last_error() returns the
 *    detailed message of the calling thread's last failed call (file, operation, syscall).
 *  - The engine persists data files only. The catalog (collection parameters, the cluster
 *    directory, the id map) is owned by the caller: kvt_coll_export_* produce blobs that the
 *    caller commits atomically after kvt_coll_sync() returned, and kvt_coll_open() takes them
 *    back. Data written after the last committed blobs is ignored on reopen.
 *  - A store serialises its calls internally: any call may come from any thread.
 *  - Memory returned by the engine (kvt_result, exported blobs) is owned by the caller and
 *    released with kvt_result_free() / kvt_free().
 */
#ifndef KVTIER_H
#define KVTIER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVT_VERSION_MAJOR 0
#define KVT_VERSION_MINOR 1
/* Bumped whenever the layout of data files or exported blobs changes. The engine reads every
 * format from 1 up to this one (a file keeps its format) and creates files in this one.
 * 2: records padded to 4 KiB pages (pool.h). */
#define KVT_FORMAT_VERSION 3

/* ---- error codes ------------------------------------------------------------------------ */
#define KVT_OK        0
#define KVT_EINVAL    (-30001) /* an argument is out of range or inconsistent */
#define KVT_ECORRUPT  (-30002) /* a checksum or structural check failed on data read back */
#define KVT_EBUDGET   (-30003) /* the DRAM budget cannot hold what the call must keep resident */
#define KVT_ENOTFOUND (-30004) /* an id that was never added */
#define KVT_EFORMAT   (-30005) /* an exported blob or file of another format version */
#define KVT_ECLOSED   (-30006) /* the store was closed */
#define KVT_EINJECTED (-30007) /* a fault injected by a test hook (never in production) */

/* "KVT_NAME: text" for kvtier codes, "ENAME: strerror" for errno values. Never NULL. */
const char *kvt_strerror(int code);
/* The calling thread's last detailed error message ("" if none). Valid until the next call. */
const char *kvt_last_error(void);

/* ---- damaged entries ------------------------------------------------------------------------ */
/* What a read does when a record it needs fails its checksum, does not match the catalog, or
 * lies past the end of a truncated data file. The choice is the calling thread's, like
 * kvt_last_error, and applies to kvt_coll_search, kvt_coll_retrieve(_est), kvt_retrieve_batch,
 * kvt_coll_get and kvt_coll_open:
 *  - KVT_ON_CORRUPT_RAISE (the default): the call fails with KVT_ECORRUPT, its message naming
 *    the data file, the collection and the ids of the damaged records;
 *  - KVT_ON_CORRUPT_SKIP: the call answers from the intact entries: search ranks only them,
 *    retrieve returns only them (the budget is not refilled from other clusters), get fills
 *    only their rows (the rows of the others are zeros); kvt_coll_open accepts a damaged
 *    header page (the catalog, checksummed on its own, gives the file's geometry).
 * Either way kvt_last_unreadable then lists the entries the call could not read. A cluster
 * found damaged is not cached, split or rewritten by the call (a co-location rewrite that
 * meets it is abandoned), so nothing intact is lost and the damage stays where verify finds
 * it. Returns the previous mode, or KVT_EINVAL for an unknown mode. */
enum kvt_on_corrupt { KVT_ON_CORRUPT_RAISE = 0, KVT_ON_CORRUPT_SKIP = 1 };
int kvt_set_on_corrupt(int mode);
/* An entry a read could not read: the collection's number (as given to kvt_coll_create) and
 * its id. */
typedef struct kvt_unreadable {
    uint32_t coll;
    int64_t id;
} kvt_unreadable;
/* The entries the calling thread's last read call (search, retrieve, retrieve_batch, get,
 * open, verify) met damaged, sorted by collection and id, each once; *out (may be NULL) points
 * at them until the thread's next such call. Returns their number. */
size_t kvt_last_unreadable(const kvt_unreadable **out);

/* ---- enums -------------------------------------------------------------------------------- */
enum kvt_dtype { KVT_F32 = 0, KVT_F16 = 1 };
enum kvt_metric { KVT_METRIC_IP = 0, KVT_METRIC_L2 = 1 };
/* The clustering policies, written once: X(ID, value, name) gives KVT_POLICY_ID = value, and
 * `name` is the policy's name in every API (kvt_policy_names; Python's policy="name"). The
 * value is stored in catalogs: it never changes. Listed as the benchmarks compare them: the
 * baselines, then the method. */
#define KVT_POLICIES(X)                                                                                                \
    X(NONE, 3, none)         /* no clusters: exact token-level top-k, one read per entry */                            \
    X(STATIC, 0, static)     /* PQCache-like: entries join their nearest cluster for good */                           \
    X(LOCAL, 2, local)       /* ClusterKV-like: new entries clustered per window */                                    \
    X(ADAPTIVE, 1, adaptive) /* the method: clusters split when their squared error grows */
enum kvt_policy {
#define KVT_POLICY_ENUM_(id, value, name) KVT_POLICY_##id = value,
    KVT_POLICIES(KVT_POLICY_ENUM_)
#undef KVT_POLICY_ENUM_
};
/* The cache policies (kvt_store_opts.cache_policy), the same way. */
#define KVT_CACHE_POLICIES(X)                                                                                          \
    X(LRU, 0, lru)                                                                                                     \
    X(LFU, 1, lfu)                                                                                                     \
    X(CLUSTER, 2, cluster) /* cluster-aligned (docs/design.md §2.3) */
enum kvt_cache_policy {
#define KVT_CACHE_POLICY_ENUM_(id, value, name) KVT_CACHE_##id = value,
    KVT_CACHE_POLICIES(KVT_CACHE_POLICY_ENUM_)
#undef KVT_CACHE_POLICY_ENUM_
};
/* A name table, in the order the X-macro lists it. */
typedef struct kvt_name {
    const char *name;
    int value;
} kvt_name;
const kvt_name *kvt_policy_names(size_t *n);
const kvt_name *kvt_cache_policy_names(size_t *n);
enum kvt_direct { KVT_DIRECT_AUTO = -1, KVT_DIRECT_OFF = 0, KVT_DIRECT_ON = 1 };

/* ---- device model ------------------------------------------------------------------------- */
/* Every read is charged to this model: a batch of reads issued together costs
 * latency + max(ops / iops, bytes / bandwidth), so bandwidth(size) = min(BW, IOPS * size).
 * bandwidth == 0 disables the model (modeled time stays 0). With throttle != 0 the engine
 * also sleeps until the modeled time has passed. */
typedef struct kvt_device {
    double latency_s;     /* per batch of reads, seconds */
    double iops;          /* read operations per second ceiling */
    double bandwidth_Bps; /* sequential read bandwidth, bytes per second */
    int queue_depth;      /* informational: reads the device overlaps */
    int page_size;        /* flash page, bytes */
    int throttle;
} kvt_device;

typedef struct kvt_store_opts {
    uint64_t dram_budget; /* bytes; hard cap on engine-held data memory */
    kvt_device device;
    int direct; /* enum kvt_direct */
    /* Extents read in one batch whose gap is at most this many bytes are read as one request
     * (the gap is read and dropped). 0 merges only touching extents (a pool's unused tail
     * between them counts as touching). A good value is the device's knee, bandwidth /
     * IOPS: reading the gap then costs less than another request. */
    uint64_t merge_gap;
    /* Which cached clusters make room (enum kvt_cache_policy): LRU, LFU, or cluster-aligned
     * (docs/design.md §2.3: clusters updated in the last few decoding steps keep a reserved share; then clusters
     * not read at their collection's latest retrieve leave first, least recently used first;
     * then the coolest, as counted in the collection's retrieves, the one read last first). */
    int cache_policy;
    /* Page-aligned write buffers (docs/design.md §2.2): bytes of DRAM, shared equally by the open
     * collections, in which the clusters appended to most recently gather their newest
     * entries until they fill a whole 4 KiB page, so that no flash page is programmed twice.
     * When a collection's share is full, the buffer of its cluster appended to least recently
     * is written out (a partial page, counted in write_buffer_evictions). 0 writes every
     * append directly. Applies to format-2 (padded) data files. */
    uint64_t write_buffer;
} kvt_store_opts;

typedef struct kvt_coll_params {
    uint32_t dim;               /* key dimension, 1..4096 */
    uint32_t value_dim;         /* value dimension, 0..4096 */
    int dtype;                  /* enum kvt_dtype, for keys and values */
    int metric;                 /* enum kvt_metric */
    int policy;                 /* enum kvt_policy */
    uint32_t init_cluster_size; /* target entries per cluster of the first partition */
    uint32_t max_cluster_size;  /* a pool holds twice this many entries */
    uint32_t kmeans_iters;
    uint64_t seed;
    /* adaptive: a cluster is flagged for a split when its sum of squared distances to its
     * mean (SSE = size x variance) exceeds tau x init_cluster_size, i.e. when it holds more
     * spread than a cluster of the first partition's target size at variance tau; its size
     * exceeding max_cluster_size is a safety net. tau <= 0 derives it from the first
     * partition: tau_factor x the variance that partition reached (its SSE over its entries). */
    double tau, tau_factor;
    uint32_t pending_budget; /* adaptive: entries buffered for flagged clusters' splits */
    /* local: new entries gather in a staging cluster; every local_window of them are
     * clustered on their own into clusters of about local_cluster_size */
    uint32_t local_window, local_cluster_size;
    /* How representatives are scored against a query q. 0: q . mean (the centroid). t > 0:
     * q . mean + t/2 * sum_j q_j^2 var_j, the log of the mean of exp(t * q . k) over a cluster
     * whose keys are Gaussian with per-dimension variances var_j: for an LLM's keys with
     * t = 1/sqrt(head_dim) it ranks clusters by expected attention mass per entry, which
     * favours a loose cluster that still holds high-scoring keys. */
    double score_temp;
    /* Co-location (docs/design.md §2.2): the first `colocate_after` retrieves count which clusters are
     * fetched together; then the collection is rewritten once so that clusters often fetched
     * together sit next to each other (a co-retrieval chain laid across dual-head pools), and
     * one retrieve becomes a few merged reads. 0 disables it. */
    uint32_t colocate_after;
    /* Where records live (a baseline switch, docs/design.md §2.2): KVT_LAYOUT_CLUSTERED (0, the method:
     * each cluster contiguous in dual-head pools) or KVT_LAYOUT_TOKEN (1: one log in insertion
     * order, clusters only in the directory, so a cluster is read as runs of consecutive ids;
     * nothing moves on a split and there is no co-location; up to 2^32 - 1 entries, as its
     * member lists hold 32-bit ids). Policy none always keeps token order. */
    int layout;
    /* != 0: keep each cluster's value sum in DRAM (value_dim float32 per cluster, counted in
     * the budget, persisted with the directory), which kvt_coll_retrieve_est needs. A
     * collection reopened with it on from a directory exported without sums sums its stored
     * values once on open. Ignored by policy none and value_dim 0. */
    int value_sums;
} kvt_coll_params;
enum kvt_layout_kind { KVT_LAYOUT_CLUSTERED = 0, KVT_LAYOUT_TOKEN = 1 };

typedef struct kvt_store kvt_store;
typedef struct kvt_coll kvt_coll;
typedef struct kvt_result kvt_result;

/* ---- store -------------------------------------------------------------------------------- */
/* Opens (creating if needed) the data directory `dir` (which must exist).
 * Errors: KVT_EINVAL, errno from open/stat. */
int kvt_store_open(const char *dir, const kvt_store_opts *opts, kvt_store **out);
/* Closes every collection and frees the store. Does NOT sync: call kvt_coll_sync first.
 * Safe on NULL. */
void kvt_store_close(kvt_store *store);

/* ---- statistics, each counter written once -------------------------------------------------
 * A table X(CTYPE, field, KIND, "key", "also") gives each counter its C field (CTYPE: U64,
 * F64, I32, U64_24 / F64_24 for arrays of 24, STR) and its key in the Python binding's
 * dicts (KIND: INT, FLOAT, BOOL, LIST, STR, HIDDEN for none; "a.b" is key b of the nested
 * dict a; "also" is a second key for the same value, or ""). The structs below, the tables
 * kvt_store_stat_fields / kvt_coll_stat_fields, the binding's dicts and their type stub all
 * come from it. */
#define KVT_STORE_STATS(X)                                                                                             \
    /* DRAM reserved against the budget, the budget, the peak (kvt_store_reset_io_stats restarts) */                   \
    X(U64, dram_bytes, INT, "dram_bytes", "")                                                                          \
    X(U64, dram_budget, INT, "dram_budget", "")                                                                        \
    X(U64, dram_peak_bytes, INT, "dram_peak_bytes", "")                                                                \
    X(U64, cache_bytes, INT, "cache_bytes", "dram_by_use.cache")                                                       \
    X(U64, cached_clusters, INT, "cached_clusters", "")                                                                \
    X(U64, cache_hits, INT, "cache_hits", "")                                                                          \
    X(U64, cache_misses, INT, "cache_misses", "")                                                                      \
    X(U64, evictions, INT, "evictions", "")                                                                            \
    /* device reads actually issued (aligned sizes), and the live entries they carried */                              \
    X(U64, read_ops, INT, "read_ops", "")                                                                              \
    X(U64, read_bytes, INT, "read_bytes", "")                                                                          \
    X(U64, read_entries, INT, "read_entries", "")                                                                      \
    /* reads as a gap-free layout would count them: read_ops plus one per gap a merged read       \
     * crossed (store option merge_gap), and the bytes of those gaps, read and dropped; and the   \
     * bytes of dead slots read inside extents and dropped (format 3: a split's moved child) */                    \
    X(U64, contiguous_reads, INT, "contiguous_reads", "")                                                              \
    X(U64, gap_bytes, INT, "gap_bytes", "")                                                                            \
    X(U64, dead_bytes, INT, "dead_bytes", "")                                                                          \
    X(U64, write_ops, INT, "write_ops", "")                                                                            \
    X(U64, write_bytes, INT, "write_bytes", "")                                                                        \
    X(U64, sync_ops, INT, "sync_ops", "")                                                                              \
    X(F64, modeled_io_seconds, FLOAT, "modeled_io_seconds", "")                                                        \
    X(I32, direct_io, BOOL, "direct_io", "") /* 1 if reads use O_DIRECT */                                             \
    /* reads with size in [2^(i+9), 2^(i+10)) bytes; 0: < 1 KiB */                                                     \
    X(U64_24, read_size_hist, LIST, "read_size_histogram", "")                                                         \
    X(U64, prefetch_issued, INT, "prefetch_issued", "") /* clusters queued by prefetch */                              \
    /* of those, found (loaded or loading) by a later read */                                                          \
    X(U64, prefetch_hits, INT, "prefetch_hits", "")                                                                    \
    /* prefetched clusters evicted before any read used them (a guess not taken, or room lost) */                      \
    X(U64, prefetch_evicted, INT, "prefetch_evicted", "")                                                              \
    X(U64, prefetch_read_bytes, INT, "prefetch_read_bytes", "read_bytes_by_cause.prefetch")                            \
    /* prefetch reads that failed (the cluster is read again on use) */                                                \
    X(U64, prefetch_errors, INT, "prefetch_errors", "")                                                                \
    /* time calls spent waiting for prefetches still loading */                                                        \
    X(F64, io_wait_seconds, FLOAT, "io_wait_seconds", "")                                                              \
    /* group virtualization (kvt_store_park): parked now, images written / installed, the         \
     * installs an operation waited for, their bytes, the swap file's size in use */                    \
    X(U64, parked_collections, INT, "parked_collections", "")                                                          \
    X(U64, swap_outs, INT, "swap_outs", "")                                                                            \
    X(U64, swap_ins, INT, "swap_ins", "")                                                                              \
    X(U64, swap_demand_ins, INT, "swap_demand_ins", "")                                                                \
    /* of swap_outs, the collections the engine parked itself when a call found the budget       \
     * full (demand paging: the least recently used collection first) */                     \
    X(U64, swap_pressure_outs, INT, "swap_pressure_outs", "")                                                          \
    X(U64, swap_write_bytes, INT, "swap_write_bytes", "")                                                              \
    /* image pages a park found as the collection's swap slot held them, and did not write */                          \
    X(U64, swap_unchanged_bytes, INT, "swap_unchanged_bytes", "")                                                      \
    X(U64, swap_read_bytes, INT, "swap_read_bytes", "read_bytes_by_cause.swap")                                        \
    X(U64, swap_file_bytes, INT, "swap_file_bytes", "")                                                                \
    /* bytes read by cause: split_read_bytes (forced loads) and relayout_read_bytes of every      \
     * collection; with prefetch_read_bytes and swap_read_bytes the rest of read_bytes is what    \
     * retrieve, search and get read on demand (retrieve_read_bytes) */                    \
    X(U64, split_read_bytes, INT, "read_bytes_by_cause.split", "")                                                     \
    X(U64, relayout_read_bytes, INT, "read_bytes_by_cause.relayout", "")                                               \
    X(U64, retrieve_read_bytes, INT, "read_bytes_by_cause.retrieve", "")                                               \
    X(U64, partial_page_writes, INT, "partial_page_writes", "")   /* summed over the collections */                    \
    X(U64, write_buffer_entries, INT, "write_buffer_entries", "") /* ... these three too */                            \
    X(U64, write_buffer_evictions, INT, "write_buffer_evictions", "")                                                  \
    X(U64, write_buffer_errors, INT, "write_buffer_errors", "")                                                        \
    /* measured (wall-clock) seconds in read system calls and bytes read, by the buckets of       \
     * read_size_hist: the real bandwidth by request size (reads issued together share their      \
     * batch's time in proportion to their bytes) */                    \
    X(F64, read_seconds, FLOAT, "read_seconds", "")                                                                    \
    X(F64_24, read_size_seconds, LIST, "read_size_seconds", "")                                                        \
    X(U64_24, read_size_bytes, LIST, "read_size_bytes", "")                                                            \
    /* dram_bytes by use, and the peak of each since open or the last kvt_store_reset_io_stats:   \
     * the resident index (cluster directory, representatives, id map, pool table, token-level    \
     * keys), cached clusters (cache_bytes), pending buffers (write-buffer tails and adaptive     \
     * pending entries) and transient buffers (add staging, reads, split scratch).                \
     * dram_fixed_peak is the peak of everything but the cache, which kvt_budget_estimate         \
     * predicts. */                    \
    X(U64, dram_index_bytes, INT, "dram_by_use.index", "")                                                             \
    X(U64, dram_pending_bytes, INT, "dram_by_use.pending", "")                                                         \
    X(U64, dram_buffer_bytes, INT, "dram_by_use.buffers", "")                                                          \
    X(U64, dram_index_peak, INT, "dram_peak_by_use.index", "")                                                         \
    X(U64, dram_cache_peak, INT, "dram_peak_by_use.cache", "")                                                         \
    X(U64, dram_pending_peak, INT, "dram_peak_by_use.pending", "")                                                     \
    X(U64, dram_buffer_peak, INT, "dram_peak_by_use.buffers", "")                                                      \
    X(U64, dram_fixed_peak, INT, "dram_fixed_peak_bytes", "")                                                          \
    /* the read backend in force (kvt_store_io_backend): a static string */                                            \
    X(STR, io_backend, STR, "io_backend", "")

/* The C type of each CTYPE. */
#define KVT_STAT_FIELD_U64(name)                      uint64_t name;
#define KVT_STAT_FIELD_F64(name)                      double name;
#define KVT_STAT_FIELD_I32(name)                      int name;
#define KVT_STAT_FIELD_U64_24(name)                   uint64_t name[24];
#define KVT_STAT_FIELD_F64_24(name)                   double name[24];
#define KVT_STAT_FIELD_STR(name)                      const char *name;
#define KVT_STAT_FIELD_(ctype, name, kind, key, also) KVT_STAT_FIELD_##ctype(name)

typedef struct kvt_store_stats {
    KVT_STORE_STATS(KVT_STAT_FIELD_)
} kvt_store_stats;
int kvt_store_stats_get(kvt_store *store, kvt_store_stats *out);
int kvt_store_reset_io_stats(kvt_store *store);
/* Marks the end of a decoding step (every layer has been through once): the cluster-aligned
 * cache policy measures its horizons in steps, so that a cluster used or updated by layer l
 * keeps its standing until layer l's turn in the next step, however many layers run in
 * between. Callers that never mark steps get one step per call that reads clusters. */
int kvt_store_step(kvt_store *store);
/* The read backend in force for the store's files: "io_uring" (built with liburing, not turned
 * off by KVTIER_IO_URING=0, and granted a ring by the kernel when the store was opened) or
 * "pread". A static string. */
const char *kvt_store_io_backend(kvt_store *store);

/* ---- collections -------------------------------------------------------------------------- */
/* Creates collection number `coll_no` with an empty data file "c<coll_no>.kvd" (truncating
 * any leftover file of that name). Errors: KVT_EINVAL, KVT_EBUDGET, errno. */
int kvt_coll_create(kvt_store *store, uint32_t coll_no, const kvt_coll_params *params, kvt_coll **out);
/* Reopens a collection from its committed directory blob and id-map chunks (see export).
 * chunks[i] holds chunk i (KVT_LOC_CHUNK ids). A damaged data file header is KVT_ECORRUPT,
 * unless the thread reads with KVT_ON_CORRUPT_SKIP (then it opens, with
 * kvt_coll_stats.header_damaged set). Errors: KVT_EFORMAT, KVT_ECORRUPT, KVT_EBUDGET,
 * KVT_EINVAL, errno. */
int kvt_coll_open(kvt_store *store, uint32_t coll_no, const kvt_coll_params *params, const void *dir_blob,
                  size_t dir_len, const void *const *chunks, const size_t *chunk_lens, size_t n_chunks, kvt_coll **out);

/* Appends n entries (keys: n*dim, values: n*value_dim, both in the collection dtype).
 * Ids are assigned consecutively; *first_id receives the first. On error nothing is added.
 * Errors: KVT_EINVAL, KVT_EBUDGET, errno from pwrite. */
int kvt_coll_add(kvt_coll *coll, const void *keys, const void *values, uint64_t n, int64_t *first_id);

/* Approximate top-k per query (float32 queries, nq*dim): scores the representatives, reads
 * the `nprobe` best clusters and rescores their entries exactly. Rows with fewer than k hits
 * are padded with id -1 and score -inf. Errors: KVT_EINVAL, KVT_ECORRUPT, errno. */
int kvt_coll_search(kvt_coll *coll, const float *queries, uint64_t nq, uint32_t k, uint32_t nprobe, int64_t *ids_out,
                    float *scores_out);

/* Chooses search's nprobe from the collection: the fewest probes with which the nq sample
 * queries would find at least `target` (in (0, 1]) of their true top-k, measured exactly in
 * one pass over the collection (every entry scored against every query, each true neighbour's
 * cluster ranked as search ranks it). *nprobe gets that count (1 for policy none, which does
 * not probe, or an empty collection), *recall the recall it reaches on the sample. Reads like
 * a search of every cluster; changes nothing. Errors: KVT_EINVAL, KVT_EBUDGET, KVT_ECORRUPT,
 * errno. */
int kvt_coll_tune_nprobe(kvt_coll *coll, const float *queries, uint64_t nq, uint32_t k, double target, uint32_t *nprobe,
                         double *recall);

/* Whole clusters in descending score (max over the query group) whose entry counts fit in
 * `budget` entries in total. The result owns its arrays. Errors: as search. */
int kvt_coll_retrieve(kvt_coll *coll, const float *queries, uint64_t nq, uint64_t budget, kvt_result **out);
uint64_t kvt_result_count(const kvt_result *res);
uint64_t kvt_result_nclusters(const kvt_result *res);
/* Copies the result out; any pointer may be NULL. keys/values in the collection dtype. */
void kvt_result_copy(const kvt_result *res, int64_t *ids, void *keys, void *values, int32_t *clusters);
void kvt_result_free(kvt_result *res);

/* A retrieve that also estimates the clusters it does not fetch, for attention (the zone
 * beyond the exact one; see estimate.c). est->clusters: how many of the best-scored
 * clusters not fetched are estimated (those the ranking puts next, including any skipped
 * because they did not fit the budget), < 0 all of them, 0 none. est->scale: the attention
 * scale, > 0, or 0 for 1/sqrt(dim). For each query row i the result then carries
 * lse[i] = log sum_j n_j exp(scale * q_i . mean_j) over the estimated clusters j (-inf if
 * none) and values[i] = sum_j softmax_j(...) * vsum_j / n_j (value_dim floats, zeros if
 * none), from the sizes, mean keys and value sums the engine keeps in DRAM: no read beyond
 * those of kvt_coll_retrieve with the same arguments, which this call otherwise equals.
 * Policy none (no clusters) estimates nothing. Errors: as kvt_coll_retrieve, KVT_EINVAL. */
typedef struct kvt_estimate_opts {
    int64_t clusters;
    double scale;
    /* != 0: a cluster's keys taken as Gaussian around their mean rather than all equal to
     * it: log-mass + scale^2 / 2 * sum_k q_k^2 var_k (per-dimension variances when the
     * collection keeps them, score_temp > 0; else the mean variance for every dimension) */
    int variance;
} kvt_estimate_opts;
int kvt_coll_retrieve_est(kvt_coll *coll, const float *queries, uint64_t nq, uint64_t budget,
                          const kvt_estimate_opts *est, kvt_result **out);
/* The estimate of a result of kvt_coll_retrieve_est (nq floats of lse, nq * value_dim floats
 * of values, the clusters and entries estimated); any pointer may be NULL. A result of
 * kvt_coll_retrieve has no estimate: lse -inf, values 0, counts 0. */
void kvt_result_estimate(const kvt_result *res, float *lse, float *values, uint64_t *clusters, uint64_t *entries);

/* Retrieves for a group of n collections of one shape (dim, value_dim, dtype; for an LLM:
 * the KV heads of one layer) in one call. queries: n x nq x dim, member i's group first.
 * Member i's result is exactly kvt_coll_retrieve(colls[i], its queries, nq, budgets[i]),
 * written to rows [i*cap, i*cap + counts[i]) of ids (n*cap), keys (n*cap*dim), values
 * (n*cap*value_dim) and clusters (n*cap); later rows of a member hold id and cluster -1.
 * Any output but counts may be NULL. Every budgets[i] must be <= cap. Errors: KVT_EINVAL
 * (checked for all members before any retrieve), and those of kvt_coll_retrieve, in which
 * case the earlier members have been retrieved. */
int kvt_retrieve_batch(kvt_coll *const *colls, size_t n, const float *queries, uint64_t nq, const uint64_t *budgets,
                       uint64_t cap, int64_t *ids, void *keys, void *values, int32_t *clusters, uint64_t *counts);

/* What a decoding step does with one layer's collections, in one call (kvt_step_batch):
 * 1. adds: add_rows entries to each of n_add collections of one shape (for an LLM: the
 *    tokens that left the previous layer's window), add_keys n_add x add_rows x dim and
 *    add_values n_add x add_rows x value_dim in their dtype, member i's rows first, each
 *    exactly kvt_coll_add;
 * 2. prefetch: kvt_coll_prefetch for each of n_prefetch collections (the next layer's),
 *    prefetch_queries n_prefetch x prefetch_nq x dim, with prefetch_budgets[i];
 * 3. retrieve: as kvt_retrieve_batch for the n collections (n = 0: none), except that
 *    member i's keys and values start at row i * stride of keys and values (stride 0: cap;
 *    else at least cap), so that they can land inside a larger buffer that also holds other
 *    rows, and are written as float32 when out_f32 (a float16 collection's values widened,
 *    exactly); with est (kvt_estimate_opts), each member is kvt_coll_retrieve_est, its
 *    estimate in est_lse (n x nq), est_values (n x nq x value_dim) and est_entries (n).
 * Any part may be empty. */
typedef struct kvt_step_args {
    kvt_coll *const *add_colls;
    size_t n_add;
    const void *add_keys, *add_values;
    uint64_t add_rows;
    kvt_coll *const *prefetch_colls;
    size_t n_prefetch;
    const float *prefetch_queries;
    uint64_t prefetch_nq;
    const uint64_t *prefetch_budgets;
    kvt_coll *const *colls;
    size_t n;
    const float *queries;
    uint64_t nq;
    const uint64_t *budgets;
    uint64_t cap, stride;
    int64_t *ids;
    int32_t *clusters;
    uint64_t *counts;
    void *keys, *values;
    int out_f32;
    const kvt_estimate_opts *est;
    float *est_lse, *est_values;
    uint64_t *est_entries;
} kvt_step_args;
/* Runs the parts in the order above (the order of the separate calls a decoding adapter
 * makes: the previous layer's adds, the next layer's prefetch, this layer's retrieve), each
 * with the result of the separate call. `queued` (may be NULL) receives the clusters the
 * prefetches queued. Errors: KVT_EINVAL (every part's arguments checked before any part
 * runs), then those of the parts, in which case the parts before have run. */
int kvt_step_batch(const kvt_step_args *args, uint64_t *queued);

/* Starts reading, in the background, the clusters kvt_coll_retrieve(coll, queries, nq,
 * budget) would read from flash, and returns at once; the reads land in the cache, and a
 * later retrieve waits only for what is still loading. Charged to the device model as one
 * batch. `queued` (may be NULL) receives the number of clusters queued. A hint: it uses idle
 * room only, brings a parked collection in only if its image fits as the budget stands (it
 * parks nothing to make room), and queues nothing where there is no room. Errors: KVT_EINVAL,
 * ENOMEM. Reads that fail are counted and retried by the call that needs the cluster. */
int kvt_coll_prefetch(kvt_coll *coll, const float *queries, uint64_t nq, uint64_t budget, uint64_t *queued);

/* Keys and values of n ids (any order, repeats allowed). Errors: KVT_ENOTFOUND, KVT_ECORRUPT,
 * errno. */
int kvt_coll_get(kvt_coll *coll, const int64_t *ids, uint64_t n, void *keys_out, void *values_out);

uint64_t kvt_coll_count(const kvt_coll *coll);

/* A collection's statistics (the same table form as KVT_STORE_STATS). */
#define KVT_COLL_STATS(X)                                                                                              \
    X(U64, entries, INT, "entries", "")                                                                                \
    X(U64, clusters, INT, "clusters", "")                                                                              \
    X(U64, pools, INT, "pools", "")                                                                                    \
    X(U64, data_file_bytes, INT, "data_file_bytes", "")                                                                \
    X(F64, mean_cluster_size, FLOAT, "mean_cluster_size", "")                                                          \
    X(F64, max_cluster_size, INT, "max_cluster_size", "")                                                              \
    X(F64, mean_variance, FLOAT, "mean_variance", "")                                                                  \
    X(U64, cached_clusters, INT, "cached_clusters", "")                                                                \
    X(F64, tau, FLOAT, "tau", "") /* adaptive: the split threshold in force */                                         \
    /* clusters split (adaptive) or reclustered windows (local) */                                                     \
    X(U64, splits, INT, "splits", "")                                                                                  \
    X(U64, unsplittable, INT, "unsplittable", "") /* split attempts that found no two groups */                        \
    /* clusters flagged while on flash (split waits for a read) */                                                     \
    X(U64, deferred_splits, INT, "deferred_splits", "")                                                                \
    /* clusters read only to split them (pending budget overflow) */                                                   \
    X(U64, forced_loads, INT, "forced_loads", "")                                                                      \
    /* entries buffered in DRAM for flagged clusters (adaptive) */                                                     \
    X(U64, pending_entries, INT, "pending_entries", "")                                                                \
    X(U64, flagged_clusters, INT, "flagged_clusters", "")                                                              \
    /* bytes read on behalf of splits (forced loads only), and written by splits */                                    \
    X(U64, split_read_bytes, INT, "split_read_bytes", "")                                                              \
    X(U64, split_write_bytes, INT, "split_write_bytes", "")                                                            \
    /* splits that failed on I/O and were left for later; splits postponed because the DRAM      \
     * budget had no room for them */                     \
    X(U64, split_errors, INT, "split_errors", "")                                                                      \
    X(U64, split_skipped, INT, "split_skipped", "")                                                                    \
    /* co-location rewrites done, the bytes they wrote, and read (clusters not in the cache) */                        \
    X(U64, relayouts, INT, "relayouts", "")                                                                            \
    X(U64, relayout_bytes, INT, "relayout_bytes", "")                                                                  \
    X(U64, relayout_read_bytes, INT, "relayout_read_bytes", "")                                                        \
    X(U64, append_bytes, INT, "append_bytes", "") /* bytes of entries added */                                         \
    /* what a naive cluster-by-cluster layout (clusters packed back to back, no room to grow)     \
     * would have moved for the same appends: each append relocates its cluster's entries */                    \
    X(U64, naive_move_bytes, INT, "naive_move_bytes", "")                                                              \
    X(U64, parked, BOOL, "parked", "") /* 1 while parked (kvt_store_park) */                                           \
    /* writes that rewrote a flash page already holding data (the page where an append meets      \
     * earlier records): each costs the device a read-modify-write of that page */                    \
    X(U64, partial_page_writes, INT, "partial_page_writes", "")                                                        \
    /* page-aligned write buffers (kvt_store_opts.write_buffer): entries waiting in them now;     \
     * buffers written out before they filled a page, to make room for hotter clusters; and       \
     * such writes that failed on I/O (the entries stay buffered, written later or by the next    \
     * checkpoint, which reports its own failures) */                    \
    X(U64, write_buffer_entries, INT, "write_buffer_entries", "")                                                      \
    X(U64, write_buffer_evictions, INT, "write_buffer_evictions", "")                                                  \
    X(U64, write_buffer_errors, INT, "write_buffer_errors", "")                                                        \
    /* pending buffers written to flash early because the DRAM budget was needed elsewhere (a    \
     * flagged cluster stays flagged: it splits when it is next read) */                     \
    X(U64, pending_flushes, INT, "pending_flushes", "")                                                                \
    /* policy none: 1 once its keys no longer fit the budget and are scanned from flash (one      \
     * sequential read of the key column per retrieve or search, counted in the I/O stats) */                    \
    X(U64, keys_on_flash, BOOL, "keys_on_flash", "")                                                                   \
    /* adaptive: splits by what flagged the cluster: the variance rule (SSE past its threshold),  \
     * the size cap, and the pending budget's overflow (forced loads) */                    \
    X(U64, splits_variance, INT, "splits_variance", "")                                                                \
    X(U64, splits_size, INT, "splits_size", "")                                                                        \
    X(U64, splits_pending, INT, "splits_pending", "")                                                                  \
    /* retrieves: how many had an entry budget, the sum of returned / budget over them, and      \
     * its mean mean_fill */                     \
    X(U64, fill_retrieves, HIDDEN, "", "")                                                                             \
    X(F64, fill_sum, HIDDEN, "", "")                                                                                   \
    X(F64, mean_fill, FLOAT, "mean_fill", "")                                                                          \
    /* damage met by reads since open: records found damaged (once per read that met them), and \
     * whether the data file's header page was found damaged at open (skip mode, kvtier.h) */                      \
    X(U64, damaged_reads, INT, "damaged_reads", "")                                                                    \
    X(U64, header_damaged, BOOL, "header_damaged", "")                                                                 \
    /* format 3: slots of the clusters' segments that hold a record of another cluster (a split   \
     * keeps its larger child in place; the other child's records there are dead), and the        \
     * clusters rewritten into one head to drop dead slots or join a chain of segments            \
     * (consolidations), with the bytes they wrote */                    \
    X(U64, dead_slots, INT, "dead_slots", "")                                                                          \
    X(U64, consolidations, INT, "consolidations", "")                                                                  \
    X(U64, consolidate_bytes, INT, "consolidate_bytes", "")

typedef struct kvt_coll_stats {
    KVT_COLL_STATS(KVT_STAT_FIELD_)
} kvt_coll_stats;
int kvt_coll_stats_get(kvt_coll *coll, kvt_coll_stats *out);

/* The tables as data (for bindings): one entry per X of KVT_STORE_STATS / KVT_COLL_STATS, in
 * order, with the field's offset in its struct. */
enum kvt_stat_ctype {
    KVT_STAT_CTYPE_U64,
    KVT_STAT_CTYPE_F64,
    KVT_STAT_CTYPE_I32,
    KVT_STAT_CTYPE_U64_24,
    KVT_STAT_CTYPE_F64_24,
    KVT_STAT_CTYPE_STR
};
enum kvt_stat_kind {
    KVT_STAT_KIND_INT,
    KVT_STAT_KIND_FLOAT,
    KVT_STAT_KIND_BOOL,
    KVT_STAT_KIND_LIST,
    KVT_STAT_KIND_STR,
    KVT_STAT_KIND_HIDDEN
};
typedef struct kvt_stat_field {
    const char *field, *key, *also;
    int ctype, kind; /* enum kvt_stat_ctype, enum kvt_stat_kind */
    size_t offset;
} kvt_stat_field;
const kvt_stat_field *kvt_store_stat_fields(size_t *n);
const kvt_stat_field *kvt_coll_stat_fields(size_t *n);
/* Entry count of every cluster (cap entries written, total returned in *n_clusters). */
int kvt_coll_cluster_sizes(kvt_coll *coll, uint32_t *sizes, uint64_t cap, uint64_t *n_clusters);

/* Every cluster slot's entry count and float32 value sum (value_dim floats), by cluster
 * number as kvt_result_copy reports it (free slots: 0 and zeros); cap slots written, their
 * number in *n_clusters. KVT_EINVAL for a collection that keeps no sums (policy none,
 * value_dim 0). For tests and diagnostics of the estimate. */
int kvt_coll_value_sums(kvt_coll *coll, uint32_t *sizes, float *sums, uint64_t cap, uint64_t *n_clusters);

/* ---- group virtualization (docs/design.md §2.3) ---------------------------------------------------- */
/* A group of collections (for an LLM: the KV heads of one layer) can be parked: each one's
 * representatives, cluster directory, id map, pending buffers and, with keep_cache != 0, its
 * cache working set (the cached clusters used since it was last brought in; its other cached
 * clusters are clean copies of the data file and are dropped, as all are with keep_cache 0)
 * are written to the store's swap file "swap.kvs",
 * the group's images in consecutive ranges, and their
 * DRAM is given back to the budget. Parking changes no results: any operation on a parked
 * collection first brings it back (an on-demand swap-in, counted); kvt_store_unpark brings a
 * group back ahead of use with one sequential read per run of consecutive images, and with
 * async != 0 queues those reads on the loader threads and returns at once (an operation on a
 * collection still loading waits for it). Stats and checkpoints of a parked collection leave
 * it parked. The swap file is volatile: it is recreated by the first park of a store and
 * removed on close; what is durable is what checkpoints made so, parked or not.
 * collections: n distinct collections of this store. Errors: KVT_EINVAL, KVT_EBUDGET (an
 * unpark whose image does not fit), KVT_ECORRUPT (a damaged image), errno. */
int kvt_store_park(kvt_store *store, kvt_coll *const *collections, size_t n, int keep_cache);
int kvt_store_unpark(kvt_store *store, kvt_coll *const *collections, size_t n, int async);
int kvt_coll_is_parked(kvt_coll *coll);

/* ---- durability --------------------------------------------------------------------------- */
/* A checkpoint captures, in one atomic step under the store's lock, a collection's state as
 * the caller must commit it: it first writes every buffered entry and fdatasyncs the data
 * file, then exports the cluster directory and every id-map chunk changed since the last
 * commit. After the caller committed the blobs, kvt_coll_committed(coll, cp) lets the engine
 * reuse space that state no longer names. Adds may continue between the two calls. */
#define KVT_LOC_CHUNK 65536u
typedef struct kvt_checkpoint kvt_checkpoint;
int kvt_coll_checkpoint(kvt_coll *coll, kvt_checkpoint **out);
/* The directory blob. */
const void *kvt_checkpoint_dir(const kvt_checkpoint *cp, size_t *len);
size_t kvt_checkpoint_nchunks(const kvt_checkpoint *cp);
/* The i-th changed chunk: its index and blob. */
const void *kvt_checkpoint_chunk(const kvt_checkpoint *cp, size_t i, uint64_t *chunk, size_t *len);
int kvt_coll_committed(kvt_coll *coll, const kvt_checkpoint *cp);
/* 1 if the collection changed (entries, their places, the cluster directory) since the state
 * last passed to kvt_coll_committed, or since it was opened; 0 otherwise. A caller may skip
 * checkpointing an unchanged collection whose state it already committed (a parked one then
 * stays parked). */
int kvt_coll_changed(kvt_coll *coll);
void kvt_checkpoint_free(kvt_checkpoint *cp);
void kvt_free(void *p);

/* ---- verification ------------------------------------------------------------------------- */
/* Reads every record of a collection from its data file (never from the cache) and checks its
 * checksum and that it holds the id the catalog puts there, and checks the data file's header
 * page (its fields against the collection's parameters, and its page checksum; a header
 * written before page checksums existed must be zero past its fields). Records past the end of
 * the file count as damaged. The damaged entries' ids go to kvt_last_unreadable. Reads are
 * charged as any other (one record column, pool by pool); the cache is left as it was. Entries
 * still in DRAM (a write buffer's tail, adaptive pending entries) are not on flash: counted in
 * in_dram, not checked. Errors: KVT_EBUDGET (no room for one pool's read), errno (an I/O error
 * other than a short read). */
typedef struct kvt_verify_t {
    uint64_t records;       /* records read and checked */
    uint64_t damaged;       /* of them, failed (their ids: kvt_last_unreadable) */
    uint64_t in_dram;       /* entries not on flash yet, not checked */
    int header_damaged;     /* 1: the header page fails its checksum or its fields do not match */
    int header_checksummed; /* 1: the header page carries a page checksum (0: an older file) */
    uint64_t file_bytes;    /* the data file's size */
    uint64_t named_bytes;   /* the end of the furthest record the catalog names */
} kvt_verify_t;
int kvt_coll_verify(kvt_coll *coll, kvt_verify_t *out);

/* ---- know before you run ------------------------------------------------------------------ */
/* What a collection of n entries with these parameters needs of the DRAM budget, sized from
 * the structures the engine reserves (see estimate.c). Bytes unless said otherwise. */
typedef struct kvt_budget_t {
    uint64_t entry_bytes;      /* one record on flash */
    uint64_t clusters;         /* clusters assumed: the size the policy aims for */
    uint64_t index;            /* resident index without growth slack */
    uint64_t index_grown;      /* ... with the slack of growing it entry by entry */
    uint64_t keys;             /* policy none: keys kept resident when they fit */
    uint64_t buffers;          /* working memory of the smallest add chunk or cluster read */
    uint64_t pending;          /* write-buffer share plus the adaptive pending budget */
    uint64_t cache;            /* a cache holding one retrieve of `fetch` x n entries */
    uint64_t minimum;          /* index + buffers: below it operations fail with KVT_EBUDGET */
    uint64_t recommended;      /* index_grown + keys + buffers + pending + cache */
    double resident_per_entry; /* index / n */
} kvt_budget_t;
/* write_buffer: the collection's share of kvt_store_opts.write_buffer; fetch: the share of
 * the entries one retrieve fetches (for the recommended cache). Errors: KVT_EINVAL. */
int kvt_budget_estimate(const kvt_coll_params *params, uint64_t n, uint64_t write_buffer, double fetch,
                        kvt_budget_t *out);

/* ---- test hooks --------------------------------------------------------------------------- */
/* Makes the nth (0-based) subsequent I/O call of kind op ('r' read, 'w' write, 's' sync) fail
 * with `code` (an errno, or KVT_EINJECTED); code 0 clears. For fault-injection tests. */
int kvt_store_inject_fault(kvt_store *store, char op, uint64_t nth, int code);

/* Which dot-product kernel the engine chose at run time: "avx2", "neon" or "scalar". */
const char *kvt_simd_kernel(void);

#ifdef __cplusplus
}
#endif
#endif /* KVTIER_H */
