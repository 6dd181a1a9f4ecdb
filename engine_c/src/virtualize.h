/*
 * virtualize.h — bringing a parked collection back before any operation (virtualize.c), and
 * giving way when the budget is tight. Every function expects the store mutex held.
 */
#ifndef KVT_VIRTUALIZE_H
#define KVT_VIRTUALIZE_H

#include <pthread.h>

#include "common.h"
#include "store.h"

/* Every operation on a collection starts here: no loader busy with it, and it is resident. */
int kvt_ready(kvt_coll *c);
/* ... for a hint (prefetch): brought in only if it fits without paging anything out (else it
 * stays parked, and 0). */
int kvt_ready_for_hint(kvt_coll *c);
/* Frees what can give way under budget pressure (virtualize.c 3); 1 if anything was freed.
 * held: also the entries policies hold for splits (only for a call's last run, RUN_READY). */
int kvt_give_way(kvt_store *s, int held);
/* Demand paging: parks resident collections other than keep (idle ones first, else the most
 * recently used) until need bytes are free or none is left (virtualize.c 4); 1 if any was parked. */
int kvt_page_out(kvt_store *s, const kvt_coll *keep, uint64_t need);
/* Operations that only look (stats, checkpoints) leave a parked collection parked. */
int kvt_peek_begin(kvt_coll *c, int *was_parked);
void kvt_peek_end(kvt_coll *c, int was_parked);

/* Runs `call` (an int expression using c) on collection c under the store mutex, once c is
 * ready. A call that failed for want of budget runs once more after what can give way did:
 * reads in flight (their buffers are pinned until they land) are waited for, and write-buffer
 * tails are written to flash, token-level keys dropped and array slack given back
 * (kvt_give_way); the second run buffers nothing new and grows no slack (store->tight). A
 * call still short of room runs again after each round of demand paging (kvt_page_out: other
 * collections parked, idle ones first, until what it lacked is free), until it
 * fits or nothing is left to park; then once more with store->pieces, after the entries held
 * for splits were written too, where a retrieve reads a cluster too large for what is left in
 * pieces (pieces.c) and an add stages what is free rather than fail: only then, so that
 * whenever paging can make the room, results and splits are those of a larger budget. A
 * failed add, retrieve or search changes nothing a later run depends on. Sets rc. */
#define RUN_READY(c, call)                                                                                             \
    do {                                                                                                               \
        LOCK((c)->st);                                                                                                 \
        rc = kvt_ready(c);                                                                                             \
        if (!rc) rc = (call);                                                                                          \
        if (rc == KVT_EBUDGET && ((c)->st->loading_bytes || kvt_give_way((c)->st, 0))) {                               \
            while ((c)->st->loading_bytes) pthread_cond_wait(&(c)->st->done_cv, &(c)->st->mu);                         \
            kvt_give_way((c)->st, 0);                                                                                  \
            kvt_clear_error();                                                                                         \
            (c)->st->tight = 1;                                                                                        \
            rc = kvt_ready(c);                                                                                         \
            if (!rc) rc = (call);                                                                                      \
            (c)->st->tight = 0;                                                                                        \
        }                                                                                                              \
        while (rc == KVT_EBUDGET && kvt_page_out((c)->st, (c), (c)->st->mem.short_by)) {                               \
            (c)->st->tight = 1;                                                                                        \
            rc = kvt_ready(c);                                                                                         \
            if (!rc) rc = (call);                                                                                      \
            (c)->st->tight = 0;                                                                                        \
        }                                                                                                              \
        if (rc == KVT_EBUDGET) { /* the last run: clusters too large for what is left come in pieces */                \
            kvt_clear_error();                                                                                         \
            kvt_give_way((c)->st, 1);                                                                                  \
            (c)->st->tight = (c)->st->pieces = 1;                                                                      \
            rc = kvt_ready(c);                                                                                         \
            if (!rc) rc = (call);                                                                                      \
            (c)->st->tight = (c)->st->pieces = 0;                                                                      \
        }                                                                                                              \
        UNLOCK((c)->st);                                                                                               \
    } while (0)

#endif
