/*
 * error.c — error codes to text, the per-thread detail message, CRC-32C, blob writer.
 *
 * Invariants:
 * 1. kvt_strerror never returns NULL and never allocates.
 * 2. The detail message is thread-local: concurrent calls never see each other's errors.
 * 3. So are the on_corrupt choice and the list of unreadable entries (kvt_last_unreadable): a
 *    thread's list holds only what its own calls met, and is freed when the thread ends.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "common.h"

static _Thread_local char last_error[512];

int(kvt_fail)(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    (void)vsnprintf(last_error, sizeof last_error, fmt, ap); /* a longer message is cut, as it may be */
    va_end(ap);
    return code;
}

void kvt_clear_error(void) { last_error[0] = '\0'; }
const char *kvt_last_error(void) { return last_error; }

/* ---- damaged entries: the calling thread's choice and what its last read met -------------- */

static _Thread_local int on_corrupt = KVT_ON_CORRUPT_RAISE;

int kvt_set_on_corrupt(int mode) {
    if (mode != KVT_ON_CORRUPT_RAISE && mode != KVT_ON_CORRUPT_SKIP) return KVT_EINVAL;
    int prev = on_corrupt;
    on_corrupt = mode;
    return prev;
}

int kvt_on_corrupt(void) { return on_corrupt; }

typedef struct unread_list {
    kvt_unreadable *v;
    size_t n, cap, sorted;
} unread_list;
static _Thread_local unread_list *unread;
static pthread_key_t unread_key; /* only for its destructor: frees a thread's list at exit */
static pthread_once_t unread_once = PTHREAD_ONCE_INIT;

static void unread_free(void *p) {
    unread_list *u = p;
    if (u) free(u->v);
    free(u);
}
static void unread_init(void) { (void)pthread_key_create(&unread_key, unread_free); }

void kvt_unreadable_clear(void) {
    if (unread) unread->n = unread->sorted = 0;
}

/* The list lives outside the DRAM budget, as an error message does: it is the caller's answer,
 * at most one entry per damaged record the call met. Out of memory, it stops growing (the call's
 * own result says what it returned; the message still names the first ids). */
void kvt_unreadable_add(uint32_t coll, int64_t id) {
    if (!unread) {
        pthread_once(&unread_once, unread_init);
        if (!(unread = calloc(1, sizeof *unread))) return;
        (void)pthread_setspecific(unread_key, unread);
    }
    if (unread->n == unread->cap) {
        size_t cap = unread->cap ? unread->cap * 2 : 64;
        kvt_unreadable *v = realloc(unread->v, cap * sizeof *v);
        if (!v) return;
        unread->v = v;
        unread->cap = cap;
    }
    unread->v[unread->n++] = (kvt_unreadable){coll, id};
}

static int by_coll_id(const void *a, const void *b) {
    const kvt_unreadable *x = a, *y = b;
    if (x->coll != y->coll) return x->coll < y->coll ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

size_t kvt_last_unreadable(const kvt_unreadable **out) {
    if (!unread || !unread->n) {
        if (out) *out = NULL;
        return 0;
    }
    if (unread->sorted != unread->n) { /* a search may meet one damaged cluster per query block */
        qsort(unread->v, unread->n, sizeof *unread->v, by_coll_id);
        size_t m = 1;
        for (size_t i = 1; i < unread->n; i++)
            if (by_coll_id(&unread->v[i], &unread->v[m - 1])) unread->v[m++] = unread->v[i];
        unread->n = unread->sorted = m;
    }
    if (out) *out = unread->v;
    return unread->n;
}

const char *kvt_strerror(int code) {
    switch (code) {
    case KVT_OK: return "KVT_OK: success";
    case KVT_EINVAL: return "KVT_EINVAL: invalid argument";
    case KVT_ECORRUPT: return "KVT_ECORRUPT: data failed a checksum or structural check";
    case KVT_EBUDGET: return "KVT_EBUDGET: the DRAM budget is too small for this operation";
    case KVT_ENOTFOUND: return "KVT_ENOTFOUND: no entry with that id";
    case KVT_EFORMAT: return "KVT_EFORMAT: unsupported format version";
    case KVT_ECLOSED: return "KVT_ECLOSED: the store is closed";
    case KVT_EINJECTED: return "KVT_EINJECTED: injected fault";
    case EIO: return "EIO: input/output error";
    case ENOSPC: return "ENOSPC: no space left on device";
    case ENOMEM: return "ENOMEM: out of memory";
    case EACCES: return "EACCES: permission denied";
    case ENOENT: return "ENOENT: no such file or directory";
    case EINVAL: return "EINVAL: invalid argument (system)";
    case EROFS: return "EROFS: read-only file system";
    case EDQUOT: return "EDQUOT: disk quota exceeded";
    default: return code > 0 ? "ERRNO: system error (see kvt_last_error)" : "KVT_UNKNOWN: unknown error";
    }
}

static char kill_name[64];
static long kill_count = -1;
static pthread_once_t kill_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t kill_mu = PTHREAD_MUTEX_INITIALIZER;

static void kill_init(void) {
    const char *v = getenv("KVTIER_KILL_AT");
    const char *colon = v ? strrchr(v, ':') : NULL;
    if (!colon || colon == v || (size_t)(colon - v) >= sizeof kill_name) return;
    memcpy(kill_name, v, (size_t)(colon - v));
    kill_count = strtol(colon + 1, NULL, 10);
}

void kvt_kill_point(const char *name) {
    pthread_once(&kill_once, kill_init);
    if (kill_count < 0 || strcmp(name, kill_name) != 0) return;
    pthread_mutex_lock(&kill_mu);
    long left = kill_count--;
    pthread_mutex_unlock(&kill_mu);
    if (left == 0) (void)raise(SIGKILL);
}

static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

/* Slicing-by-8: fast enough that checksumming every record costs little next to the read. */
uint32_t kvt_crc32c(uint32_t crc, const void *data, size_t len) {
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = data;
    crc = ~crc;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^ crc_table[5][(w >> 16) & 0xFF] ^
              crc_table[4][(w >> 24) & 0xFF] ^ crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
              crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFF];
    return ~crc;
}

void kvt_wbuf_put(kvt_wbuf *w, const void *src, size_t n) {
    if (w->oom) return;
    if (w->len + n > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->len + n) cap *= 2;
        uint8_t *p = realloc(w->p, cap);
        if (!p) {
            w->oom = 1;
            return;
        }
        w->p = p;
        w->cap = cap;
    }
    memcpy(w->p + w->len, src, n);
    w->len += n;
}

void kvt_free(void *p) { free(p); }
