/*
 * bench_read_batch.c — batched O_DIRECT reads through kvt_file_read_batch, io_uring against
 * pread (KVTIER_IO_URING=0), on one file of 256 MiB.
 *
 *   bench_read_batch [dir [reads-per-batch [seconds-per-point]]]
 *
 * Each batch reads K random extents of 4..64 KiB (4 KiB multiples, 4 KiB-aligned offsets, the
 * store's cluster reads) and each point runs batches for the given seconds (default 2). The
 * file is written once and read with O_DIRECT, so this host's page cache is out of the picture
 * (a virtual machine's host may still cache). Prints MB/s (10^6 bytes) and reads/s per
 * backend, for batches of K (default 32) and of 1 as the baseline. Not part of `make test`:
 * its numbers depend on the machine.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "io.h"
#include "kvtier.h"

#define FILE_BYTES (256ull << 20)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Runs batches of k reads for `seconds` with the backend the environment selects. */
static int run(const char *path, int uring, size_t k, double seconds, uint64_t seed) {
    if (uring)
        unsetenv("KVTIER_IO_URING");
    else
        setenv("KVTIER_IO_URING", "0", 1);
    kvt_device dev = {0, 0, 0, 0, 0, 0}; /* no device model: only real time counts */
    kvt_io io;
    kvt_file *f;
    int rc = kvt_io_init(&io, &dev, KVT_DIRECT_AUTO);
    if (!rc) rc = kvt_file_open(&io, path, 0, &f);
    if (rc) {
        fprintf(stderr, "bench: %s\n", kvt_last_error());
        return rc;
    }
    if (uring && strcmp(kvt_io_backend_name(&io), "io_uring") != 0)
        printf("  (io_uring is not available here: both rows are pread)\n");
    kvt_read_req *r = malloc(k * sizeof *r);
    uint8_t *dst = malloc(k * (64u << 10));
    uint64_t bytes = 0, reads = 0;
    double t0 = now(), t = t0;
    while (!rc && t - t0 < seconds) {
        for (size_t i = 0; i < k; i++) {
            size_t len = (size_t)(1 + kvt_rng_next(&seed) % 16) * 4096;
            uint64_t off = kvt_rng_next(&seed) % ((FILE_BYTES - len) / 4096) * 4096;
            r[i] = (kvt_read_req){off, len, dst + i * (64u << 10), 1};
            bytes += len;
        }
        rc = kvt_file_read_batch(f, r, k);
        reads += k;
        t = now();
    }
    if (rc)
        fprintf(stderr, "bench: %s\n", kvt_last_error());
    else
        printf("  K=%-4zu %-8s %8.1f MB/s %9.0f reads/s  (direct %d)\n", k, kvt_io_backend_name(&io),
               (double)bytes / 1e6 / (t - t0), (double)reads / (t - t0), kvt_file_is_direct(f));
    free(r);
    free(dst);
    kvt_file_close(f);
    kvt_io_destroy(&io);
    return rc;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : getenv("TMPDIR");
    if (!dir || !*dir) dir = "/tmp";
    size_t k = argc > 2 ? (size_t)strtoul(argv[2], NULL, 10) : 32;
    double seconds = argc > 3 ? atof(argv[3]) : 2.0;
    char path[1024];
    snprintf(path, sizeof path, "%s/kvt-bench-read-batch.dat", dir);

    kvt_io io;
    kvt_file *f;
    kvt_device dev = {0};
    int rc = kvt_io_init(&io, &dev, KVT_DIRECT_OFF);
    if (!rc) rc = kvt_file_open(&io, path, 1, &f);
    if (rc) {
        fprintf(stderr, "bench: %s\n", kvt_last_error());
        return 1;
    }
    uint8_t *chunk = malloc(8u << 20);
    uint64_t s = 1;
    for (size_t i = 0; i < (8u << 20) / 8; i++) ((uint64_t *)chunk)[i] = kvt_rng_next(&s);
    for (uint64_t off = 0; !rc && off < FILE_BYTES; off += 8u << 20) rc = kvt_file_write(f, off, chunk, 8u << 20);
    if (!rc) rc = kvt_file_sync(f);
    free(chunk);
    kvt_file_close(f);
    kvt_io_destroy(&io);
    if (rc) {
        fprintf(stderr, "bench: %s\n", kvt_last_error());
        return 1;
    }
    printf("bench-io: random 4..64 KiB O_DIRECT reads of a 256 MiB file, %.1f s per point\n", seconds);
    size_t ks[] = {1, k};
    for (size_t i = 0; i < (k == 1 ? 1u : 2u) && !rc; i++) {
        rc = run(path, 1, ks[i], seconds, 42 + i);
        if (!rc) rc = run(path, 0, ks[i], seconds, 42 + i);
    }
    remove(path);
    return rc ? 1 : 0;
}
