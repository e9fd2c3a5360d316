/* The RAM section's page records, parsed without a Python step per record
 * (pyvmm.migration.ram_handler). An incremental increment of a guest that writes here and there
 * holds a record per page; parsing those one by one in Python cost more than reading the pages.
 *
 * The walk handles only the well-formed common case: PAGE and ZERO records of known blocks,
 * then the EOS that ends the section body. It stops, with the offset of the record, at anything
 * else (a block list, an unknown flag or block, a page outside its block, a record that runs
 * past the stream): the Python parser takes that record, so every error keeps its one message.
 *
 * Reading goes through a buffer filled by pread. With `skip`, page data is not copied to RAM
 * (the indexed or lazy reload places it) and a run the page index lists is stepped over whole;
 * without, each page is copied from the buffer to guest RAM, except that a run of several pages
 * the index lists is read straight into RAM (pyvmm_read_page_runs: one preadv, headers checked). */
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

#define FLAG_ZERO 0x02
#define FLAG_MEM_SIZE 0x04
#define FLAG_PAGE 0x08
#define FLAG_EOS 0x10
#define FLAG_CONTINUE 0x20
#define FLAG_COMPRESSED PYVMM_REC_COMPRESSED
#define KNOWN_FLAGS (FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE | FLAG_COMPRESSED)
#define HEADER 8

#define SKIP_BUFFER (64 << 10)
#define LOAD_BUFFER (256 << 10)

struct reader {
    int fd;
    unsigned char *buf;
    size_t cap;
    pyvmm_u64 at;   /* file offset of buf[0] */
    size_t len;     /* bytes valid in buf */
    pyvmm_u64 end;  /* nothing at or past it is read */
    const unsigned char *map; /* skip mode, a long stream: [map_at, end) mapped here instead */
    pyvmm_u64 map_at;
};

/* Bytes [offset, offset + need) of the file, or NULL when the stream or the file ends first
 * (*rc = 0) or reading fails (*rc = -errno). */
static const unsigned char *need(struct reader *r, pyvmm_u64 offset, size_t need, int *rc) {
    *rc = 0;
    if (r->map != NULL)
        return offset >= r->map_at && offset <= r->end && r->end - offset >= need
                   ? r->map + (offset - r->map_at)
                   : NULL;
    if (offset >= r->at && offset - r->at <= r->len && r->len - (offset - r->at) >= need)
        return r->buf + (offset - r->at);
    if (offset > r->end || r->end - offset < need)
        return NULL;
    size_t want = r->cap;
    if (r->end - offset < want)
        want = (size_t)(r->end - offset);
    size_t got = 0;
    while (got < want) {
        ssize_t n = pread(r->fd, r->buf + got, want - got, (off_t)(offset + got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *rc = -errno;
            r->len = 0;
            return NULL;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    r->at = offset;
    r->len = got;
    return got >= need ? r->buf : NULL;
}

static int is_zero(const unsigned char *p, pyvmm_u64 size) {
    const uint64_t *w = (const uint64_t *)p;
    for (pyvmm_u64 i = 0; i < size / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

struct data_run {
    pyvmm_u64 data_offset, first, npages;
    unsigned block;
};

static int by_offset(const void *a, const void *b) {
    pyvmm_u64 x = ((const struct data_run *)a)->data_offset;
    pyvmm_u64 y = ((const struct data_run *)b)->data_offset;
    return x < y ? -1 : x > y;
}

/* The index's data runs sorted by data offset (*count of them); NULL with *count 0 for none. */
static struct data_run *data_runs(const unsigned char *index, pyvmm_u64 nindex,
                                  pyvmm_u64 *count) {
    *count = 0;
    if (nindex == 0)
        return NULL;
    struct data_run *runs = malloc(nindex * sizeof *runs);
    if (runs == NULL)
        return NULL;
    for (pyvmm_u64 i = 0; i < nindex; i++) {
        const struct pyvmm_index_record rec = pyvmm_index_record(index + i * PYVMM_INDEX_RECORD);
        if (rec.flags & (PYVMM_INDEX_ZERO | PYVMM_INDEX_COMPRESSED))
            continue;
        runs[(*count)++] = (struct data_run){rec.data_offset, rec.first, rec.npages, rec.block};
    }
    int sorted = 1; /* as pyvmm writes them: a sort would cost more than the walk */
    for (pyvmm_u64 i = 1; i < *count && sorted; i++)
        sorted = runs[i - 1].data_offset <= runs[i].data_offset;
    if (!sorted)
        qsort(runs, *count, sizeof *runs, by_offset);
    return runs;
}

/* The index's zero runs, sorted by block then first page: a ZERO record of the stream must name
 * a page one of them lists (the index-driven readers take zero pages from the index alone). */
struct zero_run {
    pyvmm_u64 first, npages;
    unsigned block;
};

static int by_page(const void *a, const void *b) {
    const struct zero_run *x = a, *y = b;
    if (x->block != y->block)
        return x->block < y->block ? -1 : 1;
    return x->first < y->first ? -1 : x->first > y->first;
}

static struct zero_run *zero_runs(const unsigned char *index, pyvmm_u64 nindex,
                                  pyvmm_u64 *count) {
    *count = 0;
    if (nindex == 0)
        return NULL;
    struct zero_run *runs = malloc(nindex * sizeof *runs);
    if (runs == NULL)
        return NULL;
    for (pyvmm_u64 i = 0; i < nindex; i++) {
        const struct pyvmm_index_record rec = pyvmm_index_record(index + i * PYVMM_INDEX_RECORD);
        if (rec.flags & PYVMM_INDEX_ZERO)
            runs[(*count)++] = (struct zero_run){rec.first, rec.npages, rec.block};
    }
    int sorted = 1;
    for (pyvmm_u64 i = 1; i < *count && sorted; i++)
        sorted = by_page(&runs[i - 1], &runs[i]) <= 0;
    if (!sorted)
        qsort(runs, *count, sizeof *runs, by_page);
    return runs;
}

/* Whether `page` of `block` lies in one of the sorted zero runs. */
static int listed_zero(const struct zero_run *runs, pyvmm_u64 count, unsigned block,
                       pyvmm_u64 page) {
    pyvmm_u64 lo = 0, hi = count;
    while (lo < hi) { /* the first run that starts after the page */
        pyvmm_u64 mid = lo + (hi - lo) / 2;
        if (runs[mid].block < block || (runs[mid].block == block && runs[mid].first <= page))
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return 0;
    const struct zero_run *r = &runs[lo - 1];
    return r->block == block && page - r->first < r->npages;
}

/* The indexed run whose first page's data is at `offset`, if it is `page` of `block`. */
static const struct data_run *run_at(const struct data_run *runs, pyvmm_u64 count,
                                     pyvmm_u64 *cursor, pyvmm_u64 offset, unsigned block,
                                     pyvmm_u64 page) {
    /* records come in file order, so the cursor only moves forward; a binary search when not */
    pyvmm_u64 i = *cursor;
    if (i < count && runs[i].data_offset == offset) { /* the next run, as a rule */
        *cursor = i;
        return runs[i].block == block && runs[i].first == page ? &runs[i] : NULL;
    }
    if (i < count && runs[i].data_offset > offset)
        i = 0;
    pyvmm_u64 lo = i, hi = count;
    while (lo < hi) {
        pyvmm_u64 mid = lo + (hi - lo) / 2;
        if (runs[mid].data_offset < offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    *cursor = lo;
    if (lo < count && runs[lo].data_offset == offset && runs[lo].block == block &&
        runs[lo].first == page)
        return &runs[lo];
    return NULL;
}

/* The records from w->offset on, through r; see pyvmm_ram_walk. */
static int walk_records(int fd, struct reader *r, unsigned nblocks,
                        const unsigned char *const *names, void *const *bases,
                        const pyvmm_u64 *block_pages, pyvmm_u64 page_size,
                        const struct data_run *runs, pyvmm_u64 nruns,
                        const struct zero_run *zeros, pyvmm_u64 nzeros, int skip,
                        int zero_only, struct pyvmm_ram_walk *w) {
    pyvmm_u64 cursor = 0;
    const pyvmm_u64 stride = HEADER + page_size;
    int rc = 0;
    for (;;) {
        pyvmm_u64 at = w->offset;
        const unsigned char *p = need(r, at, HEADER, &rc);
        if (p == NULL)
            break;
        uint64_t header;
        memcpy(&header, p, 8);
        header = be64toh(header);
        unsigned flags = (unsigned)(header & (page_size - 1));
        pyvmm_u64 addr = header & ~(page_size - 1);
        if (flags & ~KNOWN_FLAGS)
            break;
        if (flags & FLAG_EOS) {
            w->offset = at + HEADER;
            w->eos = 1;
            break;
        }
        if ((flags & FLAG_MEM_SIZE) || __builtin_popcount(flags & (FLAG_PAGE | FLAG_ZERO |
                                                                  FLAG_COMPRESSED)) != 1)
            break;
        pyvmm_u64 pos = at + HEADER;
        int block = w->block;
        if (!(flags & FLAG_CONTINUE)) {
            const unsigned char *n = need(r, pos, 1, &rc);
            if (n == NULL)
                break;
            unsigned len = n[0];
            n = need(r, pos, 1 + len, &rc);
            if (n == NULL)
                break;
            block = -1;
            for (unsigned b = 0; b < nblocks; b++)
                if (names[b][0] == len && memcmp(names[b] + 1, n + 1, len) == 0) {
                    block = (int)b;
                    break;
                }
            if (block < 0)
                break;
            pos += 1 + len;
        } else if (block < 0) {
            break;
        }
        pyvmm_u64 page = addr / page_size;
        if (page >= block_pages[block])
            break;
        unsigned char *dst = (unsigned char *)bases[block] + page * page_size;
        pyvmm_u64 walked = 1;
        if (flags & FLAG_ZERO) {
            const unsigned char *f = need(r, pos, 1, &rc);
            if (f == NULL)
                break;
            if ((*f && (skip || zero_only)) ||
                (zero_only && !listed_zero(zeros, nzeros, (unsigned)block, page))) {
                /* a page index lists every page of a ZERO record as zero, which the index-driven
                 * readers take for it: all readers refuse a record that says otherwise (a fill
                 * byte, or a page the index does not list as zero) */
                break;
            } else if (skip) {
                /* RAM comes from the index: nothing to do here */
            } else if (*f) {
                memset(dst, *f, page_size);
            } else if (!is_zero(dst, page_size)) {
                memset(dst, 0, page_size);
            }
            pos += 1;
        } else if (flags & FLAG_COMPRESSED) {
            const unsigned char *n = need(r, pos, 2, &rc);
            if (n == NULL)
                break;
            size_t len = (size_t)n[0] << 8 | n[1];
            if (len == 0 || len > PYVMM_COMPRESSED_MAX)
                break; /* the parser names it */
            const unsigned char *frame = need(r, pos, 2 + len, &rc);
            if (frame == NULL)
                break;
            if (!skip && pyvmm_page_inflate(frame + 2, len, dst) != 0)
                break;
            pos += 2 + len;
        } else {
            const struct data_run *run = run_at(runs, nruns, &cursor, pos, (unsigned)block, page);
            if (run != NULL && run->npages > 1 && run->first + run->npages <= block_pages[block] &&
                pos + (run->npages - 1) * stride + page_size <= w->end) {
                if (!skip) { /* straight into RAM; on any failure the caller reads it again */
                    struct pyvmm_page_run one = {run->first, run->npages, pos, 0};
                    struct pyvmm_page_read_error ignored;
                    if (pyvmm_read_page_runs(fd, bases[block], block_pages[block], &one, 1,
                                             &ignored) != 0)
                        break;
                }
                walked = run->npages;
                pos += (run->npages - 1) * stride + page_size;
            } else if (skip) {
                if (pos + page_size > w->end)
                    break;
                pos += page_size;
            } else {
                const unsigned char *data = need(r, at, (size_t)(pos - at + page_size), &rc);
                if (data == NULL)
                    break;
                memcpy(dst, data + (pos - at), page_size);
                pos += page_size;
            }
        }
        w->block = block;
        w->offset = pos;
        w->pages += walked;
    }
    return rc;
}

int pyvmm_ram_walk(int fd, unsigned nblocks, const unsigned char *const *names,
                   void *const *bases, const pyvmm_u64 *block_pages, pyvmm_u64 page_size,
                   const unsigned char *index, pyvmm_u64 nindex, int skip,
                   struct pyvmm_ram_walk *w) {
    w->eos = 0;
    w->pages = 0;
    struct reader r = {fd, NULL, skip ? SKIP_BUFFER : LOAD_BUFFER, 0, 0, w->end, NULL, 0};
    if (r.cap < page_size + HEADER + 256)
        r.cap = page_size + HEADER + 256;
    r.buf = malloc(r.cap);
    pyvmm_u64 nruns = 0, nzeros = 0;
    struct data_run *runs = data_runs(index, nindex, &nruns);
    struct zero_run *zeros = zero_runs(index, nindex, &nzeros);
    if (r.buf == NULL || (nindex > 0 && (runs == NULL || zeros == NULL))) {
        free(r.buf);
        free(runs);
        free(zeros);
        return -ENOMEM;
    }
    /* Skipping, only the record headers are read, one a page in a section of scattered
     * pages: a pread through 64 KiB copies every page's data along (7 ms for the last
     * increment of a 16-increment chain, before a lazy reload's first instruction). A long
     * stream is mapped instead and only the headers are touched. A file cut short under the
     * mapping raises SIGBUS: the walk starts over, reading with pread, which stops at the
     * record the file cuts (and the parser names it). */
    const pyvmm_u64 map_at = w->offset & ~(pyvmm_u64)(PYVMM_MAP_ALIGN - 1);
    const pyvmm_u64 map_len = w->end > map_at ? w->end - map_at : 0;
    void *map = skip ? pyvmm_map_file(fd, map_at, map_len) : MAP_FAILED;
    struct pyvmm_map_guard guard;
    const struct pyvmm_ram_walk start = *w;
    if (map != MAP_FAILED) {
        if (sigsetjmp(guard.env, 1)) { /* the guard is cleared: walk again, reading */
            munmap(map, (size_t)map_len);
            map = MAP_FAILED;
            pyvmm_map_count_cut_short();
            r.map = NULL;
            *w = start;
        } else {
            r.map = map;
            r.map_at = map_at;
            guard.base = (pyvmm_u64)(uintptr_t)map;
            guard.end = guard.base + map_len;
            pyvmm_map_guard = &guard;
        }
    }
    int rc = walk_records(fd, &r, nblocks, names, bases, block_pages, page_size, runs, nruns,
                          zeros, nzeros, skip, nindex > 0, w);
    if (map != MAP_FAILED) {
        pyvmm_map_guard = NULL;
        munmap(map, (size_t)map_len);
    }
    free(r.buf);
    free(runs);
    free(zeros);
    return rc;
}
