/* userfaultfd for pyvmm: thin syscall wrappers, the PAGEMAP_SCAN dirty scan, and the C fault
 * handler thread of a synchronous write-protect session (the C half of
 * pyvmm.migration.postcopy_uffd).
 *
 * Every function returns 0 (or a count) on success and -errno on failure; policy (fallbacks,
 * which features to ask for, error messages) lives in Python. The fault-handler thread never
 * touches a Python object: a thread holding the GIL may be the one blocked in the fault it is
 * resolving (DESIGN.md section 5).
 *
 * The system headers of the build machine may predate WP_ASYNC and PAGEMAP_SCAN, so the uapi
 * values this file needs beyond <linux/userfaultfd.h> are spelled out below (from the kernel's
 * include/uapi/linux/userfaultfd.h and fs.h, stable ABI).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

typedef pyvmm_u64 u64;

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

/* PAGEMAP_SCAN (Linux 6.7+) */
struct pyvmm_page_region {
    u64 start, end, categories;
};
struct pyvmm_pm_scan_arg {
    u64 size, flags, start, end, walk_end, vec, vec_len, max_pages;
    u64 category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PYVMM_PAGEMAP_SCAN _IOWR('f', 16, struct pyvmm_pm_scan_arg)
#define PYVMM_PM_SCAN_WP_MATCHING (1ull << 0)
#define PYVMM_PM_SCAN_CHECK_WPASYNC (1ull << 1)
#define PYVMM_PAGE_IS_WRITTEN (1ull << 1)

#define PAGE_SZ 4096u
#define HUGE_PAGES 512u /* 4 KiB pages per 2 MiB transparent huge page */

/* ---- thin wrappers ---------------------------------------------------------------------- */

int pyvmm_uffd_open(int via_dev, int user_mode_only) {
    int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
    if (via_dev) {
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0)
            return -errno;
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        int err = errno;
        close(dev);
        return fd < 0 ? -err : fd;
    }
    long fd = syscall(SYS_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

int pyvmm_uffd_api(int fd, u64 features, u64 *features_out, u64 *ioctls_out) {
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *features_out = api.features;
    *ioctls_out = api.ioctls;
    return 0;
}

int pyvmm_uffd_register(int fd, u64 start, u64 len, u64 mode, u64 *ioctls_out) {
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *ioctls_out = reg.ioctls;
    return 0;
}

int pyvmm_uffd_unregister(int fd, u64 start, u64 len) {
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int pyvmm_uffd_writeprotect(int fd, u64 start, u64 len, u64 mode) {
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = len}, .mode = mode};
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

long pyvmm_uffd_copy(int fd, u64 dst, u64 src, u64 len, u64 mode) {
    struct uffdio_copy copy = {.dst = dst, .src = src, .len = len, .mode = mode};
    if (ioctl(fd, UFFDIO_COPY, &copy) < 0)
        return copy.copy < 0 ? (long)copy.copy : -errno;
    return (long)copy.copy;
}

long pyvmm_uffd_zeropage(int fd, u64 start, u64 len, u64 mode) {
    struct uffdio_zeropage zp = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_ZEROPAGE, &zp) < 0)
        return zp.zeropage < 0 ? (long)zp.zeropage : -errno;
    return (long)zp.zeropage;
}

int pyvmm_uffd_wake(int fd, u64 start, u64 len) {
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

/* ---- async dirty scan ------------------------------------------------------------------- */

long pyvmm_pagemap_scan_written(int pagemap_fd, u64 base, u64 npages, u64 *bitmap,
                                u64 vec_len, u64 *ioctls_out) {
    struct pyvmm_page_region *vec = malloc(vec_len * sizeof *vec);
    if (!vec)
        return -ENOMEM;
    u64 end = base + npages * PAGE_SZ, pos = base, found = 0, calls = 0;
    while (pos < end) {
        struct pyvmm_pm_scan_arg arg = {
            .size = sizeof arg,
            .flags = PYVMM_PM_SCAN_WP_MATCHING | PYVMM_PM_SCAN_CHECK_WPASYNC,
            .start = pos,
            .end = end,
            .vec = (u64)(uintptr_t)vec,
            .vec_len = vec_len,
            .category_mask = PYVMM_PAGE_IS_WRITTEN,
            .return_mask = PYVMM_PAGE_IS_WRITTEN,
        };
        long n = ioctl(pagemap_fd, PYVMM_PAGEMAP_SCAN, &arg);
        calls++;
        if (n < 0) {
            int err = errno;
            free(vec);
            return -err;
        }
        for (long i = 0; i < n; i++) {
            u64 first = (vec[i].start - base) / PAGE_SZ;
            u64 count = (vec[i].end - vec[i].start) / PAGE_SZ;
            pyvmm_bitmap_set_range(bitmap, first, count);
            found += count;
        }
        /* 6.18: a short vector means the walk is complete, and walk_end may then be wrong;
         * only a full vector may have stopped early, and it resumes after its last region. */
        if ((u64)n < vec_len)
            break;
        pos = vec[n - 1].end;
    }
    free(vec);
    if (ioctls_out)
        *ioctls_out = calls;
    return (long)found;
}

/* ---- synchronous write-protect session -------------------------------------------------- */

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

static struct wp_block *find_block(struct wp_session *s, u64 addr) {
    for (unsigned i = 0; i < s->nblocks; i++) {
        struct wp_block *b = &s->blocks[i];
        if (addr >= b->base && addr < b->base + b->npages * PAGE_SZ)
            return b;
    }
    return NULL;
}

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

enum { FAULT_THREAD = 0, FAULT_SIGNAL = 1 };

/* Resolve a write fault at addr, inside block b: secure and mark dirty the run the fault opens,
 * then unprotect it.  In thread mode the unprotect wakes the writer; in signal mode the writer
 * is this very thread, which retries its write when the SIGBUS handler returns.  Several threads
 * may be here at once in signal mode: the fault-around fields are then only hints (a race can
 * only change a run's length, within max_unprotect and the block). */
static void resolve_fault(struct wp_session *s, struct wp_block *b, u64 addr) {
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
    resolve_fault(s, b, addr);
}

/* Thread mode: one blocking read() per wakeup (poll() first would be a second syscall per
 * fault: measured ~10 % of the round trip); the doorbell's fault ends the loop. */
static void *handler_main(void *arg) {
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

/* ---- signal mode: the faulting thread resolves its own fault ------------------------------ */

/* Sessions in signal mode, looked up by the SIGBUS handler without a lock; and the ranges of
 * sessions stopped lately (unregistered first, so a write there goes through when retried): a
 * thread that took its SIGBUS just before the stop returns and retries instead of passing a
 * fault of pyvmm's to the previous handler. */
#define SIG_SESSIONS 64
#define SIG_GRAVES 256
static struct wp_session *sig_sessions[SIG_SESSIONS];
static u64 sig_grave_base[SIG_GRAVES], sig_grave_end[SIG_GRAVES];
static unsigned sig_grave_next;
static int sig_busy; /* SIGBUS handlers running */
static struct sigaction sig_prev;
static pthread_mutex_t sig_lock = PTHREAD_MUTEX_INITIALIZER;

__thread struct pyvmm_map_guard *pyvmm_map_guard
    __attribute__((tls_model("initial-exec")));

static void sigbus_handler(int sig, siginfo_t *si, void *ctx) {
    int saved_errno = errno;
    u64 addr = (u64)(uintptr_t)si->si_addr;
    int handled = 0;
    struct pyvmm_map_guard *guard = pyvmm_map_guard;
    if (guard && addr >= guard->base && addr < guard->end) {
        pyvmm_map_guard = NULL; /* this thread read a mapped file past its (new) end */
        siglongjmp(guard->env, 1);
    }
    __atomic_add_fetch(&sig_busy, 1, __ATOMIC_SEQ_CST);
    if (si->si_code == BUS_ADRERR) {
        for (unsigned i = 0; i < SIG_SESSIONS && !handled; i++) {
            struct wp_session *s = __atomic_load_n(&sig_sessions[i], __ATOMIC_ACQUIRE);
            struct wp_block *b = s ? find_block(s, addr) : NULL;
            if (b) {
                /* not armed yet: a fault of an earlier session on this RAM (its RAM is not
                 * this session's uffd's yet), or of this one between protect and arm; either
                 * way the write is simply retried until it goes through or can be resolved */
                if (__atomic_load_n(&s->armed, __ATOMIC_ACQUIRE))
                    resolve_fault(s, b, addr);
                handled = 1;
            }
        }
        for (unsigned i = 0; i < SIG_GRAVES && !handled; i++)
            handled = addr >= __atomic_load_n(&sig_grave_base[i], __ATOMIC_ACQUIRE) &&
                      addr < __atomic_load_n(&sig_grave_end[i], __ATOMIC_ACQUIRE);
    }
    __atomic_sub_fetch(&sig_busy, 1, __ATOMIC_SEQ_CST);
    errno = saved_errno;
    if (handled)
        return;
    /* not pyvmm's: the disposition from before pyvmm's handler takes it */
    struct sigaction prev = sig_prev;
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction)
            prev.sa_sigaction(sig, si, ctx);
        return;
    }
    if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
        return;
    }
    signal(SIGBUS, SIG_DFL); /* a fault retried now dies of it, as it would have */
    if (si->si_code <= 0)
        raise(SIGBUS);
}

/* pyvmm's SIGBUS handler in place (sig_lock held); 0 or -errno. */
static int sig_install_locked(void) {
    struct sigaction cur;
    sigaction(SIGBUS, NULL, &cur);
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == sigbus_handler)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = sigbus_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, &sig_prev) ? -errno : 0;
}

int pyvmm_sigbus_install(void) {
    pthread_mutex_lock(&sig_lock);
    int rc = sig_install_locked();
    pthread_mutex_unlock(&sig_lock);
    return rc;
}

/* ---- mapped reads of checkpoint files (crcindex.c, ramwalk.c) ---- */

static u64 map_min = 1u << 20; /* shorter stretches are read, not mapped */
static u64 map_cut_short;      /* mapped reads that took SIGBUS */

pyvmm_u64 pyvmm_map_min(pyvmm_u64 bytes) {
    return __atomic_exchange_n(&map_min, bytes, __ATOMIC_RELAXED);
}

pyvmm_u64 pyvmm_map_cut_short(void) { return __atomic_load_n(&map_cut_short, __ATOMIC_RELAXED); }

void pyvmm_map_count_cut_short(void) { __atomic_add_fetch(&map_cut_short, 1, __ATOMIC_RELAXED); }

void *pyvmm_map_file(int fd, pyvmm_u64 offset, pyvmm_u64 len) {
    if (len == 0 || len < __atomic_load_n(&map_min, __ATOMIC_RELAXED) || len > SIZE_MAX ||
        pyvmm_sigbus_install() != 0)
        return MAP_FAILED;
    return mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, fd, (off_t)offset);
}

static int sig_register(struct wp_session *s) {
    pthread_mutex_lock(&sig_lock);
    int rc = sig_install_locked();
    if (rc)
        goto out;
    rc = -EMFILE;
    for (unsigned i = 0; i < SIG_SESSIONS; i++) {
        if (!sig_sessions[i]) {
            __atomic_store_n(&sig_sessions[i], s, __ATOMIC_RELEASE);
            rc = 0;
            break;
        }
    }
out:
    pthread_mutex_unlock(&sig_lock);
    return rc;
}

/* The session's RAM is unregistered already: no new SIGBUS can name it. */
static void sig_unregister(struct wp_session *s) {
    pthread_mutex_lock(&sig_lock);
    for (unsigned b = 0; b < s->nblocks; b++) {
        unsigned g = sig_grave_next++ % SIG_GRAVES;
        __atomic_store_n(&sig_grave_end[g], 0, __ATOMIC_RELEASE);
        __atomic_store_n(&sig_grave_base[g], s->blocks[b].base, __ATOMIC_RELEASE);
        __atomic_store_n(&sig_grave_end[g], s->blocks[b].base + s->blocks[b].npages * PAGE_SZ,
                         __ATOMIC_RELEASE);
    }
    for (unsigned i = 0; i < SIG_SESSIONS; i++)
        if (sig_sessions[i] == s)
            __atomic_store_n(&sig_sessions[i], NULL, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&sig_lock);
    while (__atomic_load_n(&sig_busy, __ATOMIC_SEQ_CST)) /* a handler may still use s */
        sched_yield();
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
        int rc = sig_register(s);
        if (!rc)
            s->running = 1;
        return rc;
    }
    if (s->doorbell == MAP_FAILED) {
        int rc = ring_setup(s);
        if (rc)
            return rc;
    }
    int rc = pthread_create(&s->thread, NULL, handler_main, s);
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
        sig_unregister(s);
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
static void release_slots(struct wp_session *s, const unsigned *slots, unsigned n) {
    if (!n)
        return;
    pthread_mutex_lock(&s->lock);
    for (unsigned i = 0; i < n; i++)
        release_locked(s, slots[i]);
    pthread_cond_broadcast(&s->slot_freed);
    pthread_mutex_unlock(&s->lock);
}

/* Up to max queued shadow copies, oldest first, in one lock hold. */
static unsigned pop_shadows(struct wp_session *s, unsigned *block, u64 *page, unsigned *slot,
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

/* ---- re-arming without walking all of RAM ------------------------------------------------ */

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

/* ---- the saver, in C ---------------------------------------------------------------------- */

#define SAVE_BATCH 64u  /* records per pwritev */
#define SAVE_POLL 16u   /* pages claimed from RAM between two looks at the shadow queue */
#define REC_PAGE 0x08u
#define REC_ZERO 0x02u
#define REC_CONTINUE 0x20u

struct saver {
    struct wp_session *s;
    const struct pyvmm_live_block *blocks;
    int fd;
    u64 offset;  /* file offset of the next batch */
    u64 pending; /* bytes in the batch */
    int last_block;
    struct iovec iov[2 * SAVE_BATCH];
    unsigned niov, nrec, ncopy, nslots;
    unsigned char hdr[SAVE_BATCH][8 + 1 + 255 + 1];
    unsigned char *copy; /* SAVE_BATCH pages copied out of RAM */
    unsigned slots[SAVE_BATCH];
    struct pyvmm_page_encoder *enc;   /* NULL: pages are written plain */
    unsigned char (*packed)[2 + PYVMM_COMPRESSED_MAX]; /* with enc: be16 n + frame, a record each */
    struct pyvmm_live_run *runs;
    u64 max_runs;
    struct pyvmm_live_save_stats *st;
    int open_saved;
    unsigned open_block;
    u64 open_start, open_end; /* pages claimed from RAM, to unprotect (empty when equal) */
};

/* Unprotect the run of pages the saver claimed (open_saved): later writes to them need no
 * fault.  Their dirty bits are set first, under wp_lock, as for a handler's unprotect. */
static int saver_open(struct saver *sv) {
    if (sv->open_end == sv->open_start)
        return 0;
    struct wp_session *s = sv->s;
    struct wp_block *b = &s->blocks[sv->open_block];
    pthread_mutex_lock(&s->wp_lock);
    pyvmm_bitmap_set_range(b->dirty, sv->open_start, sv->open_end - sv->open_start);
    int rc = pyvmm_uffd_writeprotect(s->uffd, b->base + sv->open_start * PAGE_SZ,
                                     (sv->open_end - sv->open_start) * PAGE_SZ, 0);
    pthread_mutex_unlock(&s->wp_lock);
    sv->open_start = sv->open_end = 0;
    return rc == -EAGAIN ? 0 : rc;
}

static int is_zero_page(const void *data) {
    const u64 *w = data;
    for (unsigned i = 0; i < PAGE_SZ / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

static int saver_flush(struct saver *sv) {
    struct iovec *iov = sv->iov;
    unsigned n = sv->niov;
    u64 off = sv->offset;
    while (n) {
        ssize_t got = pwritev(sv->fd, iov, (int)n, (off_t)off);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0)
            return -EIO;
        off += (u64)got;
        sv->st->bytes_written += (u64)got;
        while (n && (u64)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n) {
            iov->iov_base = (char *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    sv->offset = off;
    sv->pending = 0;
    release_slots(sv->s, sv->slots, sv->nslots);
    sv->niov = sv->nrec = sv->ncopy = sv->nslots = 0;
    return 0;
}

static int saver_add_run(struct saver *sv, unsigned block, u64 page, u64 data_offset, int kind,
                         int cont) {
    struct pyvmm_live_save_stats *st = sv->st;
    if (st->nruns) {
        /* the last run holds the record written just before this one, so a compressed record
         * of the next page follows it in the file; a data run's stride is checked all the same */
        struct pyvmm_live_run *r = &sv->runs[st->nruns - 1];
        if (cont && r->block == block && r->first_page + r->npages == page && r->kind == kind &&
            (kind != PYVMM_RUN_DATA || r->data_offset + r->npages * (8 + PAGE_SZ) == data_offset)) {
            r->npages++;
            return 0;
        }
    }
    if (st->nruns >= sv->max_runs)
        return -EOVERFLOW;
    sv->runs[st->nruns++] = (struct pyvmm_live_run){block, kind, page, 1, data_offset};
    return 0;
}

/* Append the record of `page` of `block` (4 KiB at `data`, in the copy buffer or a shadow slot
 * that is released once written: slot >= 0). */
static int saver_record(struct saver *sv, unsigned block, u64 page, const void *data, int slot) {
    int zero = is_zero_page(data);
    unsigned char *packed = sv->enc ? sv->packed[sv->nrec] : NULL;
    size_t n = packed && !zero ? pyvmm_encoder_compress(sv->enc, data, packed + 2) : 0;
    int kind = zero ? PYVMM_RUN_ZERO : n ? PYVMM_RUN_COMPRESSED : PYVMM_RUN_DATA;
    unsigned char *h = sv->hdr[sv->nrec];
    int cont = (int)block == sv->last_block;
    u64 flags = zero ? REC_ZERO : n ? PYVMM_REC_COMPRESSED : REC_PAGE;
    u64 header = page * PAGE_SZ | flags | (cont ? REC_CONTINUE : 0);
    for (int i = 0; i < 8; i++)
        h[i] = (unsigned char)(header >> (56 - 8 * i));
    size_t hlen = 8;
    if (!cont) {
        const struct pyvmm_live_block *lb = &sv->blocks[block];
        h[8] = (unsigned char)lb->idstr_len;
        memcpy(h + 9, lb->idstr, lb->idstr_len);
        hlen = 9 + lb->idstr_len;
        sv->last_block = (int)block;
    }
    if (zero)
        h[hlen++] = 0;
    sv->iov[sv->niov++] = (struct iovec){h, hlen};
    u64 data_offset = zero ? 0 : sv->offset + sv->pending + hlen;
    sv->pending += hlen;
    if (n) {
        packed[0] = (unsigned char)(n >> 8);
        packed[1] = (unsigned char)n;
        sv->iov[sv->niov++] = (struct iovec){packed, 2 + n};
        sv->pending += 2 + n;
        sv->st->data_pages++;
        sv->st->compressed_pages++;
        sv->st->compressed_bytes += n;
    } else if (!zero) {
        sv->iov[sv->niov++] = (struct iovec){(void *)data, PAGE_SZ};
        sv->pending += PAGE_SZ;
        sv->st->data_pages++;
    } else {
        sv->st->zero_pages++;
    }
    if (slot >= 0) {
        sv->slots[sv->nslots++] = (unsigned)slot;
        sv->st->from_shadow++;
    }
    sv->nrec++;
    int rc = saver_add_run(sv, block, page, data_offset, kind, cont);
    if (rc)
        return rc;
    return sv->nrec == SAVE_BATCH ? saver_flush(sv) : 0;
}

/* Write every queued shadow copy; their slots go back to the pool right away. */
static int saver_drain(struct saver *sv) {
    struct wp_session *s = sv->s;
    if (!__atomic_load_n(&s->q_len, __ATOMIC_ACQUIRE))
        return 0;
    unsigned blocks[SAVE_BATCH], slots[SAVE_BATCH];
    u64 pages[SAVE_BATCH];
    int got = 0;
    unsigned n;
    while ((n = pop_shadows(s, blocks, pages, slots, SAVE_BATCH))) {
        got = 1;
        for (unsigned i = 0; i < n; i++) {
            int rc = saver_record(sv, blocks[i], pages[i],
                                  pyvmm_wp_session_slot_addr(s, slots[i]), (int)slots[i]);
            if (rc) { /* this one is in the batch already (released with it); the rest not */
                release_slots(s, slots + i + 1, n - i - 1);
                return rc;
            }
        }
    }
    /* a waiting writer gets its slot back now, not after the next full batch */
    return got && sv->nslots ? saver_flush(sv) : 0;
}

static int save_body(struct wp_session *s, int fd, u64 offset,
                     const struct pyvmm_live_block *blocks, struct pyvmm_live_run *runs,
                     u64 max_runs, int open_saved, int level,
                     struct pyvmm_live_save_stats *stats) {
    memset(stats, 0, sizeof *stats);
    if (level != 0 && !pyvmm_level_valid(level))
        return -EINVAL;
    struct saver *sv = calloc(1, sizeof *sv);
    if (!sv)
        return -ENOMEM;
    unsigned char *copy = NULL;
    struct pyvmm_page_encoder *enc = level ? pyvmm_encoder_new(level) : NULL;
    void *packed = level ? malloc(SAVE_BATCH * sizeof *sv->packed) : NULL;
    if (posix_memalign((void **)&copy, PAGE_SZ, (size_t)SAVE_BATCH * PAGE_SZ) ||
        (level && (!enc || !packed))) {
        free(copy);
        free(packed);
        pyvmm_encoder_free(enc);
        free(sv);
        return -ENOMEM;
    }
    *sv = (struct saver){.s = s, .blocks = blocks, .fd = fd, .offset = offset, .last_block = -1,
                         .copy = copy, .enc = enc, .packed = packed, .runs = runs,
                         .max_runs = max_runs, .st = stats, .open_saved = open_saved};
    pthread_mutex_lock(&s->lock);
    s->saver_active = 1;
    pthread_mutex_unlock(&s->lock);
    int rc = 0;
    for (unsigned bi = 0; bi < s->nblocks && !rc; bi++) {
        const u64 *select = blocks[bi].select;
        struct wp_block *b = &s->blocks[bi];
        if (!select)
            continue;
        unsigned since_poll = 0;
        for (u64 p = 0; p < b->npages && !rc;) {
            u64 word = select[p / 64] >> (p % 64);
            if (!word) {
                p = (p / 64 + 1) * 64;
                continue;
            }
            if (!(word & 1)) {
                p += (u64)__builtin_ctzll(word);
                continue;
            }
            if (++since_poll == SAVE_POLL) {
                since_poll = 0;
                if ((rc = saver_drain(sv)))
                    break;
            }
            unsigned char *st = &s->state[b->first + p];
            unsigned char expect = ST_NONE;
            if (__atomic_compare_exchange_n(st, &expect, ST_PROCESSING, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST)) {
                unsigned char *dst = sv->copy + (size_t)sv->ncopy++ * PAGE_SZ;
                memcpy(dst, (void *)(uintptr_t)(b->base + p * PAGE_SZ), PAGE_SZ);
                __atomic_store_n(st, ST_SENT, __ATOMIC_RELEASE);
                if (sv->open_saved) {
                    /* runs end at 2 MiB boundaries: a whole transparent huge page unprotected
                     * at once stays huge (and one ioctl, one TLB flush per 512 pages) */
                    if (sv->open_end != p || sv->open_block != bi || p % HUGE_PAGES == 0) {
                        if ((rc = saver_open(sv)))
                            break;
                        sv->open_block = bi;
                        sv->open_start = p;
                    }
                    sv->open_end = p + 1;
                }
                rc = saver_record(sv, bi, p, dst, -1);
            }
            p++;
        }
        if (!rc)
            rc = saver_open(sv);
    }
    /* pages a handler claimed before the pass reached them are still on their way */
    while (!rc) {
        u64 busy = __atomic_load_n(&s->inflight, __ATOMIC_SEQ_CST);
        if ((rc = saver_drain(sv)))
            break;
        if (!busy && !__atomic_load_n(&s->q_len, __ATOMIC_SEQ_CST))
            break;
        if (busy)
            sched_yield();
    }
    if (!rc)
        rc = saver_flush(sv);
    if (rc) /* copies taken but not written: their slots go back (the round is abandoned) */
        release_slots(s, sv->slots, sv->nslots);
    pthread_mutex_lock(&s->lock);
    s->saver_active = 0;
    pthread_cond_broadcast(&s->slot_freed); /* waiters go on with overflow slots */
    pthread_mutex_unlock(&s->lock);
    free(sv->copy);
    free(sv->packed);
    pyvmm_encoder_free(sv->enc);
    free(sv);
    return rc;
}

struct save_call {
    struct wp_session *s;
    int fd, open_saved, level, nice, rc;
    u64 offset, max_runs;
    const struct pyvmm_live_block *blocks;
    struct pyvmm_live_run *runs;
    struct pyvmm_live_save_stats *stats;
};

static void *save_thread(void *arg) {
    struct save_call *c = arg;
    pthread_setname_np(pthread_self(), "pyvmm-saver");
    setpriority(PRIO_PROCESS, 0, c->nice); /* Linux: this thread's nice value only */
    c->rc = save_body(c->s, c->fd, c->offset, c->blocks, c->runs, c->max_runs, c->open_saved,
                      c->level, c->stats);
    return NULL;
}

int pyvmm_wp_session_save(void *handle, int fd, pyvmm_u64 offset,
                          const struct pyvmm_live_block *blocks, struct pyvmm_live_run *runs,
                          pyvmm_u64 max_runs, int open_saved, int level,
                          struct pyvmm_live_save_stats *stats) {
    struct wp_session *s = handle;
    int nice = __atomic_load_n(&s->saver_nice, __ATOMIC_RELAXED);
    if (nice <= 0)
        return save_body(s, fd, offset, blocks, runs, max_runs, open_saved, level, stats);
    /* a thread of its own, so that the caller's priority need not be raised back afterwards
     * (which takes a privilege) */
    struct save_call call = {s,      fd,       open_saved, level, nice, 0,
                             offset, max_runs, blocks,     runs,  stats};
    pthread_t thread;
    int rc = pthread_create(&thread, NULL, save_thread, &call);
    if (rc)
        return save_body(s, fd, offset, blocks, runs, max_runs, open_saved, level, stats);
    pthread_join(thread, NULL);
    return call.rc;
}

int pyvmm_wp_session_set_saver_nice(void *handle, int nice) {
    struct wp_session *s = handle;
    if (nice < 0 || nice > 19)
        return -EINVAL;
    __atomic_store_n(&s->saver_nice, nice, __ATOMIC_RELAXED);
    return 0;
}

int pyvmm_wp_session_set_fault_around(void *handle, pyvmm_u64 max_pages) {
    struct wp_session *s = handle;
    if (s->running)
        return -EBUSY;
    s->max_unprotect = max_pages;
    return 0;
}
