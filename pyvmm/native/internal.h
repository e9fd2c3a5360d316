/* Declarations shared between pyvmm's C files that Python never calls (native.h is the cffi
 * interface; this header is not fed to cffi). */
#ifndef PYVMM_INTERNAL_H
#define PYVMM_INTERNAL_H

#include <sys/uio.h>

#include "native.h"

/* pages.c: reads iov[0..cnt) from `offset` to the end, retrying after EINTR and short reads
 * (advancing the iovecs it was given). End of file first: PYVMM_PAGEIO_TRUNCATED with
 * err->offset where the file ended; -errno with err->offset on failure. Adds the preadv calls
 * made to *calls unless it is NULL. */
int pyvmm_preadv_all(int fd, struct iovec *iov, int cnt, pyvmm_u64 offset,
                     struct pyvmm_page_read_error *err, pyvmm_u64 *calls);

#endif
