/* The checksum capability's checks before a reload, C calls per increment
 * (pyvmm.migration.checksum.check_before_load): the increment's raw page index records are
 * checked as the container's decoder would and applied to the per-page CRC table of the whole
 * RAM (data pages take their CRCs from the checksum block, zero pages the zero-page CRC); the
 * stream bytes outside the data runs' extents (its gaps) are read and compared with the block's
 * gap CRCs (a separate call: increments' gaps can be checked on two threads). Python runs once
 * per increment, never per run: with scattered writes an index holds a run per page.
 *
 * Any failure only says "not accepted"; the caller then runs the Python checks, which name what
 * is wrong. So every check here is at least as strict as its Python counterpart.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

typedef pyvmm_u64 u64;

#define RECORD_SIZE 24 /* be16 block, u8 flags, u8 reserved, be32 npages, be64 first, be64 data */
#define RUN_ZERO 0x01
#define RECORD_HEADER 8
#define PAGE_FLAGS_CONTINUE_PAGE 0x28 /* a page record of the same block as the one before */
#define GAP_BUFFER (128u << 10) /* bytes read ahead over gaps that are close to each other */
#define DENSE_EXTENT (16u << 10) /* a data extent up to this long is read through, not skipped */

struct extent {
    u64 start;  /* the run's first page's data */
    u64 end;    /* its last page's data end */
    u64 header; /* its first page's record header if that continues the block's records */
};

static int by_start(const void *a, const void *b) {
    const struct extent *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* Check the records and apply them to the tables. */
static int apply_records(const unsigned char *records, u64 nrecords, unsigned nblocks,
                         unsigned int *const *tables, const u64 *block_pages,
                         u64 *const *seen, u64 page_size, u64 stream_start, u64 stream_end,
                         const unsigned int *page_crcs, u64 npage_crcs, unsigned int zero_crc,
                         struct pyvmm_crcindex_result *result,
                         struct pyvmm_crcindex_error *err) {
    const u64 stride = RECORD_HEADER + page_size;
    u64 position = 0; /* next page CRC */
    for (u64 i = 0; i < nrecords; i++) {
        const struct pyvmm_index_record rec = pyvmm_index_record(records + i * RECORD_SIZE);
        const unsigned block = rec.block, flags = rec.flags;
        const pyvmm_u64 npages = rec.npages, first = rec.first, data_offset = rec.data_offset;
        err->run = i;
        if (rec.reserved != 0 || (flags & ~RUN_ZERO) != 0)
            return PYVMM_CRCINDEX_BAD_RECORD;
        if (block >= nblocks || npages == 0 || first > block_pages[block] ||
            npages > block_pages[block] - first)
            return PYVMM_CRCINDEX_BAD_RECORD;
        /* no page listed twice in one increment */
        if (pyvmm_bitmap_find_next_set(seen[block], first + npages, first) < first + npages)
            return PYVMM_CRCINDEX_BAD_RECORD;
        pyvmm_bitmap_set_range(seen[block], first, npages);
        unsigned int *table = tables[block] + first;
        if (flags & RUN_ZERO) {
            if (data_offset != 0)
                return PYVMM_CRCINDEX_BAD_RECORD;
            for (u64 k = 0; k < npages; k++)
                table[k] = zero_crc;
            result->zero_pages += npages;
            continue;
        }
        if (data_offset < stream_start || data_offset > stream_end ||
            (u64)(npages - 1) > (stream_end - stream_start) / stride ||
            (u64)(npages - 1) * stride + page_size > stream_end - data_offset)
            return PYVMM_CRCINDEX_BAD_RECORD;
        if (npages > npage_crcs - position)
            return PYVMM_CRCINDEX_COUNTS;
        memcpy(table, page_crcs + position, (size_t)npages * sizeof *table);
        position += npages;
        result->data_runs++;
        result->data_pages += npages;
    }
    if (position != npage_crcs)
        return PYVMM_CRCINDEX_COUNTS;
    return 0;
}

/* Bytes read from the file, some ahead of what is asked. */
struct gap_reader {
    int fd;
    unsigned char *buf;
    u64 start, len, end;
};

/* CRC-32C (zlib style) of [pos, pos + n) of the file; `ahead`: bytes worth reading past it. */
static int gap_crc(struct gap_reader *g, u64 pos, u64 n, u64 ahead, unsigned int *crc,
                   struct pyvmm_crcindex_error *err) {
    unsigned int c = 0;
    while (n) {
        if (pos >= g->start && pos < g->start + g->len) {
            u64 have = g->start + g->len - pos;
            u64 take = have < n ? have : n;
            c = pyvmm_crc32c(c, g->buf + (pos - g->start), take);
            pos += take;
            n -= take;
            continue;
        }
        u64 want = n + ahead;
        if (want > GAP_BUFFER)
            want = GAP_BUFFER;
        if (want > g->end - pos)
            want = g->end - pos;
        u64 done = 0;
        while (done < want) {
            ssize_t got = pread(g->fd, g->buf + done, want - done, (off_t)(pos + done));
            if (got < 0) {
                if (errno == EINTR)
                    continue;
                err->offset = pos + done;
                return -errno;
            }
            if (got == 0)
                break;
            done += (u64)got;
        }
        if (done < (n < want ? n : want)) {
            err->offset = pos + done;
            return PYVMM_CRCINDEX_TRUNCATED;
        }
        g->start = pos;
        g->len = done;
    }
    *crc = c;
    return 0;
}

/* Whether gap i (before extent i) is just extent i's first page's 8-byte continuation record
 * header, and the checksum block says it holds what it must: such a gap is not read. */
static int header_gap(const struct extent *extents, u64 i, u64 pos, const unsigned int *gap_crcs) {
    if (extents[i].start - pos != RECORD_HEADER)
        return 0;
    const uint64_t be = htobe64(extents[i].header);
    return pyvmm_crc32c(0, &be, sizeof be) == gap_crcs[i];
}

/* The gaps around the sorted extents against gap_crcs (file order), or with `out` their CRCs
 * stored there instead (and *last = where the last gap starts); `skip_headers`: see
 * pyvmm_crcindex_gaps. */
static int check_gaps(int fd, struct extent *extents, u64 nextents, u64 stream_start,
                      u64 stream_end, const unsigned int *gap_crcs, u64 ngap_crcs,
                      int skip_headers, unsigned int *out, u64 *last,
                      struct pyvmm_crcindex_error *err) {
    if (ngap_crcs != nextents + 1)
        return PYVMM_CRCINDEX_COUNTS;
    int sorted = 1;
    for (u64 i = 1; i < nextents && sorted; i++)
        sorted = extents[i - 1].start <= extents[i].start;
    if (!sorted)
        qsort(extents, nextents, sizeof *extents, by_start);
    u64 pos = stream_start;
    for (u64 i = 0; i < nextents; i++) {
        if (extents[i].start < pos) {
            err->run = i;
            return PYVMM_CRCINDEX_OVERLAP;
        }
        pos = extents[i].end;
    }
    /* The stream mapped when it can be: the gaps then cost no copy of the data between them
     * (page headers every 4 KiB in a scattered increment: a pread copies the whole stream). A
     * file cut short under the mapping raises SIGBUS, caught below, and the reads start over
     * with pread, which finds where the file ends. */
    struct gap_reader g = {fd, NULL, 0, 0, stream_end};
    struct pyvmm_map_guard guard;
    const u64 map_start = stream_start & ~(u64)(PYVMM_MAP_ALIGN - 1);
    const u64 map_len = stream_end > map_start ? stream_end - map_start : 0;
    void *map = pyvmm_map_file(fd, map_start, map_len);
    if (map != MAP_FAILED) {
        if (sigsetjmp(guard.env, 1)) { /* SIGBUS: the guard is cleared */
            munmap(map, (size_t)map_len);
            map = MAP_FAILED;
            pyvmm_map_count_cut_short();
        } else {
            g.buf = map;
            g.start = map_start;
            g.len = map_len;
            guard.base = (u64)(uintptr_t)map;
            guard.end = guard.base + g.len;
            pyvmm_map_guard = &guard;
        }
    }
    if (map == MAP_FAILED) {
        g = (struct gap_reader){fd, malloc(GAP_BUFFER), 0, 0, stream_end};
        if (g.buf == NULL)
            return -ENOMEM;
    }
    int rc = 0;
    pos = stream_start;
    for (u64 i = 0; i <= nextents; i++) {
        u64 gap_end = i < nextents ? extents[i].start : stream_end;
        if (skip_headers && i > 0 && i < nextents && header_gap(extents, i, pos, gap_crcs)) {
            pos = extents[i].end;
            continue;
        }
        /* read through a short data extent to the next gap rather than pread each gap */
        u64 ahead = 0;
        if (i < nextents && extents[i].end - extents[i].start <= DENSE_EXTENT)
            ahead = GAP_BUFFER;
        unsigned int crc = 0;
        rc = gap_crc(&g, pos, gap_end - pos, ahead, &crc, err);
        if (rc) {
            err->run = i;
            break;
        }
        if (out) {
            out[i] = crc;
        } else if (crc != gap_crcs[i]) {
            err->run = i;
            err->offset = pos;
            rc = PYVMM_CRCINDEX_GAP_MISMATCH;
            break;
        }
        if (i < nextents)
            pos = extents[i].end;
    }
    if (last)
        *last = pos;
    if (map != MAP_FAILED) {
        pyvmm_map_guard = NULL;
        munmap(map, (size_t)map_len);
    } else {
        free(g.buf);
    }
    return rc;
}

int pyvmm_crcindex_apply(const unsigned char *records, pyvmm_u64 nrecords, unsigned nblocks,
                         unsigned int *const *tables, const pyvmm_u64 *block_pages,
                         pyvmm_u64 *const *seen, pyvmm_u64 page_size, pyvmm_u64 stream_start,
                         pyvmm_u64 stream_end, const unsigned int *page_crcs,
                         pyvmm_u64 npage_crcs, unsigned int zero_crc,
                         struct pyvmm_crcindex_result *result,
                         struct pyvmm_crcindex_error *err) {
    memset(result, 0, sizeof *result);
    memset(err, 0, sizeof *err);
    if (page_size == 0 || stream_end < stream_start)
        return -EINVAL;
    for (unsigned b = 0; b < nblocks; b++)
        memset(seen[b], 0, (size_t)((block_pages[b] + 63) / 64) * sizeof(u64));
    return apply_records(records, nrecords, nblocks, tables, block_pages, seen, page_size,
                         stream_start, stream_end, page_crcs, npage_crcs, zero_crc, result,
                         err);
}

static int gaps(int fd, const unsigned char *records, u64 nrecords, u64 page_size,
                u64 stream_start, u64 stream_end, const unsigned int *gap_crcs, u64 ngap_crcs,
                int skip_headers, unsigned int *out, u64 *last,
                struct pyvmm_crcindex_error *err) {
    memset(err, 0, sizeof *err);
    if (page_size == 0 || stream_end < stream_start)
        return -EINVAL;
    const u64 stride = RECORD_HEADER + page_size;
    struct extent *extents = malloc((nrecords ? nrecords : 1) * sizeof *extents);
    if (extents == NULL)
        return -ENOMEM;
    u64 n = 0;
    for (u64 i = 0; i < nrecords; i++) {
        const unsigned char *r = records + i * RECORD_SIZE;
        uint32_t npages;
        uint64_t first, data_offset;
        if (r[2] & RUN_ZERO)
            continue;
        memcpy(&npages, r + 4, 4);
        memcpy(&first, r + 8, 8);
        memcpy(&data_offset, r + 16, 8);
        npages = be32toh(npages);
        first = be64toh(first);
        data_offset = be64toh(data_offset);
        /* as pyvmm_crcindex_apply accepted them; checked again: no read outside the stream */
        if (npages == 0 || data_offset < stream_start || data_offset > stream_end ||
            (u64)(npages - 1) > (stream_end - stream_start) / stride ||
            (u64)(npages - 1) * stride + page_size > stream_end - data_offset) {
            err->run = i;
            free(extents);
            return PYVMM_CRCINDEX_BAD_RECORD;
        }
        extents[n].start = data_offset;
        extents[n].end = data_offset + (u64)(npages - 1) * stride + page_size;
        extents[n].header = first * page_size | PAGE_FLAGS_CONTINUE_PAGE;
        n++;
    }
    int rc = check_gaps(fd, extents, n, stream_start, stream_end, gap_crcs, ngap_crcs,
                        skip_headers, out, last, err);
    free(extents);
    return rc;
}

int pyvmm_crcindex_gaps(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                        pyvmm_u64 page_size, pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                        const unsigned int *gap_crcs, pyvmm_u64 ngap_crcs, int skip_headers,
                        struct pyvmm_crcindex_error *err) {
    return gaps(fd, records, nrecords, page_size, stream_start, stream_end, gap_crcs, ngap_crcs,
                skip_headers, NULL, NULL, err);
}

int pyvmm_crcindex_gap_crcs(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                            pyvmm_u64 page_size, pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                            unsigned int *out, pyvmm_u64 nout, pyvmm_u64 *last_gap,
                            struct pyvmm_crcindex_error *err) {
    return gaps(fd, records, nrecords, page_size, stream_start, stream_end, NULL, nout, 0, out,
                last_gap, err);
}

#define PAGE_LIST 48 /* page pointers handed to the CRC code at once (a multiple of 3) */

int pyvmm_crcindex_ram_crcs(const unsigned char *records, pyvmm_u64 nrecords, unsigned nblocks,
                            void *const *bases, const pyvmm_u64 *block_pages,
                            pyvmm_u64 page_size, unsigned int *out, pyvmm_u64 nout,
                            struct pyvmm_crcindex_error *err) {
    memset(err, 0, sizeof *err);
    const void *list[PAGE_LIST];
    unsigned listed = 0;
    u64 position = 0, flushed = 0;
    for (u64 i = 0; i < nrecords; i++) {
        const struct pyvmm_index_record rec = pyvmm_index_record(records + i * RECORD_SIZE);
        if (rec.flags & RUN_ZERO)
            continue;
        const unsigned block = rec.block;
        const u64 npages = rec.npages, first = rec.first;
        err->run = i;
        if (block >= nblocks || first > block_pages[block] ||
            npages > block_pages[block] - first || npages > nout - position)
            return PYVMM_CRCINDEX_BAD_RECORD;
        const unsigned char *base = (const unsigned char *)bases[block] + first * page_size;
        if (npages >= PAGE_LIST) { /* a long run: its pages lie next to each other */
            if (listed) {
                pyvmm_crc32c_page_list(list, listed, page_size, out + flushed);
                listed = 0;
            }
            pyvmm_crc32c_pages(base, page_size, npages, NULL, out + position);
            position += npages;
            flushed = position;
            continue;
        }
        for (u64 k = 0; k < npages; k++) {
            list[listed++] = base + k * page_size;
            if (listed == PAGE_LIST) {
                pyvmm_crc32c_page_list(list, listed, page_size, out + flushed);
                flushed += listed;
                listed = 0;
            }
        }
        position += npages;
    }
    if (listed)
        pyvmm_crc32c_page_list(list, listed, page_size, out + flushed);
    return position == nout ? 0 : PYVMM_CRCINDEX_COUNTS;
}

int pyvmm_crcindex_gather(const unsigned char *records, pyvmm_u64 nrecords, unsigned nblocks,
                          const unsigned int *const *block_crcs, const pyvmm_u64 *block_pages,
                          unsigned int *out, pyvmm_u64 nout, struct pyvmm_crcindex_error *err) {
    memset(err, 0, sizeof *err);
    u64 position = 0;
    for (u64 i = 0; i < nrecords; i++) {
        const struct pyvmm_index_record rec = pyvmm_index_record(records + i * RECORD_SIZE);
        if (rec.flags & RUN_ZERO)
            continue;
        err->run = i;
        if (rec.block >= nblocks || block_crcs[rec.block] == NULL ||
            rec.first > block_pages[rec.block] || rec.npages > block_pages[rec.block] - rec.first ||
            rec.npages > nout - position)
            return PYVMM_CRCINDEX_BAD_RECORD;
        memcpy(out + position, block_crcs[rec.block] + rec.first, rec.npages * sizeof *out);
        position += rec.npages;
    }
    return position == nout ? 0 : PYVMM_CRCINDEX_COUNTS;
}

unsigned int pyvmm_crcindex_digest(unsigned nblocks, unsigned int *const *tables,
                                   const pyvmm_u64 *block_pages) {
    unsigned int crc = 0;
    for (unsigned b = 0; b < nblocks; b++) {
#if __BYTE_ORDER == __LITTLE_ENDIAN
        crc = pyvmm_crc32c(crc, tables[b], block_pages[b] * 4);
#else
        uint32_t le[1024];
        for (u64 p = 0; p < block_pages[b];) {
            u64 n = block_pages[b] - p < 1024 ? block_pages[b] - p : 1024;
            for (u64 k = 0; k < n; k++)
                le[k] = htole32(tables[b][p + k]);
            crc = pyvmm_crc32c(crc, le, n * 4);
            p += n;
        }
#endif
    }
    return crc;
}
