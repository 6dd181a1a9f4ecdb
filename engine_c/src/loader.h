/*
 * loader.h — the loader threads (loader.c): one job queue for prefetch reads and swap-ins.
 * Both functions expect the store mutex held.
 */
#ifndef KVT_LOADER_H
#define KVT_LOADER_H

#include "store.h"

/* Waits (releasing the store mutex) until no job of collection c is queued or running. */
void kvt_wait_idle(kvt_coll *c);
/* Starts the loader threads on first use; *rc is set only if none can start. */
void kvt_start_loaders(kvt_store *s, int *rc);

#endif
