/*
 * test_kvtier.c — unit tests of the engine's layers: io, pools, clusters, cache, store.
 * Each test makes its own directory under $TMPDIR and removes it. Exit status 0 iff all pass.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache.h"
#include "common.h"
#include "cluster.h"
#include "io.h"
#include "kvtier.h"
#include "pool.h"
#include "simd.h"
#include "store.h"

static int failures, checks;
#define CHECK(cond)                                                                      \
    do {                                                                                 \
        checks++;                                                                        \
        if (!(cond)) {                                                                   \
            failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, kvt_last_error());                                            \
        }                                                                                \
    } while (0)
#define CHECK_OK(expr)                                                                   \
    do {                                                                                 \
        int rc_ = (expr);                                                                \
        checks++;                                                                        \
        if (rc_) {                                                                       \
            failures++;                                                                  \
            fprintf(stderr, "%s:%d: %s returned %s (%s)\n", __FILE__, __LINE__, #expr,   \
                    kvt_strerror(rc_), kvt_last_error());                                \
        }                                                                                \
    } while (0)

static char *make_dir(void) {
    const char *t = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof tmpl, "%s/kvt-test-XXXXXX", t && *t ? t : "/tmp");
    char *d = mkdtemp(tmpl);
    return d ? strdup(d) : NULL;
}

static void remove_dir(char *d) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", d);
    free(d);
}

static float frand(uint64_t *s) { return (float)((kvt_rng_next(s) >> 11) * (1.0 / 9007199254740992.0)) * 2 - 1; }

/* ---- simd --------------------------------------------------------------------------------- */
static void test_simd(void) {
    const kvt_kernels *K = kvt_simd();
    uint64_t s = 1;
    for (size_t n = 1; n < 70; n += 7) {
        float a[80], b[80];
        uint16_t h[80];
        double ref = 0, refh = 0;
        for (size_t i = 0; i < n; i++) {
            a[i] = frand(&s);
            b[i] = frand(&s);
            h[i] = kvt_float_to_half(a[i]);
            ref += (double)a[i] * b[i];
            refh += (double)kvt_half_to_float(h[i]) * b[i];
        }
        CHECK(fabs(K->dot_f32(a, b, n) - ref) < 1e-4);
        CHECK(fabs(K->dot_f16_f32(h, b, n) - refh) < 1e-4);
        float back[80];
        K->f16_to_f32(h, back, n);
        for (size_t i = 0; i < n; i++) CHECK(back[i] == kvt_half_to_float(h[i]));
    }
    /* conversions: exact values, rounding, specials */
    CHECK(kvt_half_to_float(kvt_float_to_half(1.5f)) == 1.5f);
    CHECK(kvt_half_to_float(kvt_float_to_half(-2.0f)) == -2.0f);
    CHECK(kvt_float_to_half(65520.0f) == 0x7C00); /* rounds to +inf */
    CHECK(kvt_half_to_float(0x0001) == ldexpf(1, -24)); /* smallest subnormal */
    CHECK(isnan(kvt_half_to_float(kvt_float_to_half(NAN))));
}

/* ---- io ----------------------------------------------------------------------------------- */
static void test_io(void) {
    char *d = make_dir();
    char path[600];
    snprintf(path, sizeof path, "%s/f.dat", d);
    kvt_io io;
    kvt_device dev = {0.0001, 1000, 1e6, 32, 4096, 0};
    kvt_io_init(&io, &dev, KVT_DIRECT_AUTO);
    kvt_file *f;
    CHECK_OK(kvt_file_open(&io, path, 1, &f));
    uint8_t buf[10000], back[10000];
    for (int i = 0; i < 10000; i++) buf[i] = (uint8_t)(i * 7);
    CHECK_OK(kvt_file_write(f, 100, buf, sizeof buf));
    CHECK_OK(kvt_file_sync(f));
    /* unaligned read inside the file: exact bytes back, one op counted */
    CHECK_OK(kvt_file_read(f, 1234, 5000, back, 3));
    CHECK(memcmp(back, buf + 1134, 5000) == 0);
    kvt_io_stats st;
    kvt_io_stats_get(&io, &st);
    CHECK(st.read_ops == 1 && st.read_entries == 3);
    CHECK(st.read_bytes == (kvt_file_is_direct(f) ? 8192u : 5000u));
    /* device model: latency + max(ops/iops, bytes/bw) */
    CHECK(fabs(st.modeled_seconds - (0.0001 + fmax(1.0 / 1000, st.read_bytes / 1e6))) < 1e-12);
    CHECK(fabs(kvt_device_time(&dev, 10, 1000) - (0.0001 + 0.01)) < 1e-12);
    CHECK(fabs(kvt_device_time(&dev, 1, 1000000) - (0.0001 + 1.0)) < 1e-12);
    /* a read past the end is a clear error, not garbage */
    CHECK(kvt_file_read(f, 20000, 100, back, 1) == KVT_ECORRUPT);
    CHECK(strstr(kvt_last_error(), "f.dat") != NULL);
    /* batches are charged once */
    kvt_io_stats_reset(&io);
    kvt_io_batch_begin(&io);
    CHECK_OK(kvt_file_read(f, 100, 100, back, 1));
    CHECK_OK(kvt_file_read(f, 4196, 100, back, 1));
    kvt_io_batch_end(&io);
    kvt_io_stats_get(&io, &st);
    CHECK(st.read_ops == 2);
    CHECK(fabs(st.modeled_seconds - kvt_device_time(&dev, 2, st.read_bytes)) < 1e-12);
    /* fault injection: the 2nd next write fails with ENOSPC and names the syscall */
    CHECK_OK(kvt_io_inject(&io, 'w', 1, ENOSPC));
    CHECK_OK(kvt_file_write(f, 0, buf, 10));
    CHECK(kvt_file_write(f, 0, buf, 10) == ENOSPC);
    CHECK(strstr(kvt_last_error(), "pwrite") != NULL);
    CHECK_OK(kvt_file_write(f, 0, buf, 10));
    CHECK_OK(kvt_io_inject(&io, 'r', 0, EIO));
    CHECK(kvt_file_read(f, 0, 10, back, 1) == EIO);
    CHECK_OK(kvt_io_inject(&io, 's', 0, EIO));
    CHECK(kvt_file_sync(f) == EIO);
    CHECK_OK(kvt_file_sync(f));
    kvt_file_close(f);
    /* direct off: reads are exact-size */
    kvt_io io2;
    kvt_io_init(&io2, &dev, KVT_DIRECT_OFF);
    CHECK_OK(kvt_file_open(&io2, path, 0, &f));
    CHECK(!kvt_file_is_direct(f));
    CHECK_OK(kvt_file_read(f, 1234, 5000, back, 1));
    CHECK(memcmp(back, buf + 1134, 5000) == 0);
    kvt_io_stats_get(&io2, &st);
    CHECK(st.read_bytes == 5000);
    kvt_file_close(f);
    kvt_io_destroy(&io);
    kvt_io_destroy(&io2);
    remove_dir(d);
}

/* ---- pools -------------------------------------------------------------------------------- */
static void test_pool(void) {
    kvt_layout L;
    kvt_layout_init(&L, 64, 64, KVT_F16, 32);
    CHECK(L.esz == 16 + 128 + 128);
    CHECK(L.pool_bytes % KVT_IO_ALIGN == 0);
    CHECK(L.pool_cap >= 64 && (uint64_t)L.pool_cap * L.esz <= L.pool_bytes);
    /* heads grow toward each other; a head's run is contiguous */
    CHECK(kvt_slot_offset(&L, 0, 0, 0) == KVT_DATA_HEADER);
    CHECK(kvt_slot_offset(&L, 0, 1, 0) == KVT_DATA_HEADER + (uint64_t)(L.pool_cap - 1) * L.esz);
    CHECK(kvt_run_offset(&L, 1, 1, 0, 5) == kvt_slot_offset(&L, 1, 1, 4));
    /* records: checksum catches a flipped bit */
    uint8_t rec[272], key[128], val[128];
    for (int i = 0; i < 128; i++) key[i] = (uint8_t)i, val[i] = (uint8_t)(255 - i);
    kvt_rec_encode(&L, rec, 42, key, val);
    int64_t id;
    CHECK(kvt_rec_check(&L, rec, &id) == 0 && id == 42);
    rec[100] ^= 1;
    CHECK(kvt_rec_check(&L, rec, &id) == KVT_ECORRUPT);
    /* claims: two clusters pair in one pool, a third gets a new pool */
    kvt_pools P = {0};
    P.half_free = -1;
    kvt_seg a, b, c;
    CHECK_OK(kvt_pools_claim(&P, &L, 0, &a));
    CHECK_OK(kvt_pools_claim(&P, &L, 1, &b));
    CHECK_OK(kvt_pools_claim(&P, &L, 2, &c));
    CHECK(a.pool == 0 && a.head == 0 && b.pool == 0 && b.head == 1 && c.pool == 1 && c.head == 0);
    /* a cluster never takes the back head of its own pool */
    kvt_seg d2;
    CHECK_OK(kvt_pools_claim(&P, &L, 2, &d2));
    CHECK(d2.pool == 2);
    kvt_pools_free(&P);
}

/* ---- clusters ----------------------------------------------------------------------------- */
static void test_cluster(void) {
    const kvt_kernels *K = kvt_simd();
    /* four well separated blobs: k-means must find them */
    enum { N = 400, D = 8 };
    float *x = malloc(sizeof(float) * N * D), cent[4 * D];
    uint32_t assign[N];
    uint64_t s = 7;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < D; j++) x[i * D + j] = (j == i % 4 ? 10.0f : 0.0f) + 0.1f * frand(&s);
    CHECK_OK(kvt_kmeans(K, KVT_F32, x, D, NULL, N, 4, 20, 1, cent, assign));
    int ok = 1;
    for (int i = 4; i < N; i++) ok &= assign[i] == assign[i % 4];
    CHECK(ok);
    CHECK(assign[0] != assign[1] && assign[1] != assign[2] && assign[2] != assign[3] && assign[0] != assign[3]);
    /* two-level path for k > 256 gives a valid assignment into [0, k) */
    uint32_t *a2 = malloc(sizeof(uint32_t) * N);
    float *c2 = malloc(sizeof(float) * 300 * D);
    CHECK_OK(kvt_kmeans(K, KVT_F32, x, D, NULL, N, 300, 5, 1, c2, a2));
    ok = 1;
    for (int i = 0; i < N; i++) ok &= a2[i] < 300;
    CHECK(ok);
    /* Welford equals the batch mean and variance */
    float mean[D] = {0};
    double m2 = 0;
    for (int i = 0; i < 50; i++) kvt_welford_add(mean, &m2, (uint32_t)i, x + i * D, D);
    double bm[D] = {0}, bv = 0;
    for (int i = 0; i < 50; i++)
        for (int j = 0; j < D; j++) bm[j] += x[i * D + j] / 50.0;
    for (int i = 0; i < 50; i++)
        for (int j = 0; j < D; j++) bv += (x[i * D + j] - bm[j]) * (x[i * D + j] - bm[j]);
    for (int j = 0; j < D; j++) CHECK(fabs(mean[j] - bm[j]) < 1e-4);
    CHECK(fabs(m2 - bv) < 1e-3 * (1 + bv));
    /* nearest: exact argmin of L2 */
    float norms[4];
    for (int c = 0; c < 4; c++) norms[c] = K->dot_f32(cent + c * D, cent + c * D, D);
    CHECK(kvt_nearest(K, KVT_F32, x + 2 * D, cent, norms, 4, D) == assign[2]);
    free(x);
    free(a2);
    free(c2);
}

/* ---- cache -------------------------------------------------------------------------------- */
static int evicted[8];
static void note_evict(void *owner, uint32_t cl) { (void)owner; evicted[cl]++; }

static void test_cache(void) {
    kvt_cache c;
    kvt_cache_init(&c, 10000, note_evict);
    kvt_cache_ent *a = kvt_cache_admit(&c, NULL, 0, 10, 100), *b = kvt_cache_admit(&c, NULL, 1, 10, 100);
    CHECK(a && b);
    a->pins--;
    b->pins--;
    kvt_cache_touch(&c, a); /* b is now least recent */
    CHECK_OK(kvt_mem_reserve(&c, 9000));
    CHECK(evicted[1] == 1 && evicted[0] == 1); /* both had to go to fit 9000 */
    CHECK(c.used <= c.budget && c.peak <= c.budget);
    CHECK(kvt_mem_reserve(&c, 2000) == KVT_EBUDGET);
    kvt_mem_release(&c, 9000);
    /* a pinned entry survives pressure */
    kvt_cache_ent *p = kvt_cache_admit(&c, NULL, 2, 10, 100);
    CHECK(p != NULL);
    CHECK(kvt_mem_reserve(&c, 9500) == KVT_EBUDGET);
    CHECK(evicted[2] == 0);
    kvt_cache_destroy(&c);
    CHECK(c.used == 0);
}

/* ---- store -------------------------------------------------------------------------------- */
static kvt_coll_params params(int dtype) {
    kvt_coll_params p = {16, 8, dtype, KVT_METRIC_IP, KVT_POLICY_STATIC, 8, 16, 10, 3};
    return p;
}

static void fill(uint16_t *h, float *f, size_t n, uint64_t *s) {
    for (size_t i = 0; i < n; i++) {
        f[i] = frand(s);
        h[i] = kvt_float_to_half(f[i]);
        f[i] = kvt_half_to_float(h[i]);
    }
}

static void test_store(void) {
    char *d = make_dir();
    kvt_store_opts o = {1 << 20, {0.0001, 100000, 1e9, 32, 4096, 0}, KVT_DIRECT_AUTO};
    kvt_store *st;
    CHECK_OK(kvt_store_open(d, &o, &st));
    kvt_coll_params p = params(KVT_F16);
    kvt_coll *c;
    CHECK_OK(kvt_coll_create(st, 0, &p, &c));
    enum { N = 300 };
    uint64_t s = 11;
    uint16_t keys[N * 16], vals[N * 8];
    float kf[N * 16], vf[N * 8];
    fill(keys, kf, N * 16, &s);
    fill(vals, vf, N * 8, &s);
    int64_t first;
    CHECK_OK(kvt_coll_add(c, keys, vals, 200, &first));
    CHECK(first == 0);
    CHECK_OK(kvt_coll_add(c, keys + 200 * 16, vals + 200 * 8, 100, &first));
    CHECK(first == 200 && kvt_coll_count(c) == N);
    /* get returns exactly what was added */
    int64_t ids[N];
    for (int i = 0; i < N; i++) ids[i] = N - 1 - i;
    uint16_t gk[N * 16], gv[N * 8];
    CHECK_OK(kvt_coll_get(c, ids, N, gk, gv));
    int same = 1;
    for (int i = 0; i < N; i++)
        same &= memcmp(gk + i * 16, keys + (N - 1 - i) * 16, 32) == 0 && memcmp(gv + i * 8, vals + (N - 1 - i) * 8, 16) == 0;
    CHECK(same);
    int64_t bad = N;
    CHECK(kvt_coll_get(c, &bad, 1, gk, gv) == KVT_ENOTFOUND);
    /* retrieve with a budget covering everything returns every entry once, matching data */
    float q[2 * 16];
    for (int i = 0; i < 32; i++) q[i] = frand(&s);
    kvt_result *r;
    CHECK_OK(kvt_coll_retrieve(c, q, 2, N, &r));
    CHECK(kvt_result_count(r) == N);
    int64_t rid[N];
    uint16_t rk[N * 16];
    int32_t rcl[N];
    kvt_result_copy(r, rid, rk, NULL, rcl);
    int seen[N] = {0}, match = 1;
    for (int i = 0; i < N; i++) {
        seen[rid[i]]++;
        match &= memcmp(rk + i * 16, keys + rid[i] * 16, 32) == 0;
    }
    int once = 1;
    for (int i = 0; i < N; i++) once &= seen[i] == 1;
    CHECK(once && match);
    kvt_result_free(r);
    /* a partial budget takes whole clusters, best score first, within the budget */
    CHECK_OK(kvt_coll_retrieve(c, q, 2, 40, &r));
    CHECK(kvt_result_count(r) <= 40 && kvt_result_count(r) > 0);
    kvt_result_free(r);
    /* search with every cluster probed is exact top-k */
    int64_t sid[5];
    float ssc[5];
    kvt_coll_stats cs;
    CHECK_OK(kvt_coll_stats_get(c, &cs));
    CHECK(cs.clusters >= 20 && cs.entries == N);
    CHECK_OK(kvt_coll_search(c, q, 1, 5, (uint32_t)cs.clusters + 100, sid, ssc));
    float best[N];
    for (int i = 0; i < N; i++) best[i] = kvt_simd()->dot_f32(kf + i * 16, q, 16);
    for (int j = 0; j < 5; j++) {
        int above = 0;
        for (int i = 0; i < N; i++) above += best[i] > ssc[j] + 1e-5f;
        CHECK(above <= j);
        CHECK(fabsf(best[sid[j]] - ssc[j]) < 1e-4f);
    }
    /* budget accounting */
    kvt_store_stats ss;
    CHECK_OK(kvt_store_stats_get(st, &ss));
    CHECK(ss.dram_peak_bytes <= ss.dram_budget && ss.read_ops > 0);
    /* export, close, reopen: same results */
    CHECK_OK(kvt_coll_sync(c));
    void *blob, *chunk;
    size_t blen, clen, ndirty;
    uint64_t *dirty;
    CHECK_OK(kvt_coll_export_dir(c, &blob, &blen));
    CHECK_OK(kvt_coll_dirty_chunks(c, &dirty, &ndirty));
    CHECK(ndirty == 1 && dirty[0] == 0);
    CHECK_OK(kvt_coll_export_chunk(c, 0, &chunk, &clen));
    kvt_free(dirty);
    kvt_store_close(st);
    CHECK_OK(kvt_store_open(d, &o, &st));
    const void *chunks[1] = {chunk};
    CHECK_OK(kvt_coll_open(st, 0, &p, blob, blen, chunks, &clen, 1, &c));
    CHECK(kvt_coll_count(c) == N);
    CHECK_OK(kvt_coll_get(c, ids, N, gk, gv));
    same = 1;
    for (int i = 0; i < N; i++) same &= memcmp(gk + i * 16, keys + (N - 1 - i) * 16, 32) == 0;
    CHECK(same);
    int64_t sid2[5];
    float ssc2[5];
    CHECK_OK(kvt_coll_search(c, q, 1, 5, (uint32_t)cs.clusters + 100, sid2, ssc2));
    CHECK(memcmp(sid, sid2, sizeof sid) == 0);
    /* a corrupted directory blob is refused with KVT_ECORRUPT, and a damaged record is found */
    kvt_store_close(st);
    CHECK_OK(kvt_store_open(d, &o, &st));
    ((uint8_t *)blob)[40] ^= 0x10;
    CHECK(kvt_coll_open(st, 0, &p, blob, blen, chunks, &clen, 1, &c) == KVT_ECORRUPT);
    ((uint8_t *)blob)[40] ^= 0x10;
    CHECK_OK(kvt_coll_open(st, 0, &p, blob, blen, chunks, &clen, 1, &c));
    char path[600];
    snprintf(path, sizeof path, "%s/c0.kvd", d);
    FILE *fp = fopen(path, "r+b");
    fseek(fp, KVT_DATA_HEADER + 40, SEEK_SET);
    fputc(0x5A, fp);
    fclose(fp);
    CHECK(kvt_coll_retrieve(c, q, 2, N, &r) == KVT_ECORRUPT);
    kvt_free(blob);
    kvt_free(chunk);
    kvt_store_close(st);
    remove_dir(d);
}

/* A write failure in the middle of an add leaves the collection as it was. */
static void test_add_atomic(void) {
    char *d = make_dir();
    kvt_store_opts o = {1 << 20, {0}, KVT_DIRECT_AUTO};
    kvt_store *st;
    CHECK_OK(kvt_store_open(d, &o, &st));
    kvt_coll_params p = params(KVT_F32);
    kvt_coll *c;
    CHECK_OK(kvt_coll_create(st, 1, &p, &c));
    float k[100 * 16], v[100 * 8];
    uint64_t s = 5;
    for (int i = 0; i < 100 * 16; i++) k[i] = frand(&s);
    for (int i = 0; i < 100 * 8; i++) v[i] = frand(&s);
    int64_t first;
    CHECK_OK(kvt_coll_add(c, k, v, 60, &first));
    kvt_coll_stats before, after;
    CHECK_OK(kvt_coll_stats_get(c, &before));
    CHECK_OK(kvt_store_inject_fault(st, 'w', 2, EIO));
    CHECK(kvt_coll_add(c, k + 60 * 16, v + 60 * 8, 40, &first) == EIO);
    CHECK_OK(kvt_coll_stats_get(c, &after));
    CHECK(after.entries == 60 && after.pools == before.pools && after.clusters == before.clusters);
    CHECK_OK(kvt_coll_add(c, k + 60 * 16, v + 60 * 8, 40, &first));
    CHECK(first == 60);
    kvt_result *r;
    float q[16] = {1};
    CHECK_OK(kvt_coll_retrieve(c, q, 1, 1000, &r));
    CHECK(kvt_result_count(r) == 100);
    kvt_result_free(r);
    int64_t ids[100];
    float gk[100 * 16], gv[100 * 8];
    for (int i = 0; i < 100; i++) ids[i] = i;
    CHECK_OK(kvt_coll_get(c, ids, 100, gk, gv));
    CHECK(memcmp(gk, k, sizeof gk) == 0 && memcmp(gv, v, sizeof gv) == 0);
    kvt_store_close(st);
    remove_dir(d);
}

/* Ten times the budget in data: the engine stays under budget and still answers. */
static void test_budget(void) {
    char *d = make_dir();
    kvt_store_opts o = {1 << 20, {0}, KVT_DIRECT_AUTO};
    kvt_store *st;
    CHECK_OK(kvt_store_open(d, &o, &st));
    kvt_coll_params p = {64, 64, KVT_F16, KVT_METRIC_IP, KVT_POLICY_STATIC, 32, 64, 5, 3};
    kvt_coll *c;
    CHECK_OK(kvt_coll_create(st, 2, &p, &c));
    enum { B = 2000 };
    static uint16_t k[B * 64], v[B * 64];
    float kf[B * 64];
    uint64_t s = 9, total = 0;
    while (total * (64 * 2 * 2) < 10u * (1 << 20)) {
        fill(k, kf, B * 64, &s);
        fill(v, kf, B * 64, &s);
        fill(k, kf, B * 64, &s);
        int64_t first;
        CHECK_OK(kvt_coll_add(c, k, v, B, &first));
        total += B;
        kvt_result *r;
        CHECK_OK(kvt_coll_retrieve(c, kf, 4, total / 10, &r));
        kvt_result_free(r);
    }
    kvt_store_stats ss;
    CHECK_OK(kvt_store_stats_get(st, &ss));
    CHECK(ss.dram_peak_bytes <= ss.dram_budget);
    CHECK(ss.evictions > 0);
    kvt_store_close(st);
    remove_dir(d);
}

static void test_errors(void) {
    CHECK(strncmp(kvt_strerror(KVT_ECORRUPT), "KVT_ECORRUPT:", 13) == 0);
    CHECK(strncmp(kvt_strerror(EIO), "EIO:", 4) == 0);
    CHECK(kvt_strerror(12345) != NULL && kvt_strerror(-5) != NULL);
    kvt_store_opts o = {100, {0}, KVT_DIRECT_AUTO};
    kvt_store *st;
    CHECK(kvt_store_open("/nonexistent", &o, &st) == KVT_EINVAL);
    CHECK(strstr(kvt_last_error(), "dram_budget") != NULL);
}

int main(void) {
    printf("kvtier engine tests (kernel: %s)\n", kvt_simd_kernel());
    test_simd();
    test_io();
    test_pool();
    test_cluster();
    test_cache();
    test_store();
    test_add_atomic();
    test_budget();
    test_errors();
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
