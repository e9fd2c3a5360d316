/* The page source tables of a lazy reload (pyvmm.migration.lazy): one int64 per guest page, the
 * file offset of the page's 4096 data bytes, or -1 for a page the fault handler never reads from
 * the file (zero, or compressed and inflated before the guest starts). Built from the stream's
 * runs or from an increment's page index, both checked against the block and the stream; lazy.c
 * serves faults from them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "internal.h"

typedef pyvmm_u64 u64;

#define PAGE_SZ 4096u
#define RECORD_HDR 8u
#define STRIDE ((long long)(PAGE_SZ + RECORD_HDR))

int pyvmm_lazy_table_apply(long long *table, pyvmm_u64 npages,
                           const struct pyvmm_page_run *runs, pyvmm_u64 nruns) {
    for (u64 r = 0; r < nruns; r++)
        if (runs[r].first_page > npages || runs[r].npages > npages - runs[r].first_page)
            return -EINVAL;
    for (u64 r = 0; r < nruns; r++) {
        long long *at = table + runs[r].first_page;
        if (runs[r].kind != PYVMM_RUN_DATA) { /* zero, or compressed: inflated before the start */
            for (u64 k = 0; k < runs[r].npages; k++)
                at[k] = -1;
        } else {
            for (u64 k = 0; k < runs[r].npages; k++)
                at[k] = (long long)runs[r].data_offset + (long long)k * STRIDE;
        }
    }
    return 0;
}

int pyvmm_lazy_table_apply_index(long long *const *tables, const pyvmm_u64 *block_pages,
                                 unsigned nblocks, const unsigned char *records,
                                 pyvmm_u64 nrecords, pyvmm_u64 stream_start,
                                 pyvmm_u64 stream_end, pyvmm_u64 *counts, pyvmm_u64 *bad) {
    const u64 stride = PAGE_SZ + RECORD_HDR;
    counts[0] = counts[1] = 0;
    *bad = 0;
    u64 *seen[nblocks ? nblocks : 1];
    int rc = 0;
    for (unsigned b = 0; b < nblocks; b++) {
        seen[b] = calloc(block_pages[b] / 64 + 1, sizeof(u64));
        if (seen[b] == NULL) {
            for (unsigned k = 0; k < b; k++)
                free(seen[k]);
            return -ENOMEM;
        }
    }
    for (u64 i = 0; i < nrecords && rc == 0; i++) {
        const struct pyvmm_index_record r = pyvmm_index_record(records + i * PYVMM_INDEX_RECORD);
        *bad = i;
        if (r.reserved || (r.flags & ~PYVMM_INDEX_FLAGS) || r.flags == PYVMM_INDEX_FLAGS ||
            r.block >= nblocks || r.npages == 0 ||
            r.first > block_pages[r.block] || r.npages > block_pages[r.block] - r.first ||
            pyvmm_bitmap_find_next_set(seen[r.block], r.first + r.npages, r.first) <
                r.first + r.npages) {
            rc = -EINVAL; /* malformed, outside its block, or a page listed twice */
            break;
        }
        pyvmm_bitmap_set_range(seen[r.block], r.first, r.npages);
        long long *at = tables[r.block] + r.first;
        if (r.flags & PYVMM_INDEX_ZERO) {
            if (r.data_offset != 0) {
                rc = -EINVAL;
                break;
            }
            for (u64 k = 0; k < r.npages; k++)
                at[k] = -1;
            counts[1] += r.npages;
            continue;
        }
        if (r.flags & PYVMM_INDEX_COMPRESSED) {
            /* inflated into RAM before the guest starts (pyvmm_claim_read_index with
             * compressed_only): present then, never faulted on, so nothing to fill here */
            if (r.data_offset < stream_start || r.data_offset >= stream_end) {
                rc = -EINVAL;
                break;
            }
            for (u64 k = 0; k < r.npages; k++)
                at[k] = -1;
            counts[0] += r.npages;
            continue;
        }
        if (r.data_offset < stream_start || r.data_offset > stream_end ||
            r.npages - 1 > (stream_end - r.data_offset) / stride ||
            (r.npages - 1) * stride + PAGE_SZ > stream_end - r.data_offset) {
            rc = -EINVAL; /* data outside the increment's stream */
            break;
        }
        for (u64 k = 0; k < r.npages; k++)
            at[k] = (long long)(r.data_offset + k * stride);
        counts[0] += r.npages;
    }
    for (unsigned b = 0; b < nblocks; b++)
        free(seen[b]);
    return rc;
}

int pyvmm_lazy_table_discard(void *base, const long long *table, pyvmm_u64 npages) {
    for (u64 p = 0; p < npages;) {
        if (table[p] < 0) {
            p++;
            continue;
        }
        u64 start = p;
        while (p < npages && table[p] >= 0)
            p++;
        if (madvise((char *)base + start * PAGE_SZ, (p - start) * PAGE_SZ, MADV_DONTNEED) != 0)
            return -errno;
    }
    return 0;
}

pyvmm_u64 pyvmm_lazy_table_end(const long long *table, pyvmm_u64 npages, pyvmm_u64 *data_pages) {
    u64 end = 0, n = 0;
    for (u64 p = 0; p < npages; p++) {
        if (table[p] >= 0) {
            n++;
            if ((u64)table[p] + PAGE_SZ > end)
                end = (u64)table[p] + PAGE_SZ;
        }
    }
    *data_pages = n;
    return end;
}
