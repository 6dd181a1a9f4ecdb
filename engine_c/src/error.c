/*
 * error.c — error codes to text, the per-thread detail message, CRC-32C, blob writer.
 *
 * Invariants:
 * 1. kvt_strerror never returns NULL and never allocates.
 * 2. The detail message is thread-local: concurrent calls never see each other's errors.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "common.h"

static _Thread_local char last_error[512];

int kvt_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

void kvt_clear_error(void) { last_error[0] = '\0'; }
const char *kvt_last_error(void) { return last_error; }

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
    if (left == 0) raise(SIGKILL);
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
        crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^
              crc_table[5][(w >> 16) & 0xFF] ^ crc_table[4][(w >> 24) & 0xFF] ^
              crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
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
        if (!p) { w->oom = 1; return; }
        w->p = p;
        w->cap = cap;
    }
    memcpy(w->p + w->len, src, n);
    w->len += n;
}

void kvt_free(void *p) { free(p); }
