/*
 * common.h — what every layer of the engine shares: error reporting, checksums, small
 * arithmetic helpers. No layer state lives here.
 */
#ifndef KVT_COMMON_H
#define KVT_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvtier.h"

/* Records `code` with a printf-style detail for kvt_last_error() and returns code, so that an
 * error site reads `return kvt_fail(KVT_EINVAL, "dim %u > %u", d, max);`. */
int(kvt_fail)(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* ... and the macro makes the value `code` itself, so that a reader (and a static analyzer)
 * sees at the call that a failure returns what it names, never 0. */
static inline int kvt_failed(int recorded, int code) {
    (void)recorded;
    return code;
}
#define kvt_fail(code, ...) kvt_failed((kvt_fail)((code), __VA_ARGS__), (code))
void kvt_clear_error(void);
/* The calling thread's on_corrupt choice (kvt_set_on_corrupt), and its list of unreadable
 * entries (kvt_last_unreadable): emptied when a read call starts, added to as it meets damage. */
int kvt_on_corrupt(void);
void kvt_unreadable_clear(void);
void kvt_unreadable_add(uint32_t coll, int64_t id);

/* Crash testing: when the environment names this point (KVTIER_KILL_AT=name:n), the n-th
 * time the process reaches it, it kills itself with SIGKILL, as a power cut at that moment
 * would. Costs one comparison when unset. */
void kvt_kill_point(const char *name);

/* CRC-32C (Castagnoli); `crc` is the running value, 0 to start. */
uint32_t kvt_crc32c(uint32_t crc, const void *data, size_t len);

static inline uint64_t kvt_round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
static inline uint64_t kvt_round_down(uint64_t x, uint64_t a) { return x / a * a; }

/* splitmix64: a small deterministic generator, so that clustering is reproducible. */
static inline uint64_t kvt_rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Little-endian blob writer/reader used by the exported catalog blobs. */
typedef struct kvt_wbuf {
    uint8_t *p;
    size_t len, cap;
    int oom;
} kvt_wbuf;
void kvt_wbuf_put(kvt_wbuf *w, const void *src, size_t n);
static inline void kvt_wbuf_u32(kvt_wbuf *w, uint32_t v) { kvt_wbuf_put(w, &v, 4); }
static inline void kvt_wbuf_u64(kvt_wbuf *w, uint64_t v) { kvt_wbuf_put(w, &v, 8); }
static inline void kvt_wbuf_f64(kvt_wbuf *w, double v) { kvt_wbuf_put(w, &v, 8); }

typedef struct kvt_rbuf {
    const uint8_t *p;
    size_t len, pos;
    int bad;
} kvt_rbuf;
static inline int kvt_rbuf_get(kvt_rbuf *r, void *dst, size_t n) {
    if (!n) return 0; /* dst may be NULL then (an empty table) */
    if (r->bad || n > r->len - r->pos) {
        r->bad = 1;
        memset(dst, 0, n);
        return -1;
    }
    memcpy(dst, r->p + r->pos, n);
    r->pos += n;
    return 0;
}
static inline uint32_t kvt_rbuf_u32(kvt_rbuf *r) {
    uint32_t v;
    kvt_rbuf_get(r, &v, 4);
    return v;
}
static inline uint64_t kvt_rbuf_u64(kvt_rbuf *r) {
    uint64_t v;
    kvt_rbuf_get(r, &v, 8);
    return v;
}
static inline double kvt_rbuf_f64(kvt_rbuf *r) {
    double v;
    kvt_rbuf_get(r, &v, 8);
    return v;
}

#endif
