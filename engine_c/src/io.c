/*
 * io.c — files, direct reads, accounting and the device model; the pread backend (the
 * io_uring one is uring.c).
 *
 * Invariants:
 * 1. Every read and write goes through the backend table chosen in kvt_io_init; nothing
 *    else in the engine calls pread/pwrite.
 * 2. A file has a buffered descriptor (writes, fallback reads) and, when the file system
 *    supports it, an O_DIRECT descriptor for reads. Linux flushes dirty page-cache pages of a
 *    range before a direct read of it, so a direct read always sees earlier buffered writes.
 * 3. Every read issued is counted exactly once (ops, bytes as the device sees them, entries)
 *    and charged to the device model, in its batch when one is open.
 * 4. Error details name the file, the operation and the system call.
 * 5. Built with KVT_NO_DIRECT (systems whose file systems refuse O_DIRECT, e.g. Android app
 *    storage), no O_DIRECT descriptor is ever opened: "auto" means buffered and is reported
 *    so (direct_io = 0), and "on" fails at open with an error that names the build option.
 * 6. Every read is a transfer of a batch (kvt_file_read is a batch of one, and a batch of
 *    one is a pread under every backend: a ring has nothing to overlap it with). With
 *    io_uring a ring serves one batch at a time (uring.c 1).
 * 7. A read that io_uring cannot finish is finished by pread, so both backends return the
 *    same bytes, the same short reads at end of file and the same errors (uring.c 2).
 * 8. A forked child never uses its parent's rings; it reads by pread (uring.c 3).
 * 9. A batch is timed as a whole, from its first submission to its last completion (the
 *    reads overlap: none has a time of its own), and the time is split across its reads in
 *    proportion to their bytes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "io.h"

struct kvt_file {
    kvt_io *io;
    int fd;  /* buffered */
    int dfd; /* O_DIRECT, or -1 */
    /* an O_DIRECT descriptor whose transfers the file system refused: no longer used, but
     * closed only with the file, since another thread may be reading through it right now */
    int dfd_refused;
    char path[];
};

int kvt_posix_pread_full(int fd, void *buf, size_t len, uint64_t off, size_t *got) {
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            *got = done;
            return errno;
        }
        if (r == 0) break; /* end of file */
        done += (size_t)r;
    }
    *got = done;
    return 0;
}

int kvt_posix_datasync(int fd) { return fdatasync(fd) ? errno : 0; }

static const kvt_io_backend posix_backend = {"pread", kvt_posix_pread_full, kvt_posix_datasync, NULL};

int kvt_io_init(kvt_io *io, const kvt_device *dev, int direct_mode) {
    memset(io, 0, sizeof *io);
    io->be = &posix_backend;
    if (dev) io->dev = *dev;
    io->direct_mode = direct_mode;
#if defined(KVT_NO_DIRECT) || !defined(O_DIRECT)
    if (direct_mode == KVT_DIRECT_AUTO) io->direct_mode = KVT_DIRECT_OFF; /* invariant 5 */
#endif
    int e = pthread_mutex_init(&io->mu, NULL);
    if (e) return e;
    if ((e = pthread_mutex_init(&io->ring_mu, NULL))) {
        pthread_mutex_destroy(&io->mu);
        return e;
    }
    kvt_uring_open(io); /* io_uring when built in and granted (uring.c); else reads stay preads */
    return 0;
}

void kvt_io_destroy(kvt_io *io) {
    kvt_uring_close(io);
    pthread_mutex_destroy(&io->ring_mu);
    pthread_mutex_destroy(&io->mu);
}

const char *kvt_io_backend_name(const kvt_io *io) { return io->be->name; }

/* 0 if the next op of this kind may go ahead, else the injected code. Caller holds io->mu. */
static int take_fault_locked(kvt_io *io, int kind) {
    int code = 0;
    if (io->fault_code[kind]) {
        if (io->fault_countdown[kind] == 0) {
            code = io->fault_code[kind];
            io->fault_code[kind] = 0;
        } else {
            io->fault_countdown[kind]--;
        }
    }
    return code;
}

static int take_fault(kvt_io *io, int kind) {
    pthread_mutex_lock(&io->mu);
    int code = take_fault_locked(io, kind);
    pthread_mutex_unlock(&io->mu);
    return code;
}

int kvt_io_inject(kvt_io *io, char op, uint64_t nth, int code) {
    int kind = op == 'r' ? 0 : op == 'w' ? 1 : op == 's' ? 2 : -1;
    if (kind < 0) return kvt_fail(KVT_EINVAL, "inject_fault: op must be 'r', 'w' or 's'");
    pthread_mutex_lock(&io->mu);
    io->fault_code[kind] = code;
    io->fault_countdown[kind] = nth;
    pthread_mutex_unlock(&io->mu);
    return 0;
}

int kvt_file_open(kvt_io *io, const char *path, int truncate, kvt_file **out) {
    size_t plen = strlen(path);
    kvt_file *f = calloc(1, sizeof *f + plen + 1);
    if (!f) return kvt_fail(ENOMEM, "open(%s): out of memory", path);
    memcpy(f->path, path, plen + 1);
    f->io = io;
    f->dfd = -1;
    f->dfd_refused = -1;
    f->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | (truncate ? O_TRUNC : 0), 0644);
    if (f->fd < 0) {
        int e = errno;
        free(f);
        return kvt_fail(e, "open(%s) for read/write: %s (syscall open)", path, strerror(e));
    }
#if defined(O_DIRECT) && !defined(KVT_NO_DIRECT)
    if (io->direct_mode != KVT_DIRECT_OFF) {
        f->dfd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (f->dfd < 0 && io->direct_mode == KVT_DIRECT_ON) {
            int e = errno;
            kvt_file_close(f);
            return kvt_fail(e, "open(%s, O_DIRECT): %s (direct I/O was required)", path, strerror(e));
        }
    }
#else
    if (io->direct_mode == KVT_DIRECT_ON) {
        kvt_file_close(f);
        return kvt_fail(KVT_EINVAL, "open(%s): direct I/O was required but this build has no O_DIRECT%s", path,
#ifdef KVT_NO_DIRECT
                        " (built with KVT_NO_DIRECT)"
#else
                        ""
#endif
        );
    }
#endif
    *out = f;
    return 0;
}

void kvt_file_close(kvt_file *f) {
    if (!f) return;
    if (f->dfd >= 0) close(f->dfd);
    if (f->dfd_refused >= 0) close(f->dfd_refused);
    if (f->fd >= 0) close(f->fd);
    free(f);
}

int kvt_file_is_direct(const kvt_file *f) { return f->dfd >= 0; }
const char *kvt_file_path(const kvt_file *f) { return f->path; }

uint64_t kvt_file_size(const kvt_file *f) {
    struct stat st;
    return fstat(f->fd, &st) == 0 ? (uint64_t)st.st_size : 0;
}

double kvt_device_time(const kvt_device *dev, uint64_t ops, uint64_t bytes) {
    if (dev->bandwidth_Bps <= 0 || ops == 0) return 0.0;
    double t_iops = dev->iops > 0 ? (double)ops / dev->iops : 0.0;
    double t_bw = (double)bytes / dev->bandwidth_Bps;
    return dev->latency_s + (t_iops > t_bw ? t_iops : t_bw);
}

static void sleep_seconds(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) && errno == EINTR) {}
}

/* Loader threads read on behalf of a prefetch that charged its reads to the device model as
 * one batch when it was issued; their reads are counted but not charged again. */
static _Thread_local int uncharged;
void kvt_io_thread_uncharged(int mode) { uncharged = mode; }

void kvt_io_charge(kvt_io *io, uint64_t ops, uint64_t bytes) {
    pthread_mutex_lock(&io->mu);
    io->st.modeled_seconds += kvt_device_time(&io->dev, ops, bytes);
    pthread_mutex_unlock(&io->mu);
}

static int size_bucket(uint64_t bytes) {
    int b = 0;
    for (uint64_t v = bytes >> 10; v && b < 23; v >>= 1) b++;
    return b;
}

/* Bytes read only to be dropped: n gaps or dead slots (counter), `bytes` of them (total). */
static void count_dropped(kvt_io *io, uint64_t *counter, uint64_t *total, uint64_t n, uint64_t bytes) {
    pthread_mutex_lock(&io->mu);
    *counter += n;
    *total += bytes;
    pthread_mutex_unlock(&io->mu);
}

void kvt_io_count_gaps(kvt_io *io, uint64_t n, uint64_t bytes) {
    count_dropped(io, &io->st.gaps_read, &io->st.gap_bytes, n, bytes);
}

void kvt_io_count_dead(kvt_io *io, uint64_t n, uint64_t bytes) {
    count_dropped(io, &io->st.dead_read, &io->st.dead_bytes, n, bytes);
}

/* Counts the transfers of a batch that returned (x[i].err == 0) and charges them as one
 * batch, or into the open one; `seconds` is the batch's wall time (invariant 9). Loader
 * threads' reads are counted, not charged, and left out of the size histogram. */
static void account_batch(kvt_io *io, const kvt_io_xfer *x, const kvt_read_req *reqs, size_t n, double seconds) {
    uint64_t ops = 0, bytes = 0, entries = 0;
    for (size_t i = 0; i < n; i++)
        if (!x[i].err) {
            ops++;
            bytes += x[i].len;
            entries += reqs[i].entries;
        }
    if (!ops) return;
    double sleep_for = 0;
    pthread_mutex_lock(&io->mu);
    io->st.read_ops += ops;
    io->st.read_bytes += bytes;
    io->st.read_entries += entries;
    if (uncharged) {
        if (uncharged == KVT_READS_PREFETCH) io->st.prefetch_read_bytes += bytes;
        if (io->dev.throttle) sleep_for = kvt_device_time(&io->dev, ops, bytes);
        pthread_mutex_unlock(&io->mu);
        sleep_seconds(sleep_for);
        return;
    }
    for (size_t i = 0; i < n; i++)
        if (!x[i].err) {
            int b = size_bucket(x[i].len);
            io->st.size_hist[b]++;
            io->st.size_bytes[b] += x[i].len;
            io->st.size_seconds[b] += bytes ? seconds * ((double)x[i].len / (double)bytes) : 0;
        }
    io->st.read_seconds += bytes ? seconds : 0;
    if (io->batch_open) {
        io->batch_ops += ops;
        io->batch_bytes += bytes;
    } else {
        double t = kvt_device_time(&io->dev, ops, bytes);
        io->st.modeled_seconds += t;
        if (io->dev.throttle) sleep_for = t;
    }
    pthread_mutex_unlock(&io->mu);
    sleep_seconds(sleep_for);
}

void kvt_io_batch_begin(kvt_io *io) {
    pthread_mutex_lock(&io->mu);
    io->batch_open = 1;
    io->batch_ops = io->batch_bytes = 0;
    pthread_mutex_unlock(&io->mu);
}

void kvt_io_batch_end(kvt_io *io) {
    double sleep_for = 0;
    pthread_mutex_lock(&io->mu);
    if (io->batch_open) {
        double t = kvt_device_time(&io->dev, io->batch_ops, io->batch_bytes);
        io->st.modeled_seconds += t;
        if (io->dev.throttle) sleep_for = t;
        io->batch_open = 0;
    }
    pthread_mutex_unlock(&io->mu);
    sleep_seconds(sleep_for);
}

size_t kvt_file_read_scratch(const kvt_file *f, uint64_t off, size_t len) {
    if (f->dfd < 0) return 0;
    return (size_t)(kvt_round_up(off + len, KVT_IO_ALIGN) - kvt_round_down(off, KVT_IO_ALIGN));
}

int kvt_file_read(kvt_file *f, uint64_t off, size_t len, void *dst, uint64_t entries) {
    kvt_read_req r = {off, len, dst, entries};
    return kvt_file_read_batch(f, &r, 1);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The backend's batch method takes what it can, pread_full does the rest. A lone read goes
 * by pread under every backend: a ring has nothing to overlap it with, and one io_uring
 * round trip costs more than a pread (about 1.5 against 0.9 us for a 4 KiB page-cache hit). */
static void issue_reads(kvt_io *io, kvt_io_xfer *x, size_t n) {
    size_t done = n > 1 && io->be->read_batch ? io->be->read_batch(io, x, n) : 0;
    for (size_t i = done; i < n; i++) {
        x[i].err = io->be->pread_full(x[i].fd, x[i].buf, x[i].len, x[i].off, &x[i].got);
        x[i].via = "pread";
    }
}

/* Batches up to this size keep their transfers on the stack. */
#define KVT_BATCH_ON_STACK 8

/* Direct reads: each request's window of whole alignment units, all of them in one aligned
 * bounce buffer (every window a multiple of the alignment, so every part stays aligned). */
static int direct_windows(kvt_file *f, const kvt_read_req *reqs, size_t issue, int dfd, kvt_io_xfer *x, char **bounce) {
    size_t total = 0;
    for (size_t i = 0; i < issue; i++) {
        uint64_t a0 = kvt_round_down(reqs[i].off, KVT_IO_ALIGN);
        size_t alen = (size_t)(kvt_round_up(reqs[i].off + reqs[i].len, KVT_IO_ALIGN) - a0);
        x[i] = (kvt_io_xfer){.fd = dfd, .len = alen, .off = a0};
        total = total + alen < total ? SIZE_MAX : total + alen; /* saturates: too much to allocate */
    }
    if (total == SIZE_MAX || posix_memalign((void **)bounce, KVT_IO_ALIGN, total))
        return kvt_fail(ENOMEM, "pread(%s): cannot allocate %zu aligned bytes", f->path, total);
    for (size_t i = 0, pos = 0; i < issue; pos += x[i].len, i++) x[i].buf = *bounce + pos;
    return 0;
}

/* The file system accepted O_DIRECT at open but not a transfer (EINVAL): fall back for good to
 * buffered reads on this file rather than fail, and redo those reads. */
static void redo_refused(kvt_file *f, const kvt_read_req *reqs, kvt_io_xfer *x, size_t issue, int dfd) {
    kvt_io *io = f->io;
    for (size_t i = 0; i < issue; i++) {
        if (x[i].err != EINVAL) continue;
        if (f->dfd == dfd) {
            f->dfd = -1;
            f->dfd_refused = dfd;
        }
        x[i] = (kvt_io_xfer){.buf = reqs[i].dst, .len = reqs[i].len, .off = reqs[i].off, .via = "pread", .fd = f->fd};
        x[i].err = io->be->pread_full(x[i].fd, x[i].buf, x[i].len, x[i].off, &x[i].got);
    }
}

/* Each read's outcome, in request order: the first error, else its bytes copied out of its
 * window (direct reads). */
static int finish_reads(kvt_file *f, const kvt_read_req *reqs, const kvt_io_xfer *x, size_t issue, int dfd) {
    int rc = 0;
    for (size_t i = 0; i < issue && !rc; i++) {
        const kvt_read_req *q = &reqs[i];
        int direct = dfd >= 0 && x[i].fd == dfd;
        size_t skip = direct ? (size_t)(q->off - x[i].off) : 0;
        if (x[i].err)
            rc = kvt_fail(x[i].err, "pread(%s, offset %llu, %zu bytes%s): %s (syscall %s)", f->path,
                          (unsigned long long)x[i].off, x[i].len, direct ? ", O_DIRECT" : "", strerror(x[i].err),
                          x[i].via);
        else if (x[i].got < skip + q->len)
            rc = kvt_fail(KVT_ECORRUPT, "pread(%s, offset %llu, %zu bytes): file ends early (short read of %zu)",
                          f->path, (unsigned long long)q->off, q->len, x[i].got);
        else if (direct)
            memcpy(q->dst, (char *)x[i].buf + skip, q->len);
    }
    return rc;
}

int kvt_file_read_batch(kvt_file *f, const kvt_read_req *reqs, size_t n) {
    kvt_io *io = f->io;
    if (n == 0) return 0;
    /* Faults in request order, as n calls would meet them; nothing from the faulted request
     * on is issued, as a caller stops at its first error. */
    size_t issue = n;
    int fault = 0;
    pthread_mutex_lock(&io->mu);
    for (size_t i = 0; i < n && !fault; i++)
        if ((fault = take_fault_locked(io, 0))) issue = i;
    pthread_mutex_unlock(&io->mu);

    kvt_io_xfer on_stack[KVT_BATCH_ON_STACK], *x = on_stack;
    char *bounce = NULL;
    int rc = 0;
    if (issue > KVT_BATCH_ON_STACK && !(x = malloc(issue * sizeof *x)))
        return kvt_fail(ENOMEM, "pread(%s): out of memory for a batch of %zu reads", f->path, n);
    /* One read of f->dfd: another thread may retire it (redo_refused) while this batch runs. */
    int dfd = f->dfd;
    if (dfd >= 0 && issue)
        rc = direct_windows(f, reqs, issue, dfd, x, &bounce);
    else
        for (size_t i = 0; i < issue; i++)
            x[i] = (kvt_io_xfer){.buf = reqs[i].dst, .len = reqs[i].len, .off = reqs[i].off, .fd = f->fd};
    if (!rc) {
        double t0 = now_seconds();
        issue_reads(io, x, issue);
        if (dfd >= 0) redo_refused(f, reqs, x, issue, dfd);
        account_batch(io, x, reqs, issue, now_seconds() - t0);
        rc = finish_reads(f, reqs, x, issue, dfd);
    }
    if (!rc && fault)
        rc = kvt_fail(fault, "pread(%s, offset %llu, %zu bytes): injected fault (syscall %s)", f->path,
                      (unsigned long long)reqs[issue].off, reqs[issue].len,
                      n > 1 && io->be->read_batch ? "io_uring_enter" : "pread");
    free(bounce);
    if (x != on_stack) free(x);
    return rc;
}

/* pwritev until every part is written (short writes resume mid-part). */
static int pwritev_full(int fd, const kvt_wpart *parts, size_t n, uint64_t off, size_t limit) {
    struct iovec iov[64];
    size_t i = 0, skip = 0; /* next part, and bytes of it already written */
    while (i < n && limit) {
        int k = 0;
        size_t len = 0;
        for (size_t t = i; t < n && k < 64 && len < limit; t++, k++) {
            size_t pl = parts[t].len - (t == i ? skip : 0);
            if (pl > limit - len) pl = limit - len;
            iov[k] = (struct iovec){(void *)((const char *)parts[t].p + (t == i ? skip : 0)), pl};
            len += pl;
        }
        ssize_t r = pwritev(fd, iov, k, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (r == 0) return EIO;
        off += (uint64_t)r;
        limit -= (size_t)r;
        for (size_t done = (size_t)r; done && i < n;) {
            size_t left = parts[i].len - skip;
            if (done < left) {
                skip += done;
                done = 0;
            } else {
                done -= left;
                skip = 0;
                i++;
            }
        }
        while (i < n && parts[i].len == 0) i++;
    }
    return 0;
}

int kvt_file_writev(kvt_file *f, uint64_t off, const kvt_wpart *parts, size_t n) {
    kvt_io *io = f->io;
    size_t len = 0;
    for (size_t i = 0; i < n; i++) len += parts[i].len;
    int e = take_fault(io, 1);
    /* A torn write: half of the bytes land before the failure, as a real full disk or power
     * cut would leave them. */
    if (e == ENOSPC || e == KVT_EINJECTED) pwritev_full(f->fd, parts, n, off, len / 2);
    if (!e) e = pwritev_full(f->fd, parts, n, off, len);
    if (e)
        return kvt_fail(e, "pwrite(%s, offset %llu, %zu bytes): %s (syscall pwritev)", f->path, (unsigned long long)off,
                        len, e > 0 ? strerror(e) : "injected fault");
    pthread_mutex_lock(&io->mu);
    io->st.write_ops++;
    io->st.write_bytes += len;
    pthread_mutex_unlock(&io->mu);
    return 0;
}

int kvt_file_write(kvt_file *f, uint64_t off, const void *src, size_t len) {
    kvt_wpart part = {src, len};
    return kvt_file_writev(f, off, &part, 1);
}

int kvt_file_sync(kvt_file *f) {
    kvt_io *io = f->io;
    int e = take_fault(io, 2);
    if (!e) e = io->be->datasync(f->fd);
    if (e) return kvt_fail(e, "fdatasync(%s): %s (syscall fdatasync)", f->path, e > 0 ? strerror(e) : "injected fault");
    pthread_mutex_lock(&io->mu);
    io->st.sync_ops++;
    pthread_mutex_unlock(&io->mu);
    return 0;
}

int kvt_dir_sync(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return kvt_fail(e, "open(%s) to sync it: %s (syscall open)", dir, strerror(e));
    }
    int e = fsync(fd) ? errno : 0;
    close(fd);
    return e ? kvt_fail(e, "fsync(%s): %s (syscall fsync)", dir, strerror(e)) : 0;
}

void kvt_io_stats_get(kvt_io *io, kvt_io_stats *out) {
    pthread_mutex_lock(&io->mu);
    *out = io->st;
    pthread_mutex_unlock(&io->mu);
}

void kvt_io_stats_reset(kvt_io *io) {
    pthread_mutex_lock(&io->mu);
    memset(&io->st, 0, sizeof io->st);
    pthread_mutex_unlock(&io->mu);
}
