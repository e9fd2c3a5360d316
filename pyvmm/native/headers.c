/* The record headers in front of the data pages a page index lists (pyvmm.migration.pageio,
 * check_data_record_headers): every reader of a checkpoint file checks them whatever pages it
 * reads, so that indexed, lazy, partial and sequential reloads refuse the same damage. A chain
 * holds a run per scattered page: this loop was 60 % of an indexed reload in Python. */
#define _GNU_SOURCE
#include <endian.h>
#include <string.h>

#include "native.h"

typedef pyvmm_u64 u64;

#define FLAG_PAGE 0x08u
#define FLAG_CONTINUE 0x20u
#define INDEX_ZERO 0x01u
#define INDEX_COMPRESSED 0x02u
#define FLAG_COMPRESSED 0x400u /* compress.c */
#define INDEX_RECORD 24u

static u64 load_be64(const unsigned char *p) {
    u64 v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

static int fail(struct pyvmm_header_error *err, u64 record, u64 page, u64 offset, u64 found) {
    err->record = record;
    err->page = page;
    err->offset = offset;
    err->found = found;
    return 1;
}

int pyvmm_check_record_headers(const unsigned char *map, pyvmm_u64 map_base, pyvmm_u64 map_len,
                               pyvmm_u64 stream_start, const unsigned char *records,
                               pyvmm_u64 nrecords, const unsigned char *const *names,
                               const unsigned char *name_lens, unsigned nblocks,
                               pyvmm_u64 page_size, struct pyvmm_header_error *err) {
    u64 map_end = map_base + map_len, stride = page_size + 8;
    for (u64 n = 0; n < nrecords; n++) {
        const unsigned char *r = records + n * INDEX_RECORD;
        unsigned block = (unsigned)r[0] << 8 | r[1];
        u64 npages = (u64)r[4] << 24 | (u64)r[5] << 16 | (u64)r[6] << 8 | r[7];
        u64 first = load_be64(r + 8), data = load_be64(r + 16);
        if (r[2] & INDEX_ZERO)
            continue;
        /* a compressed run: its first record here, the others as it is inflated (compress.c) */
        int packed = (r[2] & INDEX_COMPRESSED) != 0;
        u64 kind = packed ? FLAG_COMPRESSED : FLAG_PAGE;
        /* the caller checked every run against the stream and its block; this is a guard */
        if (block >= nblocks || npages == 0 || data < stream_start || data < map_base + 8 ||
            (packed ? data + 2 > map_end : data + (npages - 1) * stride + page_size > map_end))
            return fail(err, n, first, data, 0);
        /* a run's first page: CONTINUE, or the flag + u8 length + the block's name */
        u64 h = data - 8;
        u64 found = load_be64(map + (h - map_base));
        if (!(h >= stream_start && found == (first * page_size | kind | FLAG_CONTINUE))) {
            u64 named = 1 + name_lens[block];
            int ok = h >= stream_start + named && h - named >= map_base;
            if (ok) {
                const unsigned char *at = map + (h - named - map_base);
                ok = load_be64(at) == (first * page_size | kind) &&
                     at[8] == name_lens[block] && memcmp(at + 9, names[block], name_lens[block]) == 0;
            }
            if (!ok)
                return fail(err, n, first, h, found);
        }
        if (packed)
            continue;
        const unsigned char *p = map + (data - map_base) + page_size;
        for (u64 k = 1; k < npages; k++, p += stride) {
            u64 want = (first + k) * page_size | FLAG_PAGE | FLAG_CONTINUE;
            u64 got = load_be64(p);
            if (got != want)
                return fail(err, n, first + k, (u64)(p - map) + map_base, got);
        }
    }
    return 0;
}
