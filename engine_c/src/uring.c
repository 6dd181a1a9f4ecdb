/*
 * uring.c — the io_uring read backend (io.h's backend table; io.c has the pread one):
 * a retrieve's reads submitted together, so the device overlaps them.
 *
 * Invariants:
 * 1. A ring serves one batch at a time: a caller takes an idle ring of its io context,
 *    submits and reaps the whole batch on it, and gives it back. Rings are made on demand, up
 *    to KVT_IO_RINGS per context, so that the store's thread and the loader threads keep their
 *    reads in flight together as their preads did; one ring behind a mutex held across the
 *    reap would queue them behind each other. A caller that finds no ring idle and may make no
 *    other reads by pread: correct, only not batched (io.c 6).
 * 2. A read that io_uring cannot finish (a short transfer before end of file, EINTR/EAGAIN, a
 *    ring that failed to submit) is finished by pread, so both backends return the same
 *    bytes, the same short reads at end of file and the same errors (io.c 7).
 * 3. A forked child never uses its parent's rings (they share memory with the parent's kernel
 *    ring); it reads by pread (io.c 8).
 * 4. Built without liburing (or with -DKVT_NO_IO_URING), this file offers nothing: every
 *    context keeps the pread backend.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "io.h"

#ifdef KVT_HAVE_IO_URING
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common.h"

/* The kernel fills io_uring's buffers behind valgrind's back; tell memcheck they are set. */
#if defined(__has_include)
#if __has_include(<valgrind/memcheck.h>)
#include <valgrind/memcheck.h>
#endif
#endif
#ifndef VALGRIND_MAKE_MEM_DEFINED
#define VALGRIND_MAKE_MEM_DEFINED(p, n) ((void)(p), (void)(n))
#endif

/* Incremented in the child at every fork (invariant 8). */
static unsigned fork_gen;
static void on_fork_child(void) { fork_gen++; }
static pthread_once_t fork_hook_once = PTHREAD_ONCE_INIT;
static void fork_hook(void) { pthread_atfork(NULL, NULL, on_fork_child); }

/* 64 reads in flight per ring is deeper than a phone's UFS queue (32) and than a retrieve's
 * usual batch; a larger batch goes in ring-fulls. */
#define KVT_RING_ENTRIES 64u
#define KVT_IO_RINGS     8u
#define KVT_URING_VIA    "io_uring_enter, IORING_OP_READV"
#define KVT_IN_FLIGHT    (-1)
/* EAGAIN/EBUSY from a submission is the kernel short of memory for a moment; a ring that
 * keeps answering so is retired and its batch read by pread. */
#define KVT_SUBMIT_RETRIES 100

struct kvt_ring {
    struct io_uring ring;
    struct kvt_ring *next;
};

static struct kvt_ring *ring_new(void) {
    struct kvt_ring *r = calloc(1, sizeof *r);
    if (r && io_uring_queue_init(KVT_RING_ENTRIES, &r->ring, 0) < 0) {
        free(r);
        r = NULL;
    }
    return r;
}

static void ring_free(struct kvt_ring *r) {
    io_uring_queue_exit(&r->ring);
    free(r);
}

/* An idle ring, a new one, or NULL (read by pread): invariants 6 and 8. A failed attempt
 * counts against the limit, so that a refusing kernel is not asked again on every read. */
static struct kvt_ring *ring_take(kvt_io *io) {
    if (io->ring_fork_gen != fork_gen) return NULL;
    pthread_mutex_lock(&io->ring_mu);
    struct kvt_ring *r = io->rings_idle;
    if (r) {
        io->rings_idle = r->next;
    } else if (io->rings_tried < KVT_IO_RINGS) {
        io->rings_tried++;
        r = ring_new();
    }
    pthread_mutex_unlock(&io->ring_mu);
    return r;
}

static void ring_give(kvt_io *io, struct kvt_ring *r, int broken) {
    if (broken) {
        ring_free(r);
        return;
    }
    pthread_mutex_lock(&io->ring_mu);
    r->next = io->rings_idle;
    io->rings_idle = r;
    pthread_mutex_unlock(&io->ring_mu);
}

/* Records a completion; what io_uring left unfinished is finished by pread (invariant 7). */
static void uring_complete(kvt_io_xfer *t, int res) {
    t->via = KVT_URING_VIA;
    if (res == -EINTR || res == -EAGAIN) {
        t->err = kvt_posix_pread_full(t->fd, t->buf, t->len, t->off, &t->got);
        t->via = "pread";
        return;
    }
    if (res < 0) {
        t->got = 0;
        t->err = -res;
        return;
    }
    VALGRIND_MAKE_MEM_DEFINED(t->buf, (size_t)res);
    t->got = (size_t)res;
    t->err = 0;
    if (res > 0 && (size_t)res < t->len) {
        size_t more = 0;
        t->err = kvt_posix_pread_full(t->fd, (char *)t->buf + res, t->len - (size_t)res, t->off + (uint64_t)res, &more);
        t->got += more;
    }
}

/* Submits a ring-full at a time with one io_uring_enter that also waits for all of it, and
 * reaps it. Returns how many leading transfers were done; the caller preads the rest. */
static size_t uring_read_batch(kvt_io *io, kvt_io_xfer *x, size_t n) {
    struct kvt_ring *r = ring_take(io);
    if (!r) return 0;
    struct iovec iov[KVT_RING_ENTRIES];
    size_t done = 0;
    int broken = 0;
    while (done < n && !broken) {
        unsigned k = n - done < KVT_RING_ENTRIES ? (unsigned)(n - done) : KVT_RING_ENTRIES;
        for (unsigned j = 0; j < k; j++) {
            kvt_io_xfer *t = &x[done + j];
            struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring); /* never NULL: ring drained */
            iov[j].iov_base = t->buf;
            iov[j].iov_len = t->len;
            /* READV rather than READ: every kernel with io_uring (5.1+) has it */
            io_uring_prep_readv(sqe, t->fd, &iov[j], 1, t->off);
            io_uring_sqe_set_data(sqe, t);
            t->err = KVT_IN_FLIGHT;
        }
        unsigned submitted = 0;
        int retries = 0;
        while (submitted < k) {
            int s = io_uring_submit_and_wait(&r->ring, submitted ? 0 : k);
            if (s == -EINTR) continue;
            if ((s == -EAGAIN || s == -EBUSY) && ++retries < KVT_SUBMIT_RETRIES) continue;
            if (s <= 0) { /* e.g. a sandbox that allows io_uring_setup but not io_uring_enter */
                broken = 1;
                break;
            }
            submitted += (unsigned)s;
        }
        for (unsigned reaped = 0; reaped < submitted;) {
            struct io_uring_cqe *cqe;
            int w = io_uring_wait_cqe(&r->ring, &cqe);
            if (w == -EINTR || w == -EAGAIN || w == -ETIME) continue;
            if (w < 0) {
                /* Not seen with a valid ring: fail what is still in flight, retire the ring. */
                for (unsigned j = 0; j < submitted; j++)
                    if (x[done + j].err == KVT_IN_FLIGHT) {
                        x[done + j].err = -w;
                        x[done + j].got = 0;
                        x[done + j].via = KVT_URING_VIA;
                    }
                broken = 1;
                break;
            }
            kvt_io_xfer *t = io_uring_cqe_get_data(cqe);
            int res = cqe->res;
            io_uring_cqe_seen(&r->ring, cqe);
            uring_complete(t, res);
            reaped++;
        }
        done += submitted;
    }
    ring_give(io, r, broken);
    return done;
}

static const kvt_io_backend uring_backend = {"io_uring", kvt_posix_pread_full, kvt_posix_datasync, uring_read_batch};

/* KVTIER_IO_URING=0 (or off, no, false) asks for pread. */
static int uring_disabled_by_env(void) {
    const char *v = getenv("KVTIER_IO_URING");
    if (!v) return 0;
    return !strcmp(v, "0") || !strcasecmp(v, "off") || !strcasecmp(v, "no") || !strcasecmp(v, "false");
}

void kvt_uring_open(kvt_io *io) {
    pthread_once(&fork_hook_once, fork_hook);
    io->ring_fork_gen = fork_gen;
    /* The first ring decides the backend: a kernel without io_uring, a seccomp filter
     * (EPERM/ENOSYS) or kernel.io_uring_disabled fail here, and reads silently stay preads. */
    if (uring_disabled_by_env()) return;
    struct kvt_ring *r = ring_new();
    if (r) {
        io->be = &uring_backend;
        io->rings_idle = r;
        io->rings_tried = 1;
    }
}

void kvt_uring_close(kvt_io *io) {
    while (io->rings_idle) {
        struct kvt_ring *r = io->rings_idle;
        io->rings_idle = r->next;
        ring_free(r);
    }
}

#else

void kvt_uring_open(kvt_io *io) { (void)io; }

void kvt_uring_close(kvt_io *io) { (void)io; }

#endif
