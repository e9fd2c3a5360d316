/* The baseline of benchmarks/bench_uffd.py: the kernel's write-protect fault round trip with
 * nothing of pyvmm's around it (no page states, no dirty bitmap, no lock, no fault-around), so
 * the benchmark can print how close pyvmm's fault handler comes to what the machine allows.
 *
 * Thread mode: a handler thread blocks in read() on the uffd and unprotects (waking the
 * writer) each 4 KiB page it is told about. Signal mode: the uffd has UFFD_FEATURE_SIGBUS, and
 * the faulting thread unprotects the page in its SIGBUS handler and retries the write. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

#define PAGE 4096u

/* the signal handler's uffd and range (one baseline at a time) */
static int bare_uffd = -1;
static uint64_t bare_start, bare_len;
static int bare_error;

static void pin(int cpu) {
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void bare_sigbus(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)ctx;
    int saved = errno;
    uint64_t page = (uint64_t)(uintptr_t)si->si_addr & ~(uint64_t)(PAGE - 1);
    int rc = pyvmm_uffd_writeprotect(bare_uffd, page, PAGE, UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
    if (rc < 0 && rc != -EAGAIN) { /* give the range up rather than fault forever */
        bare_error = rc;
        pyvmm_uffd_unregister(bare_uffd, bare_start, bare_len);
    }
    errno = saved;
}

struct handler {
    int uffd;
    int cpu;
    uint64_t start, len;
    uint64_t bell; /* the page whose fault ends the handler */
    int error;
};

static void *handler_main(void *arg) {
    struct handler *h = arg;
    pthread_setname_np(pthread_self(), "pyvmm-wp");
    struct uffd_msg msgs[16];
    pin(h->cpu);
    for (;;) {
        ssize_t got = read(h->uffd, msgs, sizeof msgs);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            h->error = errno;
            pyvmm_uffd_unregister(h->uffd, h->start, h->len); /* wakes the writer */
            return NULL;
        }
        int done = 0;
        for (size_t i = 0; i < (size_t)got / sizeof msgs[0]; i++) {
            uint64_t page = msgs[i].arg.pagefault.address & ~(uint64_t)(PAGE - 1);
            int rc = pyvmm_uffd_writeprotect(h->uffd, page, PAGE, 0);
            if (rc < 0 && rc != -EAGAIN) {
                h->error = -rc;
                pyvmm_uffd_unregister(h->uffd, h->start, h->len);
                return NULL;
            }
            done |= page == h->bell;
        }
        if (done)
            return NULL;
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int pyvmm_uffd_bare_wp_faults(int signal_mode, void *base, pyvmm_u64 npages, int handler_cpu,
                              int writer_cpu, double *seconds) {
    if (npages < 2)
        return -EINVAL;
    unsigned char *mem = base;
    const size_t len = (size_t)npages * PAGE;
    npages--; /* the last page: the handler thread's bell */
    memset(mem, 1, len); /* populated: the faults measured are write-protect faults only */
    int rc = 0, uffd = pyvmm_uffd_open(1, 1);
    if (uffd < 0)
        uffd = pyvmm_uffd_open(0, 1);
    if (uffd < 0)
        return uffd;
    pyvmm_u64 features, ioctls;
    rc = pyvmm_uffd_api(uffd, signal_mode ? UFFD_FEATURE_SIGBUS : 0, &features, &ioctls);
    if (rc == 0)
        rc = pyvmm_uffd_register(uffd, (uintptr_t)mem, len, UFFDIO_REGISTER_MODE_WP, &ioctls);
    if (rc == 0)
        rc = pyvmm_uffd_writeprotect(uffd, (uintptr_t)mem, len, UFFDIO_WRITEPROTECT_MODE_WP);
    if (rc)
        goto out_close;
    int flags = fcntl(uffd, F_GETFL);
    fcntl(uffd, F_SETFL, flags & ~O_NONBLOCK); /* the handler blocks in read() */
    cpu_set_t before;
    sched_getaffinity(0, sizeof before, &before);
    pin(writer_cpu);
    if (signal_mode) {
        struct sigaction sa, old;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = bare_sigbus;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        bare_uffd = uffd;
        bare_start = (uintptr_t)mem;
        bare_len = len;
        bare_error = 0;
        if (sigaction(SIGBUS, &sa, &old)) {
            rc = -errno;
        } else {
            double t0 = now();
            memset(mem, 2, (size_t)npages * PAGE);
            *seconds = now() - t0;
            sigaction(SIGBUS, &old, NULL);
            rc = bare_error;
        }
        bare_uffd = -1;
    } else {
        struct handler h = {uffd, handler_cpu, (uintptr_t)mem, len, (uintptr_t)mem + npages * PAGE,
                            0};
        pthread_t thread;
        rc = -pthread_create(&thread, NULL, handler_main, &h);
        if (rc == 0) {
            double t0 = now();
            memset(mem, 2, (size_t)npages * PAGE);
            *seconds = now() - t0;
            if (h.error == 0)
                mem[npages * PAGE] = 2; /* ring: the handler ends */
            pthread_join(thread, NULL);
            rc = -h.error;
        }
    }
    sched_setaffinity(0, sizeof before, &before);
out_close:
    close(uffd); /* unregisters the range */
    return rc;
}
