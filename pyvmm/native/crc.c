/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of buffers, guest pages and page records
 * in a file: the C half of pyvmm.migration.checksum.
 *
 * Two implementations with the same results: the SSE4.2 `crc32` instruction (x86-64, chosen at
 * run time with __builtin_cpu_supports) and a portable table-driven one (slicing-by-8). Per-page
 * CRCs are independent, so the hardware path runs three pages at once: the instruction has a
 * latency of 3 cycles and a throughput of 1, so one dependency chain leaves 2/3 of it idle.
 *
 * The file functions read with pread in large chunks into a private buffer; nothing here touches
 * a Python object, so cffi runs them with the GIL released.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "native.h"

typedef pyvmm_u64 u64;

#define POLY 0x82F63B78u
#define CHUNK (256u << 10) /* bytes read per pread: the buffer stays in L2 for the CRC pass */

static uint32_t table[8][256];
static int use_hw;

__attribute__((constructor)) static void crc_init(void) {
    for (unsigned n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        table[0][n] = c;
    }
    for (unsigned n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++)
            table[t][n] = (table[t - 1][n] >> 8) ^ table[0][table[t - 1][n] & 0xff];
#if defined(__x86_64__)
    __builtin_cpu_init();
    use_hw = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

/* ---- portable: slicing-by-8 on the inverted register ---- */

static uint32_t sw_update(uint32_t c, const unsigned char *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w = htole64(w) ^ c;
        c = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^
            table[4][(w >> 24) & 0xff] ^ table[3][(w >> 32) & 0xff] ^
            table[2][(w >> 40) & 0xff] ^ table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
    return c;
}

/* ---- SSE4.2 ---- */

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t hw_update(uint32_t c, const unsigned char *p,
                                                           size_t n) {
    uint64_t c64;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi(c, *p++);
        n--;
    }
    c64 = c;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}

/* Three independent registers over three buffers of n bytes each (n a multiple of 8). */
__attribute__((target("sse4.2"))) static void hw_update3(uint32_t *c, const unsigned char *a,
                                                        const unsigned char *b,
                                                        const unsigned char *d, size_t n) {
    uint64_t x = c[0], y = c[1], z = c[2];
    for (size_t i = 0; i < n; i += 8) {
        uint64_t wa, wb, wd;
        memcpy(&wa, a + i, 8);
        memcpy(&wb, b + i, 8);
        memcpy(&wd, d + i, 8);
        x = __builtin_ia32_crc32di(x, wa);
        y = __builtin_ia32_crc32di(y, wb);
        z = __builtin_ia32_crc32di(z, wd);
    }
    c[0] = (uint32_t)x;
    c[1] = (uint32_t)y;
    c[2] = (uint32_t)z;
}
#endif

static uint32_t update(uint32_t c, const unsigned char *p, size_t n) {
#if defined(__x86_64__)
    if (use_hw)
        return hw_update(c, p, n);
#endif
    return sw_update(c, p, n);
}

unsigned int pyvmm_crc32c(unsigned int crc, const void *buf, pyvmm_u64 length) {
    return ~update(~crc, buf, length);
}

int pyvmm_crc32c_hardware(void) { return use_hw; }

int pyvmm_crc32c_set_hardware(int on) {
    int before = use_hw;
#if defined(__x86_64__)
    use_hw = on && __builtin_cpu_supports("sse4.2") != 0;
#else
    (void)on;
#endif
    return before;
}

/* CRC of `count` whole pages of page_size bytes, `stride` bytes apart from `first`, to out[]. */
static void crc_pages(const unsigned char *first, u64 stride, u64 count, u64 page_size,
                      unsigned int *out) {
    u64 k = 0;
#if defined(__x86_64__)
    if (use_hw && page_size % 8 == 0) {
        for (; k + 3 <= count; k += 3) {
            uint32_t c[3] = {~0u, ~0u, ~0u};
            const unsigned char *p = first + k * stride;
            hw_update3(c, p, p + stride, p + 2 * stride, page_size);
            out[k] = ~c[0];
            out[k + 1] = ~c[1];
            out[k + 2] = ~c[2];
        }
    }
#endif
    for (; k < count; k++)
        out[k] = ~update(~0u, first + k * stride, page_size);
}

void pyvmm_crc32c_page_list(const void *const *pages, pyvmm_u64 npages, pyvmm_u64 page_size,
                            unsigned int *out) {
    u64 k = 0;
#if defined(__x86_64__)
    if (use_hw && page_size % 8 == 0) {
        for (; k + 3 <= npages; k += 3) {
            uint32_t c[3] = {~0u, ~0u, ~0u};
            hw_update3(c, pages[k], pages[k + 1], pages[k + 2], page_size);
            out[k] = ~c[0];
            out[k + 1] = ~c[1];
            out[k + 2] = ~c[2];
        }
    }
#endif
    for (; k < npages; k++)
        out[k] = ~update(~0u, pages[k], page_size);
}

void pyvmm_crc32c_pages(const void *base, pyvmm_u64 page_size, pyvmm_u64 npages,
                        const pyvmm_u64 *populated, unsigned int *out) {
    const unsigned char *mem = base;
    unsigned int zero = 0;
    u64 p = 0;
    if (populated == NULL) {
        crc_pages(mem, page_size, npages, page_size, out);
        return;
    }
    {
        /* the CRC of a zero page, for pages never populated (they read as zero) */
        static const unsigned char zeros[4096];
        uint32_t c = ~0u;
        for (u64 left = page_size; left;) {
            u64 n = left < sizeof zeros ? left : sizeof zeros;
            c = update(c, zeros, n);
            left -= n;
        }
        zero = ~c;
    }
    while (p < npages) {
        /* a stretch of pages with the same populated state */
        int set = (__atomic_load_n(&populated[p / 64], __ATOMIC_ACQUIRE) >> (p % 64)) & 1;
        u64 end = p + 1;
        while (end < npages &&
               (int)((__atomic_load_n(&populated[end / 64], __ATOMIC_ACQUIRE) >> (end % 64)) & 1) ==
                   set)
            end++;
        if (set)
            crc_pages(mem + p * page_size, page_size, end - p, page_size, out + p);
        else
            for (u64 k = p; k < end; k++)
                out[k] = zero;
        p = end;
    }
}

/* ---- reading a file in chunks ---- */

struct reader {
    int fd;
    unsigned char *buf;
    u64 cap;
    u64 start; /* file offset of buf[0] */
    u64 len;   /* valid bytes in buf */
    u64 end;   /* never read at or past this offset */
};

/* Make [pos, pos + min(want, ...)) available: returns a pointer to pos and sets *avail (> 0), or
 * NULL with *rc = -errno or PYVMM_CRC_TRUNCATED. `ahead`: read a whole chunk, not just `want`. */
static const unsigned char *reader_at(struct reader *r, u64 pos, u64 want, int ahead, u64 *avail,
                                      int *rc) {
    if (pos >= r->start && pos < r->start + r->len) {
        u64 have = r->start + r->len - pos;
        *avail = have < want ? have : want;
        return r->buf + (pos - r->start);
    }
    u64 n = ahead ? r->cap : (want < r->cap ? want : r->cap);
    if (n > r->end - pos)
        n = r->end - pos;
    u64 done = 0;
    while (done < n) {
        ssize_t got = pread(r->fd, r->buf + done, n - done, (off_t)(pos + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            *rc = -errno;
            return NULL;
        }
        if (got == 0)
            break;
        done += (u64)got;
    }
    if (done == 0) {
        *rc = PYVMM_CRC_TRUNCATED;
        return NULL;
    }
    r->start = pos;
    r->len = done;
    *avail = done < want ? done : want;
    return r->buf;
}

/* CRC-32C (register form, not inverted) of [pos, pos+len) of the file. */
static int reader_crc(struct reader *r, u64 pos, u64 len, int ahead, uint32_t *c) {
    while (len) {
        u64 avail;
        int rc = 0;
        const unsigned char *p = reader_at(r, pos, len, ahead, &avail, &rc);
        if (p == NULL)
            return rc;
        *c = update(*c, p, avail);
        pos += avail;
        len -= avail;
    }
    return 0;
}

/* Per-page CRCs of a data run: pages at pos + k*stride; with check_headers, the 8 bytes before
 * every page but the first must be be64((first_page + k) * page_size | PAGE | CONTINUE). */
static int reader_run(struct reader *r, u64 pos, u64 npages, u64 first_page, u64 page_size,
                      u64 stride, int check_headers, unsigned int *out,
                      struct pyvmm_crc_error *err) {
    u64 k = 0;
    while (k < npages) {
        u64 page_pos = pos + k * stride;
        if (check_headers && k > 0) {
            unsigned char hdr[8];
            u64 hpos = page_pos - 8, got = 0;
            while (got < 8) {
                u64 avail;
                int rc = 0;
                const unsigned char *p = reader_at(r, hpos + got, 8 - got, 1, &avail, &rc);
                if (p == NULL) {
                    err->offset = hpos + got;
                    return rc;
                }
                memcpy(hdr + got, p, avail);
                got += avail;
            }
            u64 be, want = (first_page + k) * page_size | 0x28u;
            memcpy(&be, hdr, 8);
            if (be64toh(be) != want) {
                err->offset = hpos;
                err->page = k;
                err->found = be64toh(be);
                return PYVMM_CRC_BAD_HEADER;
            }
        }
        /* whole pages inside the buffer: the fast path, three at a time */
        if (page_pos >= r->start && page_pos + page_size <= r->start + r->len) {
            u64 fit = (r->start + r->len - page_pos - page_size) / stride + 1;
            if (fit > npages - k)
                fit = npages - k;
            if (check_headers && fit > 1) {
                /* headers of the following pages in the buffer are checked here too */
                const unsigned char *base = r->buf + (page_pos - r->start);
                for (u64 j = 1; j < fit; j++) {
                    u64 be, want = (first_page + k + j) * page_size | 0x28u;
                    memcpy(&be, base + j * stride - 8, 8);
                    if (be64toh(be) != want) {
                        fit = j; /* stop before it: the slow path reports it */
                        break;
                    }
                }
            }
            crc_pages(r->buf + (page_pos - r->start), stride, fit, page_size, out + k);
            k += fit;
            continue;
        }
        uint32_t c = ~0u;
        int rc = reader_crc(r, page_pos, page_size, 1, &c);
        if (rc) {
            err->offset = page_pos;
            return rc;
        }
        out[k] = ~c;
        k++;
    }
    return 0;
}

static int reader_open(struct reader *r, int fd, u64 end) {
    r->fd = fd;
    r->cap = CHUNK;
    r->buf = malloc(r->cap);
    r->start = r->len = 0;
    r->end = end;
    return r->buf ? 0 : -ENOMEM;
}

int pyvmm_crc32c_file_pages(int fd, pyvmm_u64 offset, pyvmm_u64 npages, pyvmm_u64 page_size,
                            pyvmm_u64 stride, unsigned int *out, struct pyvmm_crc_error *err) {
    struct reader r;
    memset(err, 0, sizeof *err);
    if (npages == 0)
        return 0;
    if (stride < page_size || page_size == 0)
        return -EINVAL;
    int rc = reader_open(&r, fd, offset + (npages - 1) * stride + page_size);
    if (rc)
        return rc;
    rc = reader_run(&r, offset, npages, 0, page_size, stride, 0, out, err);
    free(r.buf);
    return rc;
}

int pyvmm_crc32c_stream(int fd, pyvmm_u64 start, pyvmm_u64 length,
                        const struct pyvmm_crc_run *runs, pyvmm_u64 nruns, pyvmm_u64 page_size,
                        pyvmm_u64 stride, unsigned int *page_crcs, unsigned int *gap_crcs,
                        struct pyvmm_crc_error *err) {
    struct reader r;
    u64 end = start + length, pos = start;
    int ahead = page_crcs != NULL;
    memset(err, 0, sizeof *err);
    if (stride < page_size || page_size == 0 || end < start)
        return -EINVAL;
    /* runs sorted, inside the stream, not overlapping: checked before reading anything */
    for (u64 i = 0; i < nruns; i++) {
        const struct pyvmm_crc_run *run = &runs[i];
        if (run->npages == 0 || run->npages > length / stride + 1 || run->data_offset < pos ||
            run->data_offset > end ||
            (run->npages - 1) * stride + page_size > end - run->data_offset) {
            err->run = i;
            return PYVMM_CRC_BAD_RUNS;
        }
        pos = run->data_offset + (run->npages - 1) * stride + page_size;
    }
    int rc = reader_open(&r, fd, end);
    if (rc)
        return rc;
    pos = start;
    for (u64 i = 0; i <= nruns; i++) {
        u64 gap_end = i < nruns ? runs[i].data_offset : end;
        uint32_t c = ~0u;
        rc = reader_crc(&r, pos, gap_end - pos, ahead, &c);
        if (rc) {
            err->run = i;
            err->offset = pos;
            break;
        }
        gap_crcs[i] = ~c;
        if (i == nruns)
            break;
        const struct pyvmm_crc_run *run = &runs[i];
        if (page_crcs != NULL) {
            rc = reader_run(&r, run->data_offset, run->npages, run->first_page, page_size, stride,
                            1, page_crcs + run->out_index, err);
            if (rc) {
                err->run = i;
                break;
            }
        }
        pos = run->data_offset + (run->npages - 1) * stride + page_size;
    }
    free(r.buf);
    return rc;
}
