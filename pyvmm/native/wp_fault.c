/* The write-protect session's fault path: a write to a protected page of the session's RAM is
 * let through only once the page is saved, either already (the saver's, or an earlier fault's)
 * or now, as a shadow copy queued for the saver. Thread mode: pyvmm_wp_handler_main reads the
 * faults from the uffd; signal mode: the faulting thread resolves its own fault (sigbus.c).
 *
 * This path never touches a Python object: a thread holding the GIL may be the one blocked in
 * the fault it is resolving (DESIGN.md section 5). It never waits for a thread that may need
 * the GIL either (overflow slots, see struct wp_session).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "wp_session.h"

/* An overflow slot (lock held), or -1 without memory. */
static int take_extra_slot(struct wp_session *s) {
    if (!s->nextra_free) {
        unsigned cap = s->extra_cap ? 2 * s->extra_cap : 64;
        unsigned char **grown = realloc(s->extra, cap * sizeof *grown);
        if (!grown)
            return -1;
        s->extra = grown;
        unsigned *free_ids = realloc(s->extra_free, cap * sizeof *free_ids);
        if (!free_ids)
            return -1;
        s->extra_free = free_ids;
        for (unsigned i = cap; i > s->extra_cap; i--) {
            s->extra[i - 1] = NULL;
            s->extra_free[s->nextra_free++] = i - 1;
        }
        s->extra_cap = cap;
    }
    unsigned i = s->extra_free[s->nextra_free - 1];
    if (posix_memalign((void **)&s->extra[i], PAGE_SZ, PAGE_SZ)) {
        s->extra[i] = NULL;
        return -1;
    }
    s->nextra_free--;
    return (int)(s->nslots + i);
}

/* A free shadow slot; when the pool is full, an overflow slot unless a C saver runs, whom the
 * handler then waits for.  -1 when the session is stopping. */
static int take_slot(struct wp_session *s) {
    pthread_mutex_lock(&s->lock);
    int slot = -1;
    if (!s->nfree)
        s->pool_waits++;
    while (!s->nfree && !__atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE)) {
        if (!s->saver_active && (slot = take_extra_slot(s)) >= 0)
            break;
        pthread_cond_wait(&s->slot_freed, &s->lock);
    }
    if (slot < 0 && s->nfree)
        slot = (int)s->free_stack[--s->nfree];
    pthread_mutex_unlock(&s->lock);
    return slot;
}

/* Make sure page `p` of block b is saved (now, or already) before it may change. */
static void secure_page(struct wp_session *s, struct wp_block *b, u64 p) {
    unsigned char *st = &s->state[b->first + p];
    for (;;) {
        unsigned char cur = __atomic_load_n(st, __ATOMIC_ACQUIRE);
        if (cur == ST_SENT)
            return;
        if (cur == ST_PROCESSING) {
            /* the saver is copying it out in C (pyvmm_wp_session_take_page, no GIL needed):
             * a 4 KiB memcpy away */
            sched_yield();
            continue;
        }
        unsigned char expect = ST_NONE;
        /* counted before the claim: a saver that sees 0 here after its pass knows that no
         * claim of a page it skipped is still on its way to the queue */
        __atomic_add_fetch(&s->inflight, 1, __ATOMIC_SEQ_CST);
        if (!__atomic_compare_exchange_n(st, &expect, ST_PROCESSING, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST)) {
            __atomic_sub_fetch(&s->inflight, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        int slot = take_slot(s);
        if (slot < 0) { /* stopping: nobody will save it any more */
            __atomic_store_n(st, ST_NONE, __ATOMIC_RELEASE);
            __atomic_sub_fetch(&s->inflight, 1, __ATOMIC_SEQ_CST);
            return;
        }
        memcpy(pyvmm_wp_session_slot_addr(s, (unsigned)slot),
               (void *)(uintptr_t)(b->base + p * PAGE_SZ), PAGE_SZ);
        pthread_mutex_lock(&s->lock);
        unsigned tail = (s->q_head + s->q_len) % s->q_cap;
        s->q_block[tail] = (unsigned)(b - s->blocks);
        s->q_page[tail] = p;
        s->q_slot[tail] = (unsigned)slot;
        s->q_len++;
        s->shadow_copies++;
        pthread_mutex_unlock(&s->lock);
        __atomic_store_n(st, ST_SENT, __ATOMIC_RELEASE);
        __atomic_sub_fetch(&s->inflight, 1, __ATOMIC_SEQ_CST);
        return;
    }
}

#ifndef UFFDIO_WRITEPROTECT_MODE_DONTWAKE
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ((u64)1 << 1)
#endif

/* Resolve a write fault at addr, inside block b: secure and mark dirty the run the fault opens,
 * then unprotect it.  In thread mode the unprotect wakes the writer; in signal mode the writer
 * is this very thread, which retries its write when the SIGBUS handler returns.  Several threads
 * may be here at once in signal mode: the fault-around fields are then only hints (a race can
 * only change a run's length, within max_unprotect and the block). */
void pyvmm_wp_resolve_fault(struct wp_session *s, struct wp_block *b, u64 addr) {
    u64 page = (addr - b->base) / PAGE_SZ, first, last;
    unsigned number = (unsigned)(b - s->blocks);
    u64 window = __atomic_load_n(&s->window, __ATOMIC_RELAXED);
    u64 last_end = __atomic_load_n(&s->last_end, __ATOMIC_RELAXED);
    unsigned last_block = __atomic_load_n(&s->last_block, __ATOMIC_RELAXED);
    if (s->max_unprotect > s->unprotect_pages && number == last_block && last_end &&
        page == last_end) { /* a sequential writer: open more ahead of it */
        window = 2 * window < s->max_unprotect ? 2 * window : s->max_unprotect;
        if (window < s->unprotect_pages)
            window = s->unprotect_pages;
        first = page;
        last = page + window;
        /* with room for a huge page, runs end at 2 MiB boundaries: the writer's next fault is
         * then at the start of one, whose whole unprotect keeps it huge (a partial one splits
         * it, and the guest then runs on 4 KiB host pages) */
        if (s->max_unprotect >= HUGE_PAGES && last / HUGE_PAGES * HUGE_PAGES > page)
            last = last / HUGE_PAGES * HUGE_PAGES;
    } else {
        window = s->unprotect_pages;
        first = page - page % s->unprotect_pages;
        last = first + s->unprotect_pages;
    }
    if (last > b->npages)
        last = b->npages;
    __atomic_store_n(&s->window, window, __ATOMIC_RELAXED);
    __atomic_store_n(&s->last_block, number, __ATOMIC_RELAXED);
    __atomic_store_n(&s->last_end, last, __ATOMIC_RELAXED);
    /* every page the unprotect opens must be saved first, and counts as dirty: later writes to
     * it will not fault */
    for (u64 p = first; p < last; p++)
        secure_page(s, b, p);
    pthread_mutex_lock(&s->wp_lock);
    pyvmm_bitmap_set_range(b->dirty, first, last - first);
    /* counted before the unprotect wakes the writer, so that the writer sees its own fault */
    __atomic_add_fetch(&s->faults, 1, __ATOMIC_RELEASE);
    int rc = pyvmm_uffd_writeprotect(s->uffd, b->base + first * PAGE_SZ, (last - first) * PAGE_SZ,
                                     s->mode == FAULT_SIGNAL ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE
                                                             : 0);
    pthread_mutex_unlock(&s->wp_lock);
    /* once stopping, RAM may be unregistered under us (ENOENT): that is the normal shutdown;
     * EAGAIN (mappings changing): a signal-mode writer simply faults again */
    if (rc < 0 && rc != -EAGAIN && !__atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE))
        __atomic_store_n(&s->error, -rc, __ATOMIC_RELEASE);
}

static void handle_fault(struct wp_session *s, u64 addr) {
    struct wp_block *b = find_block(s, addr);
    if (!b) { /* not ours: wake it anyway so that the writer does not hang */
        pyvmm_uffd_writeprotect(s->uffd, addr & ~(u64)(PAGE_SZ - 1), PAGE_SZ, 0);
        return;
    }
    pyvmm_wp_resolve_fault(s, b, addr);
}

/* Thread mode: one blocking read() per wakeup (poll() first would be a second syscall per
 * fault: measured ~10 % of the round trip); the doorbell's fault ends the loop. */
void *pyvmm_wp_handler_main(void *arg) {
    struct wp_session *s = arg;
    pthread_setname_np(pthread_self(), "pyvmm-wp"); /* ps -L, top -H, gdb */
    struct uffd_msg msgs[16];
    u64 bell = (u64)(uintptr_t)s->doorbell;
    int done = 0;
    while (!done) {
        ssize_t got = read(s->uffd, msgs, sizeof msgs);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            __atomic_store_n(&s->error, errno, __ATOMIC_RELEASE);
            break;
        }
        for (size_t i = 0; i < (size_t)got / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            u64 addr = msgs[i].arg.pagefault.address;
            if ((addr & ~(u64)(PAGE_SZ - 1)) == bell)
                done = 1; /* the rest of this batch is still served */
            else
                handle_fault(s, addr);
        }
    }
    /* whoever rang (now or later, if this thread ended on an error) goes on */
    pyvmm_uffd_writeprotect(s->uffd, bell, PAGE_SZ, 0);
    return NULL;
}
