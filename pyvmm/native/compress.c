/* Compressed page records (the `zstd` page encoder, pyvmm.migration.encoders): a page compressed
 * with zstd on the way to the file, and a run of such records inflated into guest RAM on the way
 * back, by C alone (no Python step per page).
 *
 * Record layout (pyvmm's own, in the QEMU RAM section beside PAGE and ZERO records; big-endian):
 * be64 (page * 4096 | PYVMM_REC_COMPRESSED [| CONTINUE]), `u8 len, idstr` unless CONTINUE, then
 * be16 n and n bytes: one zstd frame (with zstd's 4-byte content checksum, without the content
 * size) that inflates to exactly the 4096 page bytes: damage to a frame is found as it is
 * inflated, which plain PAGE records only get from the checksum capability. 1 <= n <= PYVMM_COMPRESSED_MAX: a page that does not shrink to that is written
 * as an ordinary PAGE record, so a page never costs more room than plain. QEMU's loader has no
 * such record (its own compressed page, 0x100, is zlib and deprecated): a file holding one is
 * pyvmm's to reload, and `checkpoint export` says so.
 *
 * A page index lists consecutive compressed records of consecutive pages as one run with the
 * index flag PYVMM_INDEX_COMPRESSED; its data offset is the file offset of the first record's
 * be16 length (as a data run's is that of its first page's bytes). The records' lengths vary, so
 * a page of such a run is found by walking the run from its start: readers inflate whole runs.
 *
 * Compression contexts are the caller's (one per writing thread); decompression contexts are one
 * per thread, made on first use and freed when the thread ends. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#include "internal.h"

typedef pyvmm_u64 u64;

#define PAGE 4096u
#define HEADER 8u
#define FLAG_CONTINUE 0x20u
#define INFLATE_BUFFER (1u << 20)

struct pyvmm_page_encoder {
    ZSTD_CCtx *cctx;
};

struct pyvmm_page_encoder *pyvmm_encoder_new(int level) {
    if (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel() || level == 0)
        return NULL;
    struct pyvmm_page_encoder *e = malloc(sizeof *e);
    if (e == NULL)
        return NULL;
    e->cctx = ZSTD_createCCtx();
    if (e->cctx == NULL ||
        ZSTD_isError(ZSTD_CCtx_setParameter(e->cctx, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(e->cctx, ZSTD_c_checksumFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(e->cctx, ZSTD_c_contentSizeFlag, 0))) {
        ZSTD_freeCCtx(e->cctx);
        free(e);
        return NULL;
    }
    return e;
}

void pyvmm_encoder_free(struct pyvmm_page_encoder *e) {
    if (e != NULL) {
        ZSTD_freeCCtx(e->cctx);
        free(e);
    }
}

size_t pyvmm_encoder_compress(struct pyvmm_page_encoder *e, const void *page, unsigned char *dst) {
    /* the room is the limit: a frame that does not fit is an error, and the page goes plain */
    size_t n = ZSTD_compress2(e->cctx, dst, PYVMM_COMPRESSED_MAX, page, PAGE);
    return ZSTD_isError(n) ? 0 : n;
}

int pyvmm_level_valid(int level) {
    return level != 0 && level >= ZSTD_minCLevel() && level <= ZSTD_maxCLevel();
}

/* ---- decompression ------------------------------------------------------------------------ */

static pthread_key_t dctx_key;
static pthread_once_t dctx_once = PTHREAD_ONCE_INIT;
static int dctx_key_ok;

static void dctx_free(void *dctx) { ZSTD_freeDCtx(dctx); }

static void dctx_key_make(void) { dctx_key_ok = pthread_key_create(&dctx_key, dctx_free) == 0; }

static ZSTD_DCtx *thread_dctx(void) {
    pthread_once(&dctx_once, dctx_key_make);
    if (!dctx_key_ok)
        return NULL;
    ZSTD_DCtx *d = pthread_getspecific(dctx_key);
    if (d == NULL) {
        d = ZSTD_createDCtx();
        if (d != NULL && pthread_setspecific(dctx_key, d) != 0) {
            ZSTD_freeDCtx(d);
            d = NULL;
        }
    }
    return d;
}

int pyvmm_page_inflate(const void *src, pyvmm_u64 len, void *dst) {
    if (len == 0 || len > PYVMM_COMPRESSED_MAX)
        return 1;
    ZSTD_DCtx *d = thread_dctx();
    if (d == NULL)
        return -ENOMEM;
    size_t n = ZSTD_decompressDCtx(d, dst, PAGE, src, len);
    return !ZSTD_isError(n) && n == PAGE ? 0 : 1;
}

/* ---- a run of compressed records, inflated into RAM ----------------------------------------- */

int pyvmm_inflater_init(struct pyvmm_inflater *in, int fd, u64 end) {
    memset(in, 0, sizeof *in);
    in->fd = fd;
    in->end = end;
    in->buf = malloc(INFLATE_BUFFER);
    return in->buf == NULL ? -ENOMEM : 0;
}

void pyvmm_inflater_free(struct pyvmm_inflater *in) {
    free(in->buf);
    in->buf = NULL;
}

/* Bytes [offset, offset + n) of the file (never past in->end), or NULL: *rc 0 when the stream
 * ends first, -errno when reading fails. Reads ahead a whole buffer: a run's records, and the
 * next runs' when they follow in the file, come with one pread. */
static const unsigned char *need(struct pyvmm_inflater *in, u64 offset, size_t n, int *rc) {
    *rc = 0;
    if (offset >= in->at && offset - in->at <= in->len && in->len - (offset - in->at) >= n)
        return in->buf + (offset - in->at);
    if (offset > in->end || in->end - offset < n)
        return NULL;
    size_t want = INFLATE_BUFFER;
    if (in->end - offset < want)
        want = (size_t)(in->end - offset);
    size_t got = 0;
    while (got < want) {
        ssize_t r = pread(in->fd, in->buf + got, want - got, (off_t)(offset + got));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            in->len = 0;
            *rc = -errno;
            return NULL;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    in->reads++;
    in->at = offset;
    in->len = got;
    return got >= n ? in->buf : NULL;
}

static int fail(struct pyvmm_page_read_error *err, u64 offset, u64 page, u64 found, int code) {
    err->offset = offset;
    err->page = page;
    err->found = found;
    return code;
}

int pyvmm_inflate_run(struct pyvmm_inflater *in, unsigned char *mem, u64 first, u64 npages,
                      u64 offset, u64 *claimed, int claim, struct pyvmm_page_read_error *err,
                      u64 *inflated) {
    u64 at = offset; /* the current record's be16 length */
    unsigned char scratch[PAGE]; /* without mem: pages are inflated here, only to check them */
    for (u64 k = 0; k < npages; k++) {
        u64 page = first + k;
        int rc;
        if (k > 0) { /* every record but the run's first: its header, which the index implies */
            const unsigned char *h = need(in, at, HEADER + 2, &rc);
            if (h == NULL)
                return rc ? fail(err, at, page, 0, rc) : fail(err, at, page, 0,
                                                              PYVMM_PAGEIO_TRUNCATED);
            u64 found;
            memcpy(&found, h, 8);
            found = be64toh(found);
            if (found != (page * PAGE | PYVMM_REC_COMPRESSED | FLAG_CONTINUE))
                return fail(err, at, page, found, PYVMM_PAGEIO_BAD_HEADER);
            at += HEADER;
        }
        const unsigned char *p = need(in, at, 2, &rc);
        if (p == NULL)
            return fail(err, at, page, 0, rc ? rc : PYVMM_PAGEIO_TRUNCATED);
        size_t n = (size_t)p[0] << 8 | p[1];
        if (n == 0 || n > PYVMM_COMPRESSED_MAX)
            return fail(err, at, page, n, PYVMM_PAGEIO_BAD_DATA);
        p = need(in, at, 2 + n, &rc);
        if (p == NULL)
            return fail(err, at, page, 0, rc ? rc : PYVMM_PAGEIO_TRUNCATED);
        int taken = claimed != NULL && (claimed[page / 64] >> (page % 64) & 1);
        if (!taken) {
            rc = pyvmm_page_inflate(p + 2, n, mem != NULL ? mem + page * PAGE : scratch);
            if (rc < 0)
                return fail(err, at, page, 0, rc);
            if (rc > 0)
                return fail(err, at, page, n, PYVMM_PAGEIO_BAD_DATA);
            if (inflated != NULL)
                (*inflated)++;
            if (claimed != NULL && claim)
                claimed[page / 64] |= 1ull << (page % 64);
        }
        at += 2 + n;
    }
    return 0;
}

int pyvmm_inflate_runs(int fd, void *base, pyvmm_u64 npages, const struct pyvmm_page_run *runs,
                       pyvmm_u64 nruns, pyvmm_u64 end, struct pyvmm_page_read_error *err) {
    memset(err, 0, sizeof *err);
    struct pyvmm_inflater in;
    int rc = pyvmm_inflater_init(&in, fd, end);
    if (rc)
        return rc;
    for (u64 i = 0; i < nruns && rc == 0; i++) {
        const struct pyvmm_page_run *r = &runs[i];
        err->run = i;
        if (r->kind != PYVMM_RUN_COMPRESSED)
            continue;
        if (r->npages == 0 || r->first_page > npages || r->npages > npages - r->first_page)
            rc = PYVMM_PAGEIO_RUN_OUTSIDE_BLOCK;
        else
            rc = pyvmm_inflate_run(&in, base, r->first_page, r->npages, r->data_offset, NULL, 0,
                                   err, NULL);
    }
    pyvmm_inflater_free(&in);
    return rc;
}
