/* pyvmm's SIGBUS handler, process-wide, and the two things that need it: write-protect sessions
 * in signal mode (the faulting thread resolves its own fault: wp_fault.c) and mapped reads of
 * checkpoint files (a file cut short under its mapping jumps back to the reader, who reads it
 * again with pread). A SIGBUS that is neither goes to the disposition from before pyvmm's.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "wp_session.h"

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
                    pyvmm_wp_resolve_fault(s, b, addr);
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

int pyvmm_wp_sig_register(struct wp_session *s) {
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
void pyvmm_wp_sig_unregister(struct wp_session *s) {
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
