# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin binding of the C engine. Validation lives in kvtier.store; this module converts
buffers, releases the GIL around every engine call, frees engine memory in ``finally`` and
maps each error code to one exception class (kvtier.errors)."""
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

from kvtier._engine cimport *

from typing import TypedDict as _TypedDict

import numpy as np

from kvtier.errors import error_class, StoreClosedError

FORMAT_VERSION = KVT_FORMAT_VERSION
LOC_CHUNK = KVT_LOC_CHUNK


cdef dict _names(int cache):
    cdef size_t n = 0
    cdef const kvt_name *t = kvt_cache_policy_names(&n) if cache else kvt_policy_names(&n)
    return {t[i].name.decode(): t[i].value for i in range(n)}


#: The clustering policies and the cache policies of kvtier.h's tables (KVT_POLICIES,
#: KVT_CACHE_POLICIES), name -> engine value, in the tables' order.
POLICIES = _names(0)
CACHE_POLICIES = _names(1)


# ---- statistics: every key comes from kvtier.h's tables (KVT_STORE_STATS, KVT_COLL_STATS) ----

cdef list _fields(int coll):
    """(key, also, ctype, kind, offset) per shown field of a table, in its order."""
    cdef size_t n = 0
    cdef const kvt_stat_field *f = kvt_coll_stat_fields(&n) if coll else kvt_store_stat_fields(&n)
    return [(f[i].key.decode(), f[i].also.decode(), f[i].ctype, f[i].kind, f[i].offset)
            for i in range(n) if f[i].kind != KVT_STAT_KIND_HIDDEN]


_STORE_FIELDS = _fields(0)
_COLL_FIELDS = _fields(1)
#: The keys the stats dicts carry ("a.b": key b of the nested dict a), as the tables give them.
STORE_STAT_KEYS = tuple(k for f in _STORE_FIELDS for k in f[:2] if k)
COLL_STAT_KEYS = tuple(k for f in _COLL_FIELDS for k in f[:2] if k)


def _typed_dicts(str name, list fields):
    """The TypedDict of a stats dict, and of each dict nested in it ("a.b" keys: class A
    holds b), as scripts/gen_engine_stub.py writes them into the stub."""
    top, nested = {}, {}
    for key, also, ctype, kind, _ in fields:
        t = ((list[float] if ctype == KVT_STAT_CTYPE_F64_24 else list[int]) if kind == KVT_STAT_KIND_LIST
             else int if kind == KVT_STAT_KIND_INT else float if kind == KVT_STAT_KIND_FLOAT
             else bool if kind == KVT_STAT_KIND_BOOL else str)
        for k in (key, also):
            if not k:
                continue
            group, _, leaf = k.rpartition(".")
            if group:
                nested.setdefault(group, {})[leaf] = t
                top.setdefault(group, None)  # its place; its class below
            else:
                top[leaf] = t
    out = {}
    for group, members in nested.items():
        cls = "".join(w.capitalize() for w in group.split("_"))
        out[cls] = top[group] = _TypedDict(cls, members)
    out[name] = _TypedDict(name, top)
    return out


globals().update(_typed_dicts("StoreStats", _STORE_FIELDS))
globals().update(_typed_dicts("CollStats", _COLL_FIELDS))


cdef object _stat_value(const char *at, int ctype, int kind):
    cdef object v
    if ctype == KVT_STAT_CTYPE_U64:
        v = (<const uint64_t *>at)[0]
    elif ctype == KVT_STAT_CTYPE_F64:
        v = (<const double *>at)[0]
    elif ctype == KVT_STAT_CTYPE_I32:
        v = (<const int *>at)[0]
    elif ctype == KVT_STAT_CTYPE_U64_24:
        v = [int((<const uint64_t *>at)[i]) for i in range(24)]
    elif ctype == KVT_STAT_CTYPE_F64_24:
        v = [float((<const double *>at)[i]) for i in range(24)]
    else:
        v = (<const char * const *>at)[0].decode()
    if kind == KVT_STAT_KIND_INT:
        return int(v)
    if kind == KVT_STAT_KIND_FLOAT:
        return float(v)
    if kind == KVT_STAT_KIND_BOOL:
        return bool(v)
    return v


cdef void _put(dict out, str key, object value):
    group, _, name = key.rpartition(".")
    if group:
        out.setdefault(group, {})[name] = value
    else:
        out[name] = value


cdef dict _stats_dict(list fields, const char *base):
    cdef dict out = {}
    for key, also, ctype, kind, offset in fields:
        value = _stat_value(base + <size_t>offset, ctype, kind)
        _put(out, key, value)
        if also:
            _put(out, also, value)
    return out


def simd_kernel():
    return kvt_simd_kernel().decode()


def strerror(int code):
    return kvt_strerror(code).decode()


def budget_estimate(dict params, uint64_t n, uint64_t write_buffer, double fetch):
    """kvt_budget_estimate for validated collection params (kvtier.budget.estimate)."""
    cdef kvt_coll_params cp = _params(params)
    cdef kvt_budget_t e
    cdef int rc
    with nogil:
        rc = kvt_budget_estimate(&cp, n, write_buffer, fetch, &e)
    check(rc)
    return {"entry_bytes": e.entry_bytes, "clusters": e.clusters, "index": e.index,
            "index_grown": e.index_grown, "keys": e.keys, "buffers": e.buffers, "pending": e.pending,
            "cache": e.cache, "minimum": e.minimum, "recommended": e.recommended,
            "resident_per_entry": e.resident_per_entry}


ON_CORRUPT = {"raise": KVT_ON_CORRUPT_RAISE, "skip": KVT_ON_CORRUPT_SKIP}


def last_unreadable():
    """The entries the calling thread's last read call (search, retrieve, retrieve_batch, get,
    open, verify) met damaged: an int64 array of (collection number, id) rows, sorted."""
    cdef const kvt_unreadable *u = NULL
    cdef size_t n = kvt_last_unreadable(&u), i
    out = np.empty((n, 2), dtype=np.int64)
    cdef int64_t[:, ::1] ov = out
    for i in range(n):
        ov[i, 0] = u[i].coll
        ov[i, 1] = u[i].id
    return out


cdef int check(int rc) except -1:
    if rc == 0:
        return 0
    detail = kvt_last_error().decode(errors="replace")
    name = kvt_strerror(rc).decode()
    e = error_class(rc)(f"{name} — {detail}" if detail else name, rc)
    if rc == KVT_ECORRUPT:
        e.unreadable = last_unreadable()  # (collection number, id) rows the call met damaged
    raise e


cdef class Engine:
    """An open engine store (the data directory); owns every collection handle."""
    cdef kvt_store *ptr
    cdef public object path

    def __cinit__(self, str path, uint64_t dram_budget, tuple device, int direct, uint64_t merge_gap=4096,
                  int cache_policy=2, uint64_t write_buffer=0):
        cdef kvt_store_opts o
        o.dram_budget = dram_budget
        o.device.latency_s, o.device.iops, o.device.bandwidth_Bps = device[0], device[1], device[2]
        o.device.queue_depth, o.device.page_size, o.device.throttle = device[3], device[4], device[5]
        o.direct = direct
        o.merge_gap = merge_gap
        o.cache_policy = cache_policy
        o.write_buffer = write_buffer
        cdef bytes p = path.encode()
        cdef const char *cp = p
        cdef int rc
        with nogil:
            rc = kvt_store_open(cp, &o, &self.ptr)
        check(rc)
        self.path = path

    def __dealloc__(self):
        if self.ptr is not NULL:
            kvt_store_close(self.ptr)
            self.ptr = NULL

    cdef kvt_store *live(self) except NULL:
        if self.ptr is NULL:
            raise StoreClosedError("the store is closed", -30006)
        return self.ptr

    def close(self):
        if self.ptr is not NULL:
            with nogil:
                kvt_store_close(self.ptr)
            self.ptr = NULL

    def stats(self):
        cdef kvt_store_stats s
        cdef kvt_store *p = self.live()
        with nogil:
            kvt_store_stats_get(p, &s)
        return _stats_dict(_STORE_FIELDS, <const char *>&s)

    def park(self, list colls, bint unpark=False, bint async_=False, bint keep_cache=True):
        """Parks (or, with unpark, brings back) a group of Coll handles."""
        cdef size_t n = len(colls), i
        cdef kvt_store *p = self.live()
        cdef kvt_coll **v = <kvt_coll **>malloc((n + 1) * sizeof(kvt_coll *))
        cdef int rc, a = async_, kc = keep_cache
        if v is NULL:
            raise MemoryError()
        try:
            for i in range(n):
                v[i] = (<Coll?>colls[i]).live()
            with nogil:
                if unpark:
                    rc = kvt_store_unpark(p, v, n, a)
                else:
                    rc = kvt_store_park(p, v, n, kc)
            check(rc)
        finally:
            free(v)

    def retrieve_batch(self, list colls, const float[:, :, ::1] q, const uint64_t[::1] budgets,
                       int64_t[:, ::1] ids, keys, values, int32_t[:, ::1] clusters,
                       uint64_t[::1] counts, int on_corrupt=0):
        """Retrieves for a group of Coll handles of one shape in one engine call: q is
        (n, nq, dim); ids, clusters (n, cap), keys (n, cap, dim), values (n, cap, value_dim)
        in the collections' dtype, counts (n,), all preallocated and C-contiguous."""
        cdef size_t n = len(colls), i
        cdef kvt_store *p = self.live()
        if n == 0 or q.shape[0] != n or budgets.shape[0] != n or ids.shape[0] != n \
                or clusters.shape[0] != n or counts.shape[0] != n or clusters.shape[1] != ids.shape[1]:
            raise ValueError("retrieve_batch: q, budgets, ids, clusters and counts need one row per collection")
        cdef uint64_t cap = ids.shape[1]
        cdef Coll c0 = <Coll?>colls[0]
        if tuple(keys.shape) != (n, cap, c0.dim) or tuple(values.shape) != (n, cap, c0.value_dim) \
                or keys.dtype != c0.dtype or values.dtype != c0.dtype or q.shape[2] != c0.dim \
                or not keys.flags.c_contiguous or not values.flags.c_contiguous:
            raise ValueError("retrieve_batch: keys (n, cap, dim) and values (n, cap, value_dim) expected, C-contiguous, in the collections' dtype")
        cdef unsigned char[::1] kb = keys.reshape(-1).view(np.uint8)
        cdef unsigned char[::1] vb = values.reshape(-1).view(np.uint8)
        cdef void *kp = &kb[0] if kb.shape[0] else NULL
        cdef void *vp = &vb[0] if vb.shape[0] else NULL
        cdef int64_t *ip = &ids[0, 0] if cap else NULL
        cdef int32_t *cp = &clusters[0, 0] if cap else NULL
        cdef uint64_t nq = q.shape[1]
        cdef kvt_coll **v = self._handles(colls, "retrieve_batch")
        cdef int rc, prev
        try:
            with nogil:
                prev = kvt_set_on_corrupt(on_corrupt)
                rc = kvt_retrieve_batch(<kvt_coll *const *>v, n, &q[0, 0, 0], nq, &budgets[0], cap,
                                        ip, kp, vp, cp, &counts[0])
                kvt_set_on_corrupt(prev)
            check(rc)
        finally:
            free(v)

    cdef kvt_coll **_handles(self, list colls, str what) except? NULL:
        """A malloc'd array of the live handles of ``colls`` (Coll of this engine); NULL if empty."""
        cdef size_t n = len(colls), i
        if n == 0:
            return NULL
        cdef kvt_coll **v = <kvt_coll **>malloc(n * sizeof(kvt_coll *))
        if v is NULL:
            raise MemoryError()
        try:
            for i in range(n):
                v[i] = (<Coll?>colls[i]).live()
                if (<Coll>colls[i]).owner is not self:
                    raise ValueError(f"{what}: collections of this engine expected")
        except BaseException:
            free(v)
            raise
        return v

    def step_batch(self, list add_colls, add_keys, add_values, list pf_colls, pf_q, pf_budgets,
                   list colls, q, budgets, ids, clusters, counts, keys, values, uint64_t offset=0,
                   est=None, lse=None, est_values=None, est_entries=None, int on_corrupt=0):
        """kvt_step_batch: adds (add_keys (n_add, rows, dim), add_values in the collections'
        dtype), prefetches (pf_q (n_pf, nq, dim) float32, pf_budgets uint64) and the retrieve
        of ``colls`` (q (n, nq, dim) float32, budgets, ids and clusters (n, cap), counts (n,)),
        its keys and values written at rows [offset, offset + cap) of keys (n, rows, dim) and
        values (n, rows, value_dim), float32 or the collections' dtype; est (clusters, scale,
        variance) or None, with lse (n, nq), est_values (n, nq, value_dim) float32 and
        est_entries (n,) uint64. Every array C-contiguous. Returns the clusters queued."""
        cdef kvt_step_args a
        cdef kvt_estimate_opts eo
        cdef uint64_t queued = 0
        cdef int rc, prev
        memset(&a, 0, sizeof(a))
        self.live()
        cdef const unsigned char[::1] akb, avb
        cdef const float[:, :, ::1] pq, rq
        cdef const uint64_t[::1] pb, rb
        cdef int64_t[:, ::1] rid
        cdef int32_t[:, ::1] rcl
        cdef uint64_t[::1] rcn, ren
        cdef unsigned char[::1] kb, vb
        cdef float[:, ::1] rlse
        cdef float[:, :, ::1] rev
        cdef size_t kout, vout
        try:
            a.n_add = len(add_colls)
            if a.n_add:
                a.add_rows = add_keys.shape[1]
                akb = add_keys.reshape(-1).view(np.uint8)
                avb = add_values.reshape(-1).view(np.uint8)
                a.add_keys = &akb[0] if akb.shape[0] else NULL
                a.add_values = &avb[0] if avb.shape[0] else NULL
                a.add_colls = self._handles(add_colls, "step_batch")
            a.n_prefetch = len(pf_colls)
            if a.n_prefetch:
                pq, pb = pf_q, pf_budgets
                if pq.shape[0] != a.n_prefetch or pb.shape[0] != a.n_prefetch:
                    raise ValueError("step_batch: pf_q and pf_budgets need one row per prefetched collection")
                a.prefetch_queries, a.prefetch_nq, a.prefetch_budgets = &pq[0, 0, 0], pq.shape[1], &pb[0]
                a.prefetch_colls = self._handles(pf_colls, "step_batch")
            a.n = len(colls)
            if a.n:
                rq, rb, rid, rcl, rcn = q, budgets, ids, clusters, counts
                if rq.shape[0] != a.n or rb.shape[0] != a.n or rid.shape[0] != a.n or rcl.shape[0] != a.n \
                        or rcn.shape[0] != a.n or rcl.shape[1] != rid.shape[1]:
                    raise ValueError("step_batch: q, budgets, ids, clusters and counts need one row per collection")
                a.cap, a.stride = rid.shape[1], keys.shape[1]
                c0 = <Coll?>colls[0]
                a.out_f32 = keys.dtype == np.float32 and c0.dtype != np.float32
                if not a.out_f32 and keys.dtype != c0.dtype or values.dtype != keys.dtype \
                        or tuple(keys.shape) != (a.n, a.stride, c0.dim) \
                        or tuple(values.shape) != (a.n, a.stride, c0.value_dim) or offset + a.cap > a.stride \
                        or not keys.flags.c_contiguous or not values.flags.c_contiguous:
                    raise ValueError("step_batch: keys (n, rows, dim) and values (n, rows, value_dim) expected, "
                                     "C-contiguous, float32 or the collections' dtype, offset + cap <= rows")
                kb, vb = keys.reshape(-1).view(np.uint8), values.reshape(-1).view(np.uint8)
                kout, vout = keys.itemsize * c0.dim, values.itemsize * c0.value_dim
                a.keys = &kb[offset * kout] if kb.shape[0] else NULL
                a.values = &vb[offset * vout] if vb.shape[0] and vout else NULL
                a.queries, a.nq, a.budgets = &rq[0, 0, 0], rq.shape[1], &rb[0]
                a.ids = &rid[0, 0] if a.cap else NULL
                a.clusters = &rcl[0, 0] if a.cap else NULL
                a.counts = &rcn[0]
                if est is not None:
                    eo.clusters, eo.scale, eo.variance = est
                    rlse, rev, ren = lse, est_values, est_entries
                    a.est, a.est_lse, a.est_values, a.est_entries = &eo, &rlse[0, 0], &rev[0, 0, 0], &ren[0]
                a.colls = self._handles(colls, "step_batch")
            with nogil:
                prev = kvt_set_on_corrupt(on_corrupt)
                rc = kvt_step_batch(&a, &queued)
                kvt_set_on_corrupt(prev)
            check(rc)
            return queued
        finally:
            free(<void *>a.add_colls)
            free(<void *>a.prefetch_colls)
            free(<void *>a.colls)

    def reset_io_stats(self):
        cdef kvt_store *p = self.live()
        with nogil:
            kvt_store_reset_io_stats(p)

    def step(self):
        cdef kvt_store *p = self.live()
        cdef int rc
        with nogil:
            rc = kvt_store_step(p)
        check(rc)

    def inject_fault(self, str op, uint64_t nth, int code):
        cdef kvt_store *p = self.live()
        cdef char o = ord(op)
        cdef int rc
        with nogil:  # it takes the store mutex, which a long retrieve may hold
            rc = kvt_store_inject_fault(p, o, nth, code)
        check(rc)

    def create(self, uint32_t no, dict params):
        cdef kvt_coll_params cp = _params(params)
        cdef kvt_coll *c = NULL
        cdef kvt_store *p = self.live()
        cdef int rc
        with nogil:
            rc = kvt_coll_create(p, no, &cp, &c)
        check(rc)
        return Coll._wrap(self, c, params)

    def open_coll(self, uint32_t no, dict params, bytes dir_blob, list chunks, int on_corrupt=0):
        cdef kvt_coll_params cp = _params(params)
        cdef kvt_coll *c = NULL
        cdef kvt_store *p = self.live()
        cdef size_t n = len(chunks), i
        cdef const void **ptrs = <const void **>malloc((n + 1) * sizeof(void *))
        cdef size_t *lens = <size_t *>malloc((n + 1) * sizeof(size_t))
        cdef const char *d = dir_blob
        cdef size_t dl = len(dir_blob)
        cdef int rc, prev
        try:
            for i in range(n):
                ptrs[i] = <const char *>chunks[i]
                lens[i] = len(chunks[i])
            with nogil:
                prev = kvt_set_on_corrupt(on_corrupt)
                rc = kvt_coll_open(p, no, &cp, d, dl, ptrs, lens, n, &c)
                kvt_set_on_corrupt(prev)
            check(rc)
        finally:
            free(ptrs)
            free(lens)
        return Coll._wrap(self, c, params)


cdef kvt_coll_params _params(dict p) except *:
    cdef kvt_coll_params cp
    cp.dim = p["dim"]
    cp.value_dim = p["value_dim"]
    cp.dtype = {"float32": 0, "float16": 1}[p["dtype"]]
    cp.metric = {"ip": 0, "l2": 1}[p["metric"]]
    cp.policy = POLICIES[p["policy"]]
    cp.init_cluster_size = p["init_cluster_size"]
    cp.max_cluster_size = p["max_cluster_size"]
    cp.kmeans_iters = p["kmeans_iters"]
    cp.seed = p["seed"]
    cp.tau = p.get("tau") or 0.0
    cp.tau_factor = p["tau_factor"]
    cp.pending_budget = p["pending_budget"]
    cp.local_window = p["local_window"]
    cp.local_cluster_size = p["local_cluster_size"]
    cp.score_temp = p.get("score_temp") or 0.0
    cp.colocate_after = p.get("colocate_after") or 0
    cp.layout = {"token": 1}.get(p.get("layout"), 0)  # colocated and clustered: the pools
    cp.value_sums = 1 if p.get("value_sums") else 0
    return cp


cdef class Coll:
    """One collection's engine handle; valid while its Engine is open."""
    cdef kvt_coll *ptr
    cdef Engine owner
    cdef public int dim, value_dim
    cdef public object dtype

    @staticmethod
    cdef Coll _wrap(Engine owner, kvt_coll *c, dict params):
        cdef Coll o = Coll.__new__(Coll)
        o.ptr = c
        o.owner = owner
        o.dim = params["dim"]
        o.value_dim = params["value_dim"]
        o.dtype = np.dtype(params["dtype"])
        return o

    cdef kvt_coll *live(self) except NULL:
        if self.owner.ptr is NULL:
            raise StoreClosedError("the store is closed", -30006)
        return self.ptr

    def count(self):
        cdef kvt_coll *c = self.live()
        cdef uint64_t n
        with nogil:  # it takes the store mutex, which a long retrieve may hold
            n = kvt_coll_count(c)
        return n

    def add(self, keys, values):
        """keys: C-contiguous [n, dim] and values [n, value_dim] in the collection dtype."""
        cdef const unsigned char[::1] kb = keys.reshape(-1).view(np.uint8)
        cdef const unsigned char[::1] vb = values.reshape(-1).view(np.uint8)
        cdef uint64_t n = keys.shape[0]
        cdef int64_t first = 0
        cdef kvt_coll *c = self.live()
        cdef const void *vp = &vb[0] if vb.shape[0] else NULL
        cdef int rc
        with nogil:
            rc = kvt_coll_add(c, &kb[0], vp, n, &first)
        check(rc)
        return first

    def search(self, const float[:, ::1] q, uint32_t k, uint32_t nprobe, int on_corrupt=0):
        cdef uint64_t nq = q.shape[0]
        ids = np.empty((nq, k), dtype=np.int64)
        scores = np.empty((nq, k), dtype=np.float32)
        cdef int64_t[:, ::1] iv = ids
        cdef float[:, ::1] sv = scores
        cdef kvt_coll *c = self.live()
        cdef int rc, prev
        with nogil:
            prev = kvt_set_on_corrupt(on_corrupt)
            rc = kvt_coll_search(c, &q[0, 0], nq, k, nprobe, &iv[0, 0], &sv[0, 0])
            kvt_set_on_corrupt(prev)
        check(rc)
        return ids, scores

    def retrieve(self, const float[:, ::1] q, uint64_t budget, int on_corrupt=0):
        cdef kvt_result *r = NULL
        cdef kvt_coll *c = self.live()
        cdef uint64_t nq = q.shape[0], n
        cdef int rc, prev
        with nogil:
            prev = kvt_set_on_corrupt(on_corrupt)
            rc = kvt_coll_retrieve(c, &q[0, 0], nq, budget, &r)
            kvt_set_on_corrupt(prev)
        check(rc)
        try:
            return self._result_arrays(r)
        finally:
            kvt_result_free(r)

    cdef tuple _result_arrays(self, kvt_result *r):
        """(ids, keys, values, clusters) of a retrieve result, copied out."""
        cdef uint64_t n = kvt_result_count(r)
        ids = np.empty(n, dtype=np.int64)
        keys = np.empty((n, self.dim), dtype=self.dtype)
        values = np.empty((n, self.value_dim), dtype=self.dtype)
        clusters = np.empty(n, dtype=np.int32)
        if n:
            _copy_result(r, ids, keys, values, clusters)
        return ids, keys, values, clusters

    def retrieve_est(self, const float[:, ::1] q, uint64_t budget, int64_t clusters, double scale, int variance=0,
                     int on_corrupt=0):
        """retrieve plus the estimate of the clusters not fetched (kvt_coll_retrieve_est):
        (ids, keys, values, clusters, lse [nq] f32, est_values [nq, value_dim] f32,
        estimated clusters, estimated entries)."""
        cdef kvt_result *r = NULL
        cdef kvt_coll *c = self.live()
        cdef uint64_t nq = q.shape[0], ecl = 0, ent = 0
        cdef kvt_estimate_opts opts
        opts.clusters = clusters
        opts.scale = scale
        opts.variance = variance
        cdef int rc, prev
        with nogil:
            prev = kvt_set_on_corrupt(on_corrupt)
            rc = kvt_coll_retrieve_est(c, &q[0, 0], nq, budget, &opts, &r)
            kvt_set_on_corrupt(prev)
        check(rc)
        try:
            lse = np.empty(nq, dtype=np.float32)
            ev = np.zeros((nq, self.value_dim), dtype=np.float32)
            _copy_estimate(r, lse, ev, &ecl, &ent)
            return self._result_arrays(r) + (lse, ev, int(ecl), int(ent))
        finally:
            kvt_result_free(r)

    def prefetch(self, const float[:, ::1] q, uint64_t budget):
        cdef kvt_coll *c = self.live()
        cdef uint64_t nq = q.shape[0], queued = 0
        cdef int rc
        with nogil:
            rc = kvt_coll_prefetch(c, &q[0, 0], nq, budget, &queued)
        check(rc)
        return queued

    def get(self, const int64_t[::1] ids, int on_corrupt=0):
        cdef uint64_t n = ids.shape[0]
        keys = np.empty((n, self.dim), dtype=self.dtype)
        values = np.empty((n, self.value_dim), dtype=self.dtype)
        if n == 0:
            return keys, values
        cdef unsigned char[::1] kb = keys.reshape(-1).view(np.uint8)
        cdef unsigned char[::1] vb = values.reshape(-1).view(np.uint8)
        cdef void *vp = &vb[0] if vb.shape[0] else NULL
        cdef kvt_coll *c = self.live()
        cdef int rc, prev
        with nogil:
            prev = kvt_set_on_corrupt(on_corrupt)
            rc = kvt_coll_get(c, &ids[0], n, &kb[0], vp)
            kvt_set_on_corrupt(prev)
        check(rc)
        return keys, values

    def stats(self):
        cdef kvt_coll_stats s
        cdef kvt_coll *c = self.live()
        with nogil:
            kvt_coll_stats_get(c, &s)
        return _stats_dict(_COLL_FIELDS, <const char *>&s)

    def tune_nprobe(self, const float[:, ::1] q, uint32_t k, double target):
        """(nprobe, recall): the fewest probes reaching target recall@k on q (kvt_coll_tune_nprobe)."""
        cdef kvt_coll *c = self.live()
        cdef uint64_t nq = q.shape[0]
        cdef uint32_t nprobe = 1
        cdef double recall = 1.0
        cdef int rc
        with nogil:
            rc = kvt_coll_tune_nprobe(c, &q[0, 0], nq, k, target, &nprobe, &recall)
        check(rc)
        return nprobe, recall

    def verify(self):
        """Reads and checks every record on flash and the header page (kvt_coll_verify): a dict
        of counts, and the damaged ids in "unreadable" (int64, sorted)."""
        cdef kvt_verify_t v
        cdef kvt_coll *c = self.live()
        cdef int rc
        with nogil:
            rc = kvt_coll_verify(c, &v)
        check(rc)
        bad = last_unreadable()
        return {"records": v.records, "damaged": v.damaged, "in_dram": v.in_dram,
                "header_damaged": bool(v.header_damaged), "header_checksummed": bool(v.header_checksummed),
                "file_bytes": v.file_bytes, "named_bytes": v.named_bytes, "unreadable": bad[:, 1].copy()}

    def cluster_sizes(self):
        cdef kvt_coll *c = self.live()
        cdef uint64_t n = 0, cap
        cdef int rc
        with nogil:
            rc = kvt_coll_cluster_sizes(c, NULL, 0, &n)
        check(rc)
        out = np.zeros(n + 1, dtype=np.uint32)
        cdef uint32_t[::1] ov = out
        cap = n + 1
        with nogil:
            rc = kvt_coll_cluster_sizes(c, &ov[0], cap, &n)
        check(rc)
        return out[:n]

    def value_sums(self):
        """(sizes [slots] u32, sums [slots, value_dim] f32) by cluster number."""
        cdef kvt_coll *c = self.live()
        cdef uint64_t n = 0, cap
        cdef int rc
        with nogil:
            rc = kvt_coll_value_sums(c, NULL, NULL, 0, &n)
        check(rc)
        sizes = np.zeros(n + 1, dtype=np.uint32)
        sums = np.zeros((n + 1, max(self.value_dim, 1)), dtype=np.float32)
        cdef uint32_t[::1] sv = sizes
        cdef float[:, ::1] fv = sums
        cap = n + 1
        with nogil:
            rc = kvt_coll_value_sums(c, &sv[0], &fv[0, 0], cap, &n)
        check(rc)
        return sizes[:n], sums[:n, :self.value_dim]

    @property
    def parked(self):
        cdef kvt_coll *c = self.live()
        cdef int r
        with nogil:  # the store mutex, as count()
            r = kvt_coll_is_parked(c)
        return bool(r)

    def changed(self):
        """True if anything changed since the last committed checkpoint."""
        cdef kvt_coll *c = self.live()
        cdef int r
        with nogil:
            r = kvt_coll_changed(c)
        return bool(r)

    def checkpoint(self):
        """Writes buffered entries, syncs, and captures the state to commit."""
        cdef kvt_checkpoint *cp = NULL
        cdef kvt_coll *c = self.live()
        cdef int rc
        with nogil:
            rc = kvt_coll_checkpoint(c, &cp)
        check(rc)
        return Checkpoint._wrap(cp)

    def committed(self, Checkpoint cp):
        cdef kvt_coll *c = self.live()
        cdef kvt_checkpoint *p = cp.ptr
        cdef int rc
        with nogil:
            rc = kvt_coll_committed(c, p)
        check(rc)


cdef class Checkpoint:
    """A collection state captured for commit: ``dir`` blob and changed ``chunks``."""
    cdef kvt_checkpoint *ptr
    cdef public bytes dir
    cdef public dict chunks

    @staticmethod
    cdef Checkpoint _wrap(kvt_checkpoint *cp):
        cdef Checkpoint o = Checkpoint.__new__(Checkpoint)
        cdef size_t n = 0, i
        cdef uint64_t idx = 0
        cdef const void *p
        o.ptr = cp
        p = kvt_checkpoint_dir(cp, &n)
        o.dir = (<const char *>p)[:n]
        o.chunks = {}
        for i in range(kvt_checkpoint_nchunks(cp)):
            p = kvt_checkpoint_chunk(cp, i, &idx, &n)
            o.chunks[idx] = (<const char *>p)[:n]
        return o

    def __dealloc__(self):
        kvt_checkpoint_free(self.ptr)


cdef void _copy_estimate(kvt_result *r, float[::1] lse, float[:, ::1] ev, uint64_t *ecl, uint64_t *ent):
    cdef float *vp = NULL
    if ev.shape[0] and ev.shape[1]:
        vp = &ev[0, 0]
    kvt_result_estimate(r, &lse[0], vp, ecl, ent)


cdef void _copy_result(kvt_result *r, int64_t[::1] ids, keys, values, int32_t[::1] clusters):
    cdef unsigned char[::1] kb = keys.reshape(-1).view(np.uint8)
    cdef unsigned char[::1] vb = values.reshape(-1).view(np.uint8)
    cdef void *vp = &vb[0] if vb.shape[0] else NULL
    with nogil:
        kvt_result_copy(r, &ids[0], &kb[0], vp, &clusters[0])
