/* userfaultfd for pyvmm: thin syscall wrappers and the PAGEMAP_SCAN dirty scan (the async
 * tracker's). The synchronous write-protect session built on them, the C half of
 * pyvmm.migration.postcopy_uffd, has files of its own: wp_session.c (its lifecycle, shadow
 * slots and page states), wp_fault.c (the fault path), sigbus.c (signal mode) and live_saver.c
 * (the saver in C); wp_session.h holds what they share.
 *
 * Every function returns 0 (or a count) on success and -errno on failure; policy (fallbacks,
 * which features to ask for, error messages) lives in Python.
 *
 * The system headers of the build machine may predate WP_ASYNC and PAGEMAP_SCAN, so the uapi
 * values this file needs beyond <linux/userfaultfd.h> are spelled out below (from the kernel's
 * include/uapi/linux/userfaultfd.h and fs.h, stable ABI).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
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
    return pyvmm_pagemap_written(pagemap_fd, base, npages, bitmap, vec_len, ioctls_out, 1);
}

long pyvmm_pagemap_written(int pagemap_fd, u64 base, u64 npages, u64 *bitmap, u64 vec_len,
                           u64 *ioctls_out, int protect) {
    struct pyvmm_page_region *vec = malloc(vec_len * sizeof *vec);
    if (!vec)
        return -ENOMEM;
    u64 end = base + npages * PAGE_SZ, pos = base, found = 0, calls = 0;
    while (pos < end) {
        struct pyvmm_pm_scan_arg arg = {
            .size = sizeof arg,
            .flags = protect ? PYVMM_PM_SCAN_WP_MATCHING | PYVMM_PM_SCAN_CHECK_WPASYNC : 0,
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
            if (bitmap != NULL)
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
