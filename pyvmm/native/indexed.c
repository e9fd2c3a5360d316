/* The indexed reload's inner loop (pyvmm.migration.reload): one increment's page index, as the
 * raw big-endian records of the file, claimed newest-first against per-block bitmaps and the
 * pages no newer increment holds read straight into guest RAM. Python runs once per increment,
 * never per run: with scattered writes an index holds a run per page. */
#include <endian.h>
#include <stdint.h>
#include <string.h>

#include "native.h"

#define RECORD_SIZE 24   /* be16 block, u8 flags, u8 reserved, be32 npages, be64 first, be64 data */
#define RUN_ZERO 0x01
#define STRIDE_HEADER 8

int pyvmm_claim_read_index(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                           unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                           pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                           pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                           struct pyvmm_claim_result *result,
                           struct pyvmm_page_read_error *err) {
    memset(result, 0, sizeof *result);
    memset(err, 0, sizeof *err);
    const pyvmm_u64 stride = STRIDE_HEADER + page_size;
    for (pyvmm_u64 i = 0; i < nrecords; i++) {
        const unsigned char *r = records + i * RECORD_SIZE;
        uint16_t block;
        uint32_t npages;
        uint64_t first, data_offset;
        memcpy(&block, r, 2);
        memcpy(&npages, r + 4, 4);
        memcpy(&first, r + 8, 8);
        memcpy(&data_offset, r + 16, 8);
        block = be16toh(block);
        npages = be32toh(npages);
        first = be64toh(first);
        data_offset = be64toh(data_offset);
        unsigned flags = r[2];
        err->run = i;
        if (r[3] != 0 || (flags & ~RUN_ZERO) != 0)
            return PYVMM_CLAIM_BAD_RECORD;
        if (block >= nblocks || npages == 0 || first > block_pages[block] ||
            npages > block_pages[block] - first)
            return PYVMM_PAGEIO_RUN_OUTSIDE_BLOCK;
        pyvmm_u64 *bits = claimed[block];
        if (flags & RUN_ZERO) {
            /* a fresh machine's RAM is zero already: claiming is all there is to do */
            result->zero_pages += npages;
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
            struct pyvmm_page_run run = {start, stop - start,
                                         data_offset + (start - first) * stride, 0};
            struct pyvmm_page_read_error sub;
            int rc = pyvmm_read_page_runs(fd, bases[block], block_pages[block], &run, 1, &sub);
            if (rc != 0) {
                err->offset = sub.offset;
                err->page = sub.page;
                err->found = sub.found;
                return rc;
            }
            result->pages_read += stop - start;
            result->reads++;
            page = stop;
        }
        pyvmm_bitmap_set_range(bits, first, npages);
    }
    return 0;
}
