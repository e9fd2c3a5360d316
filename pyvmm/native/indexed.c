/* The indexed reload's inner loop (pyvmm.migration.reload): one increment's page index, as the
 * raw big-endian records of the file, claimed newest-first against per-block bitmaps and the
 * pages no newer increment holds read straight into guest RAM. Python runs once per increment,
 * never per run: with scattered writes an index holds a run per page.
 *
 * With checksums, each page read is compared with the CRC-32C the file's checksum table expects
 * right after its batch is read (small batches then, so the pages are still in the cache), and
 * every page left zero (zero runs, pages no increment holds) must expect a zero page: the
 * reloaded RAM is checked without a second pass over it. */
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

#define RECORD_SIZE 24   /* be16 block, u8 flags, u8 reserved, be32 npages, be64 first, be64 data */
#define RUN_ZERO 0x01
#define STRIDE_HEADER 8

#define BATCH_IOV 1024 /* IOV_MAX on Linux */
#define CHECKED_BATCH_IOV 256 /* with CRC checks: 128 pages, 512 KiB, checked while cached */
#define PAGE_FLAGS_CONTINUE_PAGE 0x28

/* Pages that follow each other in the file (one 8-byte record header apart), read by one
 * preadv however scattered they are in RAM; the headers in between go to `headers` and are
 * checked afterwards. With sieving, a gap of up to `sieve` records a newer increment holds is
 * read into `scratch` (one buffer, reused by every gap: its contents are never looked at) rather
 * than ending the batch: a page copy costs less here than the preadv call it saves. */
struct batch {
    struct iovec iov[BATCH_IOV];
    unsigned char *scratch;
    pyvmm_u64 sieve_bytes;   /* largest gap read into scratch; 0: never */
    pyvmm_u64 sieved;        /* bytes read into scratch */
    unsigned char headers[BATCH_IOV / 2][8];
    pyvmm_u64 expected[BATCH_IOV / 2];
    pyvmm_u64 header_page[BATCH_IOV / 2];
    pyvmm_u64 header_offset[BATCH_IOV / 2];
    unsigned niov, nheaders, max_iov;
    pyvmm_u64 start, end; /* file offsets of the batch */
    pyvmm_u64 preads;
    /* CRC checks (crcs NULL: none): the batch's pages, their block, page and data offset */
    const unsigned int *const *crcs;
    const void *page_dst[BATCH_IOV / 2];
    unsigned page_block[BATCH_IOV / 2];
    pyvmm_u64 page_no[BATCH_IOV / 2];
    pyvmm_u64 page_offset[BATCH_IOV / 2];
    unsigned npages;
    pyvmm_u64 page_size;
};

/* The batch's pages against their CRCs, just read, so still in this core's cache. (A checker
 * thread beside the reading one measured slower on the 2-core machines here.) */
static int check_pages(struct batch *b, struct pyvmm_page_read_error *err) {
    unsigned int crc[BATCH_IOV / 2];
    pyvmm_crc32c_page_list(b->page_dst, b->npages, b->page_size, crc);
    for (unsigned k = 0; k < b->npages; k++) {
        if (crc[k] != b->crcs[b->page_block[k]][b->page_no[k]]) {
            err->run = b->page_block[k];
            err->page = b->page_no[k];
            err->offset = b->page_offset[k];
            err->found = crc[k];
            return PYVMM_CLAIM_BAD_CRC;
        }
    }
    return 0;
}

static int batch_flush(int fd, struct batch *b, struct pyvmm_page_read_error *err) {
    if (b->niov == 0)
        return 0;
    int rc = pyvmm_preadv_all(fd, b->iov, (int)b->niov, b->start, err, &b->preads);
    if (rc)
        return rc;
    for (unsigned h = 0; h < b->nheaders; h++) {
        uint64_t found;
        memcpy(&found, b->headers[h], 8);
        found = be64toh(found);
        if (found != b->expected[h]) {
            err->offset = b->header_offset[h];
            err->page = b->header_page[h];
            err->found = found;
            return PYVMM_PAGEIO_BAD_HEADER;
        }
    }
    if (b->crcs != NULL && b->npages) {
        int rc = check_pages(b, err);
        if (rc)
            return rc;
    }
    b->niov = b->nheaders = b->npages = 0;
    return 0;
}

/* Queue page `page` of RAM block `block` at `dst`, whose data is at file offset `offset`. */
static int batch_add(int fd, struct batch *b, void *dst, unsigned block, pyvmm_u64 page,
                     pyvmm_u64 offset, pyvmm_u64 page_size, struct pyvmm_page_read_error *err) {
    const pyvmm_u64 stride = STRIDE_HEADER + page_size;
    pyvmm_u64 gap = b->niov && offset > b->end + 8 ? offset - 8 - b->end : 0;
    int sieve = gap && gap <= b->sieve_bytes && gap % stride == 0;
    if (b->niov && ((offset != b->end + 8 && !sieve) || b->niov + 3 > b->max_iov)) {
        int rc = batch_flush(fd, b, err);
        if (rc)
            return rc;
        sieve = 0;
    }
    if (b->niov == 0) {
        b->start = offset;
    } else {
        if (sieve) { /* whole records of pages a newer increment holds: read, not used */
            b->iov[b->niov].iov_base = b->scratch;
            b->iov[b->niov++].iov_len = gap;
            b->sieved += gap;
        }
        unsigned h = b->nheaders++;
        b->expected[h] = page * page_size | PAGE_FLAGS_CONTINUE_PAGE;
        b->header_page[h] = page;
        b->header_offset[h] = offset - 8;
        b->iov[b->niov].iov_base = b->headers[h];
        b->iov[b->niov++].iov_len = 8;
    }
    b->iov[b->niov].iov_base = dst;
    b->iov[b->niov++].iov_len = page_size;
    b->end = offset + page_size;
    if (b->crcs != NULL) {
        unsigned k = b->npages++;
        b->page_dst[k] = dst;
        b->page_block[k] = block;
        b->page_no[k] = page;
        b->page_offset[k] = offset;
    }
    return 0;
}

/* Pages [from, to) of `block` not claimed yet stay zero: each must expect a zero page. */
static int check_left_zero(const pyvmm_u64 *bits, pyvmm_u64 from, pyvmm_u64 to,
                           const struct pyvmm_claim_options *options, unsigned block,
                           struct pyvmm_page_read_error *err) {
    const unsigned int *want = options->crcs[block];
    pyvmm_u64 page = from;
    while (page < to) {
        pyvmm_u64 start = pyvmm_bitmap_find_next_clear(bits, to, page);
        if (start >= to)
            break;
        pyvmm_u64 stop = pyvmm_bitmap_find_next_set(bits, to, start);
        for (pyvmm_u64 p = start; p < stop; p++) {
            if (want[p] != options->zero_crc) {
                err->run = block;
                err->page = p;
                err->offset = 0;
                err->found = options->zero_crc;
                return PYVMM_CLAIM_BAD_CRC;
            }
        }
        page = stop;
    }
    return 0;
}

int pyvmm_claim_check_unclaimed(unsigned nblocks, const pyvmm_u64 *block_pages,
                                pyvmm_u64 *const *claimed,
                                const struct pyvmm_claim_options *options,
                                struct pyvmm_page_read_error *err) {
    memset(err, 0, sizeof *err);
    if (options->crcs == NULL)
        return 0;
    for (unsigned block = 0; block < nblocks; block++) {
        int rc = check_left_zero(claimed[block], 0, block_pages[block], options, block, err);
        if (rc)
            return rc;
    }
    return 0;
}

static int claim_read(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                      unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                      pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                      pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                      const struct pyvmm_claim_options *options,
                      struct pyvmm_claim_result *result,
                      struct pyvmm_page_read_error *err, struct batch *b);

int pyvmm_claim_read_index(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                           unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                           pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                           pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                           const struct pyvmm_claim_options *options,
                           struct pyvmm_claim_result *result,
                           struct pyvmm_page_read_error *err) {
    pyvmm_u64 sieve_pages = options->sieve_pages;
    if (sieve_pages > PYVMM_CLAIM_MAX_SIEVE)
        return -EINVAL;
    memset(result, 0, sizeof *result);
    memset(err, 0, sizeof *err);
    struct batch *b = malloc(sizeof *b);
    if (b == NULL)
        return -ENOMEM;
    b->niov = b->nheaders = b->npages = 0;
    b->preads = 0;
    b->crcs = options->crcs;
    b->max_iov = options->crcs != NULL ? CHECKED_BATCH_IOV : BATCH_IOV;
    b->page_size = page_size;
    b->sieved = 0;
    b->sieve_bytes = sieve_pages * (STRIDE_HEADER + page_size);
    b->scratch = NULL;
    if (sieve_pages) {
        b->scratch = malloc(b->sieve_bytes);
        if (b->scratch == NULL) {
            free(b);
            return -ENOMEM;
        }
    }
    int rc = claim_read(fd, records, nrecords, nblocks, bases, block_pages, claimed, page_size,
                        stream_start, stream_end, options, result, err, b);
    result->sieved_bytes = b->sieved;
    free(b->scratch);
    free(b);
    return rc;
}

static int claim_read(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                      unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                      pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                      pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                      const struct pyvmm_claim_options *options,
                      struct pyvmm_claim_result *result,
                      struct pyvmm_page_read_error *err, struct batch *b) {
    const pyvmm_u64 stride = STRIDE_HEADER + page_size;
    for (pyvmm_u64 i = 0; i < nrecords; i++) {
        const struct pyvmm_index_record rec = pyvmm_index_record(records + i * RECORD_SIZE);
        const unsigned block = rec.block, flags = rec.flags;
        const pyvmm_u64 npages = rec.npages, first = rec.first, data_offset = rec.data_offset;
        err->run = i;
        if (rec.reserved != 0 || (flags & ~RUN_ZERO) != 0)
            return PYVMM_CLAIM_BAD_RECORD;
        if (block >= nblocks || npages == 0 || first > block_pages[block] ||
            npages > block_pages[block] - first)
            return PYVMM_PAGEIO_RUN_OUTSIDE_BLOCK;
        pyvmm_u64 *bits = claimed[block];
        if (flags & RUN_ZERO) {
            /* a fresh machine's RAM is zero already: claiming is all there is to do */
            result->zero_pages += npages;
            if (options->crcs != NULL) {
                int rc = check_left_zero(bits, first, first + npages, options, block, err);
                if (rc)
                    return rc;
            }
            pyvmm_bitmap_set_range(bits, first, npages);
            continue;
        }
        if (data_offset < stream_start ||
            (uint64_t)(npages - 1) > (stream_end - stream_start) / stride ||
            data_offset + (uint64_t)(npages - 1) * stride + page_size > stream_end ||
            data_offset + (uint64_t)(npages - 1) * stride + page_size < data_offset) {
            err->offset = data_offset;
            return PYVMM_PAGEIO_RUN_OUTSIDE_FILE;
        }
        result->data_pages += npages;
        const pyvmm_u64 end = first + npages;
        pyvmm_u64 page = first;
        while (page < end) {
            pyvmm_u64 start = pyvmm_bitmap_find_next_clear(bits, end, page);
            if (start >= end)
                break;
            pyvmm_u64 stop = pyvmm_bitmap_find_next_set(bits, end, start);
            for (pyvmm_u64 p = start; p < stop; p++) {
                int rc = batch_add(fd, b, (char *)bases[block] + p * page_size, block, p,
                                   data_offset + (p - first) * stride, page_size, err);
                if (rc)
                    return rc;
            }
            result->pages_read += stop - start;
            page = stop;
        }
        pyvmm_bitmap_set_range(bits, first, npages);
    }
    int rc = batch_flush(fd, b, err);
    result->reads = b->preads;
    return rc;
}
