/*
 * io.h — the io layer: files behind a backend function table, O_DIRECT reads with aligned
 * bounce buffers, read accounting, the device model and fault injection.
 *
 * Build options (see engine_c/README.md): -DKVT_NO_DIRECT never opens O_DIRECT (all reads
 * buffered, direct_io reported 0); -DKVT_IO_ALIGN=N sets the alignment below;
 * -DKVT_HAVE_IO_URING (set by the build when liburing is found) compiles the io_uring read
 * backend and -DKVT_NO_IO_URING keeps it out (see below).
 *
 * Upper layers see byte ranges of files; this layer hides alignment, retries of short
 * transfers, the choice of backend and what a read costs on the modeled device.
 */
#ifndef KVT_IO_H
#define KVT_IO_H

#include <pthread.h>
#include <stdint.h>

#include "kvtier.h"

/* Alignment (bytes) of direct reads, their bounce buffers and pool sizes. 4 KiB fits the
 * logical block of every common SSD/UFS device; a build for 16 KiB-page systems passes
 * -DKVT_IO_ALIGN=16384 (a multiple of 4096 keeps every direct transfer legal). Data files
 * record the pool size it implies, so a store is refused, not misread, by a build with
 * another alignment. */
#ifndef KVT_IO_ALIGN
#define KVT_IO_ALIGN 4096u
#endif
_Static_assert((KVT_IO_ALIGN) >= 4096 && ((KVT_IO_ALIGN) & ((KVT_IO_ALIGN)-1)) == 0,
               "KVT_IO_ALIGN must be a power of two of at least 4096");

/* io_uring: reads are submitted through io_uring (liburing) when the build defines
 * KVT_HAVE_IO_URING (the Makefile and setup.py do when <liburing.h> is found) and the kernel
 * gives the process a ring at kvt_io_init; otherwise, and with KVTIER_IO_URING=0 in the
 * environment, they are preads. -DKVT_NO_IO_URING keeps the io_uring code out of a build
 * whatever was detected (for kernels and sandboxes that refuse it, e.g. Android apps). */
#ifdef KVT_NO_IO_URING
#undef KVT_HAVE_IO_URING
#endif

typedef struct kvt_file kvt_file;
typedef struct kvt_io kvt_io;

/* One transfer of a batch as a backend performs it: `len` bytes at `off` of `fd` into `buf`.
 * The backend sets `got` (bytes read; fewer only at end of file), `err` (0 or an errno) and
 * `via` (the system call that moved the bytes, for error messages). */
typedef struct kvt_io_xfer {
    void *buf;
    size_t len;
    uint64_t off;
    size_t got;
    const char *via;
    int fd, err;
} kvt_io_xfer;

/* A read backend: chosen once when the io context is made (writes are always pwritev). Every
 * method returns 0 or an errno, except read_batch: optional (NULL: every transfer is a
 * pread_full), it issues the n transfers together and returns how many of the leading ones it
 * performed; the caller performs the rest with pread_full, so a backend may decline all or
 * part of a batch (no ring free, a ring that broke) without the caller failing. */
typedef struct kvt_io_backend {
    const char *name;
    int (*pread_full)(int fd, void *buf, size_t len, uint64_t off, size_t *got);
    int (*datasync)(int fd);
    size_t (*read_batch)(kvt_io *io, kvt_io_xfer *x, size_t n);
} kvt_io_backend;

typedef struct kvt_io_stats {
    uint64_t read_ops, read_bytes, read_entries;
    /* gaps inside merged reads (read.c): each is a seek a gap-free layout would not need;
     * gap_bytes were read only to be dropped */
    uint64_t gaps_read, gap_bytes;
    /* dead slots inside the extents read (format 3, read.c 2): read_entries counted them as
     * the extents' slots; dead_read of those held no live record and dead_bytes were dropped */
    uint64_t dead_read, dead_bytes;
    uint64_t write_ops, write_bytes, sync_ops;
    double modeled_seconds;
    uint64_t size_hist[24]; /* charged reads by size: [2^(i+9), 2^(i+10)) bytes; 0: < 1 KiB */
    uint64_t prefetch_read_bytes;
    /* Measured wall-clock seconds in the read system calls of the reads counted in size_hist,
     * by the same buckets, and in total (read_seconds = the sum of size_seconds). A batch's
     * time is split across its reads in proportion to their bytes (they overlap, so no read
     * has a time of its own); with size_hist this gives measured bandwidth by read size. */
    double size_seconds[24];
    double read_seconds;
    uint64_t size_bytes[24]; /* bytes of the reads in size_hist, by the same buckets */
} kvt_io_stats;

struct kvt_ring; /* uring.c */

struct kvt_io {
    const kvt_io_backend *be;
    kvt_device dev;
    int direct_mode;    /* enum kvt_direct as asked */
    pthread_mutex_t mu; /* guards stats and fault state */
    kvt_io_stats st;
    uint64_t batch_ops, batch_bytes;
    int batch_open;
    /* fault injection: fail the nth next op of a kind */
    int fault_code[3];
    uint64_t fault_countdown[3];
    /* io_uring rings not in use (uring.c 1), guarded by ring_mu */
    pthread_mutex_t ring_mu;
    struct kvt_ring *rings_idle;
    unsigned rings_tried, ring_fork_gen;
};

/* Makes the io context and chooses its backend: io_uring when compiled in, not disabled by
 * KVTIER_IO_URING=0 (or off/no/false) and the kernel grants a ring now; else pread. */
int kvt_io_init(kvt_io *io, const kvt_device *dev, int direct_mode);
/* Frees the rings. No read may be in flight. */
void kvt_io_destroy(kvt_io *io);
/* The read backend in force: "io_uring" or "pread". */
const char *kvt_io_backend_name(const kvt_io *io);
/* The backends: pread (io.c), whose reads and syncs the io_uring backend (uring.c) shares;
 * the io_uring backend offered to a new context (taken when the kernel grants a ring) and
 * its rings freed. */
int kvt_posix_pread_full(int fd, void *buf, size_t len, uint64_t off, size_t *got);
int kvt_posix_datasync(int fd);
void kvt_uring_open(kvt_io *io);
void kvt_uring_close(kvt_io *io);

/* Opens `path` (creating it; truncating when `truncate`). Direct reads are tried when the
 * io's direct mode allows and silently fall back to buffered when the file system refuses.
 */
int kvt_file_open(kvt_io *io, const char *path, int truncate, kvt_file **out);
void kvt_file_close(kvt_file *f);
int kvt_file_is_direct(const kvt_file *f);
uint64_t kvt_file_size(const kvt_file *f);
const char *kvt_file_path(const kvt_file *f);

/* Reads exactly len bytes at off into dst (any alignment). Counted as one read carrying
 * `entries` entries; with O_DIRECT the device sees the aligned window around the range.
 * Short reads past end of file give KVT_ECORRUPT. */
int kvt_file_read(kvt_file *f, uint64_t off, size_t len, void *dst, uint64_t entries);
/* Counts the gaps one merged read crossed (n gaps, `bytes` between the extents it wanted). */
void kvt_io_count_gaps(kvt_io *io, uint64_t n, uint64_t bytes);
/* Counts n dead slots (`bytes`) found in extents read: no entries after all. */
void kvt_io_count_dead(kvt_io *io, uint64_t n, uint64_t bytes);

/* One read of a batch: len bytes at off into dst, counted as carrying `entries` entries. */
typedef struct kvt_read_req {
    uint64_t off;
    size_t len;
    void *dst;
    uint64_t entries;
} kvt_read_req;
/* The n reads of f as n calls of kvt_file_read would do them (alignment and bounce buffers
 * for O_DIRECT, the O_DIRECT-refused fallback, KVT_ECORRUPT on a short read, one counted read
 * per request), but issued together: with io_uring in one submission per ring-full (64) and
 * reaped together, with pread one after the other. Returns 0 or the first error in request
 * order, its kvt_fail message naming file, offset and system call; the dst of that request
 * and of the ones after it are then unspecified. Read faults (kvt_io_inject 'r') are consulted
 * once per request in order, as the calls would: a faulted request fails with the injected
 * code and neither it nor any later request is issued. Device model: inside
 * kvt_io_batch_begin/end the reads join that batch; outside one, the call is charged as ONE
 * batch of n reads (kvt_device_time(dev, n, their bytes)), since they are issued together;
 * a loader thread's (kvt_io_thread_uncharged) batch is counted, not charged. With O_DIRECT
 * the call holds the sum of kvt_file_read_scratch over its requests at once. n = 0 does
 * nothing. */
int kvt_file_read_batch(kvt_file *f, const kvt_read_req *reqs, size_t n);
/* Bytes of scratch a direct read of this range needs (for DRAM accounting). */
size_t kvt_file_read_scratch(const kvt_file *f, uint64_t off, size_t len);
int kvt_file_write(kvt_file *f, uint64_t off, const void *src, size_t len);
/* One piece of a gathered write. */
typedef struct kvt_wpart {
    const void *p;
    size_t len;
} kvt_wpart;
/* Writes the n parts back to back from off, as one write (pwritev): counted as one write op of
 * their total bytes; faults and torn writes as kvt_file_write. */
int kvt_file_writev(kvt_file *f, uint64_t off, const kvt_wpart *parts, size_t n);
int kvt_file_sync(kvt_file *f);
/* fsyncs a directory, so that the files just created in it survive a power cut. */
int kvt_dir_sync(const char *dir);

/* Reads between begin and end form one batch for the device model (issued together). */
void kvt_io_batch_begin(kvt_io *io);
void kvt_io_batch_end(kvt_io *io);
void kvt_io_stats_get(kvt_io *io, kvt_io_stats *out);
void kvt_io_stats_reset(kvt_io *io);
/* Modeled seconds for `ops` reads of `bytes` in total issued as one batch. */
double kvt_device_time(const kvt_device *dev, uint64_t ops, uint64_t bytes);
int kvt_io_inject(kvt_io *io, char op, uint64_t nth, int code);
/* Charges `ops` reads of `bytes` as one batch to the device model (for prefetches). */
void kvt_io_charge(kvt_io *io, uint64_t ops, uint64_t bytes);
/* Reads of the calling thread are counted but not charged (loader threads: what they read
 * was charged when it was queued): KVT_READS_PREFETCH also counts them as prefetch_read_bytes,
 * KVT_READS_UNCHARGED does not (swap-ins), KVT_READS_CHARGED (0) restores charging. */
enum { KVT_READS_CHARGED = 0, KVT_READS_PREFETCH = 1, KVT_READS_UNCHARGED = 2 };
void kvt_io_thread_uncharged(int mode);

#endif
