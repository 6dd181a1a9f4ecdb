/*
 * swap.c — the volatile swap file of parked collections' images (docs/design.md §2.3): its
 * free ranges, and the writer that streams an image into a collection's slot.
 *
 * Invariants:
 * 1. The file is volatile: recreated at the first park of each run and removed at close, so
 *    nothing in it outlives the store; a parked collection's durable state is its data file
 *    and catalog.
 * 2. Free ranges are sorted by offset and coalesced; a range that ends the file shrinks it.
 * 3. A page the writer skips holds, byte for byte as far as a 64-bit hash can tell, what the
 *    new image puts there: it is skipped only when the slot still holds the image its hashes
 *    describe (reuse), and the image's own CRC-32C, checked at install, covers every byte.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "store.h"
#include "swap.h"

/* FNV-1a over 64-bit words beside the page's CRC-32C: 64 bits, so that an unchanged hash of
 * a changed page is out of reach in practice (invariant 3). */
static uint64_t page_hash(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, p + i, 8);
        h = (h ^ x) * 0x100000001b3ull;
    }
    return h ^ ((uint64_t)kvt_crc32c(0, p, n) << 32);
}

/* The staged bytes go out as runs of changed pages; unchanged ones are skipped. Staged bytes
 * always start on a page boundary of the slot (the buffer holds whole pages). */
static void sw_flush(kvt_swap_writer *w) {
    if (!w->len || w->rc) return;
    const size_t pg = KVT_IO_ALIGN;
    for (size_t at = 0; w->f && at < w->len && !w->rc;) {
        size_t a = at;
        int same = 0;
        while (at < w->len) {
            size_t n = w->len - at < pg ? w->len - at : pg;
            uint64_t i = (w->off + at - w->base) / pg;
            if (w->pgh && i < w->npg) {
                uint64_t h = page_hash(w->buf + at, n);
                same = w->reuse && n == pg && w->pgh[i] == h;
                w->pgh[i] = h;
            }
            if (same) break;
            at += n;
        }
        if (at > a) {
            w->rc = kvt_file_write(w->f, w->off + a, w->buf + a, at - a);
            w->written += at - a;
        }
        if (same) {
            w->skipped += pg;
            at += pg;
        }
    }
    w->off += w->len;
    w->len = 0;
}

void kvt_sw_put(kvt_swap_writer *w, const void *p, size_t n) {
    w->total += n;
    if (!w->f || !n) return; /* p may be NULL when n is 0 (an empty table) */
    w->crc = kvt_crc32c(w->crc, p, n);
    const uint8_t *src = p;
    while (n && !w->rc) {
        size_t take = w->cap - w->len < n ? w->cap - w->len : n;
        memcpy(w->buf + w->len, src, take);
        w->len += take;
        src += take;
        n -= take;
        if (w->len == w->cap) sw_flush(w);
    }
}

void kvt_sw_u32(kvt_swap_writer *w, uint32_t v) { kvt_sw_put(w, &v, 4); }

void kvt_sw_zeros(kvt_swap_writer *w, uint64_t to) {
    static const uint8_t zero[512];
    while (w->total < to) {
        uint64_t n = to - w->total < sizeof zero ? to - w->total : sizeof zero;
        kvt_sw_put(w, zero, (size_t)n);
    }
}

void kvt_sw_finish(kvt_swap_writer *w) {
    kvt_sw_zeros(w, kvt_round_up(w->total, KVT_IO_ALIGN));
    sw_flush(w);
}

int kvt_swap_open(kvt_store *s) {
    if (s->swap) return 0;
    char path[4096];
    if (snprintf(path, sizeof path, "%s/swap.kvs", s->dir) >= (int)sizeof path)
        return kvt_fail(KVT_EINVAL, "dir: the store's path is too long (%zu bytes)", strlen(s->dir));
    return kvt_file_open(&s->io, path, 1, &s->swap);
}

void kvt_swap_alloc(kvt_store *s, uint64_t len, uint64_t *off) {
    for (uint32_t i = 0; i < s->nsfree; i++)
        if (s->sfree[i].len >= len) {
            *off = s->sfree[i].off;
            s->sfree[i].off += len;
            s->sfree[i].len -= len;
            if (!s->sfree[i].len)
                memmove(&s->sfree[i], &s->sfree[i + 1], (s->nsfree - i - 1) * sizeof *s->sfree), s->nsfree--;
            return;
        }
    *off = s->swap_end;
    s->swap_end += len;
}

void kvt_swap_free(kvt_store *s, uint64_t off, uint64_t len) {
    if (!len) return;
    if (off + len == s->swap_end) {
        s->swap_end = off;
        /* the range before may now end the file too */
        while (s->nsfree && s->sfree[s->nsfree - 1].off + s->sfree[s->nsfree - 1].len == s->swap_end)
            s->swap_end = s->sfree[--s->nsfree].off;
        return;
    }
    if (s->nsfree == s->sfreecap) {
        uint32_t cap = s->sfreecap ? s->sfreecap * 2 : 16;
        kvt_range *r = realloc(s->sfree, cap * sizeof *r);
        if (!r) return; /* the range leaks until the file is recreated: harmless */
        s->sfree = r;
        s->sfreecap = cap;
    }
    uint32_t i = 0;
    while (i < s->nsfree && s->sfree[i].off < off) i++;
    memmove(&s->sfree[i + 1], &s->sfree[i], (s->nsfree - i) * sizeof *s->sfree);
    s->sfree[i] = (kvt_range){off, len};
    s->nsfree++;
    if (i + 1 < s->nsfree && s->sfree[i].off + s->sfree[i].len == s->sfree[i + 1].off) {
        s->sfree[i].len += s->sfree[i + 1].len;
        memmove(&s->sfree[i + 1], &s->sfree[i + 2], (s->nsfree - i - 2) * sizeof *s->sfree);
        s->nsfree--;
    }
    if (i > 0 && s->sfree[i - 1].off + s->sfree[i - 1].len == s->sfree[i].off) {
        s->sfree[i - 1].len += s->sfree[i].len;
        memmove(&s->sfree[i], &s->sfree[i + 1], (s->nsfree - i - 1) * sizeof *s->sfree);
        s->nsfree--;
    }
}
