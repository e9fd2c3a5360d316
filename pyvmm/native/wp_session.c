/* The synchronous write-protect session (the C half of pyvmm.migration.postcopy_uffd): its RAM
 * blocks, the pool of shadow slots and the queue of shadow copies waiting for the saver, each
 * page's state in the round, starting and stopping the handler thread (or signal mode), and
 * re-arming a round without walking all of RAM. The fault path is wp_fault.c, signal mode
 * sigbus.c, the saver in C live_saver.c; wp_session.h says what they share.
 *
 * Every function returns 0 (or a count) on success and -errno on failure; policy lives in
 * Python.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "wp_session.h"

/* ---- the session: blocks, settings, start and stop ------------------------------------------ */

void *pyvmm_wp_session_new(int uffd, unsigned int max_blocks, unsigned int nslots,
                           pyvmm_u64 unprotect_pages) {
    struct wp_session *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->uffd = uffd;
    s->doorbell = MAP_FAILED;
    s->max_blocks = max_blocks;
    s->nslots = nslots ? nslots : 1;
    s->unprotect_pages = unprotect_pages ? unprotect_pages : 1;
    s->blocks = calloc(max_blocks ? max_blocks : 1, sizeof *s->blocks);
    s->free_stack = calloc(s->nslots, sizeof(unsigned));
    /* 2 MiB aligned and huge-page backed where the kernel allows: a slot's first use then
     * costs a share of one fault per 512 slots instead of a fault of its own (measured: the
     * first touch, not the copy, was most of a shadow copy's cost in a large pool) */
    size_t pool_bytes = (size_t)s->nslots * PAGE_SZ;
    size_t huge = (size_t)HUGE_PAGES * PAGE_SZ;
    if (posix_memalign((void **)&s->pool, pool_bytes >= huge ? huge : PAGE_SZ, pool_bytes))
        s->pool = NULL;
    else if (pool_bytes >= huge)
        madvise(s->pool, pool_bytes / huge * huge, MADV_HUGEPAGE);
    if (!s->blocks || !s->free_stack || !s->pool) {
        pyvmm_wp_session_free(s);
        return NULL;
    }
    /* Only the first slots are touched now (1 MiB at most): a slot costs host memory from its
     * first shadow copy on, and the free stack hands out the most recently freed slot first
     * (slot 0 first), so the pool's footprint is the most copies ever waiting at once, not its
     * size; a copy into a slot beyond these pays one page fault the first time. */
    memset(s->pool, 0, (size_t)(s->nslots < 256 ? s->nslots : 256) * PAGE_SZ);
    for (unsigned i = 0; i < s->nslots; i++)
        s->free_stack[i] = s->nslots - 1 - i;
    s->nfree = s->nslots;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->wp_lock, NULL);
    pthread_cond_init(&s->slot_freed, NULL);
    return s;
}

int pyvmm_wp_session_add_block(void *handle, pyvmm_u64 base, pyvmm_u64 npages, pyvmm_u64 *dirty) {
    struct wp_session *s = handle;
    if (s->running || s->nblocks >= s->max_blocks)
        return -EINVAL;
    unsigned char *state = realloc(s->state, s->total_pages + npages + 1);
    if (!state)
        return -ENOMEM;
    memset(state + s->total_pages, ST_NONE, npages + 1);
    s->state = state;
    s->blocks[s->nblocks++] = (struct wp_block){base, npages, s->total_pages, dirty};
    s->total_pages += npages;
    return 0;
}

int pyvmm_wp_session_set_mode(void *handle, int mode) {
    struct wp_session *s = handle;
    if (s->running)
        return -EBUSY;
    if (mode != FAULT_THREAD && mode != FAULT_SIGNAL)
        return -EINVAL;
    s->mode = mode;
    return 0;
}

int pyvmm_wp_session_set_fault_around(void *handle, pyvmm_u64 max_pages) {
    struct wp_session *s = handle;
    if (s->running)
        return -EBUSY;
    s->max_unprotect = max_pages;
    return 0;
}

static int ring_setup(struct wp_session *s) {
    s->doorbell = mmap(NULL, PAGE_SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s->doorbell == MAP_FAILED)
        return -errno;
    s->doorbell[0] = 0; /* populated */
    u64 ioctls, bell = (u64)(uintptr_t)s->doorbell;
    int rc = pyvmm_uffd_register(s->uffd, bell, PAGE_SZ, UFFDIO_REGISTER_MODE_WP, &ioctls);
    if (!rc)
        rc = pyvmm_uffd_writeprotect(s->uffd, bell, PAGE_SZ, UFFDIO_WRITEPROTECT_MODE_WP);
    int flags = fcntl(s->uffd, F_GETFL);
    if (!rc && (flags < 0 || fcntl(s->uffd, F_SETFL, flags & ~O_NONBLOCK) < 0))
        rc = -errno;
    return rc;
}

int pyvmm_wp_session_start(void *handle, int cpu) {
    struct wp_session *s = handle;
    if (s->running)
        return -EBUSY;
    if (!s->q_cap) { /* the blocks are known now */
        u64 cap = s->total_pages + 1;
        s->q_block = calloc(cap, sizeof(unsigned));
        s->q_slot = calloc(cap, sizeof(unsigned));
        s->q_page = calloc(cap, sizeof(u64));
        if (!s->q_block || !s->q_slot || !s->q_page || cap > 0xffffffffu)
            return -ENOMEM;
        s->q_cap = (unsigned)cap;
    }
    if (s->mode == FAULT_SIGNAL) {
        int rc = pyvmm_wp_sig_register(s);
        if (!rc)
            s->running = 1;
        return rc;
    }
    if (s->doorbell == MAP_FAILED) {
        int rc = ring_setup(s);
        if (rc)
            return rc;
    }
    int rc = pthread_create(&s->thread, NULL, pyvmm_wp_handler_main, s);
    if (rc)
        return -rc;
    s->running = 1;
    return cpu >= 0 ? pyvmm_wp_session_set_cpu(s, cpu) : 0;
}

int pyvmm_wp_session_arm(void *handle) {
    struct wp_session *s = handle;
    __atomic_store_n(&s->armed, 1, __ATOMIC_RELEASE);
    return 0;
}

int pyvmm_wp_session_set_cpu(void *handle, int cpu) {
    struct wp_session *s = handle;
    if (!s->running)
        return -ESRCH;
    if (s->mode == FAULT_SIGNAL) /* faults are resolved where they happen */
        return 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (cpu >= 0)
        CPU_SET(cpu, &set);
    else
        for (int c = 0; c < CPU_SETSIZE; c++)
            CPU_SET(c, &set);
    return -pthread_setaffinity_np(s->thread, sizeof set, &set);
}

int pyvmm_wp_session_stop(void *handle) {
    struct wp_session *s = handle;
    if (!s->running)
        return 0;
    __atomic_store_n(&s->stopping, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&s->lock);
    pthread_cond_broadcast(&s->slot_freed);
    pthread_mutex_unlock(&s->lock);
    if (s->mode == FAULT_SIGNAL) {
        /* unregistered (protection dropped) before the handler may stop knowing the RAM */
        for (unsigned b = 0; b < s->nblocks; b++)
            pyvmm_uffd_unregister(s->uffd, s->blocks[b].base, s->blocks[b].npages * PAGE_SZ);
        pyvmm_wp_sig_unregister(s);
    } else {
        /* ring: this store faults until the thread reads its message and unprotects the bell */
        *(volatile unsigned char *)s->doorbell = 1;
        pthread_join(s->thread, NULL);
    }
    s->running = 0;
    return 0;
}

void pyvmm_wp_session_free(void *handle) {
    struct wp_session *s = handle;
    if (!s)
        return;
    pyvmm_wp_session_stop(s);
    if (s->doorbell != MAP_FAILED)
        munmap(s->doorbell, PAGE_SZ);
    free(s->blocks);
    free(s->state);
    free(s->pool);
    free(s->free_stack);
    free(s->q_block);
    free(s->q_slot);
    free(s->q_page);
    for (unsigned i = 0; i < s->extra_cap; i++)
        free(s->extra[i]);
    free(s->extra);
    free(s->extra_free);
    free(s);
}

/* ---- shadow copies (the queue, the slots) and page states ----------------------------------- */

int pyvmm_wp_session_next_shadow(void *handle, unsigned int *block, pyvmm_u64 *page,
                                 unsigned int *slot) {
    struct wp_session *s = handle;
    int got = 0;
    pthread_mutex_lock(&s->lock);
    if (s->q_len) {
        *block = s->q_block[s->q_head];
        *page = s->q_page[s->q_head];
        *slot = s->q_slot[s->q_head];
        s->q_head = (s->q_head + 1) % s->q_cap;
        s->q_len--;
        got = 1;
    }
    pthread_mutex_unlock(&s->lock);
    return got;
}

void *pyvmm_wp_session_slot_addr(void *handle, unsigned int slot) {
    struct wp_session *s = handle;
    if (slot < s->nslots)
        return s->pool + (size_t)slot * PAGE_SZ;
    slot -= s->nslots;
    return slot < s->extra_cap ? s->extra[slot] : NULL;
}

/* Slot back to the pool (lock held): 0, or -EINVAL if it is not in use. */
static int release_locked(struct wp_session *s, unsigned slot) {
    if (slot >= s->nslots) {
        unsigned i = slot - s->nslots;
        if (i >= s->extra_cap || !s->extra[i])
            return -EINVAL;
        free(s->extra[i]);
        s->extra[i] = NULL;
        s->extra_free[s->nextra_free++] = i;
        return 0;
    }
    if (s->nfree >= s->nslots)
        return -EINVAL;
    s->free_stack[s->nfree++] = slot;
    return 0;
}

int pyvmm_wp_session_release_shadow(void *handle, unsigned int slot) {
    struct wp_session *s = handle;
    pthread_mutex_lock(&s->lock);
    int rc = release_locked(s, slot);
    if (!rc)
        pthread_cond_signal(&s->slot_freed);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* The saver's slots, n at once: one lock hold and one wakeup for a handler waiting on a full
 * pool, which then finds a batch free (one slot at a time made it sleep and wake per page). */
void pyvmm_wp_release_slots(struct wp_session *s, const unsigned *slots, unsigned n) {
    if (!n)
        return;
    pthread_mutex_lock(&s->lock);
    for (unsigned i = 0; i < n; i++)
        release_locked(s, slots[i]);
    pthread_cond_broadcast(&s->slot_freed);
    pthread_mutex_unlock(&s->lock);
}

/* Up to max queued shadow copies, oldest first, in one lock hold. */
unsigned pyvmm_wp_pop_shadows(struct wp_session *s, unsigned *block, u64 *page, unsigned *slot,
                              unsigned max) {
    unsigned n = 0;
    pthread_mutex_lock(&s->lock);
    while (n < max && s->q_len) {
        block[n] = s->q_block[s->q_head];
        page[n] = s->q_page[s->q_head];
        slot[n] = s->q_slot[s->q_head];
        s->q_head = (s->q_head + 1) % s->q_cap;
        s->q_len--;
        n++;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

int pyvmm_wp_session_take_page(void *handle, unsigned int block, pyvmm_u64 page, void *out) {
    struct wp_session *s = handle;
    if (block >= s->nblocks || page >= s->blocks[block].npages)
        return -EINVAL;
    struct wp_block *b = &s->blocks[block];
    unsigned char *st = &s->state[b->first + page];
    unsigned char expect = ST_NONE;
    if (!__atomic_compare_exchange_n(st, &expect, ST_PROCESSING, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        return 0;
    /* still write-protected: a writer is held in its fault until the state below says SENT */
    memcpy(out, (void *)(uintptr_t)(b->base + page * PAGE_SZ), PAGE_SZ);
    __atomic_store_n(st, ST_SENT, __ATOMIC_RELEASE);
    return 1;
}

pyvmm_u64 pyvmm_wp_session_mark_sent(void *handle, unsigned int block, pyvmm_u64 start,
                                     pyvmm_u64 count) {
    struct wp_session *s = handle;
    if (block >= s->nblocks || start + count > s->blocks[block].npages)
        return 0;
    unsigned char *st = &s->state[s->blocks[block].first + start];
    u64 marked = 0;
    for (u64 i = 0; i < count; i++) {
        unsigned char expect = ST_NONE;
        marked += __atomic_compare_exchange_n(&st[i], &expect, ST_SENT, 0, __ATOMIC_ACQ_REL,
                                              __ATOMIC_ACQUIRE);
    }
    return marked;
}

int pyvmm_wp_session_page_state(void *handle, unsigned int block, pyvmm_u64 page) {
    struct wp_session *s = handle;
    if (block >= s->nblocks || page >= s->blocks[block].npages)
        return -EINVAL;
    return __atomic_load_n(&s->state[s->blocks[block].first + page], __ATOMIC_ACQUIRE);
}

void pyvmm_wp_session_counters(void *handle, pyvmm_u64 *out) {
    struct wp_session *s = handle;
    out[0] = __atomic_load_n(&s->faults, __ATOMIC_ACQUIRE);
    pthread_mutex_lock(&s->lock);
    out[1] = s->shadow_copies;
    out[2] = s->pool_waits;
    out[3] = s->q_len;
    pthread_mutex_unlock(&s->lock);
    out[4] = (u64)__atomic_load_n(&s->error, __ATOMIC_ACQUIRE);
}

/* Mark sent every page of `block` whose bit in `keep` is clear (one call for a whole
 * selection: pages a checkpoint does not save need no shadow copy). Returns how many changed. */
pyvmm_u64 pyvmm_wp_session_mark_sent_unselected(void *handle, unsigned int block,
                                               const pyvmm_u64 *keep) {
    struct wp_session *s = handle;
    if (block >= s->nblocks)
        return 0;
    u64 npages = s->blocks[block].npages;
    unsigned char *st = &s->state[s->blocks[block].first];
    u64 marked = 0;
    for (u64 w = 0; w * 64 < npages; w++) {
        u64 bits = __atomic_load_n(&keep[w], __ATOMIC_ACQUIRE);
        if (bits == ~(u64)0)
            continue;
        u64 end = (w + 1) * 64 < npages ? (w + 1) * 64 : npages;
        for (u64 p = w * 64; p < end; p++) {
            if (bits >> (p - w * 64) & 1)
                continue;
            unsigned char expect = ST_NONE;
            marked += __atomic_compare_exchange_n(&st[p], &expect, ST_SENT, 0, __ATOMIC_ACQ_REL,
                                                  __ATOMIC_ACQUIRE);
        }
    }
    return marked;
}

/* ---- re-arming without walking all of RAM --------------------------------------------------- */

/* Protect again every page of `block` whose dirty bit is set, clearing the bits (or-ed into
 * `carried` when it is not NULL).  Pages without a dirty bit are still protected (see wp_lock),
 * so this costs in proportion to the pages written since the last pass, not to RAM.  Works a
 * 64-word (4096-page) chunk per lock hold, so a writer faulting meanwhile waits for one chunk
 * at most; the runs of one chunk go in one WRITEPROTECT per span of consecutive non-empty
 * words (the clean pages inside a span are protected already: protecting them again is cheap).
 * Returns the pages protected again, or -errno. */
long pyvmm_wp_session_reprotect(void *handle, unsigned int block, pyvmm_u64 *carried) {
    struct wp_session *s = handle;
    if (block >= s->nblocks)
        return -EINVAL;
    struct wp_block *b = &s->blocks[block];
    u64 words = (b->npages + 63) / 64, count = 0;
    int rc = 0;
    for (u64 w0 = 0; w0 < words && !rc; w0 += 64) {
        u64 w1 = w0 + 64 < words ? w0 + 64 : words;
        u64 span_start = 0, span_end = 0; /* pages; empty when equal */
        pthread_mutex_lock(&s->wp_lock);
        for (u64 w = w0; w <= w1; w++) {
            u64 bits = 0;
            if (w < w1 && __atomic_load_n(&b->dirty[w], __ATOMIC_RELAXED))
                bits = __atomic_exchange_n(&b->dirty[w], 0, __ATOMIC_ACQ_REL);
            if (bits) {
                if (carried)
                    carried[w] |= bits;
                count += (u64)__builtin_popcountll(bits);
                u64 lo = w * 64 + (u64)__builtin_ctzll(bits);
                u64 hi = w * 64 + 64 - (u64)__builtin_clzll(bits);
                if (span_end == span_start)
                    span_start = lo;
                span_end = hi;
                continue;
            }
            if (span_end != span_start) {
                rc = pyvmm_uffd_writeprotect(s->uffd, b->base + span_start * PAGE_SZ,
                                             (span_end - span_start) * PAGE_SZ, 1);
                span_start = span_end = 0;
                if (rc)
                    break;
            }
        }
        pthread_mutex_unlock(&s->wp_lock);
    }
    return rc ? rc : (long)count;
}

/* Start a new round (guest paused, the previous round finished): pages set in `select` need
 * saving, all others count as saved; pages written since the last reprotect are protected
 * again and the block's dirty bits cleared (the caller read them first). */
int pyvmm_wp_session_rearm(void *handle, unsigned int block, const pyvmm_u64 *select) {
    struct wp_session *s = handle;
    if (block >= s->nblocks)
        return -EINVAL;
    struct wp_block *b = &s->blocks[block];
    unsigned char *st = &s->state[b->first];
    u64 words = (b->npages + 63) / 64;
    for (u64 w = 0; w < words; w++) {
        u64 bits = select[w];
        u64 p0 = w * 64, end = p0 + 64 < b->npages ? p0 + 64 : b->npages;
        if (bits == 0 || (bits == ~(u64)0 && end - p0 == 64)) {
            memset(st + p0, bits ? ST_NONE : ST_SENT, end - p0);
            continue;
        }
        for (u64 p = p0; p < end; p++)
            st[p] = (bits >> (p - p0) & 1) ? ST_NONE : ST_SENT;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    long rc = pyvmm_wp_session_reprotect(s, block, NULL);
    return rc < 0 ? (int)rc : 0;
}

/* Give up the current round (a failed save): every page not saved yet counts as saved, and the
 * queued shadow copies are dropped, once no handler is between claim and queue.  Afterwards the
 * handler only tracks, and never waits for a saver that is gone. */
void pyvmm_wp_session_abandon_round(void *handle) {
    struct wp_session *s = handle;
    for (u64 i = 0; i < s->total_pages; i++) {
        unsigned char expect = ST_NONE;
        __atomic_compare_exchange_n(&s->state[i], &expect, ST_SENT, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST);
    }
    for (;;) {
        u64 busy = __atomic_load_n(&s->inflight, __ATOMIC_SEQ_CST);
        unsigned block, slot;
        u64 page;
        while (pyvmm_wp_session_next_shadow(s, &block, &page, &slot))
            pyvmm_wp_session_release_shadow(s, slot);
        if (!busy)
            break;
        sched_yield();
    }
}
