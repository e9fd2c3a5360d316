/* Lazy reload (the C half of pyvmm.migration.lazy): guest RAM registered with userfaultfd in
 * MISSING mode is filled from the checkpoint file on demand by a fault-handler thread, while a
 * fill thread copies in everything else in page order.
 *
 * Every RAM block comes with a page source table: one int64 per guest page, the file offset of
 * the page's 4096 data bytes, or -1 for a page that reads as zero. Pages whose offsets follow
 * each other at the record stride (8-byte record header + 4096 bytes) are one run in the file
 * and are read by one preadv (headers into a scratch area, checked) and installed by one
 * UFFDIO_COPY. Neither thread ever touches a Python object: a thread holding the GIL may be the
 * one blocked in the fault being served (DESIGN.md section 5).
 *
 * The two threads race on purpose: a page is installed by whichever gets there first, the other
 * sees EEXIST (whole copy refused) or EAGAIN (copy stopped short at an installed page) and moves
 * on. The present bitmap (set after a page is installed) only saves work; the kernel decides.
 * With a checksummed file, every page read is compared with its CRC-32C before it is installed.
 * Failures (read errors, a file cut short, a wrong record header or page CRC, an ioctl error) are
 * recorded
 * once; a fault that cannot be served from the file is then served with a zero page so no
 * thread hangs, and the caller is told to stop the guest (pyvmm_lazy_wait returns 2).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

typedef pyvmm_u64 u64;

#define PAGE_SZ 4096u
#define RECORD_HDR 8u
#define STRIDE ((long long)(PAGE_SZ + RECORD_HDR))
#define REC_PAGE 0x08ull
#define REC_CONTINUE 0x20ull
#define MAX_RUN 1024u /* bound on fault_run / fill_run: 4 MiB bounce buffers, 2047 iovecs */

struct lazy_block {
    u64 base;
    u64 npages;
    const long long *table;
    u64 *present; /* one bit per page, set once the page is installed */
    const unsigned int *crcs; /* CRC-32C each page's data must have; NULL: not checked */
};

struct lazy {
    int uffd;
    int fd;
    int stopfd;
    unsigned nblocks, max_blocks;
    struct lazy_block *blocks;
    u64 fault_run, fill_run;
    int fill_nice;
    pthread_t handler, filler;
    int handler_running, filler_running;
    int stopping;
    /* fault-handler and fill-thread buffers (one of each: each thread owns its own) */
    unsigned char *fault_buf, *fill_buf;
    u64 *fault_hdrs, *fill_hdrs;
    unsigned int *fault_crcs, *fill_crcs;
    struct iovec *fault_iov, *fill_iov;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    struct pyvmm_lazy_stats st; /* counters: atomic adds; error fields: under lock, set once */
};

/* ---- small helpers -------------------------------------------------------------------- */

static inline int present(const struct lazy_block *b, u64 page) {
    return (__atomic_load_n(&b->present[page / 64], __ATOMIC_ACQUIRE) >> (page % 64)) & 1;
}

static void mark_present(struct lazy_block *b, u64 first, u64 count) {
    for (u64 p = first; p < first + count; p++)
        __atomic_fetch_or(&b->present[p / 64], 1ull << (p % 64), __ATOMIC_RELEASE);
}

static void count(u64 *counter, u64 n) { __atomic_add_fetch(counter, n, __ATOMIC_RELAXED); }

/* A counter raised by `counted` ahead of an install that returned rc: back to what it installed. */
static void settle(u64 *counter, u64 counted, long rc) {
    u64 installed = rc > 0 ? (u64)rc : 0;
    if (installed < counted)
        __atomic_sub_fetch(counter, counted - installed, __ATOMIC_RELAXED);
}

static void record_error(struct lazy *l, int kind, int err, unsigned block, u64 page, u64 offset,
                         u64 found) {
    pthread_mutex_lock(&l->lock);
    if (!l->st.error_kind) {
        l->st.error = err;
        l->st.error_block = block;
        l->st.error_page = page;
        l->st.error_offset = offset;
        l->st.error_found = found;
        __atomic_store_n(&l->st.error_kind, kind, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&l->changed);
    }
    pthread_mutex_unlock(&l->lock);
}

static int failed(struct lazy *l) {
    return __atomic_load_n(&l->st.error_kind, __ATOMIC_ACQUIRE) != 0;
}

static int stopping(struct lazy *l) { return __atomic_load_n(&l->stopping, __ATOMIC_ACQUIRE); }

/* The longest run from `page` on (at most `max` pages, inside the block) of pages not yet
 * present whose table entries are all -1 (zero) or, for a data page, follow at the stride. */
static u64 run_length(const struct lazy_block *b, u64 page, u64 max) {
    long long first = b->table[page];
    u64 n = 1;
    while (n < max && page + n < b->npages && !present(b, page + n)) {
        long long want = first < 0 ? -1 : first + (long long)n * STRIDE;
        long long have = b->table[page + n];
        if (first < 0 ? have >= 0 : have != want)
            break;
        n++;
    }
    return n;
}

/* Read the data of the n pages starting at `page` (a stride run) into buf; headers between
 * pages go to hdrs and are checked, and with the block's CRCs each page's data (crcs: room for
 * n). 0, or -1 with the error recorded: then nothing of buf may be installed. */
static int read_run(struct lazy *l, unsigned bi, u64 page, u64 n, unsigned char *buf, u64 *hdrs,
                    struct iovec *iov, unsigned int *crcs) {
    const struct lazy_block *b = &l->blocks[bi];
    u64 offset = (u64)b->table[page];
    int cnt = 0;
    for (u64 k = 0; k < n; k++) {
        if (k) {
            iov[cnt].iov_base = &hdrs[k];
            iov[cnt++].iov_len = RECORD_HDR;
        }
        iov[cnt].iov_base = buf + k * PAGE_SZ;
        iov[cnt++].iov_len = PAGE_SZ;
    }
    struct iovec *at = iov;
    u64 pos = offset;
    while (cnt > 0) {
        ssize_t got = preadv(l->fd, at, cnt < IOV_MAX ? cnt : IOV_MAX, (off_t)pos);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            record_error(l, PYVMM_LAZY_READ_FAILED, errno, bi, page, pos, 0);
            return -1;
        }
        if (got == 0) {
            record_error(l, PYVMM_LAZY_TRUNCATED, 0, bi, page + (pos - offset) / STRIDE, pos, 0);
            return -1;
        }
        pos += (u64)got;
        size_t left = (size_t)got;
        while (cnt > 0 && left >= at->iov_len) {
            left -= at->iov_len;
            at++;
            cnt--;
        }
        if (cnt > 0 && left) {
            at->iov_base = (unsigned char *)at->iov_base + left;
            at->iov_len -= left;
        }
    }
    for (u64 k = 1; k < n; k++) {
        u64 want = ((page + k) * PAGE_SZ) | REC_PAGE | REC_CONTINUE;
        u64 found = __builtin_bswap64(hdrs[k]);
        if (found != want) {
            record_error(l, PYVMM_LAZY_BAD_HEADER, 0, bi, page + k, offset + k * STRIDE - RECORD_HDR,
                         found);
            return -1;
        }
    }
    if (b->crcs) {
        pyvmm_crc32c_pages(buf, PAGE_SZ, n, NULL, crcs);
        for (u64 k = 0; k < n; k++) {
            if (crcs[k] != b->crcs[page + k]) {
                record_error(l, PYVMM_LAZY_BAD_CRC, 0, bi, page + k, offset + k * STRIDE,
                             crcs[k]);
                return -1;
            }
        }
    }
    return 0;
}

/* UFFDIO_COPY (src != NULL) or UFFDIO_ZEROPAGE of pages [page, page+n) of block bi; pages
 * installed by someone else are skipped. Returns the pages installed here, or -errno. */
static long install(struct lazy *l, unsigned bi, u64 page, u64 n, const unsigned char *src,
                    int *skipped) {
    struct lazy_block *b = &l->blocks[bi];
    u64 done = 0, installed = 0;
    int retries = 0;
    while (done < n) {
        u64 dst = b->base + (page + done) * PAGE_SZ, len = (n - done) * PAGE_SZ;
        long long got;
        int rc;
        if (src) {
            struct uffdio_copy c = {.dst = dst, .src = (u64)(uintptr_t)(src + done * PAGE_SZ),
                                    .len = len, .mode = 0};
            rc = ioctl(l->uffd, UFFDIO_COPY, &c);
            got = c.copy;
        } else {
            struct uffdio_zeropage z = {.range = {.start = dst, .len = len}, .mode = 0};
            rc = ioctl(l->uffd, UFFDIO_ZEROPAGE, &z);
            got = z.zeropage;
        }
        if (rc == 0) {
            mark_present(b, page + done, n - done);
            installed += n - done;
            break;
        }
        int err = errno;
        if (got > 0) { /* stopped short (EAGAIN): the next page is there already, or retry */
            u64 pages = (u64)got / PAGE_SZ;
            mark_present(b, page + done, pages);
            installed += pages;
            done += pages;
            continue;
        }
        if (err == EEXIST) { /* this page is installed: step over it */
            mark_present(b, page + done, 1);
            *skipped += 1;
            done++;
            continue;
        }
        if (err == EAGAIN && retries++ < 1000) /* the address space is changing: try again */
            continue;
        return -err;
    }
    return (long)installed;
}

static void wake_page(struct lazy *l, unsigned bi, u64 page) {
    struct uffdio_range r = {.start = l->blocks[bi].base + page * PAGE_SZ, .len = PAGE_SZ};
    ioctl(l->uffd, UFFDIO_WAKE, &r);
}

/* ---- the fault handler ---------------------------------------------------------------- */

static void serve_fault(struct lazy *l, u64 addr) {
    unsigned bi;
    struct lazy_block *b = NULL;
    for (bi = 0; bi < l->nblocks; bi++) {
        b = &l->blocks[bi];
        if (addr >= b->base && addr < b->base + b->npages * PAGE_SZ)
            break;
    }
    if (bi == l->nblocks)
        return; /* not ours (cannot happen: only our blocks are registered) */
    u64 page = (addr - b->base) / PAGE_SZ;
    count(&l->st.faults, 1);
    int skipped = 0;
    long rc;
    if (present(b, page)) { /* installed since the fault was queued */
        wake_page(l, bi, page);
        return;
    }
    u64 fault = page;
    if (b->table[fault] >= 0 && failed(l)) {
        /* the file cannot be read any more: a zero page, so that nothing hangs */
        rc = install(l, bi, fault, 1, NULL, &skipped);
    } else {
        /* serve the part of the aligned window of fault_run pages around the fault that is one
         * run with the faulting page: missing, and consecutive in the file or all zero */
        u64 window = fault - fault % l->fault_run, window_end = window + l->fault_run;
        long long kind = b->table[fault];
        while (page > window && !present(b, page - 1) &&
               (kind < 0 ? b->table[page - 1] < 0 : b->table[page - 1] == kind - STRIDE)) {
            page--;
            kind = b->table[page];
        }
        u64 n = run_length(b, page, window_end - page);
        /* pages are counted before the install wakes the faulting thread (which may look at
         * the stats at once), then the count is settled to what was installed */
        if (kind < 0) {
            count(&l->st.zero_pages, n);
            rc = install(l, bi, page, n, NULL, &skipped);
            settle(&l->st.zero_pages, n, rc);
        } else if (read_run(l, bi, page, n, l->fault_buf, l->fault_hdrs, l->fault_iov,
                            l->fault_crcs) < 0) {
            rc = install(l, bi, fault, 1, NULL, &skipped);
        } else {
            count(&l->st.fault_pages, n);
            rc = install(l, bi, page, n, l->fault_buf, &skipped);
            settle(&l->st.fault_pages, n, rc);
        }
    }
    /* ENOENT: the range was unregistered under us, which woke the faulting thread already */
    if (rc < 0 && rc != -ENOENT && !stopping(l)) {
        record_error(l, PYVMM_LAZY_UFFD_FAILED, (int)-rc, bi, fault, 0, 0);
        wake_page(l, bi, fault);
    }
    if (skipped) {
        count(&l->st.exists, (u64)skipped);
        wake_page(l, bi, fault); /* EEXIST does not wake: the waiter may still sleep */
    }
}

static void *handler_main(void *arg) {
    struct lazy *l = arg;
    pthread_setname_np(pthread_self(), "pyvmm-lazy-flt");
    struct uffd_msg msgs[16];
    struct pollfd fds[2] = {{.fd = l->uffd, .events = POLLIN}, {.fd = l->stopfd, .events = POLLIN}};
    for (;;) {
        int n = poll(fds, 2, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            record_error(l, PYVMM_LAZY_UFFD_FAILED, errno, 0, 0, 0, 0);
            break;
        }
        if (fds[1].revents)
            break;
        if (fds[0].revents & (POLLERR | POLLHUP)) {
            record_error(l, PYVMM_LAZY_UFFD_FAILED, EIO, 0, 0, 0, 0);
            break;
        }
        ssize_t got = read(l->uffd, msgs, sizeof msgs);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            record_error(l, PYVMM_LAZY_UFFD_FAILED, errno, 0, 0, 0, 0);
            break;
        }
        for (size_t i = 0; i < (size_t)got / sizeof msgs[0]; i++)
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
                serve_fault(l, msgs[i].arg.pagefault.address & ~(u64)(PAGE_SZ - 1));
    }
    return NULL;
}

/* ---- the fill thread ------------------------------------------------------------------ */

static void *filler_main(void *arg) {
    struct lazy *l = arg;
    pthread_setname_np(pthread_self(), "pyvmm-lazy-fill");
    if (l->fill_nice)
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), l->fill_nice);
    for (unsigned bi = 0; bi < l->nblocks; bi++) {
        struct lazy_block *b = &l->blocks[bi];
        u64 page = 0;
        while (page < b->npages) {
            if (stopping(l) || failed(l))
                goto out;
            if (b->table[page] < 0 || present(b, page)) {
                page++;
                continue;
            }
            u64 n = run_length(b, page, l->fill_run);
            if (read_run(l, bi, page, n, l->fill_buf, l->fill_hdrs, l->fill_iov, l->fill_crcs) < 0)
                goto out;
            int skipped = 0;
            long rc = install(l, bi, page, n, l->fill_buf, &skipped);
            if (rc < 0) {
                if (!stopping(l))
                    record_error(l, PYVMM_LAZY_UFFD_FAILED, (int)-rc, bi, page, 0, 0);
                goto out;
            }
            count(&l->st.fill_pages, (u64)rc);
            count(&l->st.exists, (u64)skipped);
            page += n;
        }
    }
    pthread_mutex_lock(&l->lock);
    l->st.fill_done = 1;
    pthread_cond_broadcast(&l->changed);
    pthread_mutex_unlock(&l->lock);
out:
    return NULL;
}

/* ---- the interface (the page source tables: lazy_table.c) ------------------------------ */

void *pyvmm_lazy_new(int uffd, int fd, unsigned int max_blocks, pyvmm_u64 fault_run,
                     pyvmm_u64 fill_run, int fill_nice) {
    if (fault_run < 1 || fault_run > MAX_RUN || fill_run < 1 || fill_run > MAX_RUN ||
        (fault_run & (fault_run - 1)))
        return NULL;
    struct lazy *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    l->uffd = uffd;
    l->fd = fd;
    l->max_blocks = max_blocks;
    l->fault_run = fault_run;
    l->fill_run = fill_run;
    l->fill_nice = fill_nice;
    l->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    l->blocks = calloc(max_blocks ? max_blocks : 1, sizeof *l->blocks);
    l->fault_hdrs = calloc(fault_run, sizeof(u64));
    l->fill_hdrs = calloc(fill_run, sizeof(u64));
    l->fault_iov = calloc(2 * fault_run, sizeof(struct iovec));
    l->fill_iov = calloc(2 * fill_run, sizeof(struct iovec));
    l->fault_crcs = calloc(fault_run, sizeof(unsigned int));
    l->fill_crcs = calloc(fill_run, sizeof(unsigned int));
    void *fb = NULL, *lb = NULL;
    if (posix_memalign(&fb, PAGE_SZ, fault_run * PAGE_SZ) == 0)
        l->fault_buf = fb;
    if (posix_memalign(&lb, PAGE_SZ, fill_run * PAGE_SZ) == 0)
        l->fill_buf = lb;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&l->changed, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&l->lock, NULL);
    if (l->stopfd < 0 || !l->blocks || !l->fault_hdrs || !l->fill_hdrs || !l->fault_iov ||
        !l->fill_iov || !l->fault_buf || !l->fill_buf || !l->fault_crcs || !l->fill_crcs) {
        pyvmm_lazy_free(l);
        return NULL;
    }
    return l;
}

int pyvmm_lazy_add_block(void *handle, pyvmm_u64 base, pyvmm_u64 npages, const long long *table,
                         pyvmm_u64 *present) {
    struct lazy *l = handle;
    if (l->handler_running || l->filler_running)
        return -EBUSY;
    if (l->nblocks >= l->max_blocks)
        return -ENOSPC;
    if (base % PAGE_SZ)
        return -EINVAL;
    u64 data_pages = 0;
    pyvmm_lazy_table_end(table, npages, &data_pages);
    l->blocks[l->nblocks++] = (struct lazy_block){base, npages, table, present, NULL};
    l->st.data_pages += data_pages;
    return 0;
}

int pyvmm_lazy_set_block_crcs(void *handle, unsigned int block, const unsigned int *crcs) {
    struct lazy *l = handle;
    if (l->handler_running || l->filler_running)
        return -EBUSY;
    if (block >= l->nblocks)
        return -EINVAL;
    l->blocks[block].crcs = crcs;
    return 0;
}

static void pin(pthread_t thread, int cpu) {
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(thread, sizeof set, &set);
}

int pyvmm_lazy_start_handler(void *handle, int cpu) {
    struct lazy *l = handle;
    if (l->handler_running)
        return -EBUSY;
    int rc = pthread_create(&l->handler, NULL, handler_main, l);
    if (rc)
        return -rc;
    l->handler_running = 1;
    pin(l->handler, cpu);
    return 0;
}

int pyvmm_lazy_start_fill(void *handle) {
    struct lazy *l = handle;
    if (l->filler_running)
        return -EBUSY;
    int rc = pthread_create(&l->filler, NULL, filler_main, l);
    if (rc)
        return -rc;
    l->filler_running = 1;
    return 0;
}

int pyvmm_lazy_wait(void *handle, long long timeout_ms) {
    struct lazy *l = handle;
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (timeout_ms >= 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    int result = 0;
    pthread_mutex_lock(&l->lock);
    for (;;) {
        if (l->st.error_kind) {
            result = 2;
            break;
        }
        if (l->st.fill_done) {
            result = 1;
            break;
        }
        if (stopping(l))
            break;
        if (timeout_ms < 0)
            pthread_cond_wait(&l->changed, &l->lock);
        else if (pthread_cond_timedwait(&l->changed, &l->lock, &deadline) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&l->lock);
    return result;
}

int pyvmm_lazy_stop(void *handle) {
    struct lazy *l = handle;
    pthread_mutex_lock(&l->lock);
    __atomic_store_n(&l->stopping, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&l->lock);
    if (l->filler_running) {
        pthread_join(l->filler, NULL);
        l->filler_running = 0;
    }
    if (l->handler_running) {
        u64 one = 1;
        if (write(l->stopfd, &one, sizeof one) < 0)
            return -errno;
        pthread_join(l->handler, NULL);
        l->handler_running = 0;
    }
    /* wake anyone blocked in pyvmm_lazy_wait */
    pthread_mutex_lock(&l->lock);
    pthread_cond_broadcast(&l->changed);
    pthread_mutex_unlock(&l->lock);
    return 0;
}

void pyvmm_lazy_free(void *handle) {
    struct lazy *l = handle;
    if (!l)
        return;
    pyvmm_lazy_stop(l);
    if (l->stopfd >= 0)
        close(l->stopfd);
    pthread_cond_destroy(&l->changed);
    pthread_mutex_destroy(&l->lock);
    free(l->blocks);
    free(l->fault_buf);
    free(l->fill_buf);
    free(l->fault_hdrs);
    free(l->fill_hdrs);
    free(l->fault_iov);
    free(l->fill_iov);
    free(l->fault_crcs);
    free(l->fill_crcs);
    free(l);
}

void pyvmm_lazy_get_stats(void *handle, struct pyvmm_lazy_stats *out) {
    struct lazy *l = handle;
    pthread_mutex_lock(&l->lock);
    *out = l->st;
    out->faults = __atomic_load_n(&l->st.faults, __ATOMIC_RELAXED);
    out->fault_pages = __atomic_load_n(&l->st.fault_pages, __ATOMIC_RELAXED);
    out->zero_pages = __atomic_load_n(&l->st.zero_pages, __ATOMIC_RELAXED);
    out->fill_pages = __atomic_load_n(&l->st.fill_pages, __ATOMIC_RELAXED);
    out->exists = __atomic_load_n(&l->st.exists, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&l->lock);
}
