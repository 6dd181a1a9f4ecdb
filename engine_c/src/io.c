/*
 * io.c — files, direct reads, accounting and the device model.
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
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "io.h"

struct kvt_file {
    kvt_io *io;
    int fd;         /* buffered */
    int dfd;        /* O_DIRECT, or -1 */
    char path[];
};

static int posix_pread_full(int fd, void *buf, size_t len, uint64_t off, size_t *got) {
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

static int posix_pwrite_full(int fd, const void *buf, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t r = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (r == 0) return EIO;
        done += (size_t)r;
    }
    return 0;
}

static int posix_datasync(int fd) {
    return fdatasync(fd) ? errno : 0;
}

static const kvt_io_backend posix_backend = {"pread", posix_pread_full, posix_pwrite_full,
                                             posix_datasync};

int kvt_io_init(kvt_io *io, const kvt_device *dev, int direct_mode) {
    memset(io, 0, sizeof *io);
    io->be = &posix_backend;
    if (dev) io->dev = *dev;
    io->direct_mode = direct_mode;
#if defined(KVT_NO_DIRECT) || !defined(O_DIRECT)
    if (direct_mode == KVT_DIRECT_AUTO) io->direct_mode = KVT_DIRECT_OFF; /* invariant 5 */
#endif
    return pthread_mutex_init(&io->mu, NULL);
}

void kvt_io_destroy(kvt_io *io) { pthread_mutex_destroy(&io->mu); }

/* 0 if the next op of this kind may go ahead, else the injected code. */
static int take_fault(kvt_io *io, int kind) {
    int code = 0;
    pthread_mutex_lock(&io->mu);
    if (io->fault_code[kind]) {
        if (io->fault_countdown[kind] == 0) {
            code = io->fault_code[kind];
            io->fault_code[kind] = 0;
        } else {
            io->fault_countdown[kind]--;
        }
    }
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
        return kvt_fail(KVT_EINVAL, "open(%s): direct I/O was required but this build has no O_DIRECT%s",
                        path,
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
void kvt_io_thread_uncharged(int on) { uncharged = on; }

void kvt_io_charge(kvt_io *io, uint64_t ops, uint64_t bytes) {
    pthread_mutex_lock(&io->mu);
    io->st.modeled_seconds += kvt_device_time(&io->dev, ops, bytes);
    pthread_mutex_unlock(&io->mu);
}

/* Charges one read; outside a batch it is its own batch. */
static void account_read(kvt_io *io, uint64_t bytes, uint64_t entries) {
    double sleep_for = 0;
    pthread_mutex_lock(&io->mu);
    if (uncharged) {
        io->st.read_ops++;
        io->st.read_bytes += bytes;
        io->st.read_entries += entries;
        io->st.prefetch_read_bytes += bytes;
        if (io->dev.throttle) sleep_for = kvt_device_time(&io->dev, 1, bytes);
        pthread_mutex_unlock(&io->mu);
        sleep_seconds(sleep_for);
        return;
    }
    io->st.read_ops++;
    io->st.read_bytes += bytes;
    io->st.read_entries += entries;
    int b = 0;
    for (uint64_t s = bytes >> 10; s && b < 23; s >>= 1) b++;
    io->st.size_hist[b]++;
    if (io->batch_open) {
        io->batch_ops++;
        io->batch_bytes += bytes;
    } else {
        double t = kvt_device_time(&io->dev, 1, bytes);
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
    kvt_io *io = f->io;
    int code = take_fault(io, 0);
    if (code) return kvt_fail(code, "pread(%s, offset %llu, %zu bytes): injected fault (syscall pread)",
                              f->path, (unsigned long long)off, len);
    size_t got = 0;
    if (f->dfd >= 0) {
        uint64_t a0 = kvt_round_down(off, KVT_IO_ALIGN);
        size_t alen = (size_t)(kvt_round_up(off + len, KVT_IO_ALIGN) - a0);
        void *bounce = NULL;
        if (posix_memalign(&bounce, KVT_IO_ALIGN, alen))
            return kvt_fail(ENOMEM, "pread(%s): cannot allocate %zu aligned bytes", f->path, alen);
        int e = io->be->pread_full(f->dfd, bounce, alen, a0, &got);
        if (e == EINVAL) {
            /* The file system accepted O_DIRECT at open but not this transfer: fall back for
             * good to buffered reads on this file rather than fail. */
            close(f->dfd);
            f->dfd = -1;
            free(bounce);
            return kvt_file_read(f, off, len, dst, entries);
        }
        if (e) {
            free(bounce);
            return kvt_fail(e, "pread(%s, offset %llu, %zu bytes, O_DIRECT): %s (syscall pread)",
                            f->path, (unsigned long long)a0, alen, strerror(e));
        }
        account_read(io, alen, entries);
        if (got < (size_t)(off - a0) + len) {
            free(bounce);
            return kvt_fail(KVT_ECORRUPT, "pread(%s, offset %llu, %zu bytes): file ends early (short read of %zu)",
                            f->path, (unsigned long long)off, len, got);
        }
        memcpy(dst, (char *)bounce + (off - a0), len);
        free(bounce);
        return 0;
    }
    int e = io->be->pread_full(f->fd, dst, len, off, &got);
    if (e)
        return kvt_fail(e, "pread(%s, offset %llu, %zu bytes): %s (syscall pread)", f->path,
                        (unsigned long long)off, len, strerror(e));
    account_read(io, len, entries);
    if (got < len)
        return kvt_fail(KVT_ECORRUPT, "pread(%s, offset %llu, %zu bytes): file ends early (short read of %zu)",
                        f->path, (unsigned long long)off, len, got);
    return 0;
}

int kvt_file_write(kvt_file *f, uint64_t off, const void *src, size_t len) {
    kvt_io *io = f->io;
    int e = take_fault(io, 1);
    if (e == ENOSPC || e == KVT_EINJECTED) {
        /* A torn write: half of the bytes land before the failure, as a real full disk or
         * power cut would leave them. */
        io->be->pwrite_full(f->fd, src, len / 2, off);
    }
    if (!e) e = io->be->pwrite_full(f->fd, src, len, off);
    if (e)
        return kvt_fail(e, "pwrite(%s, offset %llu, %zu bytes): %s (syscall pwrite)", f->path,
                        (unsigned long long)off, len, e > 0 ? strerror(e) : "injected fault");
    pthread_mutex_lock(&io->mu);
    io->st.write_ops++;
    io->st.write_bytes += len;
    pthread_mutex_unlock(&io->mu);
    return 0;
}

int kvt_file_sync(kvt_file *f) {
    kvt_io *io = f->io;
    int e = take_fault(io, 2);
    if (!e) e = io->be->datasync(f->fd);
    if (e)
        return kvt_fail(e, "fdatasync(%s): %s (syscall fdatasync)", f->path,
                        e > 0 ? strerror(e) : "injected fault");
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
