/* RAM page records of a QEMU migration stream, written from and read into guest RAM in one call.
 *
 * The C half of pyvmm.migration.pageio. Saving a block means one pwritev per batch of records,
 * the page bytes taken straight from guest RAM and only the record headers built here; loading a
 * run of page records is one preadv per batch whose iovecs alternate between guest RAM (the page
 * bytes) and a scratch array (the next record's header, checked afterwards). No Python object is
 * touched, so cffi calls these functions with the GIL released and the vCPU thread runs meanwhile.
 *
 * Record layout (QEMU RAM section, big-endian): be64 (offset_in_block | flags), then for a record
 * without CONTINUE `u8 len, idstr`, then the payload: one fill byte for ZERO, the page for PAGE.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

typedef pyvmm_u64 u64;

#define PAGE 4096u
#define FLAG_ZERO 0x02u
#define FLAG_PAGE 0x08u
#define FLAG_CONTINUE 0x20u
#define HEADER 8u
#define PAGE_RECORD (HEADER + PAGE) /* a PAGE record with CONTINUE: the stride inside a run */
#define MAX_RECORD_HEADER (HEADER + 1u + 255u + 1u) /* be64, u8 len, idstr, fill byte */
/* ... or be64, u8 len, idstr, be16 length, a compressed page's frame */
#define MAX_RECORD_BYTES (HEADER + 1u + 255u + 2u + PYVMM_COMPRESSED_MAX)

/* IOV_MAX is 1024 on Linux; a batch of 2 iovecs per data page is then 2 MiB of pages, enough
 * for the syscall cost to vanish next to the copy. */
#define BATCH_IOVS 1024
/* Record headers (and compressed pages) of one batch. Consecutive zero records share one
 * iovec, so a long zero run fills this rather than the iovec array. */
#define SCRATCH_BYTES (64u << 10)

static inline int test_bit(const u64 *words, u64 bit) {
    /* atomic like every access to bitmap words (bitmap.c), though callers pass a private copy */
    return (__atomic_load_n(&words[bit / 64], __ATOMIC_ACQUIRE) >> (bit % 64)) & 1;
}

static inline void put_be64(unsigned char *dst, u64 value) {
    u64 be = htobe64(value);
    memcpy(dst, &be, sizeof be);
}

/* Step past `done` bytes of an iovec array after a short pwritev/preadv. */
static void iov_advance(struct iovec **iovp, int *cntp, size_t done) {
    struct iovec *iov = *iovp;
    int cnt = *cntp;
    while (cnt > 0 && done >= iov->iov_len) {
        done -= iov->iov_len;
        iov++;
        cnt--;
    }
    if (cnt > 0) {
        iov->iov_base = (char *)iov->iov_base + done;
        iov->iov_len -= done;
    }
    *iovp = iov;
    *cntp = cnt;
}

/* Writes all of iov[0..cnt) at `offset`, retrying after EINTR and short writes (which consume
 * the iovecs it advances over). Adds the bytes that reached the file to *written. 0 or -errno. */
static int pwritev_all(int fd, struct iovec *iov, int cnt, u64 offset, u64 *written) {
    while (cnt > 0) {
        ssize_t n = pwritev(fd, iov, cnt, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO; /* a regular file never takes nothing without an error */
        *written += (u64)n;
        offset += (u64)n;
        iov_advance(&iov, &cnt, (size_t)n);
    }
    return 0;
}

/* A batch under construction: iovecs plus the scratch bytes holding their record headers. */
struct write_batch {
    struct iovec iov[BATCH_IOVS];
    int cnt;
    size_t scratch_used;
    u64 bytes; /* bytes the batch will write */
    unsigned char scratch[SCRATCH_BYTES];
};

/* Appends `len` header bytes from scratch[start..]: merged into the previous iovec when that one
 * ends exactly there (runs of zero records, a data page's header after zero records). */
static void batch_add_scratch(struct write_batch *b, size_t start, size_t len) {
    unsigned char *p = b->scratch + start;
    if (b->cnt > 0) {
        struct iovec *last = &b->iov[b->cnt - 1];
        if ((unsigned char *)last->iov_base + last->iov_len == p) {
            last->iov_len += len;
            b->bytes += len;
            return;
        }
    }
    b->iov[b->cnt].iov_base = p;
    b->iov[b->cnt].iov_len = len;
    b->cnt++;
    b->bytes += len;
}

static int batch_flush(int fd, struct write_batch *b, u64 *offset, u64 *written) {
    int rc = 0;
    if (b->cnt > 0) {
        u64 before = *written;
        rc = pwritev_all(fd, b->iov, b->cnt, *offset, written);
        *offset += *written - before;
    }
    b->cnt = 0;
    b->scratch_used = 0;
    b->bytes = 0;
    return rc;
}

/* Extends the last run with `page` or starts a new one; -EOVERFLOW when `max_runs` are taken.
 * A data or compressed run needs its records to follow each other in the file too: they do,
 * since the records of one call are contiguous and a record with CONTINUE is never a first
 * record. `offset`: the page's data (data run) or its record's be16 length (compressed run). */
static int note_run(struct pyvmm_page_run *runs, u64 *nruns, u64 max_runs, u64 page, int kind,
                    u64 offset) {
    if (*nruns > 0) {
        struct pyvmm_page_run *last = &runs[*nruns - 1];
        if (last->kind == kind && last->first_page + last->npages == page) {
            last->npages++;
            return 0;
        }
    }
    if (*nruns == max_runs)
        return -EOVERFLOW;
    struct pyvmm_page_run *run = &runs[(*nruns)++];
    run->first_page = page;
    run->npages = 1;
    run->data_offset = kind == PYVMM_RUN_ZERO ? 0 : offset;
    run->kind = kind;
    return 0;
}

int pyvmm_write_page_records(int fd, pyvmm_u64 file_offset, const void *base,
                             pyvmm_u64 npages, const pyvmm_u64 *select,
                             const unsigned char *idstr, unsigned idstr_len, int first_has_idstr,
                             int detect_zero, int level, struct pyvmm_page_run *runs,
                             pyvmm_u64 max_runs, struct pyvmm_page_write_stats *stats) {
    memset(stats, 0, sizeof *stats);
    if (idstr_len > 255 || (level != 0 && !pyvmm_level_valid(level)))
        return -EINVAL;
    /* heap, not stack: 80 KiB is much of a small thread stack */
    struct write_batch *b = malloc(sizeof *b);
    struct pyvmm_page_encoder *enc = level ? pyvmm_encoder_new(level) : NULL;
    if (!b || (level && !enc)) {
        free(b);
        pyvmm_encoder_free(enc);
        return -ENOMEM;
    }
    b->cnt = 0;
    b->scratch_used = 0;
    b->bytes = 0;

    const unsigned char *mem = base;
    u64 offset = file_offset; /* file offset where the current batch starts */
    int need_idstr = first_has_idstr;
    int rc = 0;
    u64 page = 0;
    while ((page = pyvmm_bitmap_find_next_set(select, npages, page)) < npages) {
        /* the slow path of the scan is the gap between runs; inside a run test bits directly */
        for (; page < npages && test_bit(select, page); page++) {
            const unsigned char *src = mem + page * PAGE;
            int zero = detect_zero && pyvmm_page_is_zero(src, PAGE);
            if (b->cnt + 2 > BATCH_IOVS || b->scratch_used + MAX_RECORD_BYTES > SCRATCH_BYTES) {
                rc = batch_flush(fd, b, &offset, &stats->bytes_written);
                if (rc)
                    goto out;
            }
            size_t start = b->scratch_used;
            unsigned char *h = b->scratch + start;
            size_t hlen = HEADER + (need_idstr ? 1u + idstr_len : 0u);
            /* a page that compresses goes into the scratch after its header */
            size_t packed = enc && !zero ? pyvmm_encoder_compress(enc, src, h + hlen + 2) : 0;
            u64 flags = zero     ? FLAG_ZERO
                        : packed ? PYVMM_REC_COMPRESSED
                                 : FLAG_PAGE;
            put_be64(h, page * PAGE | flags | (need_idstr ? 0 : FLAG_CONTINUE));
            if (need_idstr) {
                h[HEADER] = (unsigned char)idstr_len;
                memcpy(h + HEADER + 1, idstr, idstr_len);
                need_idstr = 0;
            }
            if (zero) {
                h[hlen++] = 0; /* the fill byte */
            } else if (packed) {
                h[hlen] = (unsigned char)(packed >> 8);
                h[hlen + 1] = (unsigned char)packed;
            }
            u64 data_at = offset + b->bytes + hlen; /* the page's bytes, or the frame's length */
            if (packed)
                hlen += 2 + packed;
            b->scratch_used += hlen;
            batch_add_scratch(b, start, hlen);
            if (zero) {
                rc = note_run(runs, &stats->nruns, max_runs, page, PYVMM_RUN_ZERO, 0);
                if (rc)
                    goto out;
                stats->zero_pages++;
            } else if (packed) {
                rc = note_run(runs, &stats->nruns, max_runs, page, PYVMM_RUN_COMPRESSED, data_at);
                if (rc)
                    goto out;
                stats->data_pages++;
                stats->compressed_pages++;
                stats->compressed_bytes += packed;
            } else {
                rc = note_run(runs, &stats->nruns, max_runs, page, PYVMM_RUN_DATA, data_at);
                if (rc)
                    goto out;
                b->iov[b->cnt].iov_base = (void *)src; /* zero-copy: pwritev reads guest RAM */
                b->iov[b->cnt].iov_len = PAGE;
                b->cnt++;
                b->bytes += PAGE;
                stats->data_pages++;
            }
        }
    }
    rc = batch_flush(fd, b, &offset, &stats->bytes_written);
out:
    free(b);
    pyvmm_encoder_free(enc);
    return rc;
}

/* One page index record (native.h); -EOVERFLOW when the block or the run length does not fit. */
static int put_index_record(unsigned char *out, u64 block, int kind, u64 npages, u64 first_page,
                            u64 data_offset) {
    if (block > UINT16_MAX || npages > UINT32_MAX)
        return -EOVERFLOW;
    const uint16_t be_block = htobe16((uint16_t)block);
    const uint32_t be_npages = htobe32((uint32_t)npages);
    memcpy(out, &be_block, 2);
    out[2] = (unsigned char)kind; /* PYVMM_RUN_* are the index's flags */
    out[3] = 0;
    memcpy(out + 4, &be_npages, 4);
    put_be64(out + 8, first_page);
    put_be64(out + 16, kind == PYVMM_RUN_ZERO ? 0 : data_offset);
    return 0;
}

int pyvmm_index_records_from_runs(const struct pyvmm_page_run *runs, pyvmm_u64 nruns,
                                  unsigned block, unsigned char *out) {
    for (u64 i = 0; i < nruns; i++, out += PYVMM_INDEX_RECORD) {
        const struct pyvmm_page_run *r = &runs[i];
        if (put_index_record(out, block, r->kind, r->npages, r->first_page, r->data_offset))
            return -EOVERFLOW;
    }
    return 0;
}

int pyvmm_index_records_from_live_runs(const struct pyvmm_live_run *runs, pyvmm_u64 nruns,
                                       unsigned char *out) {
    for (u64 i = 0; i < nruns; i++, out += PYVMM_INDEX_RECORD) {
        const struct pyvmm_live_run *r = &runs[i];
        if (put_index_record(out, r->block, r->kind, r->npages, r->first_page, r->data_offset))
            return -EOVERFLOW;
    }
    return 0;
}

/* RAM order of two records: block, then first page (big-endian, so bytes compare as numbers). */
static int record_order(const void *a, const void *b) {
    const unsigned char *x = a, *y = b;
    int c = memcmp(x, y, 2);
    return c ? c : memcmp(x + 8, y + 8, 8);
}

void pyvmm_index_records_sort(unsigned char *records, pyvmm_u64 nrecords) {
    qsort(records, (size_t)nrecords, PYVMM_INDEX_RECORD, record_order);
}

/* Checks every run against the block and the file before anything is read or written. */
static int check_runs(int fd, u64 npages, const struct pyvmm_page_run *runs, u64 nruns,
                      struct pyvmm_page_read_error *err) {
    int have_data = 0;
    for (u64 i = 0; i < nruns && !have_data; i++)
        have_data = runs[i].kind != PYVMM_RUN_ZERO;
    u64 file_size = 0;
    if (have_data) {
        struct stat st;
        if (fstat(fd, &st) < 0)
            return -errno;
        file_size = (u64)st.st_size;
    }
    for (u64 i = 0; i < nruns; i++) {
        const struct pyvmm_page_run *r = &runs[i];
        err->run = i;
        err->offset = r->data_offset;
        if (r->npages == 0 || r->first_page > npages || r->npages > npages - r->first_page)
            return PYVMM_PAGEIO_RUN_OUTSIDE_BLOCK;
        if (r->kind == PYVMM_RUN_ZERO)
            continue;
        if (r->kind == PYVMM_RUN_COMPRESSED) { /* its length shows as it is read */
            if (r->data_offset >= file_size) {
                err->offset = file_size;
                return PYVMM_PAGEIO_RUN_OUTSIDE_FILE;
            }
            continue;
        }
        if (r->kind != PYVMM_RUN_DATA)
            return -EINVAL;
        /* the run's bytes: npages pages with the 8-byte headers between them */
        u64 span, end;
        if (__builtin_mul_overflow(r->npages, (u64)PAGE_RECORD, &span) ||
            __builtin_add_overflow(r->data_offset, span - HEADER, &end) || end > file_size ||
            end > (u64)INT64_MAX) {
            err->offset = file_size;
            return PYVMM_PAGEIO_RUN_OUTSIDE_FILE;
        }
    }
    return 0;
}

int pyvmm_preadv_all(int fd, struct iovec *iov, int cnt, u64 offset,
                     struct pyvmm_page_read_error *err, u64 *calls) {
    while (cnt > 0) {
        ssize_t n = preadv(fd, iov, cnt, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err->offset = offset;
            return -errno;
        }
        if (calls)
            (*calls)++;
        if (n == 0) {
            err->offset = offset;
            return PYVMM_PAGEIO_TRUNCATED;
        }
        offset += (u64)n;
        iov_advance(&iov, &cnt, (size_t)n);
    }
    return 0;
}

/* Zeroes the pages of a zero run that are not zero already: a page never touched reads as zero
 * (through the shared zero page) and stays unallocated, where a memset would allocate it. */
static void clear_pages(unsigned char *mem, u64 first, u64 count) {
    for (u64 p = first; p < first + count; p++) {
        unsigned char *page = mem + p * PAGE;
        if (!pyvmm_page_is_zero(page, PAGE))
            memset(page, 0, PAGE);
    }
}

static int read_data_run(int fd, unsigned char *mem, const struct pyvmm_page_run *r,
                         struct pyvmm_page_read_error *err) {
    struct iovec iov[BATCH_IOVS];
    u64 headers[BATCH_IOVS / 2];
    u64 k = 0; /* pages of the run read so far */
    while (k < r->npages) {
        u64 batch_first = k;
        u64 offset = r->data_offset + k * PAGE_RECORD; /* this batch's first page data */
        int cnt = 0, nh = 0;
        /* pairs (page k, header of page k+1); the run's last page has no header after it */
        for (; k < r->npages && cnt + 2 <= BATCH_IOVS; k++) {
            iov[cnt].iov_base = mem + (r->first_page + k) * PAGE;
            iov[cnt].iov_len = PAGE;
            cnt++;
            if (k + 1 < r->npages) {
                iov[cnt].iov_base = &headers[nh++];
                iov[cnt].iov_len = HEADER;
                cnt++;
            }
        }
        int rc = pyvmm_preadv_all(fd, iov, cnt, offset, err, NULL);
        if (rc)
            return rc;
        for (int h = 0; h < nh; h++) {
            u64 page = r->first_page + batch_first + (u64)h + 1;
            if (headers[h] != htobe64(page * PAGE | FLAG_PAGE | FLAG_CONTINUE)) {
                err->offset = offset + (u64)h * PAGE_RECORD + PAGE;
                err->page = page;
                err->found = be64toh(headers[h]);
                return PYVMM_PAGEIO_BAD_HEADER;
            }
        }
    }
    return 0;
}

int pyvmm_read_page_runs(int fd, void *base, pyvmm_u64 npages, const struct pyvmm_page_run *runs,
                         pyvmm_u64 nruns, struct pyvmm_page_read_error *err) {
    memset(err, 0, sizeof *err);
    int rc = check_runs(fd, npages, runs, nruns, err);
    if (rc)
        return rc;
    unsigned char *mem = base;
    struct pyvmm_inflater in = {.buf = NULL};
    for (u64 i = 0; i < nruns && rc == 0; i++) {
        const struct pyvmm_page_run *r = &runs[i];
        err->run = i;
        if (r->kind == PYVMM_RUN_ZERO) {
            clear_pages(mem, r->first_page, r->npages);
        } else if (r->kind == PYVMM_RUN_COMPRESSED) {
            if (in.buf == NULL && (rc = pyvmm_inflater_init(&in, fd, UINT64_MAX)) != 0)
                break;
            rc = pyvmm_inflate_run(&in, mem, r->first_page, r->npages, r->data_offset, NULL, 0,
                                   err, NULL);
        } else {
            rc = read_data_run(fd, mem, r, err);
        }
    }
    pyvmm_inflater_free(&in);
    return rc;
}
