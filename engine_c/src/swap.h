/*
 * swap.h — the volatile swap file that holds parked collections' images (swap.c): its free
 * ranges, and the writer that streams an image into a collection's slot. Every function
 * expects the store mutex held.
 */
#ifndef KVT_SWAP_H
#define KVT_SWAP_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

/* Streams an image to [base, base + slot) of the swap file through a staging buffer of
 * `cap` bytes (a multiple of KVT_IO_ALIGN). With f == NULL it only counts, so the same code
 * sizes an image before writing it. With `pgh` (a hash per KVT_IO_ALIGN page of the slot)
 * and `reuse` (the slot holds the image those hashes describe), a page whose hash is
 * unchanged is not written again: a parked layer's unchanged index is not rewritten. */
typedef struct kvt_swap_writer {
    kvt_file *f;
    uint64_t base, off, total; /* the slot's start; the staged bytes' file offset; bytes put */
    uint8_t *buf;
    size_t len, cap;
    uint32_t crc;
    int rc;
    uint64_t *pgh; /* the slot's page hashes (NULL: every page is written) */
    uint32_t npg;  /* entries of pgh */
    int reuse;
    uint64_t written, skipped; /* bytes written, bytes found unchanged and skipped */
} kvt_swap_writer;

void kvt_sw_put(kvt_swap_writer *w, const void *p, size_t n);
void kvt_sw_u32(kvt_swap_writer *w, uint32_t v);
/* Zeros up to the image's byte `to` (its sections' slack). */
void kvt_sw_zeros(kvt_swap_writer *w, uint64_t to);
/* Zeros to the I/O alignment, then the last write. */
void kvt_sw_finish(kvt_swap_writer *w);

int kvt_swap_open(kvt_store *s);
/* First fit among the free ranges, else the file's end. */
void kvt_swap_alloc(kvt_store *s, uint64_t len, uint64_t *off);
void kvt_swap_free(kvt_store *s, uint64_t off, uint64_t len);

#endif
