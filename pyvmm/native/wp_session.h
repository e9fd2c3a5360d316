/* The synchronous write-protect session's insides (the C half of pyvmm.migration.postcopy_uffd),
 * shared by the files that make it up; its API for Python is in native.h. Not fed to cffi.
 *   wp_session.c  the session: blocks, shadow slots, the queue of shadow copies, page states,
 *                 start and stop, re-arming a round;
 *   wp_fault.c    the fault path: a write to a protected page is saved (a shadow copy) before it
 *                 is let through, on the handler thread or in the faulting thread;
 *   sigbus.c      signal mode: pyvmm's SIGBUS handler finds the session a fault belongs to;
 *   live_saver.c  the saver in C, which writes a round's pages while writers keep faulting.
 * No code here touches a Python object: a thread holding the GIL may be the one blocked in the
 * fault being resolved (DESIGN.md section 5).
 */
#ifndef PYVMM_WP_SESSION_H
#define PYVMM_WP_SESSION_H

#include <pthread.h>
#include <stddef.h>

#include "internal.h"

typedef pyvmm_u64 u64;

#define PAGE_SZ 4096u
#define HUGE_PAGES 512u /* 4 KiB pages per 2 MiB transparent huge page */

enum { ST_NONE = 0, ST_PROCESSING = 1, ST_SENT = 2 };

struct wp_block {
    u64 base, npages, first; /* first: index of its page 0 in the session's state array */
    u64 *dirty;
};

struct wp_session {
    int uffd;
    unsigned nblocks, max_blocks, nslots;
    u64 unprotect_pages, total_pages;
    struct wp_block *blocks;
    unsigned char *state; /* per page, atomic: ST_* */
    unsigned char *pool;  /* nslots * PAGE_SZ shadow copies */
    pthread_mutex_t lock; /* guards free stack and queue */
    pthread_cond_t slot_freed;
    unsigned *free_stack, nfree;
    /* queue of (block, page, slot), a ring of q_cap entries: a page is queued at most once per
     * round, and a round's entries are all taken before the next, so pages + 1 is enough */
    unsigned *q_block, *q_slot, q_head, q_len, q_cap;
    u64 *q_page;
    /* Overflow slots (ids nslots + i), malloc'ed one page each when the pool is full and no C
     * saver runs (saver_active 0): the handler then never waits for a thread that may need the
     * GIL; freed as soon as released.  While a C saver runs, a full pool makes writers wait
     * for it instead (it frees slots without the GIL), which bounds the memory. */
    unsigned char **extra;
    unsigned *extra_free, extra_cap, nextra_free; /* free ids of extra, a stack */
    int saver_active;
    pthread_t thread;
    int running, stopping, error;
    int armed; /* signal mode: RAM registered and protected, faults may be resolved */
    /* FAULT_THREAD: the handler thread blocks in read() (one syscall per fault, no poll), and
     * stop rings the doorbell: a write to a page of its own that it protected, whose fault
     * message tells the thread to end.  FAULT_SIGNAL: no thread; the uffd has
     * UFFD_FEATURE_SIGBUS and the faulting thread resolves its own fault in a SIGBUS handler. */
    int mode;
    unsigned char *doorbell;
    int saver_nice; /* > 0: pyvmm_wp_session_save runs on a thread of this nice value */
    u64 faults, shadow_copies, pool_waits;
    /* Held while a block's dirty bits and its protection change together: the handler sets a
     * page's dirty bit and then unprotects it; reprotect takes the bits and protects those
     * pages.  So a page is unprotected only while its dirty bit is set (or a reprotect pass
     * that took the bit is protecting it): re-arming then needs to protect only dirty pages. */
    pthread_mutex_t wp_lock;
    /* fault-around (handler thread only): a fault on the page right after the run the last
     * fault opened doubles the run, up to max_unprotect pages; any other fault starts again */
    u64 max_unprotect, window, last_end;
    unsigned last_block;
    /* handlers between claiming a page (NONE -> PROCESSING) and queueing its shadow copy: the
     * saver is done only when this is 0 and the queue is empty */
    u64 inflight;
};

enum { FAULT_THREAD = 0, FAULT_SIGNAL = 1 }; /* struct wp_session's mode */

/* The block that holds addr, or NULL (inline: looked up on every fault, in either mode). */
static inline struct wp_block *find_block(struct wp_session *s, u64 addr) {
    for (unsigned i = 0; i < s->nblocks; i++) {
        struct wp_block *b = &s->blocks[i];
        if (addr >= b->base && addr < b->base + b->npages * PAGE_SZ)
            return b;
    }
    return NULL;
}

/* wp_session.c */
/* The saver's slots, n at once, back to the pool. */
PYVMM_HIDDEN void pyvmm_wp_release_slots(struct wp_session *s, const unsigned *slots, unsigned n);
/* Up to max queued shadow copies, oldest first. */
PYVMM_HIDDEN unsigned pyvmm_wp_pop_shadows(struct wp_session *s, unsigned *block, u64 *page,
                                           unsigned *slot, unsigned max);

/* wp_fault.c */
/* Resolve a write fault at addr inside block b (saved first, then unprotected). */
PYVMM_HIDDEN void pyvmm_wp_resolve_fault(struct wp_session *s, struct wp_block *b, u64 addr);
/* Thread mode: the handler thread's body (arg: the session), until the doorbell rings. */
PYVMM_HIDDEN void *pyvmm_wp_handler_main(void *arg);

/* sigbus.c */
/* Signal mode: the session known to the SIGBUS handler (installed first); 0 or -errno. */
PYVMM_HIDDEN int pyvmm_wp_sig_register(struct wp_session *s);
/* Forgotten by it, once no SIGBUS handler may still use s (its RAM unregistered first). */
PYVMM_HIDDEN void pyvmm_wp_sig_unregister(struct wp_session *s);

#endif
