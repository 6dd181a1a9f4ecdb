/*
 * io.h — the io layer: files behind a backend function table, O_DIRECT reads with aligned
 * bounce buffers, read accounting, the device model and fault injection.
 *
 * Build options (see engine_c/README.md): -DKVT_NO_DIRECT never opens O_DIRECT (all reads
 * buffered, direct_io reported 0); -DKVT_IO_ALIGN=N sets the alignment below;
 * -DKVT_NO_IO_URING is reserved (see below).
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
_Static_assert((KVT_IO_ALIGN) >= 4096 && ((KVT_IO_ALIGN) & ((KVT_IO_ALIGN) - 1)) == 0,
               "KVT_IO_ALIGN must be a power of two of at least 4096");

/* io_uring: the engine has no io_uring backend yet (every read is a pread through the table
 * below). One added later is compiled under KVT_HAVE_IO_URING; -DKVT_NO_IO_URING, accepted
 * today and changing nothing yet, then keeps it out of a build for kernels that lack it. */
#ifdef KVT_NO_IO_URING
#undef KVT_HAVE_IO_URING
#endif

typedef struct kvt_file kvt_file;
typedef struct kvt_io kvt_io;

/* A backend: chosen once when the io context is made. Every method returns 0 or an errno. */
typedef struct kvt_io_backend {
    const char *name;
    int (*pread_full)(int fd, void *buf, size_t len, uint64_t off, size_t *got);
    int (*pwrite_full)(int fd, const void *buf, size_t len, uint64_t off);
    int (*datasync)(int fd);
} kvt_io_backend;

typedef struct kvt_io_stats {
    uint64_t read_ops, read_bytes, read_entries;
    uint64_t write_ops, write_bytes, sync_ops;
    double modeled_seconds;
    uint64_t size_hist[24];
    uint64_t prefetch_read_bytes;
} kvt_io_stats;

struct kvt_io {
    const kvt_io_backend *be;
    kvt_device dev;
    int direct_mode;          /* enum kvt_direct as asked */
    pthread_mutex_t mu;       /* guards stats and fault state */
    kvt_io_stats st;
    uint64_t batch_ops, batch_bytes; int batch_open;
    /* fault injection: fail the nth next op of a kind */
    int fault_code[3]; uint64_t fault_countdown[3];
};

int kvt_io_init(kvt_io *io, const kvt_device *dev, int direct_mode);
void kvt_io_destroy(kvt_io *io);

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
/* Bytes of scratch a direct read of this range needs (for DRAM accounting). */
size_t kvt_file_read_scratch(const kvt_file *f, uint64_t off, size_t len);
int kvt_file_write(kvt_file *f, uint64_t off, const void *src, size_t len);
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
/* Reads of the calling thread are counted but not charged (loader threads). */
void kvt_io_thread_uncharged(int on);

#endif
