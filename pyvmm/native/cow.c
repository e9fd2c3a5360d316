/* The fork-based ("cow") snapshot writer: a child process writes RAM page records and the stream's
 * tail while the parent's guest runs on, the kernel copying on write what the guest changes.
 *
 * The C half of pyvmm.migration.cow. The parent calls pyvmm_cow_start with the machine paused
 * (the consistency point); it forks and returns the child's pid at once. The child never returns
 * to Python: only the forking thread exists in it and other threads may have held locks (the GIL
 * among them), so it runs C only — pyvmm_write_page_records for each job, one pwrite of the tail
 * — fills the result area the parent mapped MAP_SHARED before the fork, and calls _exit.
 *
 * malloc in the child (pyvmm_write_page_records allocates its batch) is safe with glibc: fork()
 * takes every malloc arena lock in the parent and resets them in the child.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

typedef pyvmm_u64 u64;

/* Writes len bytes at offset, retrying after EINTR and short writes. 0 or -errno. */
static int pwrite_all(int fd, const unsigned char *buf, u64 len, u64 offset, u64 *written) {
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        *written += (u64)n;
        buf += n;
        len -= (u64)n;
        offset += (u64)n;
    }
    return 0;
}

static void sleep_ns(u64 ns) {
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static u64 now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (u64)ts.tv_sec * 1000000000u + (u64)ts.tv_nsec;
}

/* The child's whole life. Never returns. */
static void cow_child(int fd, u64 file_offset, const struct pyvmm_cow_job *jobs, unsigned njobs,
                      const unsigned char *tail, u64 tail_len, struct pyvmm_cow_result *result,
                      struct pyvmm_page_write_stats *job_stats, struct pyvmm_page_run *runs,
                      u64 child_delay_ns, pid_t parent) {
    /* A child that outlived a killed parent would hold the checkpoint file's writer lock (an
     * inherited descriptor of the same open file) and write an increment nobody commits. It
     * dies with the thread that forked it, which waits for it; if that thread was already gone
     * between fork and prctl, getppid() has changed. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(PYVMM_COW_EXIT_FAILED);
    if (child_delay_ns)
        sleep_ns(child_delay_ns); /* test hook: a window to kill the child in */
    u64 offset = file_offset;
    int rc = 0;
    unsigned i;
    for (i = 0; i < njobs; i++) {
        const struct pyvmm_cow_job *j = &jobs[i];
        struct pyvmm_page_write_stats *st = &job_stats[i];
        rc = pyvmm_write_page_records(fd, offset, j->base, j->npages, j->select, j->idstr,
                                      j->idstr_len, j->first_has_idstr, j->detect_zero, j->level,
                                      runs + j->runs_index, j->max_runs, st);
        offset += st->bytes_written;
        result->bytes_written += st->bytes_written;
        if (rc)
            break;
    }
    if (!rc) {
        result->stage = njobs; /* njobs = writing the tail */
        rc = pwrite_all(fd, tail, tail_len, offset, &result->bytes_written);
    } else {
        result->stage = i;
    }
    result->error = -rc;
    /* the parent reads the area after waitpid; the release store only documents the order */
    __atomic_store_n(&result->status, rc ? PYVMM_COW_FAILED : PYVMM_COW_DONE, __ATOMIC_RELEASE);
    _exit(rc ? PYVMM_COW_EXIT_FAILED : 0);
}

void *pyvmm_cow_area_map(pyvmm_u64 length) {
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

int pyvmm_cow_area_unmap(void *addr, pyvmm_u64 length) {
    return munmap(addr, length) == 0 ? 0 : -errno;
}

int pyvmm_cow_start(int fd, pyvmm_u64 file_offset, const struct pyvmm_cow_job *jobs,
                    unsigned njobs, const unsigned char *tail, pyvmm_u64 tail_len,
                    struct pyvmm_cow_result *result, struct pyvmm_page_write_stats *job_stats,
                    struct pyvmm_page_run *runs, pyvmm_u64 child_delay_ns,
                    pyvmm_u64 *fork_ns) {
    memset(result, 0, sizeof *result);
    memset(job_stats, 0, sizeof *job_stats * njobs);
    pid_t parent = getpid();
    u64 t0 = now_ns();
    pid_t pid = fork();
    if (pid == 0)
        cow_child(fd, file_offset, jobs, njobs, tail, tail_len, result, job_stats, runs,
                  child_delay_ns, parent);
    *fork_ns = now_ns() - t0;
    return pid < 0 ? -errno : (int)pid;
}
