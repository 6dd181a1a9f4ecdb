/*
 * mem.c — the DRAM ledger (mem.h): reservations against the budget, by use, and their peaks.
 *
 * Invariants:
 * 1. used <= budget at every return, and peak is the largest value used has had.
 * 2. used counts every reservation not yet released; use[u] counts those made for use u, so
 *    the uses sum to used.
 * 3. A reservation that does not fit asks give_way for room one unit at a time, and fails
 *    only when give_way has nothing left: it never fails while something could give way.
 */
#include <stdio.h>
#include <string.h>

#include "common.h"
#include "mem.h"

void kvt_mem_init(kvt_mem *m, uint64_t budget) {
    memset(m, 0, sizeof *m);
    m->budget = budget;
}

static const char *const use_names[KVT_USES] = {"index", "cache", "pending", "buffers"};

static void note_peaks(kvt_mem *m, int use) {
    if (m->used > m->peak) m->peak = m->used;
    if (m->use[use] > m->use_peak[use]) m->use_peak[use] = m->use[use];
    if (kvt_mem_fixed(m) > m->fixed_peak) m->fixed_peak = kvt_mem_fixed(m);
}

int kvt_mem_reserve_as(kvt_mem *m, int use, uint64_t bytes) {
    while (m->used + bytes > m->budget && m->give_way && m->give_way(m->give_way_ctx)) {}
    if (m->used + bytes > m->budget) {
        m->short_by = m->used + bytes - m->budget;
        char what[256];
        size_t at = 0;
        for (int u = 0; u < KVT_USES; u++)
            at += (size_t)snprintf(what + at, sizeof what - at, "%s%s %llu", u ? ", " : "", use_names[u],
                                   (unsigned long long)m->use[u]);
        return kvt_fail(KVT_EBUDGET,
                        "DRAM budget of %llu bytes cannot hold %llu more bytes of %s (in use: %s; "
                        "the cached clusters left are pinned by this operation). Raise dram_budget "
                        "(kvtier.estimate tells the minimum), or lower write_buffer, pending_budget or the add batch.",
                        (unsigned long long)m->budget, (unsigned long long)bytes, use_names[use], what);
    }
    m->used += bytes;
    m->use[use] += bytes;
    note_peaks(m, use);
    return 0;
}

void kvt_mem_release_as(kvt_mem *m, int use, uint64_t bytes) {
    m->used -= bytes;
    m->use[use] -= bytes;
}

void kvt_mem_reset_peaks(kvt_mem *m) {
    m->peak = m->used;
    memcpy(m->use_peak, m->use, sizeof m->use);
    m->fixed_peak = kvt_mem_fixed(m);
}

uint64_t kvt_grow_step(uint64_t cap, uint64_t need) {
    /* a first allocation is exact: most clusters keep one segment all their life */
    uint64_t nc = cap ? cap : need;
    while (nc < need) nc += (nc > (1u << 17) ? nc / 4 : nc / 2) + 1;
    return nc;
}
