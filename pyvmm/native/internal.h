/* Declarations shared between pyvmm's C files that Python never calls (native.h is the cffi
 * interface; this header is not fed to cffi). */
#ifndef PYVMM_INTERNAL_H
#define PYVMM_INTERNAL_H

#include <endian.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "native.h"

/* On a function one of pyvmm's C files calls in another but Python never does (declared in a
 * private header): a direct call, as when it was static in one file (no PLT, no interposition),
 * and no symbol exported beyond native.h's for it. */
#define PYVMM_HIDDEN __attribute__((visibility("hidden")))

/* One page index record as the container stores it (24 bytes, big-endian): be16 block, u8
 * flags (PYVMM_INDEX_ZERO), u8 reserved, be32 npages, be64 first page, be64 data offset. */
#define PYVMM_INDEX_RECORD 24
#define PYVMM_INDEX_ZERO 0x01
#define PYVMM_INDEX_COMPRESSED 0x02 /* compressed records (compress.c); = PYVMM_RUN_COMPRESSED */
#define PYVMM_INDEX_FLAGS (PYVMM_INDEX_ZERO | PYVMM_INDEX_COMPRESSED)
struct pyvmm_index_record {
    unsigned block, flags, reserved;
    pyvmm_u64 npages, first, data_offset;
};

static inline struct pyvmm_index_record pyvmm_index_record(const unsigned char *r) {
    uint16_t block;
    uint32_t npages;
    uint64_t first, data_offset;
    memcpy(&block, r, 2);
    memcpy(&npages, r + 4, 4);
    memcpy(&first, r + 8, 8);
    memcpy(&data_offset, r + 16, 8);
    return (struct pyvmm_index_record){be16toh(block), r[2], r[3], be32toh(npages),
                                       be64toh(first), be64toh(data_offset)};
}

/* pages.c: reads iov[0..cnt) from `offset` to the end, retrying after EINTR and short reads
 * (advancing the iovecs it was given). End of file first: PYVMM_PAGEIO_TRUNCATED with
 * err->offset where the file ended; -errno with err->offset on failure. Adds the preadv calls
 * made to *calls unless it is NULL. */
int pyvmm_preadv_all(int fd, struct iovec *iov, int cnt, pyvmm_u64 offset,
                     struct pyvmm_page_read_error *err, pyvmm_u64 *calls);

/* compress.c: pyvmm's compressed page record (flag 0x400; see compress.c for the layout).
 * A compressed page takes at most PYVMM_COMPRESSED_MAX frame bytes, else it is written plain:
 * a quarter of the page saved at least, or the decompression is not worth its time. */
#define PYVMM_REC_COMPRESSED 0x400u
#define PYVMM_COMPRESSED_MAX 3072u
struct pyvmm_page_encoder;
/* NULL on ENOMEM or a level zstd does not have; one per thread that compresses */
struct pyvmm_page_encoder *pyvmm_encoder_new(int level);
void pyvmm_encoder_free(struct pyvmm_page_encoder *e);
/* The 4096 bytes at page compressed into dst (room for PYVMM_COMPRESSED_MAX bytes): the frame's
 * length, or 0 when it would not fit (write the page plain). */
size_t pyvmm_encoder_compress(struct pyvmm_page_encoder *e, const void *page, unsigned char *dst);
/* A buffered reader of one increment's stream, up to `end`, for compressed runs. */
struct pyvmm_inflater {
    int fd;
    unsigned char *buf;
    pyvmm_u64 at;  /* file offset of buf[0] */
    size_t len;    /* bytes valid in buf */
    pyvmm_u64 end; /* nothing at or past it is read */
    pyvmm_u64 reads;
};
int pyvmm_inflater_init(struct pyvmm_inflater *in, int fd, pyvmm_u64 end); /* 0 or -ENOMEM */
void pyvmm_inflater_free(struct pyvmm_inflater *in);
/* Pages first .. first+npages-1 of the block at mem from the compressed run whose first record's
 * be16 length is at `offset`: every record's header but the first is checked, and each page is
 * inflated into mem (NULL: into a scratch page, to check it) unless its bit in `claimed` is set
 * (all when claimed is NULL); with claim,
 * the bit of each page inflated is set. *inflated (unless NULL) counts the pages inflated.
 * 0, -errno, or PYVMM_PAGEIO_TRUNCATED / _BAD_HEADER / _BAD_DATA with *err (offset, page). */
int pyvmm_inflate_run(struct pyvmm_inflater *in, unsigned char *mem, pyvmm_u64 first,
                      pyvmm_u64 npages, pyvmm_u64 offset, pyvmm_u64 *claimed, int claim,
                      struct pyvmm_page_read_error *err, pyvmm_u64 *inflated);

/* sigbus.c: a thread reading a mapped file sets pyvmm_map_guard to the mapping's range after
 * sigsetjmp(env, 1) (and pyvmm_sigbus_install() succeeded); a SIGBUS there (the file shrank
 * under the mapping) jumps back to env with 1, the guard cleared. Clear it when done. */
struct pyvmm_map_guard {
    sigjmp_buf env;
    pyvmm_u64 base, end;
};
/* initial-exec: read in a signal handler, by threads that never set it too (a vCPU thread's
 * SIGBUS in uffd signal mode), so it must not be allocated lazily on first use */
extern __thread struct pyvmm_map_guard *pyvmm_map_guard
    __attribute__((tls_model("initial-exec")));
int pyvmm_sigbus_install(void);
/* sigbus.c: [offset, offset + len) of fd mapped read-only (offset a multiple of PYVMM_MAP_ALIGN)
 * with pyvmm's SIGBUS handler in place, or MAP_FAILED (shorter than pyvmm_map_min(), or no
 * mapping to be had: read with pread then); pyvmm_map_count_cut_short after a SIGBUS there. */
#define PYVMM_MAP_ALIGN (64u << 10) /* a multiple of any page size mmap offsets need */
void *pyvmm_map_file(int fd, pyvmm_u64 offset, pyvmm_u64 len);
void pyvmm_map_count_cut_short(void);

#endif
